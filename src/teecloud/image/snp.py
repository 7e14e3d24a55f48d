"""The SEV-SNP launch measurement of a guest image for a VM shape, through `sev-snp-measure` (PyPI, pinned),
as dstack's VMM runs it: QEMU, CPU EPYC-v4, guest features 1 (SNPActive), one VMSA per vCPU, the kernel,
initrd and command line in OVMF's SEV hash table (kernel-hashes=on).

The whole computation is that package's (an implementation of the AMD SEV-SNP ABI's page-measurement
chain, used as the oracle the issue names); teecloud does not re-implement it. What this module adds: the
refusal of firmware without the kernel-hashes section (the kernel would then not be measured), and errors a
user can act on in place of the package's exceptions.
"""

from __future__ import annotations

from pathlib import Path

from teecloud.image.errors import ImageFormatError, MeasurementUnavailable

__all__ = ["DSTACK_GUEST_FEATURES", "DSTACK_VCPU_TYPE", "snp_launch_measurement"]

DSTACK_VCPU_TYPE = "EPYC-v4"
DSTACK_GUEST_FEATURES = 0x1
MAX_VCPUS = 512


def snp_launch_measurement(
    *,
    ovmf: Path,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    vcpus: int,
    vcpu_type: str = DSTACK_VCPU_TYPE,
    guest_features: int = DSTACK_GUEST_FEATURES,
) -> bytes:
    """The 48-byte MEASUREMENT an SNP attestation report of this image and shape must carry."""
    try:
        from sevsnpmeasure import guest, sev_mode, vcpu_types
        from sevsnpmeasure import ovmf as ovmf_mod
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise MeasurementUnavailable(
            "sev-snp-measure is not installed (pip install sev-snp-measure)"
        ) from exc
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ImageFormatError(f"vcpus must be in 1..{MAX_VCPUS}")
    sig = vcpu_types.CPU_SIGS.get(vcpu_type)
    if sig is None:
        raise ImageFormatError(f"unknown vCPU type {vcpu_type!r} (one of: {', '.join(vcpu_types.CPU_SIGS)})")
    for path in (ovmf, kernel, initrd):
        if not Path(path).is_file():
            raise ImageFormatError(f"{path}: no such file")
    try:
        firmware = ovmf_mod.OVMF(str(ovmf))
        sections = list(firmware.metadata_items())
    except (RuntimeError, ValueError, OSError, KeyError, IndexError) as exc:
        raise ImageFormatError(f"{Path(ovmf).name}: not an SEV-SNP firmware ({exc})") from None
    if not sections:
        raise ImageFormatError(f"{Path(ovmf).name}: not an SEV-SNP firmware (no SEV metadata)")
    if not firmware.has_metadata_section(ovmf_mod.SectionType.SNP_KERNEL_HASHES):
        raise MeasurementUnavailable(
            f"{Path(ovmf).name} has no SEV kernel-hashes section: the kernel, initrd and command line "
            "would not be measured. Use OVMF built from AmdSevX64 (dstack's ovmf-sev.fd)"
        )
    try:
        digest = guest.calc_launch_digest(
            sev_mode.SevMode.SEV_SNP,
            vcpus,
            sig,
            str(ovmf),
            str(kernel),
            str(initrd),
            cmdline,
            guest_features,
        )
    except (RuntimeError, ValueError, OSError, KeyError, IndexError) as exc:
        raise ImageFormatError(f"cannot measure this image for SEV-SNP: {exc}") from None
    return bytes(digest)
