"""`teecloud tee ...` through Typer's CliRunner (simulated platform)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import dcap_qvl
import pytest
from typer.testing import CliRunner

from teecloud.cli.tee_cmd import app
from teecloud.tee.simulated import SimulatedTdx

runner = CliRunner()


@pytest.fixture(autouse=True)
def _simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEECLOUD_TEE", "simulated")


def _replay(entries: list[dict]) -> list[str]:
    rtmrs = [bytes(48)] * 4
    for e in entries:
        rtmrs[e["imr"]] = hashlib.sha384(rtmrs[e["imr"]] + bytes.fromhex(e["digest"])).digest()
    return [r.hex() for r in rtmrs]


def test_quote_json_is_dstack_shaped_and_verifies(tmp_path: Path) -> None:
    r = runner.invoke(app, ["quote", "--report-data", "0xdeadbeef"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"quote", "event_log", "report_data", "vm_config"}
    assert doc["report_data"] == "deadbeef" + "00" * 60
    assert isinstance(doc["event_log"], str) and isinstance(doc["vm_config"], str)
    assert json.loads(doc["vm_config"])["os_image_hash"] == SimulatedTdx().os_image_hash.hex()
    # cross-check with dcap-qvl using the exported dev root + collateral
    export = tmp_path / "export"
    r2 = runner.invoke(app, ["dev-root", "--export", str(export)])
    assert r2.exit_code == 0, r2.output
    col = dcap_qvl.QuoteCollateralV3.from_json((export / "collateral.json").read_text())
    report = dcap_qvl.verify_with_root_ca(
        bytes.fromhex(doc["quote"]), col, (export / "root_ca.der").read_bytes(), int(time.time())
    )
    assert report.status == "UpToDate"


def test_emit_event_persists_between_invocations(tmp_path: Path) -> None:
    assert runner.invoke(app, ["emit-event", "app-id", "aa" * 20]).exit_code == 0
    r = runner.invoke(app, ["emit-event", "compose-hash", "bb" * 32])
    assert r.exit_code == 0, r.output
    out = tmp_path / "q.json"
    r = runner.invoke(app, ["quote", "--report-data", "01", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    log = json.loads(doc["event_log"])
    assert [e["event"] for e in log if e["imr"] == 3] == ["app-id", "compose-hash"]
    quote = bytes.fromhex(doc["quote"])
    rtmrs = [quote[48 + 328 + 48 * i : 48 + 376 + 48 * i].hex() for i in range(4)]
    assert _replay(log) == rtmrs
    # reset forgets the runtime events
    assert runner.invoke(app, ["reset"]).exit_code == 0
    doc = json.loads(runner.invoke(app, ["quote", "--report-data", ""]).stdout)
    assert [e for e in json.loads(doc["event_log"]) if e["imr"] == 3] == []


def test_emit_event_with_empty_payload() -> None:
    r = runner.invoke(app, ["emit-event", "system-ready", ""])
    assert r.exit_code == 0, r.output
    assert "rtmr3 = " in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["quote", "--report-data", "zz"],
        ["quote", "--report-data", "00" * 65],
        ["emit-event", "x", "abc"],
        ["emit-event", "bad:name", "00"],
        ["quote", "--report-data", "00", "--tee", "sgx"],
    ],
)
def test_bad_input_exits_2_without_traceback(args: list[str]) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert "error" in r.output.lower()


def test_info_shows_simulated_platform() -> None:
    r = runner.invoke(app, ["info", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    tee = SimulatedTdx()
    assert info["kind"] == "tdx-simulated"
    assert info["device_id"] == tee.device_id.hex()
    assert info["dev_root_sha256"] == hashlib.sha256(tee.dev_root_der()).hexdigest()
    assert set(info["measurements"]) == {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    r = runner.invoke(app, ["info"])
    assert r.exit_code == 0 and "development root" in r.stdout


def test_no_tee_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEECLOUD_TEE")
    import teecloud.tee as tee_pkg

    def nothing(**_: object) -> None:
        raise tee_pkg.TeeUnavailable("no TEE found ... set TEECLOUD_TEE=simulated")

    monkeypatch.setattr("teecloud.cli.tee_cmd.detect", nothing)
    r = runner.invoke(app, ["quote", "--report-data", "00"])
    assert r.exit_code == 1 and "TEECLOUD_TEE=simulated" in r.output and "Traceback" not in r.output


def test_corrupt_dev_root_is_reported_by_cli(teecloud_home: Path) -> None:
    SimulatedTdx()
    (teecloud_home / "simulated-tee" / "root_ca.der").write_bytes(b"junk")
    r = runner.invoke(app, ["quote", "--report-data", "00"])
    assert r.exit_code == 1 and "corrupt" in r.output and "Traceback" not in r.output
    assert (teecloud_home / "simulated-tee" / "root_ca.der").read_bytes() == b"junk"


def test_corrupt_cli_state_is_reported(teecloud_home: Path) -> None:
    assert runner.invoke(app, ["emit-event", "a", "00"]).exit_code == 0
    (teecloud_home / "simulated-tee" / "cli-cvm.json").write_text("{broken")
    r = runner.invoke(app, ["quote", "--report-data", "00"])
    assert r.exit_code == 1 and "tee reset" in r.output


def test_export_into_a_file_path_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = runner.invoke(app, ["dev-root", "--export", str(f)])
    assert r.exit_code == 2
