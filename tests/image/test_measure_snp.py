"""The SEV-SNP launch measurement (teecloud.image.snp) against sev-snp-measure's own command-line tool, the
pinned oracle, for the same firmware, kernel, initrd, command line, vCPU count and type. The calculation is
the package's in both paths, so what this proves is teecloud's use of it: every input reaches the right
argument (a swapped kernel/initrd, another command line or vCPU count gives another value, and each
matches the tool's for that input). No SNP firmware with a kernel-hashes section is installed here
(Debian's OVMF has none), so the firmware is an OVMF layout built here: the OVMF GUID-table footer, the SEV
metadata ("ASEV", AMD SEV-SNP firmware sections) and the SEV hash-table and SEV-ES reset-block entries, as
OVMF's AmdSev build lays them out.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from teecloud.image.snp import snp_launch_measurement


def _entry(guid: str, data: bytes) -> bytes:
    """An OVMF footer-table entry: data, then u16 size (data + 18), then the GUID (little-endian form)."""
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


def sev_firmware(size: int = 0x100000) -> bytes:
    fw = bytearray(b"\xcc" * size)
    sections = [  # (gpa, size, type): SEC_MEM, SECRETS, CPUID, KERNEL_HASHES
        (0x800000, 0x9000, 1),
        (0x809000, 0x1000, 2),
        (0x80A000, 0x1000, 3),
        (0x80B000, 0x1000, 0x10),
    ]
    meta = struct.pack("<4sIII", b"ASEV", 16 + 12 * len(sections), 1, len(sections))
    meta += b"".join(struct.pack("<III", *s) for s in sections)
    meta_at = size - 0x2000
    fw[meta_at : meta_at + len(meta)] = meta
    table = _entry("dc886566-984a-4798-a75e-5585a7bf67cc", struct.pack("<I", size - meta_at))
    table += _entry("7255371f-3a3b-4b04-927b-1da6efa8d454", struct.pack("<II", 0x80BC00, 0x400))
    table += _entry("00f771de-1a7e-4fcb-890e-68c77e2fb44e", struct.pack("<I", 0xFFFFF000))
    footer = struct.pack("<H", len(table) + 18) + uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
    end = size - 32
    fw[end - len(table) - len(footer) : end] = table + footer
    return bytes(fw)


def oracle(ovmf: Path, kernel: Path, initrd: Path, cmdline: str, vcpus: int, vcpu_type: str) -> bytes:
    args = ["--mode", "snp", "--vcpus", str(vcpus), "--vcpu-type", vcpu_type, "--ovmf", str(ovmf)]
    args += ["--kernel", str(kernel), "--initrd", str(initrd), "--append", cmdline, "--guest-features", "0x1"]
    out = subprocess.run(
        [sys.executable, "-m", "sevsnpmeasure.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return bytes.fromhex(out.stdout.strip())


@pytest.fixture
def image(tmp_path: Path) -> dict[str, Path]:
    files = {"ovmf": sev_firmware(), "kernel": b"MZ kernel" * 4000, "initrd": b"\x1f\x8b initrd" * 3000}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    ("cmdline", "vcpus", "vcpu_type"),
    [
        ("console=ttyS0 init=/init panic=1", 1, "EPYC-v4"),
        ("console=ttyS0 init=/init panic=1", 4, "EPYC-v4"),
        ("console=ttyS0 dstack.rootfs_hash=00ff", 2, "EPYC-Milan"),
    ],
)
def test_the_calculator_is_the_oracle_for_the_same_inputs(
    image: dict[str, Path], cmdline: str, vcpus: int, vcpu_type: str
) -> None:
    ours = snp_launch_measurement(**image, cmdline=cmdline, vcpus=vcpus, vcpu_type=vcpu_type)
    assert len(ours) == 48
    assert ours == oracle(image["ovmf"], image["kernel"], image["initrd"], cmdline, vcpus, vcpu_type)


def test_every_input_counts(image: dict[str, Path]) -> None:
    base = {**image, "cmdline": "console=ttyS0", "vcpus": 2}
    value = snp_launch_measurement(**base)
    swapped = {**base, "kernel": image["initrd"], "initrd": image["kernel"]}
    others = [
        swapped,
        {**base, "cmdline": "console=ttyS1"},
        {**base, "vcpus": 3},
        {**base, "vcpu_type": "EPYC-Milan"},
    ]
    for change in others:
        assert snp_launch_measurement(**change) != value, change
    assert snp_launch_measurement(**swapped) == oracle(
        image["ovmf"], image["initrd"], image["kernel"], "console=ttyS0", 2, "EPYC-v4"
    )
