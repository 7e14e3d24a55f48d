"""Reference TDX measurements of a guest image, computed from its files and the VM shape as dstack-mr does
(dstack-mr/src/{tdvf,kernel,tdx}.rs; facts in shared/reference/dstack-vmm.md section 3).

    mrtd(tdvf, two_pass=...)                     MRTD: TDH.MEM.PAGE.ADD / TDH.MR.EXTEND of the TDVF sections
    rtmr0_fixed_events()                         the RTMR0 events that depend on no input (CFV, Secure Boot
                                                 variables, separator, BootOrder, Boot0000)
    rtmr1_events(kernel, initrd_size, memory)    Authenticode SHA-384 of the kernel *as QEMU patches it*,
                                                 then the four fixed boot-service events
    rtmr2_events(cmdline, initrd)                the command line as OVMF's LoadOptions, then the initrd
    replay(digests)                              RTMR = SHA384(RTMR ‖ digest) from 48 zero bytes

What these are checked against (tests/image/test_tdx.py): the Authenticode hash against `signify` (an
independent implementation, on real PE files); the fixed RTMR0/RTMR1 events against the event log of a real
dstack boot (shared/vectors/tdx/dstack_quote_report.json); MRTD, the QEMU kernel patch and RTMR2 only against
the specifications (Intel TDX module ABI, Linux boot protocol, QEMU's x86 loader), since no image whose files
and published values both exist is reachable here. Not computed: RTMR0's TD HOB and ACPI events (they need
QEMU's ACPI tables for the VM shape: dstack runs a patched QEMU for them).

Pure functions of bytes: no I/O. Hostile or malformed input raises ImageFormatError with a reason.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from teecloud.image.errors import ImageFormatError

__all__ = [
    "ACPI_DATA_SIZE",
    "TdvfSection",
    "authenticode_sha384",
    "efi_variable_digest",
    "mrtd",
    "parse_tdvf",
    "qemu_patch_kernel",
    "replay",
    "rtmr0_fixed_events",
    "rtmr1_events",
    "rtmr2_events",
    "sha384",
]

# QEMU's ACPI blob reservation below 4 GiB that the kernel patch accounts for (dstack-mr: 0x28000)
ACPI_DATA_SIZE = 0x28000
MAX_KERNEL = 256 * 1024 * 1024
MAX_FIRMWARE = 64 * 1024 * 1024
PAGE = 4096

# TDVF metadata (Intel TDX Virtual Firmware Design Guide, section 11): the OVMF footer GUID table, the TDVF
# metadata offset entry, the "TDVF" descriptor and its 32-byte section entries
_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
_TDVF_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
TDVF_ATTR_MR_EXTEND = 1
TDVF_ATTR_PAGE_AUG = 2
TDVF_SECTION_TD_HOB = 2
TDVF_SECTION_TEMP_MEM = 3

# RTMR0 events that depend on no input, as dstack-mr lists them: the CFV (the OVMF variable store, as QEMU
# presents it) digest, and Boot0000 (OVMF's "UiApp" boot option) digest
_CFV_DIGEST = bytes.fromhex(
    "344bc51c980ba621aaa00da3ed7436f7d6e549197dfe699515dfa2c6583d95e6412af21c097d473155875ffd561d6790"
)
_BOOT0000_DIGEST = bytes.fromhex(
    "23ada07f5261f12f34a0bd8e46760962d6b4d576a416f1fea1c64bc656b1d28eacf7047ae6e967c58fd2a98bfa74c298"
)
_EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
_EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def replay(digests: Iterable[bytes]) -> bytes:
    """A TDX RTMR after extending `digests` in order: RTMR = SHA384(RTMR ‖ digest), from 48 zero bytes."""
    mr = bytes(48)
    for d in digests:
        if len(d) != 48:
            raise ImageFormatError(f"an RTMR extend takes a 48-byte digest, got {len(d)} bytes")
        mr = sha384(mr + d)
    return mr


# -- RTMR0 ---------------------------------------------------------------------------------------------


def efi_variable_digest(guid: uuid.UUID, name: str, data: bytes = b"") -> bytes:
    """UEFI_VARIABLE_DATA as TCG PC Client PFP measures it (EV_EFI_VARIABLE_DRIVER_CONFIG): VariableName GUID
    (mixed-endian), u64 name length in characters, u64 data length, UTF-16LE name, data."""
    encoded = name.encode("utf-16-le")
    return sha384(guid.bytes_le + struct.pack("<QQ", len(name), len(data)) + encoded + data)


def rtmr0_fixed_events() -> dict[str, bytes]:
    """The RTMR0 events that do not depend on the VM shape, by name, in their order in the log (the TD HOB
    comes before them and the ACPI tables between `separator` and `boot-order`)."""
    return {
        "cfv": _CFV_DIGEST,
        "secure-boot": efi_variable_digest(_EFI_GLOBAL_VARIABLE, "SecureBoot"),
        "pk": efi_variable_digest(_EFI_GLOBAL_VARIABLE, "PK"),
        "kek": efi_variable_digest(_EFI_GLOBAL_VARIABLE, "KEK"),
        "db": efi_variable_digest(_EFI_IMAGE_SECURITY_DATABASE, "db"),
        "dbx": efi_variable_digest(_EFI_IMAGE_SECURITY_DATABASE, "dbx"),
        "separator": sha384(bytes(4)),
        "boot-order": sha384(bytes(2)),  # BootOrder = [0x0000]
        "boot0000": _BOOT0000_DIGEST,
    }


# -- RTMR1: the kernel -----------------------------------------------------------------------------------


def _u16(data: bytes, off: int, what: str) -> int:
    if off < 0 or off + 2 > len(data):
        raise ImageFormatError(f"PE file truncated at the {what}")
    return int(struct.unpack_from("<H", data, off)[0])


def _u32(data: bytes, off: int, what: str) -> int:
    if off < 0 or off + 4 > len(data):
        raise ImageFormatError(f"PE file truncated at the {what}")
    return int(struct.unpack_from("<I", data, off)[0])


def authenticode_sha384(pe: bytes, *, pad_to_8: bool = False) -> bytes:
    """The Authenticode digest of a PE/COFF image (Microsoft "Windows Authenticode Portable Executable
    Signature Format", section "Calculating the PE Image Hash"): the headers without the CheckSum field and
    the Certificate Table directory entry, the sections in file order, then the data after the last section
    less the certificate table. `pad_to_8` hashes zero bytes up to a multiple of 8 of the file size, as
    OVMF's loader sees an image QEMU hands it (dstack-mr does the same for the kernel)."""
    if len(pe) > MAX_KERNEL:
        raise ImageFormatError(f"a PE image is at most {MAX_KERNEL} bytes here")
    if pe[:2] != b"MZ":
        raise ImageFormatError("not a PE image: no MZ header (a kernel must be built with the EFI stub)")
    nt = _u32(pe, 0x3C, "DOS header")
    if pe[nt : nt + 4] != b"PE\0\0":
        raise ImageFormatError("not a PE image: no PE signature")
    coff = nt + 4
    n_sections = _u16(pe, coff + 2, "COFF header")
    opt_size = _u16(pe, coff + 16, "COFF header")
    opt = coff + 20
    magic = _u16(pe, opt, "optional header")
    if magic not in (0x10B, 0x20B):
        raise ImageFormatError(f"unknown optional header magic {magic:#x}")
    checksum = opt + 64
    data_dirs = opt + (112 if magic == 0x20B else 96)
    n_dirs = _u32(pe, data_dirs - 4, "optional header")
    if n_dirs < 5:
        raise ImageFormatError("the PE image has no certificate table directory entry")
    cert_entry = data_dirs + 4 * 8  # IMAGE_DIRECTORY_ENTRY_SECURITY
    size_of_headers = _u32(pe, opt + 60, "optional header")
    if not cert_entry + 8 <= size_of_headers <= len(pe):
        raise ImageFormatError("the PE headers are larger than the file")
    h = hashlib.sha384()
    h.update(pe[:checksum])
    h.update(pe[checksum + 4 : cert_entry])
    h.update(pe[cert_entry + 8 : size_of_headers])
    hashed = size_of_headers
    table = opt + opt_size
    sections = []
    for i in range(n_sections):
        s = table + 40 * i
        size, ptr = _u32(pe, s + 16, "section table"), _u32(pe, s + 20, "section table")
        if size:
            sections.append((ptr, size))
    for ptr, size in sorted(sections):
        if ptr + size > len(pe):
            raise ImageFormatError("a PE section runs past the end of the file")
        h.update(pe[ptr : ptr + size])
        hashed += size
    cert_size = _u32(pe, cert_entry + 4, "certificate table entry")
    if len(pe) > hashed:
        extra = len(pe) - hashed - (cert_size if _u32(pe, cert_entry, "certificate table entry") else 0)
        if extra > 0:
            h.update(pe[hashed : hashed + extra])
    if pad_to_8 and len(pe) % 8:
        h.update(bytes(8 - len(pe) % 8))
    return h.digest()


def _below_4g_memory(memory_bytes: int) -> int:
    """RAM QEMU's q35 machine maps below 4 GiB (hw/i386/pc_q35.c: 2.75 GiB, or 2 GiB from 2.75 GiB up)."""
    lowmem = 0x80000000 if memory_bytes >= 0xB0000000 else 0xB0000000
    return min(memory_bytes, lowmem)


def qemu_patch_kernel(
    kernel: bytes, *, initrd_size: int, memory_bytes: int, acpi_data_size: int = ACPI_DATA_SIZE
) -> bytes:
    """The bzImage as QEMU's x86 direct-kernel loader (hw/i386/x86.c, x86_load_linux) writes the Linux boot
    protocol's setup header before firmware measures it: type_of_loader, CAN_USE_HEAP with heap_end_ptr,
    cmd_line_ptr, and the initrd address (highest page-aligned spot under initrd_addr_max and low RAM less
    the ACPI data) and size (Documentation/arch/x86/boot.rst)."""
    if not 0x1000 <= len(kernel) <= MAX_KERNEL:
        raise ImageFormatError("the kernel image is too short or too large")
    k = bytearray(kernel)
    protocol = struct.unpack_from("<H", k, 0x206)[0]
    if k[0x202:0x206] != b"HdrS":
        protocol = 0  # no setup header signature: a pre-2.0 kernel
    loadflags = k[0x211]
    high = protocol >= 0x200 and loadflags & 0x01
    real_addr, cmdline_addr = (0x10000, 0x20000) if high else (0x90000, 0x9A000)
    if protocol >= 0x200:
        k[0x210] = 0xB0  # type_of_loader: QEMU
    if protocol >= 0x201:
        k[0x211] |= 0x80  # CAN_USE_HEAP
        struct.pack_into("<I", k, 0x224, cmdline_addr - real_addr - 0x200)  # heap_end_ptr
    if protocol >= 0x202:
        struct.pack_into("<I", k, 0x228, cmdline_addr)  # cmd_line_ptr
    else:
        struct.pack_into("<HH", k, 0x20, 0xA33F, cmdline_addr - real_addr)  # the old command-line protocol
    if initrd_size > 0:
        if protocol < 0x200:
            raise ImageFormatError("the kernel is too old to take an initrd")
        if protocol >= 0x20C:
            xloadflags = struct.unpack_from("<H", k, 0x236)[0]
            initrd_max = 0xFFFFFFFF if xloadflags & 0x40 else 0x37FFFFFF  # XLF_CAN_BE_LOADED_ABOVE_4G
        elif protocol >= 0x203:
            initrd_max = struct.unpack_from("<I", k, 0x22C)[0] or 0x37FFFFFF
        else:
            initrd_max = 0x37FFFFFF
        available = _below_4g_memory(memory_bytes) - acpi_data_size
        if available <= 0:
            raise ImageFormatError("the ACPI data does not fit in the VM's memory")
        initrd_max = min(initrd_max, available - 1)
        if initrd_size >= initrd_max:
            raise ImageFormatError("the initrd does not fit below the kernel's initrd_addr_max")
        struct.pack_into("<II", k, 0x218, (initrd_max - initrd_size) & ~0xFFF, initrd_size)
    return bytes(k)


def rtmr1_events(kernel: bytes, *, initrd_size: int, memory_bytes: int) -> list[bytes]:
    """RTMR1 of a direct-boot TD: the patched kernel's Authenticode hash (EV_EFI_BOOT_SERVICES_APPLICATION),
    then "Calling EFI Application from Boot Option", the separator, and the two ExitBootServices events."""
    patched = qemu_patch_kernel(kernel, initrd_size=initrd_size, memory_bytes=memory_bytes)
    return [
        authenticode_sha384(patched, pad_to_8=True),
        sha384(b"Calling EFI Application from Boot Option"),
        sha384(bytes(4)),
        sha384(b"Exit Boot Services Invocation"),
        sha384(b"Exit Boot Services Returned with Success"),
    ]


# -- RTMR2: command line and initrd ----------------------------------------------------------------------


def rtmr2_events(cmdline: str, initrd: bytes) -> list[bytes]:
    """RTMR2: OVMF's LoadOptions for a QEMU direct boot (the command line QEMU passes, with " initrd=initrd"
    appended by OVMF's QemuKernelLoaderFsDxe, as UTF-16LE with its NUL), then the initrd's bytes."""
    return [sha384((cmdline + " initrd=initrd").encode("utf-16-le") + b"\0\0"), sha384(initrd)]


# -- MRTD --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TdvfSection:
    data_offset: int
    raw_size: int
    gpa: int
    memory_size: int
    kind: int
    attributes: int


def parse_tdvf(firmware: bytes) -> list[TdvfSection]:
    """The TDVF metadata's sections (TDVF Design Guide 11.1): from the OVMF GUID-table footer (the 48 bytes
    before the end), the entry whose u32 is the metadata's offset from the end of the firmware."""
    if not 0x1000 <= len(firmware) <= MAX_FIRMWARE:
        raise ImageFormatError("the firmware is too short or too large to be a TDVF")
    end = len(firmware) - 0x20  # the footer GUID sits 0x20 + 16 bytes from the end (OVMF ResetVector)
    if firmware[end - 16 : end] != _FOOTER_GUID:
        raise ImageFormatError("no OVMF GUID table footer: not an OVMF/TDVF build")
    table_len = struct.unpack_from("<H", firmware, end - 18)[0]
    start = end - 18 - (table_len - 18)
    if table_len < 18 or start < 0:
        raise ImageFormatError("the OVMF GUID table length is out of range")
    pos = end - 18
    offset = None
    while pos - 18 >= start:  # entries are walked back from the table's end: data, u16 length, GUID
        guid = firmware[pos - 16 : pos]
        length = struct.unpack_from("<H", firmware, pos - 18)[0]
        if length < 18 or pos - length < start:
            raise ImageFormatError("a malformed entry in the OVMF GUID table")
        if guid == _TDVF_OFFSET_GUID:
            offset = struct.unpack_from("<I", firmware, pos - length)[0]
            break
        pos -= length
    if offset is None:
        raise ImageFormatError("the firmware has no TDVF metadata: not a TDX firmware (build OVMF IntelTdx)")
    base = len(firmware) - offset
    if not 0 <= base <= len(firmware) - 16 or firmware[base : base + 4] != b"TDVF":
        raise ImageFormatError("the TDVF metadata descriptor is missing or misplaced")
    _sig, _length, version, count = struct.unpack_from("<4sIII", firmware, base)
    if version != 1 or not 1 <= count <= 64 or base + 16 + 32 * count > len(firmware):
        raise ImageFormatError("unsupported TDVF metadata (version 1, 1..64 sections)")
    sections = []
    for i in range(count):
        off, raw, gpa, mem, kind, attr = struct.unpack_from("<IIQQII", firmware, base + 16 + 32 * i)
        if off + raw > len(firmware) or gpa % PAGE or mem % PAGE or raw > mem:
            raise ImageFormatError(f"TDVF section {i} is out of range or not page-aligned")
        sections.append(TdvfSection(off, raw, gpa, mem, kind, attr))
    return sections


def _mem_page_add(gpa: int) -> bytes:
    return b"MEM.PAGE.ADD".ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)


