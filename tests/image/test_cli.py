"""`teecloud image measure`: the values are the calculators' (replayed), bad input is one error line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teecloud.cli import app
from teecloud.image.tdx import replay, rtmr1_events, rtmr2_events

KERNEL = Path("/var/cache/teecloud/guest-kernel/vmlinuz")


def test_measure_prints_rtmr1_and_rtmr2(tmp_path: Path) -> None:
    if not KERNEL.is_file():
        pytest.fail(f"{KERNEL} is missing: run scripts/setup.sh")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x1f\x8b" + bytes(5000))
    args = [
        "image",
        "measure",
        "--kernel",
        str(KERNEL),
        "--initrd",
        str(initrd),
        "--cmdline",
        "console=ttyS0",
    ]
    r = CliRunner().invoke(app, [*args, "--memory", "4G"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    r1 = rtmr1_events(KERNEL.read_bytes(), initrd_size=5002, memory_bytes=4 << 30)
    assert doc["rtmr1"] == replay(r1).hex() and doc["rtmr1_events"] == [d.hex() for d in r1]
    assert doc["rtmr2"] == replay(rtmr2_events("console=ttyS0", initrd.read_bytes())).hex()
    assert doc["rtmr0"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--memory", "lots"], "memory is a size"),
        (["--kernel", "/nonexistent"], "cannot read kernel"),
        (["--tdvf", "/etc/hostname"], "TDVF|too short"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path: Path, extra: list[str], message: str) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    args = ["image", "measure", "--kernel", str(KERNEL), "--initrd", str(initrd), "--cmdline", "c"]
    r = CliRunner().invoke(app, [*args, *extra])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert re.search(message, r.output), r.output


def test_measure_writes_the_measurement_file(tmp_path: Path) -> None:
    from teecloud.image.measurement import measure_tdx_image, parse
    from tests.image.test_measure_rtmr0 import BFV, DSTACK_SECTIONS
    from tests.image.test_tdx import _tdvf

    if not KERNEL.is_file():
        pytest.fail(f"{KERNEL} is missing: run scripts/setup.sh")
    initrd, tdvf, out = tmp_path / "initrd", tmp_path / "tdvf.fd", tmp_path / "img" / "measurement.tdx.cbor"
    initrd.write_bytes(b"\x1f\x8b" + bytes(5000))
    tdvf.write_bytes(_tdvf([BFV, *DSTACK_SECTIONS], b"\xf4" * 0x2000))
    args = [
        "image",
        "measure",
        "--kernel",
        str(KERNEL),
        "--initrd",
        str(initrd),
        "--cmdline",
        "console=ttyS0",
    ]
    r = CliRunner().invoke(app, [*args, "--tdvf", str(tdvf), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["measurement_file"] == str(out)
    expected = measure_tdx_image(
        kernel=KERNEL.read_bytes(),
        initrd=initrd.read_bytes(),
        cmdline="console=ttyS0",
        tdvf=tdvf.read_bytes(),
    )
    assert parse(out.read_bytes()) == expected
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x.cbor")])  # no firmware: refused
    assert r.exit_code == 1 and "--tdvf" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.cbor").exists()


def test_measure_writes_the_snp_measurement_file(tmp_path: Path) -> None:
    from teecloud.image.snp import SnpShape, expected_snp_measurement, parse_snp
    from tests.image.test_measure_snp import oracle, sev_firmware

    if not KERNEL.is_file():
        pytest.fail(f"{KERNEL} is missing: run scripts/setup.sh")
    files = {"ovmf": sev_firmware(), "kernel": KERNEL.read_bytes(), "initrd": b"\x1f\x8b initrd" * 3000}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "measurement.snp.cbor"
    args = ["image", "measure", "--kernel", str(tmp_path / "kernel"), "--initrd", str(tmp_path / "initrd")]
    args += ["--cmdline", "console=ttyS0", "--ovmf-sev", str(tmp_path / "ovmf"), "--vcpus", "2"]
    r = CliRunner().invoke(app, [*args, "--snp-out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    want = oracle(tmp_path / "ovmf", tmp_path / "kernel", tmp_path / "initrd", "console=ttyS0", 2, "EPYC-v4")
    assert doc["snp_measurement"] == want.hex() and doc["snp_measurement_file"] == str(out)
    m = parse_snp(out.read_bytes())
    assert expected_snp_measurement(m, SnpShape(2)) == want
    assert expected_snp_measurement(m, SnpShape(3)) == oracle(
        tmp_path / "ovmf", tmp_path / "kernel", tmp_path / "initrd", "console=ttyS0", 3, "EPYC-v4"
    )
    r = CliRunner().invoke(app, [*args[:8], "--snp-out", str(out)])
    assert r.exit_code == 1 and "--ovmf-sev" in r.output and "Traceback" not in r.output
