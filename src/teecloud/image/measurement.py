"""The compact per-image TDX measurement file (`measurement.tdx.cbor`): what a verifier needs to compute an
image's MRTD and RTMR0-2 for a CVM's `vm_config` without the image's files — the content of dstack's "lite"
measurement document (dstack-mr tdx.rs; shared/reference/dstack-vmm.md section 3), in teecloud's own CBOR
encoding (RFC 8949, deterministic: it is not byte-compatible with dstack's file).

    measure_tdx_image(kernel=, initrd=, cmdline=, tdvf=) -> TdxImageMeasurement
    encode(m) -> bytes / parse(bytes) -> TdxImageMeasurement       strict: exact keys, types and sizes
    expected_tdx_registers(m, vm_config, acpi) -> ExpectedRegisters  MRTD, RTMR0-2 and their events
    acpi_digests_of(rtmr0_log) -> AcpiDigests                      the ACPI events of a replayed RTMR0 log
    bind(os_image_hash, sha256sum_txt, measurement) -> TdxImageMeasurement   the file, once shown to be
                                                                   that image's (bound_file: any listed file)

What lite verification trusts (as dstack's does): the three ACPI digests are taken from the CVM's own RTMR0
event log (the log replays to the quoted RTMR0, so they are what the firmware measured, but nothing says
which tables they are); everything else in RTMR0 (TD HOB, firmware variables, boot order) and all of MRTD,
RTMR1 and RTMR2 are recomputed. The kernel hash is computed once for QEMU's layout with 2 GiB of RAM below
4 GiB, so only CVMs with exactly 2 GiB or at least 2.75 GiB of RAM can be checked (their patched kernels
are identical); other sizes are refused.

Pure functions of bytes: no I/O. Hostile or malformed input raises ImageFormatError with a reason.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from teecloud import vmconfig
from teecloud.image.errors import ImageFormatError, MeasurementUnavailable
from teecloud.image.ovmf import SECURE_BOOT_VARIABLES, SecureBootVariable, secure_boot_variable
from teecloud.image.tdx import (
    AcpiDigests,
    authenticode_sha384,
    mrtd,
    qemu_patch_kernel,
    replay,
    rtmr0_events,
    rtmr1_events_of,
    rtmr2_events,
    sha384,
    td_hob,
    td_hob_witness,
)

__all__ = [
    "MEASUREMENT_FILE",
    "MEASUREMENT_VERSION",
    "ExpectedRegisters",
    "TdxImageMeasurement",
    "acpi_digests_of",
    "bind",
    "bound_file",
    "encode",
    "expected_tdx_registers",
    "measure_tdx_image",
    "parse",
]

MEASUREMENT_FILE = "measurement.tdx.cbor"
# version 1: dstack's firmware (SecureBoot logged absent); version 2 adds `secure_boot`, what the image's
# firmware logs for the SecureBoot variable (teecloud.image.ovmf). A file is written in the lowest version
# that states its content, so one content has one encoding and version-1 files keep their bytes.
MEASUREMENT_VERSION = 2
MAX_MEASUREMENT_FILE = 8192
MAX_SHA256SUM = 64 * 1024
OVMF_VARIANT = "pre202505"  # the 13-event RTMR0 layout (teecloud.image.tdx.rtmr0_events)
# The RAM the kernel hash is computed for: from 2.75 GiB QEMU's q35 keeps 2 GiB below 4 GiB, exactly what a
# 2 GiB VM has, so the patched kernel (its initrd address) is the same for both (dstack-mr kernel.rs).
KERNEL_HASH_MEMORY = 0xB0000000
_TWO_GIB = 2 << 30
_RTMR0_EVENTS = 13
_ACPI_AT = slice(8, 11)  # the loader, RSDP and tables events in RTMR0's log order
_KEYS = {
    "version",
    "ovmf_variant",
    "cmdline_sha384",
    "kernel_authenticode",
    "initrd_sha384",
    "mrtd",
    "td_hob_witness",
}
_KEYS_V2 = _KEYS | {"secure_boot"}
_MRTD_KEYS = {"single_pass", "two_pass"}


@dataclass(frozen=True)
class TdxImageMeasurement:
    """One image's TDX measurement material. `cmdline_sha384` is RTMR2's first event: the command line QEMU
    passes (-append) with OVMF's " initrd=initrd", as UTF-16LE (teecloud.image.tdx.rtmr2_events)."""

    cmdline_sha384: bytes
    kernel_authenticode: bytes
    initrd_sha384: bytes
    mrtd_single_pass: bytes
    mrtd_two_pass: bytes
    td_hob_witness: bytes
    # what the image's firmware logs for SecureBoot in RTMR0 (teecloud.image.ovmf.secure_boot_variable)
    secure_boot: SecureBootVariable = "absent"

    def __post_init__(self) -> None:
        if self.secure_boot not in SECURE_BOOT_VARIABLES:
            raise ImageFormatError(
                f"measurement file: secure_boot must be one of {', '.join(SECURE_BOOT_VARIABLES)}"
            )
        for name in (
            "cmdline_sha384",
            "kernel_authenticode",
            "initrd_sha384",
            "mrtd_single_pass",
            "mrtd_two_pass",
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 48:
                raise ImageFormatError(f"measurement file: {name} must be 48 bytes (SHA-384)")
        if not isinstance(self.td_hob_witness, bytes):
            raise ImageFormatError("measurement file: td_hob_witness must be bytes")
        td_hob(self.td_hob_witness, KERNEL_HASH_MEMORY)  # well-formed, or ImageFormatError


@dataclass(frozen=True)
class ExpectedRegisters:
    """The registers a TD booted from an image with a given vm_config must quote, with their events."""

    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    events: Mapping[str, tuple[bytes, ...]]
    two_pass: bool

    def registers(self) -> dict[str, bytes]:
        return {"mrtd": self.mrtd, "rtmr0": self.rtmr0, "rtmr1": self.rtmr1, "rtmr2": self.rtmr2}


def measure_tdx_image(*, kernel: bytes, initrd: bytes, cmdline: str, tdvf: bytes) -> TdxImageMeasurement:
    """The measurement material of an image's files (dstack-mr's, for the same files), with what this
    firmware logs for SecureBoot (detected from the firmware file: teecloud.image.ovmf)."""
    patched = qemu_patch_kernel(kernel, initrd_size=len(initrd), memory_bytes=KERNEL_HASH_MEMORY)
    return TdxImageMeasurement(
        cmdline_sha384=rtmr2_events(cmdline, b"")[0],
        kernel_authenticode=authenticode_sha384(patched, pad_to_8=True),
        initrd_sha384=sha384(initrd),
        mrtd_single_pass=mrtd(tdvf, two_pass=False),
        mrtd_two_pass=mrtd(tdvf, two_pass=True),
        td_hob_witness=td_hob_witness(tdvf),
        secure_boot=secure_boot_variable(tdvf),
    )


def encode(m: TdxImageMeasurement) -> bytes:
    """Deterministic CBOR (RFC 8949 section 4.2.1: shortest forms, sorted map keys), version 1 for dstack's
    firmware layout (SecureBoot absent), else version 2 with `secure_boot`."""
    doc: dict[str, Any] = {
        "version": 1 if m.secure_boot == "absent" else MEASUREMENT_VERSION,
        "ovmf_variant": OVMF_VARIANT,
        "cmdline_sha384": m.cmdline_sha384,
        "kernel_authenticode": m.kernel_authenticode,
        "initrd_sha384": m.initrd_sha384,
        "mrtd": {"single_pass": m.mrtd_single_pass, "two_pass": m.mrtd_two_pass},
        "td_hob_witness": m.td_hob_witness,
    }
    if m.secure_boot != "absent":
        doc["secure_boot"] = m.secure_boot
    return cbor2.dumps(doc, canonical=True)


def _map(value: object, keys: set[str], what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        have = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
        raise ImageFormatError(
            f"measurement file: {what} must be a map of exactly {sorted(keys)}, got {have}"
        )
    return value


def parse(data: bytes) -> TdxImageMeasurement:
    """A measurement file from untrusted bytes: at most MAX_MEASUREMENT_FILE bytes of deterministic CBOR
    (so one value has one encoding: no duplicate keys, no tags, no trailing bytes), the version and
    layout this code computes, exact keys and field sizes."""
    if not isinstance(data, bytes) or not 1 <= len(data) <= MAX_MEASUREMENT_FILE:
        raise ImageFormatError(f"a measurement file is 1..{MAX_MEASUREMENT_FILE} bytes")
    try:
        doc = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ImageFormatError(f"measurement file: not CBOR ({str(exc)[:100]})") from None
    if not isinstance(doc, dict):
        _map(doc, _KEYS, "the document")  # raises: names the expected keys
    version = doc.get("version")
    if version not in (1, 2) or isinstance(version, bool):
        raise ImageFormatError(f"measurement file: version {version!r} (this code reads versions 1 and 2)")
    top = _map(doc, _KEYS if version == 1 else _KEYS_V2, "the document")
    secure_boot = top.get("secure_boot", "absent")
    if version == 2 and secure_boot not in SECURE_BOOT_VARIABLES[1:]:
        raise ImageFormatError(
            f"measurement file: secure_boot {secure_boot!r} in version 2 (one of "
            f"{', '.join(SECURE_BOOT_VARIABLES[1:])}; dstack's 'absent' is version 1)"
        )
    if top["ovmf_variant"] != OVMF_VARIANT:
        raise ImageFormatError(
            f"measurement file: OVMF variant {top['ovmf_variant']!r} (only {OVMF_VARIANT!r}'s RTMR0 layout)"
        )
    candidates = _map(top["mrtd"], _MRTD_KEYS, "mrtd")
    m = TdxImageMeasurement(
        cmdline_sha384=top["cmdline_sha384"],
        kernel_authenticode=top["kernel_authenticode"],
        initrd_sha384=top["initrd_sha384"],
        mrtd_single_pass=candidates["single_pass"],
        mrtd_two_pass=candidates["two_pass"],
        td_hob_witness=top["td_hob_witness"],
        secure_boot=secure_boot,
    )
    if encode(m) != data:
        raise ImageFormatError("measurement file: not in deterministic CBOR (re-encoding differs)")
    return m


def acpi_digests_of(rtmr0_log: Sequence[bytes]) -> AcpiDigests:
    """The ACPI loader, RSDP and tables digests of a TD's RTMR0 event log (the quote-replayed digests, in
    order). A log of another length is another firmware layout: refused."""
    if len(rtmr0_log) != _RTMR0_EVENTS:
        raise MeasurementUnavailable(
            f"the RTMR0 event log has {len(rtmr0_log)} events, not the {_RTMR0_EVENTS} of the "
            f"{OVMF_VARIANT} firmware layout: its ACPI events cannot be located"
        )
    return AcpiDigests(*rtmr0_log[_ACPI_AT])


def _two_pass(config: vmconfig.VmConfig) -> bool:
    """QEMU 8 adds all of a section's pages before extending them; QEMU >= 9 interleaves (dstack-mr assumes
    9.1 when vm_config does not say)."""
    version = config.extra.get("qemu_version", "9.1.0")
    m = re.fullmatch(r"(\d{1,3})\.\d{1,3}(?:\.\d{1,3})?", version) if isinstance(version, str) else None
    if m is None:
        raise MeasurementUnavailable(f"vm_config.qemu_version {str(version)[:32]!r} is not a QEMU version")
    major = int(m.group(1))
    if major < 8:
        raise MeasurementUnavailable(f"QEMU {version} predates upstream TDX launch support (8 or later)")
    return major == 8


def expected_tdx_registers(
    m: TdxImageMeasurement, config: vmconfig.VmConfig, acpi: AcpiDigests
) -> ExpectedRegisters:
    """MRTD and RTMR0-2 a TD of this image and vm_config must quote, given RTMR0's ACPI digests."""
    memory = config.memory_size
    if memory != _TWO_GIB and memory < KERNEL_HASH_MEMORY:
        raise MeasurementUnavailable(
            f"a measurement file fixes the kernel hash for 2 GiB or >= 2.75 GiB of RAM; vm_config has "
            f"{memory} bytes (QEMU places the initrd, and so patches the kernel, by the RAM below 4 GiB)"
        )
    two_pass = _two_pass(config)
    r0 = rtmr0_events(sha384(td_hob(m.td_hob_witness, memory)), acpi, secure_boot=m.secure_boot)
    r1 = rtmr1_events_of(m.kernel_authenticode)
    r2 = [m.cmdline_sha384, m.initrd_sha384]
    return ExpectedRegisters(
        mrtd=m.mrtd_two_pass if two_pass else m.mrtd_single_pass,
        rtmr0=replay(r0),
        rtmr1=replay(r1),
        rtmr2=replay(r2),
        events={"rtmr0": tuple(r0), "rtmr1": tuple(r1), "rtmr2": tuple(r2)},
        two_pass=two_pass,
    )


_SUM_LINE = re.compile(r"([0-9a-f]{64})  ([A-Za-z0-9._-]{1,128})")


def bind(os_image_hash: bytes, sha256sum_txt: bytes, measurement: bytes) -> TdxImageMeasurement:
    """The image's measurement file, once shown to belong to `os_image_hash` as dstack binds them:
    os_image_hash = sha256(sha256sum.txt) (digest.txt), and sha256sum.txt lists sha256 of
    measurement.tdx.cbor. Raises ImageFormatError naming the broken link."""
    return parse(bound_file(os_image_hash, sha256sum_txt, MEASUREMENT_FILE, measurement))


def bound_file(os_image_hash: bytes, sha256sum_txt: bytes, name: str, data: bytes) -> bytes:
    """`data`, once shown to be the file `name` of OS image `os_image_hash`: sha256(sha256sum.txt) is the
    hash, and sha256sum.txt lists `name` with sha256(data). Raises ImageFormatError naming the broken
    link."""
    if len(os_image_hash) != 32:
        raise ImageFormatError("an os_image_hash is 32 bytes")
    if len(sha256sum_txt) > MAX_SHA256SUM:
        raise ImageFormatError(f"sha256sum.txt is larger than {MAX_SHA256SUM} bytes")
    if hashlib.sha256(sha256sum_txt).digest() != os_image_hash:
        raise ImageFormatError(f"sha256sum.txt is not OS image {os_image_hash.hex()}'s (its sha256 differs)")
    try:
        text = sha256sum_txt.decode("ascii")
    except UnicodeDecodeError:
        raise ImageFormatError("sha256sum.txt is not ASCII") from None
    # lines as sha256sum(1) splits them: at "\n" only (str.splitlines would also split at \r, \v, \f and
    # \x1c-\x1e, showing the KMS an entry that `sha256sum -c` reads as part of another name); no other
    # control character anywhere
    if any((ord(c) < 0x20 and c != "\n") or ord(c) == 0x7F for c in text):
        raise ImageFormatError("sha256sum.txt holds a control character (only \\n ends a line)")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    listed: dict[str, str] = {}
    for line in lines:
        match = _SUM_LINE.fullmatch(line)
        if match is None or match.group(2) in listed:
            raise ImageFormatError(f"sha256sum.txt: malformed or repeated line {line[:80]!r}")
        listed[match.group(2)] = match.group(1)
    if name not in listed:
        raise ImageFormatError(f"OS image {os_image_hash.hex()} lists no {name}")
    if hashlib.sha256(data).hexdigest() != listed[name]:
        raise ImageFormatError(f"{name} is not the one OS image {os_image_hash.hex()} lists")
    return data
