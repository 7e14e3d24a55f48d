"""TDX reference measurements (teecloud.image.tdx). What each test checks against:

- outside oracle: the Authenticode hash against LIEF (an independent PE implementation) on real PE files
  (pip's Windows launchers; Debian's signed EFI-stub kernel, which carries a certificate table); RTMR0's and
  RTMR1's fixed events against the event log of a real dstack boot on TDX hardware
  (shared/vectors/tdx/dstack_quote_report.json), and `replay` against that quote's RTMR0-3;
- the specification only: QEMU's setup-header patch of the kernel (Linux boot protocol, QEMU's x86 loader),
  RTMR2 (OVMF's LoadOptions), MRTD (TDX module ABI) on a TDVF layout built here.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import lief  # a test dependency (pyproject [test]): the independent Authenticode implementation
import pytest

from teecloud.image import ImageFormatError
from teecloud.image.tdx import (
    TDVF_ATTR_MR_EXTEND,
    TDVF_ATTR_PAGE_AUG,
    authenticode_sha384,
    efi_variable_digest,
    mrtd,
    parse_tdvf,
    qemu_patch_kernel,
    replay,
    rtmr0_fixed_events,
    rtmr1_events,
    rtmr2_events,
    sha384,
)

# where scripts/setup.sh puts Debian's signed cloud kernel (an EFI-stub PE with a certificate table)
GUEST_KERNEL = Path(os.environ.get("TEECLOUD_GUEST_KERNEL", "/var/cache/teecloud/guest-kernel/vmlinuz"))


def _pe_files() -> list[Path]:
    import pip._vendor.distlib as distlib  # ships Windows launcher .exe files on every platform

    files = sorted(Path(distlib.__file__).parent.glob("*.exe"))
    assert files, "pip's distlib launchers not found"
    return files


def _lief_authentihash(path: Path) -> bytes:
    binary = lief.PE.parse(str(path))
    assert binary is not None, path
    return bytes(binary.authentihash(lief.PE.ALGORITHMS.SHA_384))


@pytest.fixture(scope="module")
def kernel() -> bytes:
    if not GUEST_KERNEL.is_file():
        pytest.fail(f"{GUEST_KERNEL} is missing: run scripts/setup.sh (it fetches Debian's cloud kernel)")
    return GUEST_KERNEL.read_bytes()


@pytest.mark.parametrize("path", _pe_files(), ids=lambda p: p.name)
def test_authenticode_matches_lief_on_real_pe_files(path: Path) -> None:
    assert authenticode_sha384(path.read_bytes()) == _lief_authentihash(path)


def test_authenticode_matches_lief_on_a_signed_linux_kernel(kernel: bytes) -> None:
    # a signed kernel: the certificate table after the last section is left out of the hash
    nt = struct.unpack_from("<I", kernel, 0x3C)[0]
    magic = struct.unpack_from("<H", kernel, nt + 24)[0]
    cert_size = struct.unpack_from("<I", kernel, nt + 24 + (112 if magic == 0x20B else 96) + 36)[0]
    assert cert_size > 0, "expected Debian's signed kernel"
    assert authenticode_sha384(kernel) == _lief_authentihash(GUEST_KERNEL)
    # and the patched kernel that RTMR1 measures is still a PE LIEF hashes the same way
    patched = qemu_patch_kernel(kernel, initrd_size=1 << 20, memory_bytes=2 << 30)
    assert patched != kernel and authenticode_sha384(patched) != authenticode_sha384(kernel)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"XX" + b[2:], "no MZ header"),
        (lambda b: b[:0x40], "no PE signature|truncated"),
        (lambda b: b[: len(b) // 2], "past the end"),
        (lambda b: b[:0x3C] + struct.pack("<I", 0xFFFFFFF0) + b[0x40:], "no PE signature"),
    ],
)
def test_malformed_pe_is_refused_with_a_reason(mutate: Any, reason: str) -> None:
    data = _pe_files()[0].read_bytes()
    with pytest.raises(ImageFormatError, match=reason):
        authenticode_sha384(mutate(data))


# -- RTMR0 / RTMR1 fixed events against a real dstack boot ----------------------------------------------


@pytest.fixture(scope="module")
def dstack_boot(vectors: Path) -> tuple[list[dict[str, Any]], bytes]:
    report = json.loads((vectors / "tdx" / "dstack_quote_report.json").read_text())
    return json.loads(report["event_log"]), bytes.fromhex(report["quote"])


def _imr(log: list[dict[str, Any]], imr: int) -> list[dict[str, Any]]:
    return [e for e in log if e["imr"] == imr]


def test_rtmr0_fixed_events_are_those_of_a_real_dstack_boot(dstack_boot: tuple[list[Any], bytes]) -> None:
    log, _ = dstack_boot
    rtmr0 = [bytes.fromhex(e["digest"]) for e in _imr(log, 0)]
    fixed = rtmr0_fixed_events()
    # log order: TD HOB, CFV, 5 Secure Boot variables, separator, 3 ACPI, BootOrder, Boot0000
    expected_at = {"cfv": 1, "secure-boot": 2, "pk": 3, "kek": 4, "db": 5, "dbx": 6, "separator": 7}
    expected_at |= {"boot-order": 11, "boot0000": 12}
    assert len(rtmr0) == 13
    for name, index in expected_at.items():
        assert fixed[name] == rtmr0[index], name


def test_efi_variable_events_hash_the_payload_the_firmware_logged(
    dstack_boot: tuple[list[Any], bytes],
) -> None:
    log, _ = dstack_boot
    variables = [e for e in _imr(log, 0) if e["event_type"] == 0x80000001]  # EV_EFI_VARIABLE_DRIVER_CONFIG
    assert len(variables) == 5
    for e, (guid, name) in zip(
        variables,
        [
            ("8be4df61-93ca-11d2-aa0d-00e098032b8c", "SecureBoot"),
            ("8be4df61-93ca-11d2-aa0d-00e098032b8c", "PK"),
            ("8be4df61-93ca-11d2-aa0d-00e098032b8c", "KEK"),
            ("d719b2cb-3d3a-4596-a3bc-dad00e67656f", "db"),
            ("d719b2cb-3d3a-4596-a3bc-dad00e67656f", "dbx"),
        ],
        strict=True,
    ):
        payload = bytes.fromhex(e["event_payload"])
        assert sha384(payload).hex() == e["digest"]
        assert efi_variable_digest(uuid.UUID(guid), name).hex() == e["digest"], name


def test_rtmr1_fixed_events_are_those_of_a_real_dstack_boot(
    dstack_boot: tuple[list[Any], bytes], kernel: bytes
) -> None:
    log, _ = dstack_boot
    logged = [bytes.fromhex(e["digest"]) for e in _imr(log, 1)]
    ours = rtmr1_events(kernel, initrd_size=1 << 20, memory_bytes=2 << 30)
    assert len(logged) == len(ours) == 5
    assert ours[1:] == logged[1:]  # the first is the kernel: another kernel here


def test_replay_of_the_real_log_gives_the_quoted_rtmrs(dstack_boot: tuple[list[Any], bytes]) -> None:
    log, quote = dstack_boot
    body = 48  # Intel DCAP quote v4: 48-byte header, then the TD report body; RTMR0 at body + 328
    for i in range(4):
        quoted = quote[body + 328 + 48 * i : body + 376 + 48 * i]
        digests = [bytes.fromhex(e["digest"]) for e in _imr(log, i)]
        assert replay(digests) == quoted, f"RTMR{i}"
    with pytest.raises(ImageFormatError):
        replay([b"short"])


# -- the kernel as QEMU patches it (spec) ----------------------------------------------------------------


def _initrd_addr(k: bytes) -> int:
    return int(struct.unpack_from("<I", k, 0x218)[0])


def test_qemu_patch_writes_only_the_setup_header_fields(kernel: bytes) -> None:
    patched = qemu_patch_kernel(kernel, initrd_size=0x123456, memory_bytes=4 << 30)
    changed = {i for i in range(0x200, 0x240) if patched[i] != kernel[i]}
    allowed = set(range(0x210, 0x212)) | set(range(0x218, 0x220)) | set(range(0x224, 0x22C))
    assert changed and changed <= allowed
    assert patched[:0x200] == kernel[:0x200] and patched[0x240:] == kernel[0x240:]
    assert patched[0x210] == 0xB0 and patched[0x211] & 0x80  # type_of_loader QEMU, CAN_USE_HEAP
    assert struct.unpack_from("<II", patched, 0x224) == (0x20000 - 0x10000 - 0x200, 0x20000)
    assert struct.unpack_from("<I", patched, 0x21C)[0] == 0x123456
    addr = _initrd_addr(patched)
    assert addr % 4096 == 0 and addr + 0x123456 < 0x80000000 - 0x28000  # below low RAM less the ACPI data


def test_the_patched_kernel_hash_is_stable_at_2g_and_from_2_75g(kernel: bytes) -> None:
    """dstack's "lite" verification relies on it: one kernel hash for RAM == 2 GiB or >= 2.75 GiB."""

    def addr(mem: int) -> int:
        return _initrd_addr(qemu_patch_kernel(kernel, initrd_size=1 << 20, memory_bytes=mem))

    assert addr(2 << 30) == addr(0xB0000000) == addr(64 << 30)
    assert addr((2 << 30) - 4096) != addr(2 << 30)
    assert addr(0xB0000000 - 4096) != addr(0xB0000000)
    with pytest.raises(ImageFormatError, match="does not fit"):
        qemu_patch_kernel(kernel, initrd_size=0x7FFFFFFF, memory_bytes=2 << 30)


