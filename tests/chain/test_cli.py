"""`teecloud chain|app|node` on the embedded chain (opened in-process by each command)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from teecloud.chain import DEV_KEYS, compose_hash
from teecloud.cli import app as cli

runner = CliRunner()


def run(*args: str, ok: bool = True) -> str:
    r = runner.invoke(cli, list(args))
    if ok:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code != 0, r.output
        assert "Traceback" not in r.output
    return r.output


def test_register_upgrade_show(tmp_path: Path, teecloud_home: Path) -> None:
    compose = {"name": "demo", "runner": "docker-compose", "manifest_version": 2, "docker_compose_file": "x"}
    f = tmp_path / "app-compose.json"
    f.write_text(json.dumps(compose))
    run("chain", "deploy")
    k2 = tmp_path / "k2"
    k2.write_text(DEV_KEYS[1])
    a0 = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
    a1 = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"
    out = run("app", "register", str(f), "--multisig", f"{a0},{a1}", "--threshold", "2")
    app_id = re.search(r"app_id: (0x[0-9a-fA-F]{40})", out).group(1)  # type: ignore[union-attr]
    assert f"0x{compose_hash(compose).hex()}" in out
    new = "cd" * 32
    assert "proposal 0" in run("app", "upgrade", "propose", app_id, new)
    assert "not enough approvals" in run("app", "upgrade", "execute", app_id, "0", ok=False)
    assert "2/2" in run("app", "--key-file", str(k2), "upgrade", "approve", app_id, "0")
    run("app", "upgrade", "execute", app_id, "0")
    state = json.loads(run("app", "show", app_id, "--json"))
    assert "0x" + new in state["allowed_compose_hashes"] and state["owner_kind"] == "multisig"
    assert "governed by a multisig" in run("app", "allow-hash", app_id, "ef" * 32, ok=False)


def test_owner_flow_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text('{"name": "a"}')
    run("chain", "deploy")
    app_id = re.search(r"app_id: (0x\w+)", run("app", "register", str(f))).group(1)  # type: ignore[union-attr]
    run("app", "allow-hash", app_id, "11" * 32)
    run("app", "remove-hash", app_id, "11" * 32)
    assert "compose hash not allowed" in run("app", "remove-hash", app_id, "11" * 32, ok=False)
    assert "32 bytes of hex" in run("app", "allow-hash", app_id, "zz", ok=False)
    assert "not an address" in run("app", "show", "0x12", ok=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert "not valid JSON" in run("app", "register", str(bad), ok=False)
    stranger = tmp_path / "k"
    stranger.write_text(DEV_KEYS[4])
    assert "not by this signer" in run(
        "app", "--key-file", str(stranger), "allow-hash", app_id, "11" * 32, ok=False
    )
    assert "cannot reach" in run("chain", "--rpc-url", "http://127.0.0.1:9", "status", ok=False)


def test_timelock_register(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text('{"name": "t"}')
    run("chain", "deploy")
    out = run("app", "register", str(f), "--timelock", "3600")
    app_id = re.search(r"app_id: (0x\w+)", out).group(1)  # type: ignore[union-attr]
    out = run("app", "upgrade", "propose", app_id, "22" * 32)
    cid = re.search(r"call id (0x[0-9a-f]{64})", out).group(1)  # type: ignore[union-attr]
    assert "too early" in run("app", "upgrade", "execute", app_id, cid, ok=False)
    assert cid in run("app", "show", app_id)


def test_node_commands(tmp_path: Path) -> None:
    run("chain", "deploy")
    out = run(
        "node",
        "register",
        "--device-id",
        "aa" * 32,
        "--attestation-hash",
        "bb" * 32,
        "--capacity",
        "2",
        "--price",
        "1gwei",
        "--stake",
        "1eth",
    )
    assert "node_id: 0" in out
    run("node", "stake", "0", "0.5eth")
    assert "unstaking 500000000000000000 wei" in run("node", "unstake", "0", "0.5eth")
    assert "unstake delay not over" in run("node", "unstake", "0", "--withdraw", ok=False)
    assert "not an amount" in run("node", "stake", "0", "lots", ok=False)
    assert "stake below the minimum" in run(
        "node",
        "register",
        "--device-id",
        "aa" * 32,
        "--attestation-hash",
        "bb" * 32,
        "--capacity",
        "2",
        "--price",
        "1",
        "--stake",
        "1",
        ok=False,
    )
