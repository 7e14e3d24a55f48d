"""The guest's TEE factory: which `TeePlatform` a CVM's own agent uses, from the mode the host states.

Two factories, one per side of the VM boundary (issue 20):
    teecloud.tee.detect()        the HOST's (a node, a KMS, a gateway on its own machine): what this process
                                 runs in, or TEECLOUD_TEE
    guest_tee(mode, paths)       the GUEST's (teecloud.agent.vm_agent inside a qemu-backend VM): the mode the
                                 host wrote in the host-shared `.sys-config.json` (`tee_mode`; `guest_mode`)

    tdx      TdxPlatform: quotes through configfs-tsm (provider tdx_guest), RTMR3 through the tdx_guest sysfs
             measurement registers (`measurements/rtmr3:sha384`, the interface TdxPlatform.extend_rtmr uses)
    sev-snp  SevSnpPlatform: reports through configfs-tsm (provider sev_guest)
    plain    SimulatedTdx over the host-shared `simulated-tee/` state: labelled simulated, NOT confidential

A mode whose device is absent is refused (TeeUnavailable naming what is missing): never a fallback to the
simulated TEE. The host's word picks only which interface the guest opens; what a verifier believes still
comes from the evidence (a host that says `plain` on TDX hardware gets simulated quotes, which production
verifiers refuse; one that says `tdx` in a VM without TDX gets no boot).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from teecloud.tee.base import TeePlatform
from teecloud.tee.configfs import DEFAULT_TSM_REPORT_ROOT, TsmFs, tsm_provider
from teecloud.tee.errors import TeeUnavailable, TeeUsageError
from teecloud.tee.sev_snp import TSM_PROVIDER_SNP, SevSnpPlatform
from teecloud.tee.sysconfig import SysConfig
from teecloud.tee.tdx import (
    DEFAULT_CCEL,
    DEFAULT_DEVICE,
    DEFAULT_EVENT_LOG,
    DEFAULT_MEASUREMENTS_DIR,
    TSM_PROVIDER_TDX,
    TdxPlatform,
)

__all__ = ["GUEST_MODES", "GuestMode", "GuestTeePaths", "guest_mode", "guest_tee", "tee_label"]

GuestMode = Literal["tdx", "sev-snp", "plain"]
GUEST_MODES: tuple[GuestMode, ...] = ("tdx", "sev-snp", "plain")
SIMULATED_TEE_DIR = "simulated-tee"

_LABELS = {
    "tdx": "tdx (configfs-tsm quotes, RTMR3 through tdx_guest sysfs)",
    "sev-snp": "sev-snp (configfs-tsm reports)",
    "plain": "simulated TDX (plain mode: NOT confidential; teecloud.tee.simulated)",
}


@dataclass(frozen=True)
class GuestTeePaths:
    """Where the guest finds its TEE's interfaces (the kernel's paths by default; tests point them at a
    fake tree)."""

    share: Path = Path("/dstack/.host-shared")  # the host-shared files (read-only)
    run: Path = Path("/run/teecloud")  # the guest's tmpfs state
    tsm_root: Path = DEFAULT_TSM_REPORT_ROOT
    tdx_device: Path = DEFAULT_DEVICE
    tdx_measurements: Path = DEFAULT_MEASUREMENTS_DIR
    ccel: Path = DEFAULT_CCEL
    event_log: Path = DEFAULT_EVENT_LOG


def tee_label(mode: str) -> str:
    """What the guest's `/info` says its TEE is (plain: labelled simulated)."""
    if mode not in _LABELS:
        raise TeeUsageError(f"unknown TEE mode {mode!r} (one of: {', '.join(GUEST_MODES)})")
    return _LABELS[mode]


def guest_mode(config: SysConfig | None) -> GuestMode:
    """The mode the host states in `.sys-config.json` (`tee_mode`); a share without one is refused."""
    if config is None:
        raise TeeUnavailable("no .sys-config.json in the host share: the guest cannot tell its TEE mode")
    if not config.tee_mode:
        raise TeeUnavailable(
            ".sys-config.json states no tee_mode (tdx, sev-snp or plain): refusing to guess the guest's TEE"
        )
    for mode in GUEST_MODES:
        if config.tee_mode == mode:
            return mode
    raise TeeUsageError(f"unknown TEE mode {config.tee_mode!r} (one of: {', '.join(GUEST_MODES)})")


def _require_provider(paths: GuestTeePaths, mode: str, wanted: str, fs: TsmFs | None) -> None:
    provider = tsm_provider(paths.tsm_root, fs)
    if provider is None:
        raise TeeUnavailable(
            f"mode {mode}: configfs-tsm ({paths.tsm_root}) is absent or gives no provider; this VM has no "
            f"{mode} guest interface (refusing to boot: there is no fallback to the simulated TEE)"
        )
    if provider != wanted:
        raise TeeUnavailable(
            f"mode {mode}: configfs-tsm's provider is {provider!r}, not {wanted!r} (this VM is not a {mode} "
            "guest; refusing to boot)"
        )


def guest_tee(mode: str, paths: GuestTeePaths | None = None, *, fs: TsmFs | None = None) -> TeePlatform:
    """The TEE of a guest in `mode` (see the module docstring). Raises TeeUnavailable when the mode's
    interface is absent, TeeUsageError for an unknown mode."""
    paths = paths or GuestTeePaths()
    sys_config = paths.share / ".sys-config.json"
    if mode == "tdx":
        # (1) quotes: configfs-tsm with the tdx_guest provider (the QGS path of /dev/tdx_guest is the
        # TdxPlatform's fallback on kernels without it)
        if paths.tsm_root.is_dir():
            _require_provider(paths, mode, TSM_PROVIDER_TDX, fs)
        elif not paths.tdx_device.exists():
            raise TeeUnavailable(
                f"mode tdx: neither configfs-tsm ({paths.tsm_root}) nor {paths.tdx_device} exists; this VM "
                "is not a TD (refusing to boot: there is no fallback to the simulated TEE)"
            )
        # (2) RTMR3: the boot measures the app into it, so the register must be extendable
        rtmr3 = paths.tdx_measurements / "rtmr3:sha384"
        if not rtmr3.exists():
            raise TeeUnavailable(
                f"mode tdx: {rtmr3} does not exist (RTMR3 is extended through the tdx_guest sysfs "
                "measurement registers, Linux >= 6.16); refusing to boot"
            )
        return TdxPlatform(
            tsm_root=paths.tsm_root,
            measurements_dir=paths.tdx_measurements,
            device=paths.tdx_device,
            ccel_path=paths.ccel,
            event_log_path=paths.event_log,
            fs=fs,
            sys_config=sys_config,
        )
    if mode == "sev-snp":
        _require_provider(paths, mode, TSM_PROVIDER_SNP, fs)
        return SevSnpPlatform(tsm_root=paths.tsm_root, fs=fs, sys_config=sys_config)
    if mode == "plain":
        from teecloud.tee.simulated import SimulatedTdx

        state = paths.share / SIMULATED_TEE_DIR
        if not state.is_dir():
            raise TeeUnavailable(
                f"mode plain: the host shared no {SIMULATED_TEE_DIR}/ (the simulated TEE's state); "
                "refusing to boot"
            )
        home = paths.run / "home"
        # copied: the simulated TEE writes collateral, and the share is read-only
        shutil.copytree(state, home / SIMULATED_TEE_DIR, dirs_exist_ok=True)
        return SimulatedTdx(home)
    raise TeeUsageError(f"unknown TEE mode {mode!r} (one of: {', '.join(GUEST_MODES)})")
