"""A user's journey through the CLI on the docker runtime (real Docker Engine, the hello image, the local
cloud in this process): deploy a two-service app with secrets; upgrade it; move it under a timelock; upgrade
to a hash the timelock has not let through yet and see the old version keep serving while the pending call
is reported; advance the chain's time; commit; see the new version serve with every secret kept. Then a
rollout that fails returns to the previous version.

Every command is the CLI's (typer's CliRunner, in this process, against the cloud's endpoints.json)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from teecloud.cli import app as cli
from tests.e2e.conftest import wait_serving

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SECRETS = {
    "DB_PASSWORD": "pw-" + hashlib.sha256(b"journey-db").hexdigest()[:16],
    "API_TOKEN": "tok-journey-42",
}
DELAY = 3600

COMPOSE = """services:
  web:
    image: teecloud/hello:0.1
    ports:
      - "127.0.0.1::8080"
    environment:
      - GREETING={greeting}
      - HELLO_PORT=8080
    volumes:
      - data:/data
  api:
    image: teecloud/hello:0.1
    ports:
      - "127.0.0.1::8081"
    environment:
      - GREETING={greeting}
      - HELLO_PORT=8081
    command: {command}
volumes:
  data:
"""
HELLO_CMD = '["python3", "/app/app.py"]'


@pytest.fixture
def home(cloud: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    monkeypatch.setenv("TEECLOUD_HOME", str(cloud.home))  # the CLI finds the cloud's endpoints.json there
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    yield Path(cloud.home)


def _compose(tmp: Path, version: str, command: str = HELLO_CMD) -> Path:
    d = tmp / version
    d.mkdir(exist_ok=True)
    p = d / "docker-compose.yml"
    p.write_text(COMPOSE.format(greeting=version, command=command))
    return p


def run(*argv: str, ok: bool = True) -> Any:
    r = CliRunner().invoke(cli, list(argv), catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, f"teecloud {' '.join(argv)} -> {r.exit_code}\n{r.stdout}\n{r.stderr}"
    return r


def _serving(session: Any, name: str) -> dict[str, Any]:
    """What each service of the running app reports: its measured compose hash and its secrets' digests."""
    st = session.node.get(name)
    assert st.status == "running", st.error
    assert len(st.urls) == 2, st.urls
    seen: dict[str, Any] = {"compose_hash": st.compose_hash}
    for url in st.urls:
        info = wait_serving(url + "/").json()
        assert info["compose_hash"].removeprefix("0x") == st.compose_hash  # measured = what the node runs
        for key in SECRETS:
            got = httpx.get(url + "/secret", params={"name": key}, timeout=10).json()
            seen[f"{url}:{key}"] = got
            assert got == {"present": True, "sha256": hashlib.sha256(SECRETS[key].encode()).hexdigest()}
    return seen


