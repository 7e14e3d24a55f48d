"""What a firmware logs for SecureBoot, read from the file (teecloud.image.ovmf), and the expected RTMR0 that
follows it: Debian's OVMF builds (real files) say "00"; a firmware without edk2's AuthVariableLib (built
here: an LZMA-compressed volume as OVMF's, without the marker) says "absent", dstack's layout; a variable
store with an enrolled platform key is refused. The firmware's own log of the same file is the slow test in
tests/image/test_measure_acpi.py (swtpm)."""

from __future__ import annotations

import lzma
import struct
import uuid
from pathlib import Path

import pytest

from teecloud.image.errors import ImageFormatError
from teecloud.image.ovmf import MAX_FIRMWARE, secure_boot_variable
from teecloud.image.tdx import AcpiDigests, efi_variable_digest, replay, rtmr0_events, rtmr0_fixed_events
from tests.image.test_measure_rtmr0 import BFV, DSTACK_SECTIONS
from tests.image.test_tdx import _tdvf

OVMF = Path("/usr/share/ovmf/OVMF.fd")
OVMF_DIR = Path("/usr/share/OVMF")
LZMA_GUID = uuid.UUID("ee4e5898-3914-4259-9d6e-dc7bd79403cf").bytes_le
MARKER = "certdbv\0".encode("utf-16-le")


def _lzma_section(content: bytes) -> bytes:
    """An EFI_SECTION_GUID_DEFINED section with edk2's LZMA GUID, as OVMF's FVMAIN_COMPACT holds DXEFV."""
    data = lzma.compress(content, format=lzma.FORMAT_ALONE)
    offset = 4 + 16 + 4
    size = offset + len(data)
    return size.to_bytes(3, "little") + b"\x02" + LZMA_GUID + struct.pack("<HH", offset, 1) + data


def _debian(name: str) -> bytes:
    path = OVMF if name == "OVMF.fd" else OVMF_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/setup.sh (Debian's ovmf)")
    return path.read_bytes()


@pytest.mark.parametrize("name", ["OVMF.fd", "OVMF_CODE_4M.fd", "OVMF_CODE_4M.secboot.fd", "OVMF_CODE.fd"])
def test_debians_ovmf_builds_carry_authenticated_variables(name: str) -> None:
    assert secure_boot_variable(_debian(name)) == "00"


def test_the_marker_is_read_inside_the_compressed_volume_only_where_it_is() -> None:
    code = b"\x90" * 5000 + b"some driver" + bytes(3000)
    assert secure_boot_variable(b"\xff" * 4096 + _lzma_section(code) + b"\xff" * 64) == "absent"
    assert secure_boot_variable(b"\xff" * 4096 + _lzma_section(code + MARKER) + b"\xff" * 64) == "00"
    # the compressed bytes themselves do not show the marker: it is found only by decompressing
    assert MARKER not in _lzma_section(code + MARKER)
    # the synthetic TDVF of the measurement tests (dstack's section layout) is dstack's kind
    assert secure_boot_variable(_tdvf([BFV, *DSTACK_SECTIONS], b"\xf4" * 0x2000)) == "absent"


@pytest.mark.parametrize(
    "noise",
    [
        LZMA_GUID + bytes(64),  # the GUID's bytes at the start, no section header before them
        b"\x10\x00\x00\x19" + LZMA_GUID + struct.pack("<HH", 24, 1) + b"not lzma",  # another section type
        b"\x40\x00\x00\x02" + LZMA_GUID + struct.pack("<HH", 24, 1) + bytes(40),  # not LZMA data
        b"\xff\xff\xff\x02" + LZMA_GUID + struct.pack("<HH", 24, 1),  # a size past the file
    ],
)
def test_guid_bytes_that_are_not_a_compressed_section_are_skipped(noise: bytes) -> None:
    assert secure_boot_variable(b"\x00" * 8 + noise + b"\x00" * 8) == "absent"
    assert secure_boot_variable(noise + _lzma_section(MARKER)) == "00"


def test_an_enrolled_platform_key_is_refused() -> None:
    with pytest.raises(ImageFormatError, match="enrolled platform key"):
        secure_boot_variable(_debian("OVMF_VARS.ms.fd"))  # Microsoft's keys enrolled
    assert secure_boot_variable(_debian("OVMF_VARS.fd")) == "absent"  # an empty variable store
    with pytest.raises(ImageFormatError, match="at most"):
        secure_boot_variable(bytes(MAX_FIRMWARE + 1))


def test_the_expected_rtmr0_follows_the_firmware() -> None:
    guid = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
    assert rtmr0_fixed_events("00")["secure-boot"] == efi_variable_digest(guid, "SecureBoot", b"\x00")
    assert rtmr0_fixed_events()["secure-boot"] == efi_variable_digest(guid, "SecureBoot")
    acpi = AcpiDigests(bytes(48), b"\x01" * 48, b"\x02" * 48)
    absent, zero = rtmr0_events(bytes(48), acpi), rtmr0_events(bytes(48), acpi, secure_boot="00")
    assert [i for i in range(13) if absent[i] != zero[i]] == [2]  # the SecureBoot event only
    assert replay(absent) != replay(zero)
    with pytest.raises(ImageFormatError, match="SecureBoot variable"):
        rtmr0_fixed_events("01")


def test_a_measurement_of_debians_ovmf_expects_its_secureboot_event() -> None:
    """`image build` / `image measure` record what the firmware logs (version 2), and the registers a
    verifier expects from the file carry that event."""
    from teecloud import vmconfig
    from teecloud.image.measurement import encode, expected_tdx_registers, measure_tdx_image, parse
    from tests.image.test_tdx import GUEST_KERNEL

    if not GUEST_KERNEL.is_file():
        pytest.fail(f"{GUEST_KERNEL} is missing: run scripts/setup.sh")
    m = measure_tdx_image(
        kernel=GUEST_KERNEL.read_bytes(),
        initrd=b"\x1f\x8b" + bytes(100),
        cmdline="console=ttyS0",
        tdvf=_debian("OVMF.fd"),
    )
    assert m.secure_boot == "00" and parse(encode(m)) == m
    config = vmconfig.parse({"os_image_hash": "ab" * 32, "cpu_count": 1, "memory_size": 2 << 30})
    acpi = AcpiDigests(bytes(48), b"\x01" * 48, b"\x02" * 48)
    events = expected_tdx_registers(m, config, acpi).events["rtmr0"]
    assert events[2] == rtmr0_fixed_events("00")["secure-boot"]
