"""Reference measurements of real OS images for the KMS's OS-image step (an `authz.OsImageReference`), from
their measurement files (teecloud.image.measurement), as dstack's lite verification computes them:

    the os-image-hash the CVM measured (allowed on chain: KmsAuth)
      -> <directory>/<os_image_hash hex>/sha256sum.txt, whose sha256 must be that hash (dstack's digest.txt)
      -> the measurement.tdx.cbor it lists (its sha256 must match)
      -> MRTD and RTMR0-2 for the caller's vm_config (QEMU version, memory size), RTMR0's ACPI events
         taken from the caller's quote-replayed RTMR0 log
      -> compared with the quote by the Authorizer (a mismatch is refused, the registers named).

The directory holds untrusted copies: each file is believed only through the hash chain above, so anyone
may fill it (an image publisher, a download cache). What is trusted: the on-chain allowlist of
os_image_hash, and — as in dstack's lite mode — the ACPI tables' digests as the CVM's own log states them
(the log replays to the quoted RTMR0, but no reference says which tables they must be; docs/threat-model.md).

Without a VM shape (every attested caller, KMS onboarding included) MRTD is QEMU >= 9's candidate (single
pass) and RTMR1/RTMR2 are the image's; with the shape (GetAppKey, SignCert) all four registers are
computed for the stated vm_config.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from teecloud import vmconfig
from teecloud.image import ImageError
from teecloud.image.measurement import (
    MAX_MEASUREMENT_FILE,
    MAX_SHA256SUM,
    MEASUREMENT_FILE,
    TdxImageMeasurement,
    acpi_digests_of,
    bind,
    expected_tdx_registers,
)
from teecloud.image.tdx import replay, rtmr1_events_of
from teecloud.kms.errors import AccessDenied

__all__ = ["SHA256SUM_FILE", "MeasuredOsImages"]

SHA256SUM_FILE = "sha256sum.txt"
MAX_CACHED_IMAGES = 256


class MeasuredOsImages:
    """`ref(os_image_hash, *, cpu_count, memory_size, vm_config, rtmr0_log)` over a directory of images'
    measurement files. None for an image the directory does not hold; AccessDenied (step os_image) for one
    whose files do not bind to its hash or whose registers cannot be computed for the stated shape."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[bytes, TdxImageMeasurement] = {}
        self._lock = threading.Lock()

    def __call__(
        self,
        os_image_hash: bytes,
        *,
        cpu_count: int | None = None,
        memory_size: int | None = None,
        vm_config: vmconfig.VmConfig | None = None,
        rtmr0_log: Sequence[bytes] = (),
    ) -> Mapping[str, bytes] | None:
        m = self.measurement(os_image_hash)
        if m is None:
            return None
        if cpu_count is None and memory_size is None and vm_config is None:
            return {
                "mrtd": m.mrtd_single_pass,
                "rtmr1": replay(rtmr1_events_of(m.kernel_authenticode)),
                "rtmr2": replay([m.cmdline_sha384, m.initrd_sha384]),
            }
        if vm_config is None:
            if cpu_count is None or memory_size is None:
                raise AccessDenied("a VM shape needs both cpu_count and memory_size", step="os_image")
            vm_config = vmconfig.VmConfig(os_image_hash, cpu_count, memory_size)
        try:
            expected = expected_tdx_registers(m, vm_config, acpi_digests_of(rtmr0_log))
        except ImageError as exc:
            raise AccessDenied(
                f"OS image {os_image_hash.hex()}: cannot compute the reference for this CVM ({exc})",
                step="os_image",
            ) from None
        return expected.registers()

    def measurement(self, os_image_hash: bytes) -> TdxImageMeasurement | None:
        """The image's measurement file, bound to its hash; None when the directory has no such image."""
        if not isinstance(os_image_hash, bytes) or len(os_image_hash) != 32:
            return None
        with self._lock:
            cached = self._cache.get(os_image_hash)
        if cached is not None:
            return cached
        image_dir = self.directory / os_image_hash.hex()
        if not image_dir.is_dir():
            return None
        try:
            sums = _read(image_dir / SHA256SUM_FILE, MAX_SHA256SUM)
            data = _read(image_dir / MEASUREMENT_FILE, MAX_MEASUREMENT_FILE)
            m = bind(os_image_hash, sums, data)
        except (ImageError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise AccessDenied(
                f"OS image {os_image_hash.hex()}: its measurement files are unusable ({reason})",
                step="os_image",
            ) from None
        with self._lock:
            if len(self._cache) >= MAX_CACHED_IMAGES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[os_image_hash] = m  # content-addressed: a bound file never changes meaning
        return m


def _read(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(0, f"{path.name} is larger than {limit} bytes")
    return data