# -- RTMR2 (spec) ---------------------------------------------------------------------------------------


def test_rtmr2_is_the_load_options_then_the_initrd() -> None:
    cmdline, initrd = "console=ttyS0 panic=1", b"\x1f\x8b initrd bytes"
    ev = rtmr2_events(cmdline, initrd)
    want = "console=ttyS0 panic=1 initrd=initrd".encode("utf-16-le") + b"\0\0"
    assert ev == [hashlib.sha384(want).digest(), hashlib.sha384(initrd).digest()]
    assert rtmr2_events(cmdline + " x", initrd)[0] != ev[0]


# -- MRTD on a TDVF layout (spec) ----------------------------------------------------------------------


def _tdvf(sections: list[tuple[int, int, int, int, int, int]], data: bytes, size: int = 0x10000) -> bytes:
    """A firmware volume with OVMF's GUID-table footer and a TDVF descriptor, as TDVF lays them out."""
    fw = bytearray(size)
    fw[: len(data)] = data
    desc = struct.pack("<4sIII", b"TDVF", 16 + 32 * len(sections), 1, len(sections))
    desc += b"".join(struct.pack("<IIQQII", *s) for s in sections)
    desc_at = 0x8000
    fw[desc_at : desc_at + len(desc)] = desc
    entry = struct.pack("<I", size - desc_at) + struct.pack("<H", 22)
    entry += uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
    footer = struct.pack("<H", len(entry) + 18) + uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
    table = entry + footer
    end = size - 0x20
    fw[end - len(table) : end] = table
    return bytes(fw)


