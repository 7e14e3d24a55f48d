"""SEV-SNP launch measurement (teecloud.image.snp): the computation is sev-snp-measure's (the oracle the issue
names); what is tested here is teecloud's part: firmware without the kernel-hashes section is refused with a
reason (Debian's OVMF has SNP metadata but no such section), bad inputs get a reason, and for the firmware
alone the value is the package's command-line tool's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from teecloud.image import ImageFormatError, MeasurementUnavailable
from teecloud.image.snp import snp_launch_measurement

OVMF = Path("/usr/share/OVMF/OVMF_CODE.fd")  # Debian: SNP metadata, no kernel-hashes section
OVMF_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # Debian: no SEV metadata at all


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    if not OVMF.is_file():
        pytest.fail("OVMF is missing: run scripts/setup.sh")
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd"
    kernel.write_bytes(b"kernel" * 1000)
    initrd.write_bytes(b"initrd" * 1000)
    return kernel, initrd


def test_firmware_without_kernel_hashes_is_refused(files: tuple[Path, Path]) -> None:
    kernel, initrd = files
    with pytest.raises(MeasurementUnavailable, match=r"no SEV kernel-hashes section.*AmdSevX64"):
        snp_launch_measurement(ovmf=OVMF, kernel=kernel, initrd=initrd, cmdline="console=ttyS0", vcpus=2)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"vcpus": 0}, "vcpus"),
        ({"vcpu_type": "Pentium"}, "unknown vCPU type"),
        ({"ovmf": Path("/nonexistent/ovmf.fd")}, "no such file"),
    ],
)
def test_bad_inputs_get_a_reason(files: tuple[Path, Path], change: dict[str, object], reason: str) -> None:
    kernel, initrd = files
    args: dict[str, object] = {"ovmf": OVMF, "kernel": kernel, "initrd": initrd, "cmdline": "x", "vcpus": 1}
    with pytest.raises(ImageFormatError, match=reason):
        snp_launch_measurement(**{**args, **change})  # type: ignore[arg-type]


def test_not_a_firmware_is_refused(files: tuple[Path, Path], tmp_path: Path) -> None:
    kernel, initrd = files
    with pytest.raises(ImageFormatError, match="no SEV metadata"):
        snp_launch_measurement(ovmf=OVMF_4M, kernel=kernel, initrd=initrd, cmdline="x", vcpus=1)
    junk = tmp_path / "junk.fd"
    junk.write_bytes(bytes(1 << 20))
    with pytest.raises(ImageFormatError, match=r"not an SEV-SNP firmware|cannot measure"):
        snp_launch_measurement(ovmf=junk, kernel=kernel, initrd=initrd, cmdline="x", vcpus=1)


def test_the_oracle_tool_runs_on_this_firmware() -> None:
    """The pinned sev-snp-measure reads Debian's OVMF SNP metadata (firmware alone, as its CLI computes it):
    the package the calculator delegates to works here."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sevsnpmeasure.cli",
            "--mode",
            "snp",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC-v4",
            "--ovmf",
            str(OVMF),
            "--guest-features",
            "0x1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert len(bytes.fromhex(out.stdout.strip())) == 48