def test_deploy_upgrade_timelock_pending_commit(home: Path, session: Any, tmp_path: Path) -> None:
    # 1. deploy a two-service app with secrets
    v1 = _compose(tmp_path, "v1")
    env_args = [a for k, v in SECRETS.items() for a in ("-e", f"{k}={v}")]
    r = run("deploy", str(v1), "--name", "journey", *env_args, "--json")
    deployed = json.loads(r.stdout)
    assert deployed["status"] == "running" and deployed["verdict"]["ok"], deployed
    assert sorted(json.loads(session.node.get("journey").app_compose)["allowed_envs"]) == sorted(SECRETS)
    app_id = deployed["app_id"]
    _serving(session, "journey")
    try:
        # operator commands: full values with --wide, services named in stats, the local cloud's KMS found
        wide = run("ps", "--wide").stdout
        assert app_id.removeprefix("0x") in wide and deployed["compose_hash"].removeprefix("0x") in wide
        stats = json.loads(run("cvm", "stats", "journey", "--json").stdout)
        assert sorted(r["service"] for r in stats) == ["api", "web"], stats
        assert re.search(r"public_key\s+[0-9a-f]{64}", run("kms", "pubkey", app_id).stdout)
        # 2. upgrade (this signer owns the app: the hash is allowed directly); the secrets are kept
        v2 = _compose(tmp_path, "v2")
        r = run("upgrade", "journey", str(v2))
        assert "running" in r.stdout and "attested" in r.stdout, r.stdout
        hash_v2 = session.node.get("journey").compose_hash
        assert hash_v2 != deployed["compose_hash"].removeprefix("0x")
        _serving(session, "journey")

        # 3. move it under a timelock: AppAuth's two steps, the acceptance waits for the delay
        r = run("app", "transfer-ownership", "journey", "--timelock", str(DELAY))
        assert "waiting for the new owner's acceptance" in r.stdout and "accept_ownership" in r.stdout
        run("chain", "advance-time", str(DELAY + 1))
        r = run("app", "transfer-ownership", "journey")
        assert "is now owned by" in r.stdout, r.stdout
        assert session.chain.governance_kind(session.chain.app_owner(app_id)) == "timelock"

        # 4. upgrade to a hash the timelock has not let through: pending, and v2 keeps serving
        v3 = _compose(tmp_path, "v3")
        r = run("compose-hash", str(v3), "--name", "journey", "--allowed-env", "DB_PASSWORD", "--allowed-env",
                "API_TOKEN", "--json")  # fmt: skip
        hash_v3 = json.loads(r.stdout)["compose_hash"]
        r = run("upgrade", "journey", str(v3))
        assert "keeps running its current version" in r.stdout and hash_v3 in r.stdout, r.stdout
        assert re.search(
            r"executable from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in (59m \d+s|1h 0m 0s)", r.stdout
        )
        assert f"add compose hash {hash_v3} to app journey" in r.stdout
        assert not session.chain.is_compose_hash_allowed(app_id, hash_v3)
        assert _serving(session, "journey")["compose_hash"] == hash_v2  # never taken down
        shown = run("app", "show", "journey").stdout
        assert f"add compose hash {hash_v3} to app journey" in shown and "executable from" in shown
        # --commit before the ETA: still pending, nothing rolled out; an early execute says when
        r = run("upgrade", "journey", str(v3), "--commit", "--json")
        pending = json.loads(r.stdout)
        assert pending["status"] == "pending" and pending["pending"]["seconds_left"] > 0
        early = run("app", "upgrade", "execute", app_id, pending["pending"]["id"], ok=False)
        assert early.exit_code == 1 and "too early" in early.stderr and "executable from" in early.stderr
        assert session.node.get("journey").compose_hash == hash_v2

        # 5. advance time; commit: the timelocked call runs, the new version rolls out with its secrets;
        # the file is gone by now: the plan stored while pending is what rolls out
        run("chain", "advance-time", str(DELAY + 1))
        v3.unlink()
        r = run("upgrade", "journey", "--commit")
        assert "executed timelock" in r.stderr.replace("\n", " "), r.stderr
        assert f"compose_hash {hash_v3.removeprefix('0x')}: running" in r.stdout, r.stdout
        assert session.chain.is_compose_hash_allowed(app_id, hash_v3)
        assert _serving(session, "journey")["compose_hash"] == hash_v3.removeprefix("0x")
        r = run("attest", "journey")
        assert "attested" in r.stdout

        # 6. the same command again: nothing to do (idempotent)
        v3 = _compose(tmp_path, "v3")
        assert "nothing to do" in run("upgrade", "journey", str(v3)).stdout
        # rm without a terminal (CliRunner's stdin is not one) refuses, says how, and removes nothing
        r = run("rm", "journey", ok=False)
        assert r.exit_code == 1 and "pass -y/--yes" in r.stderr, r.output
        assert session.node.get("journey").status == "running"
    finally:
        run("rm", "journey", "-y", ok=False)


def test_failed_rollout_returns_to_the_previous_version(home: Path, session: Any, tmp_path: Path) -> None:
    v1 = _compose(tmp_path, "r1")
    env_args = [a for k, v in SECRETS.items() for a in ("-e", f"{k}={v}")]
    run("deploy", str(v1), "--name", "rollback", *env_args)
    before = session.node.get("rollback").compose_hash
    try:
        broken = _compose(tmp_path, "r2", command='["python3", "-c", "raise SystemExit(3)"]')
        r = run("upgrade", "rollback", str(broken), ok=False)
        assert r.exit_code == 1 and "rolled back to compose hash " + before in r.stderr.replace("\n", ""), (
            r.output
        )
        st = session.node.get("rollback")
        assert st.compose_hash == before and st.status == "running", st
        _serving(session, "rollback")
    finally:
        run("rm", "rollback", "-y", ok=False)
