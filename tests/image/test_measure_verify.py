"""`teecloud verify --measurement`: the image's expected MRTD/RTMR0-2 beside the quoted values, per register,
on a real dstack TDX quote (shared/vectors/tdx/dstack_quote_report.json, real Intel collateral)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from teecloud.cli import app
from teecloud.image.measurement import TdxImageMeasurement, encode
from teecloud.image.tdx import sha384
from tests.image.test_measure_rtmr0 import DSTACK_WITNESS


@pytest.fixture(scope="module")
def boot(vectors: Path) -> dict[str, Any]:
    report = json.loads((vectors / "tdx" / "dstack_quote_report.json").read_text())
    log = json.loads(report["event_log"])
    digests = {i: [bytes.fromhex(e["digest"]) for e in log if e["imr"] == i] for i in (1, 2)}
    quote = bytes.fromhex(report["quote"])
    return {
        "measurement": TdxImageMeasurement(
            cmdline_sha384=digests[2][0],
            kernel_authenticode=digests[1][0],
            initrd_sha384=digests[2][1],
            mrtd_single_pass=quote[48 + 136 : 48 + 184],
            mrtd_two_pass=sha384(b"two-pass"),
            td_hob_witness=DSTACK_WITNESS,
        ),
        "args": [
            "verify",
            str(vectors / "tdx" / "dstack_quote_report.json"),
            "--collateral",
            str(vectors / "tdx" / "tdx_quote_outdated_collateral.json"),
            "--trust-anchor",
            str(vectors / "tdx" / "Intel_SGX_RootCA.der"),
            "--at",
            "2026-03-05T00:00:00Z",
        ],
    }


def run(boot: dict[str, Any], tmp_path: Path, m: TdxImageMeasurement, *extra: str) -> Any:
    path = tmp_path / "measurement.tdx.cbor"
    path.write_bytes(encode(m))
    return CliRunner().invoke(app, [*boot["args"], "--measurement", str(path), *extra])


def test_the_measured_image_matches_register_by_register(boot: dict[str, Any], tmp_path: Path) -> None:
    r = run(boot, tmp_path, boot["measurement"], "--json")
    assert r.exit_code == 0, r.output
    ref = json.loads(r.stdout)["reference"]
    assert ref["status"] == "verified"
    assert set(ref["registers"]) == {"mrtd", "rtmr0", "rtmr1", "rtmr2"}
    assert all(v["match"] and v["expected"] == v["quoted"] for v in ref["registers"].values())
    r = run(boot, tmp_path, boot["measurement"])  # the table
    assert r.exit_code == 0 and "reference: verified" in r.output and "rtmr0" in r.output


def test_another_kernel_is_shown_as_an_rtmr1_mismatch(boot: dict[str, Any], tmp_path: Path) -> None:
    other = TdxImageMeasurement(**{**boot["measurement"].__dict__, "kernel_authenticode": sha384(b"k")})
    r = run(boot, tmp_path, other, "--json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["is_valid"]  # the quote itself is fine: the image is not the one that booted
    ref = doc["reference"]
    assert ref["status"] == "failed" and ref["reason"].startswith("RTMR1 differ")
    assert {n: v["match"] for n, v in ref["registers"].items()} == {
        "mrtd": True,
        "rtmr0": True,
        "rtmr1": False,
        "rtmr2": True,
    }


def test_a_stated_vm_config_is_used_and_checked(boot: dict[str, Any], tmp_path: Path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"os_image_hash": "00" * 32, "cpu_count": 16, "memory_size": 32 << 30}))
    r = run(boot, tmp_path, boot["measurement"], "--vm-config", str(cfg), "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["reference"]["reason"].startswith("RTMR0 differ")
    cfg.write_text("{}")
    r = run(boot, tmp_path, boot["measurement"], "--vm-config", str(cfg))
    assert r.exit_code == 2 and "os_image_hash" in r.output and "Traceback" not in r.output


def test_a_malformed_measurement_file_is_a_usage_error(boot: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.cbor"
    bad.write_bytes(b"\xa1\x01\x02")
    r = CliRunner().invoke(app, [*boot["args"], "--measurement", str(bad)])
    assert r.exit_code == 2 and "measurement file" in r.output and "Traceback" not in r.output


def test_an_snp_report_shows_the_images_measurement(vectors: Path, tmp_path: Path) -> None:
    """dstack's real SEV-SNP report (tests/kms/data), its image's measurement.snp.cbor and launch shape."""
    from teecloud.image.snp import encode_snp
    from tests.image.test_measure_snp_file import REAL, REAL_MEASUREMENT

    data = Path(__file__).parent.parent / "kms" / "data"
    (tmp_path / "measurement.snp.cbor").write_bytes(encode_snp(REAL))
    args = ["verify", str(data / "dstack_sev_snp_report.bin"), "--kind", "snp"]
    args += ["--cert-chain", str(data / "dstack_sev_snp_vcek.pem")]
    args += ["--trust-anchor", str(vectors / "snp" / "go-sev-guest_ask_ark_milan.pem")]
    args += ["--at", "2026-07-01T00:00:00Z", "--measurement", str(tmp_path / "measurement.snp.cbor")]

    def with_shape(vcpus: int, cpu_count: int, *extra: str) -> Any:
        shape = json.dumps({"vcpus": vcpus, "vcpu_type": "EPYC-v4", "guest_features": 1})
        config = {"os_image_hash": "00" * 32, "cpu_count": cpu_count, "memory_size": 1 << 32}
        (tmp_path / "vm_config.json").write_text(json.dumps({**config, "sev_snp_measurement": shape}))
        return CliRunner().invoke(app, [*args, "--vm-config", str(tmp_path / "vm_config.json"), *extra])

    r = with_shape(2, 2, "--json")
    assert r.exit_code == 0, r.output
    ref = json.loads(r.stdout)["reference"]
    assert ref["status"] == "verified"
    assert ref["registers"] == {
        "measurement": {"expected": REAL_MEASUREMENT.hex(), "quoted": REAL_MEASUREMENT.hex(), "match": True}
    }
    r = with_shape(2, 2)
    assert r.exit_code == 0 and "reference: verified" in r.output and "measurement" in r.output
    r = with_shape(3, 3, "--json")  # another launch shape: the signed value is not that shape's
    ref = json.loads(r.stdout)["reference"]
    assert r.exit_code == 1 and ref["status"] == "failed" and not ref["registers"]["measurement"]["match"]
    r = with_shape(2, 4, "--json")
    assert r.exit_code == 1 and "4 CPUs" in json.loads(r.stdout)["reference"]["reason"]
    (tmp_path / "measurement.snp.cbor").write_bytes(b"\xa0")  # not the SNP file: a usage error
    r = with_shape(2, 2)
    assert r.exit_code == 2 and "Traceback" not in r.output
