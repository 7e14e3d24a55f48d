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

SEV-SNP (`snp_launch`), as dstack-mr's verify_sev_launch does it: an SNP report measures no os-image-hash
event, so the image is the one vm_config names, believed only because the launch MEASUREMENT recomputed
from that image's measurement.snp.cbor and the launch shape vm_config states (`sev_snp_measurement`:
vcpus, vcpu_type, guest_features) equals the signed one. The file comes bound to os_image_hash through
sha256sum.txt, from vm_config itself (dstack's checksum_file/measurement) or from the directory. A debug
policy is refused. The Authorizer does not call it yet: app keys go only to boot-time evidence
(peer.require_boot_time), which SNP evidence cannot be, so an SNP CVM gets no keys (docs/node.md).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from teecloud import vmconfig
from teecloud.attestation.models import TeeKind, VerifiedEvidence
from teecloud.image import ImageError
from teecloud.image.measurement import (
    MAX_MEASUREMENT_FILE,
    MAX_SHA256SUM,
    MEASUREMENT_FILE,
    TdxImageMeasurement,
    acpi_digests_of,
    bind,
    bound_file,
    expected_tdx_registers,
)
from teecloud.image.snp import (
    MAX_SNP_MEASUREMENT_FILE,
    SNP_MEASUREMENT_FILE,
    SnpImageMeasurement,
    SnpShape,
    expected_snp_measurement,
    parse_snp,
    parse_snp_shape,
)
from teecloud.image.tdx import replay, rtmr1_events_of
from teecloud.kms.errors import AccessDenied

__all__ = ["SHA256SUM_FILE", "MeasuredOsImages", "SnpLaunch"]

SHA256SUM_FILE = "sha256sum.txt"
MAX_CACHED_IMAGES = 256


@dataclass(frozen=True)
class SnpLaunch:
    """An SEV-SNP launch whose MEASUREMENT is OS image `os_image_hash`'s for `shape`."""

    os_image_hash: bytes
    shape: SnpShape
    expected: bytes


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

    def snp_launch(self, evidence: VerifiedEvidence, vm_config: object) -> SnpLaunch:
        """The OS-image step for SEV-SNP evidence (module docstring). Raises AccessDenied(step os_image)
        naming the failing link:
        (1) SNP evidence, debug policy off; (2) vm_config and its sev_snp_measurement parsed strictly, its
        vcpus the vm_config's cpu_count; (3) the image's measurement.snp.cbor bound to vm_config's
        os_image_hash; (4) the recomputed MEASUREMENT equal to the signed one.

        Not called by any key-releasing endpoint: a launch check says which image was launched, not that
        the report was made at boot, and no SNP report field can say that (docs/threat-model.md, "SEV-SNP
        and key release"); SNP evidence stays refused by peer.require_boot_time."""

        def deny(reason: str) -> AccessDenied:
            return AccessDenied(reason, step="os_image")

        # (1)
        if evidence.kind is not TeeKind.SNP:
            raise deny(f"{evidence.tee} evidence has no SEV-SNP launch measurement")
        if evidence.debug:
            raise deny(
                "the SEV-SNP guest policy allows debugging (bit 19): its memory is readable by the host"
            )
        quoted = evidence.measurements.get("measurement")
        if not isinstance(quoted, bytes) or len(quoted) != 48:
            raise deny("the SEV-SNP evidence carries no 48-byte MEASUREMENT")
        # (2)
        try:
            config = vmconfig.parse(vm_config)
        except vmconfig.VmConfigError as exc:
            raise deny(str(exc)) from None
        image = config.os_image_hash.hex()
        if "sev_snp_measurement" not in config.extra:
            raise deny("vm_config has no sev_snp_measurement (vcpus, vcpu_type, guest_features)")
        try:
            shape = parse_snp_shape(config.extra["sev_snp_measurement"])
        except ImageError as exc:
            raise deny(str(exc)) from None
        if shape.vcpus != config.cpu_count:
            raise deny(
                f"vm_config states {config.cpu_count} CPUs but sev_snp_measurement {shape.vcpus} vCPUs"
            )
        # (3)
        try:
            if shape.checksum_file is not None and shape.measurement is not None:
                m = parse_snp(
                    bound_file(
                        config.os_image_hash, shape.checksum_file, SNP_MEASUREMENT_FILE, shape.measurement
                    )
                )
            else:
                found = self.snp_measurement(config.os_image_hash)
                if found is None:
                    raise deny(f"no SEV-SNP reference measurements for OS image {image}")
                m = found
            # (4)
            expected = expected_snp_measurement(m, shape)
        except ImageError as exc:
            raise deny(f"OS image {image}: cannot compute the SEV-SNP reference ({exc})") from None
        if expected != quoted:
            raise deny(
                f"the SEV-SNP MEASUREMENT is not OS image {image}'s reference value for {shape.vcpus} "
                f"{shape.vcpu_type} vCPUs and guest features {shape.guest_features:#x} (another image, "
                "firmware, kernel, initrd, command line or launch shape booted)"
            )
        return SnpLaunch(config.os_image_hash, shape, expected)

    def snp_measurement(self, os_image_hash: bytes) -> SnpImageMeasurement | None:
        """The image's measurement.snp.cbor from the directory, bound to its hash; None when the directory
        has no such image. Raises ImageError when its files do not bind."""
        image_dir = self.directory / os_image_hash.hex()
        if len(os_image_hash) != 32 or not image_dir.is_dir():
            return None
        try:
            sums = _read(image_dir / SHA256SUM_FILE, MAX_SHA256SUM)
            data = _read(image_dir / SNP_MEASUREMENT_FILE, MAX_SNP_MEASUREMENT_FILE)
        except OSError as exc:
            raise ImageError(f"its SEV-SNP measurement files are unusable ({exc.strerror or exc})") from None
        return parse_snp(bound_file(os_image_hash, sums, SNP_MEASUREMENT_FILE, data))


def _read(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file. Opened without blocking and checked on the open descriptor:
    a FIFO (or a device) in the image directory would otherwise hang the KMS's worker thread."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, f"{path.name} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(0, f"{path.name} is larger than {limit} bytes")
    return data