def _mr_extend(gpa: int) -> bytes:
    return b"MR.EXTEND".ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)


def mrtd(firmware: bytes, *, two_pass: bool = False) -> bytes:
    """MRTD as the TDX module builds it as QEMU loads TDVF (TDX module ABI: TDH.MEM.PAGE.ADD adds a 128-byte
    block with the page's GPA, TDH.MR.EXTEND one per 256-byte chunk followed by the chunk). Sections with
    PAGE_AUG are not added; MR_EXTEND sections are extended. QEMU >= 9 interleaves add and extend per page
    (single pass); QEMU 8 adds every page of a section, then extends them (`two_pass`)."""
    h = hashlib.sha384()
    for s in parse_tdvf(firmware):
        if s.attributes & TDVF_ATTR_PAGE_AUG:
            continue
        pages = s.memory_size // PAGE
        extend = bool(s.attributes & TDVF_ATTR_MR_EXTEND)

        def extend_page(i: int, s: TdvfSection = s) -> None:
            for c in range(16):
                rel = i * PAGE + c * 256  # bytes past the section's raw data are zero in the TD
                chunk = firmware[s.data_offset + rel : s.data_offset + min(rel + 256, s.raw_size)]
                h.update(_mr_extend(s.gpa + rel))
                h.update(chunk.ljust(256, b"\0"))

        if two_pass:
            for i in range(pages):
                h.update(_mem_page_add(s.gpa + i * PAGE))
            if extend:
                for i in range(pages):
                    extend_page(i)
        else:
            for i in range(pages):
                h.update(_mem_page_add(s.gpa + i * PAGE))
                if extend:
                    extend_page(i)
    return h.digest()
