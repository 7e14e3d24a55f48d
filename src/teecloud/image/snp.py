"""The SEV-SNP launch measurement of a guest image for a VM shape, through `sev-snp-measure` (PyPI, pinned),
as dstack's VMM runs it: QEMU, CPU EPYC-v4, guest features 1 (SNPActive), one VMSA per vCPU, the kernel,
initrd and command line in OVMF's SEV hash table (kernel-hashes=on).

    snp_launch_measurement(ovmf=, kernel=, initrd=, cmdline=, vcpus=) -> bytes    from the image's files
    measure_snp_image(ovmf=, kernel=, initrd=, cmdline=) -> SnpImageMeasurement   the image's SNP material
    encode_snp(m) -> bytes / parse_snp(bytes) -> SnpImageMeasurement              measurement.snp.cbor
    expected_snp_measurement(m, SnpShape) -> bytes                                from the file, for a shape
    parse_snp_shape(value) -> SnpShape           vm_config.sev_snp_measurement as dstack names its fields

The measurement file holds what dstack's `measurement.snp.cbor` holds (dstack-types SevOsImageMeasurement):
the command line, the OVMF launch digest (the GCTX after the firmware's pages), SHA-256 of the kernel and
initrd, the SEV hash table's GPA, the AP reset EIP and the firmware's SEV metadata sections; a verifier
computes the launch measurement for any vCPU count, type and guest features from it without the image. It
is encoded as deterministic CBOR parsed strictly, like measurement.tdx.cbor (teecloud's encoding, not
byte-compatible with dstack's file).

Every page-measurement step is that package's (its GCTX, VMSA and SEV hash-table code: an implementation of
the AMD SEV-SNP ABI's PAGE_INFO chain, the oracle the issue names); teecloud does not re-implement it. What
this module adds: the file, the refusal of firmware without the kernel-hashes section (the kernel would
then not be measured), bounds on hostile input, and errors a user can act on in place of the package's
exceptions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from teecloud.image.errors import ImageFormatError, MeasurementUnavailable

__all__ = [
    "DSTACK_GUEST_FEATURES",
    "DSTACK_VCPU_TYPE",
    "SNP_MEASUREMENT_FILE",
    "SnpImageMeasurement",
    "SnpSection",
    "SnpShape",
    "encode_snp",
    "expected_snp_measurement",
    "measure_snp_image",
    "parse_snp",
    "parse_snp_shape",
    "snp_launch_measurement",
]

DSTACK_VCPU_TYPE = "EPYC-v4"
DSTACK_GUEST_FEATURES = 0x1
MAX_VCPUS = 512
SNP_MEASUREMENT_FILE = "measurement.snp.cbor"
SNP_MEASUREMENT_VERSION = 1
MAX_SNP_MEASUREMENT_FILE = 8192
MAX_CMDLINE = 4096
MAX_SECTIONS = 64
MAX_MEASURED_PAGES = 1 << 18  # 1 GiB of metadata pages: one SHA-384 each (OVMF's are a few dozen)
MAX_SHAPE_DOCUMENT = 2048
_PAGE = 4096
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
# OVMF SEV metadata section types (OvmfPkg ResetVector SEV metadata; sev-snp-measure ovmf.SectionType)
SEC_MEM, SECRETS, CPUID, SVSM_CAA, KERNEL_HASHES = 1, 2, 3, 4, 0x10
_SECTION_TYPES = {SEC_MEM, SECRETS, CPUID, SVSM_CAA, KERNEL_HASHES}
_KEYS = {
    "version",
    "cmdline",
    "ovmf_hash",
    "kernel_sha256",
    "initrd_sha256",
    "hashes_table_gpa",
    "reset_eip",
    "sections",
}
# vm_config.sev_snp_measurement (dstack-mr sev.rs SnpMeasurementDocument): the launch shape, and optionally
# the image's sha256sum.txt and measurement file themselves (base64), bound to vm_config.os_image_hash
_SHAPE_KEYS = {"vcpus", "vcpu_type", "guest_features"}
_SHAPE_FILE_KEYS = {"checksum_file", "measurement"}


@dataclass(frozen=True)
class SnpSection:
    """One OVMF SEV metadata section: what the VMM pre-validates (and the PSP measures) at `gpa`."""

    gpa: int
    size: int
    section_type: int


@dataclass(frozen=True)
class SnpImageMeasurement:
    """One image's SEV-SNP measurement material (independent of the VM shape). `cmdline` is measured as
    QEMU puts it in the SEV hash table: its UTF-8 bytes and a NUL."""

    cmdline: str
    ovmf_hash: bytes
    kernel_sha256: bytes
    initrd_sha256: bytes
    hashes_table_gpa: int
    reset_eip: int
    sections: tuple[SnpSection, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.cmdline, str) or len(self.cmdline) > MAX_CMDLINE:
            raise ImageFormatError(
                f"SNP measurement: cmdline must be text of at most {MAX_CMDLINE} characters"
            )
        for name, size in (("ovmf_hash", 48), ("kernel_sha256", 32), ("initrd_sha256", 32)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ImageFormatError(f"SNP measurement: {name} must be {size} bytes")
        for name, limit in (("hashes_table_gpa", _U64), ("reset_eip", _U32)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise ImageFormatError(
                    f"SNP measurement: {name} must be a non-zero integer of at most {limit}"
                )
        if not 1 <= len(self.sections) <= MAX_SECTIONS:
            raise ImageFormatError(f"SNP measurement: 1..{MAX_SECTIONS} OVMF sections")
        pages = 0
        for s in self.sections:
            if not all(
                isinstance(v, int) and not isinstance(v, bool) for v in (s.gpa, s.size, s.section_type)
            ):
                raise ImageFormatError("SNP measurement: a section's gpa, size and type are integers")
            if s.section_type not in _SECTION_TYPES:
                raise ImageFormatError(f"SNP measurement: unknown OVMF section type {s.section_type:#x}")
            if s.gpa % _PAGE or s.size % _PAGE or not 0 < s.size or s.gpa + s.size > _U64:
                raise ImageFormatError("SNP measurement: a section is a non-empty range of whole 4 KiB pages")
            if s.section_type in (SECRETS, CPUID, KERNEL_HASHES) and s.size != _PAGE:
                raise ImageFormatError(f"SNP measurement: a type {s.section_type:#x} section is one page")
            pages += s.size // _PAGE
        if pages > MAX_MEASURED_PAGES:
            raise ImageFormatError(f"SNP measurement: more than {MAX_MEASURED_PAGES} section pages")
        hashes = [s for s in self.sections if s.section_type == KERNEL_HASHES]
        if len(hashes) != 1:
            raise MeasurementUnavailable(
                "the firmware has no single SEV kernel-hashes section: the kernel, initrd and command line "
                "would not be measured. Use OVMF built from AmdSevX64 (dstack's ovmf-sev.fd)"
            )
        if self.hashes_table_gpa & ~(_PAGE - 1) != hashes[0].gpa:
            raise ImageFormatError("SNP measurement: the SEV hash table is not in the kernel-hashes section")


@dataclass(frozen=True)
class SnpShape:
    """The launch parameters the measurement depends on beyond the image (dstack's names)."""

    vcpus: int
    vcpu_type: str = DSTACK_VCPU_TYPE
    guest_features: int = DSTACK_GUEST_FEATURES
    checksum_file: bytes | None = None  # sha256sum.txt, when vm_config carries the image's files
    measurement: bytes | None = None  # measurement.snp.cbor, likewise


def _cpu_sig(vcpu_type: str) -> int:
    from sevsnpmeasure import vcpu_types

    sig = vcpu_types.CPU_SIGS.get(vcpu_type) if isinstance(vcpu_type, str) else None
    if sig is None:
        raise ImageFormatError(
            f"unknown vCPU type {str(vcpu_type)[:40]!r} (one of: {', '.join(vcpu_types.CPU_SIGS)})"
        )
    return int(sig)


def _check_shape(vcpus: int, vcpu_type: str, guest_features: int) -> int:
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= MAX_VCPUS:
        raise ImageFormatError(f"vcpus must be in 1..{MAX_VCPUS}")
    gf = guest_features
    if not isinstance(gf, int) or isinstance(gf, bool) or not 0 < gf <= _U64 or not gf & 1:
        raise ImageFormatError("guest_features must have bit 0 (SNPActive) set and fit in 64 bits")
    return _cpu_sig(vcpu_type)


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


def measure_snp_image(*, ovmf: Path, kernel: bytes, initrd: bytes, cmdline: str) -> SnpImageMeasurement:
    """The SNP measurement material of an image's files: the firmware parsed and its pages measured by
    sev-snp-measure (its `calc_snp_ovmf_hash`, the digest dstack calls ovmf_hash)."""
    from sevsnpmeasure import guest
    from sevsnpmeasure import ovmf as ovmf_mod

    if not Path(ovmf).is_file():
        raise ImageFormatError(f"{ovmf}: no such file")
    try:
        firmware = ovmf_mod.OVMF(str(ovmf))
        sections = tuple(
            SnpSection(int(d.gpa), int(d.size), int(d.section_type_int)) for d in firmware.metadata_items()
        )
        table_gpa, reset_eip = firmware.sev_hashes_table_gpa(), firmware.sev_es_reset_eip()
        ovmf_hash = bytes(guest.calc_snp_ovmf_hash(str(ovmf)))
    except (RuntimeError, ValueError, OSError, KeyError, IndexError) as exc:
        raise ImageFormatError(f"{Path(ovmf).name}: not an SEV-SNP firmware ({exc})") from None
    if not sections:
        raise ImageFormatError(f"{Path(ovmf).name}: not an SEV-SNP firmware (no SEV metadata)")
    return SnpImageMeasurement(
        cmdline=cmdline,
        ovmf_hash=ovmf_hash,
        kernel_sha256=hashlib.sha256(kernel).digest(),
        initrd_sha256=hashlib.sha256(initrd).digest(),
        hashes_table_gpa=table_gpa,
        reset_eip=reset_eip,
        sections=sections,
    )


def encode_snp(m: SnpImageMeasurement) -> bytes:
    """Deterministic CBOR (RFC 8949 section 4.2.1: shortest forms, sorted map keys)."""
    doc = {
        "version": SNP_MEASUREMENT_VERSION,
        "cmdline": m.cmdline,
        "ovmf_hash": m.ovmf_hash,
        "kernel_sha256": m.kernel_sha256,
        "initrd_sha256": m.initrd_sha256,
        "hashes_table_gpa": m.hashes_table_gpa,
        "reset_eip": m.reset_eip,
        "sections": [[s.gpa, s.size, s.section_type] for s in m.sections],
    }
    return cbor2.dumps(doc, canonical=True)


def parse_snp(data: bytes) -> SnpImageMeasurement:
    """measurement.snp.cbor from untrusted bytes: at most MAX_SNP_MEASUREMENT_FILE bytes of deterministic
    CBOR (one value, one encoding), this version, exact keys, types and sizes."""
    if not isinstance(data, bytes) or not 1 <= len(data) <= MAX_SNP_MEASUREMENT_FILE:
        raise ImageFormatError(f"an SNP measurement file is 1..{MAX_SNP_MEASUREMENT_FILE} bytes")
    try:
        doc = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ImageFormatError(f"SNP measurement file: not CBOR ({str(exc)[:100]})") from None
    if not isinstance(doc, dict) or set(doc) != _KEYS:
        have = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise ImageFormatError(f"SNP measurement file: a map of exactly {sorted(_KEYS)}, got {have}")
    if doc["version"] != SNP_MEASUREMENT_VERSION or isinstance(doc["version"], bool):
        raise ImageFormatError(
            f"SNP measurement file: version {doc['version']!r} (this code reads version 1)"
        )
    raw = doc["sections"]
    if not isinstance(raw, list) or not all(isinstance(s, list) and len(s) == 3 for s in raw):
        raise ImageFormatError("SNP measurement file: sections is a list of [gpa, size, type]")
    m = SnpImageMeasurement(
        cmdline=doc["cmdline"],
        ovmf_hash=doc["ovmf_hash"],
        kernel_sha256=doc["kernel_sha256"],
        initrd_sha256=doc["initrd_sha256"],
        hashes_table_gpa=doc["hashes_table_gpa"],
        reset_eip=doc["reset_eip"],
        sections=tuple(SnpSection(*s) for s in raw),
    )
    if encode_snp(m) != data:
        raise ImageFormatError("SNP measurement file: not in deterministic CBOR (re-encoding differs)")
    return m


def _hashes_page(m: SnpImageMeasurement) -> bytes:
    """The kernel-hashes page QEMU fills (sev-snp-measure's SevHashes table, from the file's hashes)."""
    from sevsnpmeasure.sev_hashes import SevHashes

    table = SevHashes.__new__(SevHashes)  # its constructor reads files; the file holds their hashes
    table.kernel_hash = m.kernel_sha256
    table.initrd_hash = m.initrd_sha256
    table.cmdline_hash = hashlib.sha256(m.cmdline.encode() + b"\0").digest()
    return bytes(table.construct_page(m.hashes_table_gpa & (_PAGE - 1)))


def expected_snp_measurement(m: SnpImageMeasurement, shape: SnpShape) -> bytes:
    """The 48-byte MEASUREMENT an SNP attestation report of this image launched with this shape must carry:
    sev-snp-measure's launch-digest steps for QEMU (snp_calc_launch_digest), seeded with the file's OVMF
    digest instead of the firmware's pages."""
    from sevsnpmeasure import gctx, sev_mode, vmm_types, vmsa

    sig = _check_shape(shape.vcpus, shape.vcpu_type, shape.guest_features)
    ctx = gctx.GCTX(seed=m.ovmf_hash)
    for s in m.sections:  # (AMD SEV-SNP ABI 8.17 SNP_LAUNCH_UPDATE, page types as QEMU issues them)
        if s.section_type in (SEC_MEM, SVSM_CAA):
            ctx.update_zero_pages(s.gpa, s.size)
        elif s.section_type == SECRETS:
            ctx.update_secrets_page(s.gpa)
        elif s.section_type == CPUID:
            ctx.update_cpuid_page(s.gpa)
        else:
            ctx.update_normal_pages(s.gpa, _hashes_page(m))
    pages = vmsa.VMSA(
        sev_mode.SevMode.SEV_SNP, m.reset_eip, sig, shape.guest_features, vmm_types.VMMType.QEMU
    )
    for page in pages.pages(shape.vcpus):
        ctx.update_vmsa_page(page)
    return bytes(ctx.ld())


def _b64(value: object, name: str) -> bytes:
    import base64
    import binascii

    if not isinstance(value, str) or len(value) > MAX_SNP_MEASUREMENT_FILE * 2:
        raise ImageFormatError(f"sev_snp_measurement.{name} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageFormatError(f"sev_snp_measurement.{name} is not base64") from None


def parse_snp_shape(value: object) -> SnpShape:
    """vm_config's `sev_snp_measurement` (dstack's SnpMeasurementDocument: a JSON string, or an object):
    vcpus, vcpu_type, guest_features, and optionally checksum_file and measurement (base64 of the image's
    sha256sum.txt and measurement.snp.cbor). Unknown fields are refused."""
    if isinstance(value, str):
        if len(value) > MAX_SHAPE_DOCUMENT * 4:
            raise ImageFormatError("vm_config.sev_snp_measurement is too large")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ImageFormatError("vm_config.sev_snp_measurement is not JSON") from None
    if not isinstance(value, Mapping):
        raise ImageFormatError("vm_config.sev_snp_measurement must be an object (vcpus, vcpu_type, ...)")
    doc: Mapping[str, Any] = value
    keys = set(doc)
    if not _SHAPE_KEYS <= keys <= _SHAPE_KEYS | _SHAPE_FILE_KEYS or len(keys & _SHAPE_FILE_KEYS) == 1:
        raise ImageFormatError(
            f"vm_config.sev_snp_measurement has fields {sorted(map(str, keys))[:8]}; expected "
            f"{sorted(_SHAPE_KEYS)}, and optionally both of {sorted(_SHAPE_FILE_KEYS)}"
        )
    _check_shape(doc["vcpus"], doc["vcpu_type"], doc["guest_features"])
    files = {k: _b64(doc[k], k) for k in _SHAPE_FILE_KEYS if k in doc}
    return SnpShape(
        vcpus=doc["vcpus"],
        vcpu_type=doc["vcpu_type"],
        guest_features=doc["guest_features"],
        checksum_file=files.get("checksum_file"),
        measurement=files.get("measurement"),
    )
