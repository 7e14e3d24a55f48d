"""teecloud.tee: produce TEE evidence (quotes, RTMR extension, event log) on the platform we run on.

Backends implement `teecloud.tee.base.TeePlatform`:
    SimulatedTdx     real DCAP v4 quotes under a local development root CA (no hardware; dev/CI only)
    TdxPlatform      Intel TDX guest: configfs-tsm, /dev/tdx_guest + QGS fallback, sysfs RTMRs
    SevSnpPlatform   AMD SEV-SNP guest: configfs-tsm
Two factories (issue 20): `detect()` is the HOST's (what this process runs in; `TEECLOUD_TEE=simulated|tdx|
sev_snp` forces the choice); `guest_tee(mode, paths)` (teecloud.tee.guest) is the GUEST agent's, from the
mode the host states in `.sys-config.json`, refusing a mode whose device is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

from teecloud.tee.base import TeePlatform
from teecloud.tee.configfs import DEFAULT_TSM_REPORT_ROOT, TsmFs, tsm_provider
from teecloud.tee.errors import (
    QuoteGenerationError,
    SimulatedTeeStateError,
    TeeError,
    TeeUnavailable,
    TeeUsageError,
)
from teecloud.tee.guest import GUEST_MODES, GuestTeePaths, guest_mode, guest_tee
from teecloud.tee.sev_snp import SevSnpPlatform
from teecloud.tee.simulated import SimulatedTdx
from teecloud.tee.tdx import TdxPlatform

__all__ = [
    "ENV_VAR",
    "GUEST_MODES",
    "GuestTeePaths",
    "QuoteGenerationError",
    "SevSnpPlatform",
    "SimulatedTdx",
    "SimulatedTeeStateError",
    "TdxPlatform",
    "TeeError",
    "TeePlatform",
    "TeeUnavailable",
    "TeeUsageError",
    "detect",
    "guest_mode",
    "guest_tee",
]

ENV_VAR = "TEECLOUD_TEE"
_CHOICES = ("simulated", "tdx", "sev_snp")


def detect(
    *,
    home: Path | None = None,
    tsm_root: Path = DEFAULT_TSM_REPORT_ROOT,
    tdx_device: Path = Path("/dev/tdx_guest"),
    sev_device: Path = Path("/dev/sev-guest"),
    fs: TsmFs | None = None,
) -> TeePlatform:
    """The TEE this process runs in.

    1. `TEECLOUD_TEE` (simulated | tdx | sev_snp) forces a backend;
    2. else the configfs-tsm provider (tdx_guest / sev_guest);
    3. else the guest device (/dev/tdx_guest, /dev/sev-guest);
    4. else TeeUnavailable, suggesting TEECLOUD_TEE=simulated for development.
    """
    forced = os.environ.get(ENV_VAR, "").strip().lower().replace("-", "_")
    if forced:
        if forced in ("simulated", "tdx_simulated", "sim"):
            return SimulatedTdx(home)
        if forced == "tdx":
            return TdxPlatform(tsm_root=tsm_root, device=tdx_device, fs=fs)
        if forced in ("sev_snp", "snp"):
            return SevSnpPlatform(tsm_root=tsm_root, fs=fs)
        raise TeeUsageError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not one of {', '.join(_CHOICES)}")
    provider = tsm_provider(tsm_root, fs)
    if provider == "tdx_guest":
        return TdxPlatform(tsm_root=tsm_root, device=tdx_device, fs=fs)
    if provider == "sev_guest":
        return SevSnpPlatform(tsm_root=tsm_root, fs=fs)
    if Path(tdx_device).exists():
        return TdxPlatform(tsm_root=tsm_root, device=tdx_device, fs=fs)
    if Path(sev_device).exists():
        if not Path(tsm_root).is_dir():
            raise TeeUnavailable(
                f"{sev_device} exists but configfs-tsm ({tsm_root}) does not; teecloud needs configfs-tsm "
                f"(Linux >= 6.7) for SEV-SNP reports"
            )
        return SevSnpPlatform(tsm_root=tsm_root, fs=fs)
    hint = f" (configfs-tsm provider {provider!r} is not supported)" if provider else ""
    raise TeeUnavailable(
        f"no TEE found: no configfs-tsm provider, {tdx_device} or {sev_device}{hint}. To develop without "
        f"TEE hardware, set {ENV_VAR}=simulated (quotes are then signed by a local development root and "
        f"rejected by default verifiers)."
    )