BFV = (0x0, 0x2000, 0xFFFFE000, 0x2000, 0, TDVF_ATTR_MR_EXTEND)  # code: added and extended
TEMP = (0, 0, 0x800000, 0x1000, 3, 0)  # temporary memory: added only
AUG = (0, 0, 0x900000, 0x1000, 2, TDVF_ATTR_PAGE_AUG)  # accepted later: not in MRTD


def test_mrtd_follows_the_tdx_module_abi() -> None:
    code = os.urandom(0x2000)
    fw = _tdvf([BFV, TEMP, AUG], code)
    assert [s.gpa for s in parse_tdvf(fw)] == [0xFFFFE000, 0x800000, 0x900000]

    def add(gpa: int) -> bytes:
        return b"MEM.PAGE.ADD" + bytes(4) + struct.pack("<Q", gpa) + bytes(104)

    def extend(gpa: int, chunk: bytes) -> bytes:
        return b"MR.EXTEND" + bytes(7) + struct.pack("<Q", gpa) + bytes(104) + chunk

    single = b"".join(
        add(0xFFFFE000 + p * 4096)
        + b"".join(
            extend(0xFFFFE000 + p * 4096 + c * 256, code[p * 4096 + c * 256 :][:256]) for c in range(16)
        )
        for p in range(2)
    ) + add(0x800000)
    assert mrtd(fw) == hashlib.sha384(single).digest()
    two = b"".join(add(0xFFFFE000 + p * 4096) for p in range(2))
    two += b"".join(extend(0xFFFFE000 + o, code[o : o + 256]) for o in range(0, 0x2000, 256)) + add(0x800000)
    assert mrtd(fw, two_pass=True) == hashlib.sha384(two).digest()
    # a byte of the code changes MRTD; the PAGE_AUG section adds nothing
    assert mrtd(_tdvf([BFV, TEMP, AUG], bytes([code[0] ^ 1]) + code[1:])) != mrtd(fw)  # (was 1/256 flaky)
    assert mrtd(_tdvf([BFV, TEMP], code)) == mrtd(fw)


@pytest.mark.parametrize(
    ("firmware", "reason"),
    [
        (bytes(0x10000), "no OVMF GUID table footer"),
        (b"\0" * 100, "too short"),
        (_tdvf([(0x0, 0x2000, 0xFFFFE001, 0x2000, 0, 1)], b""), "not page-aligned"),
        (_tdvf([(0xFFFF0, 0x2000, 0xFFFFE000, 0x2000, 0, 1)], b""), "out of range"),
    ],
)
def test_malformed_tdvf_is_refused_with_a_reason(firmware: bytes, reason: str) -> None:
    with pytest.raises(ImageFormatError, match=reason):
        mrtd(firmware)


def test_debian_ovmf_is_no_tdvf() -> None:
    ovmf = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    if not ovmf.is_file():
        pytest.fail("OVMF is missing: run scripts/setup.sh")
    with pytest.raises(ImageFormatError, match="no TDVF metadata"):
        mrtd(ovmf.read_bytes())
