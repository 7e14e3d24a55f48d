"""examples/hello end to end on the docker runtime: deploy, attest, secrets, encrypted data, upgrades,
restarts. The tests share one CVM, deployed once by the `hello` fixture (which also writes the note every
data test reads), so any one of them runs alone too: `pytest tests/e2e/test_hello.py -k upgrade`."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import HELLO, wait_serving

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SECRET = "s3cr3t-e2e-" + hashlib.sha256(b"teecloud e2e").hexdigest()[:16]
NOTE = "note-on-the-encrypted-volume-" + hashlib.sha256(b"note").hexdigest()[:12]


@pytest.fixture(scope="module")
def hello(session: Any) -> dict[str, Any]:
    """The deployed app: its DeployResult, the phases it went through, and its ids/URL (kept current by the
    upgrade tests)."""
    from teecloud.cloud.deploy import deploy

    phases: list[str] = []
    r = deploy(
        session,
        HELLO / "docker-compose.yml",
        name="hello",
        env={"SECRET": SECRET, "NOT_ALLOWED": "dropped-value"},
        allowed_envs=["SECRET"],
        progress=lambda phase, _d: phases.append(phase),
    )
    assert r.status == "running", r.error
    wait_serving(r.urls[0] + "/")
    assert httpx.put(r.urls[0] + "/note", content=NOTE, timeout=10).status_code == 200
    return {
        "result": r,
        "phases": phases,
        "app_id": r.app_id,
        "compose_hash": r.compose_hash,
        "instance": r.instance_id,
        "url": r.urls[0],
    }


def _grep(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:
            continue
    return hits


def _compose_variant(tmp: Path, greeting: str) -> Path:
    text = (HELLO / "docker-compose.yml").read_text().replace("GREETING=hello", f"GREETING={greeting}")
    assert greeting == "hello" or text != (HELLO / "docker-compose.yml").read_text()
    d = tmp / greeting
    d.mkdir(exist_ok=True)
    (d / "docker-compose.yml").write_text(text)
    return d / "docker-compose.yml"


def test_deploy_is_attested_and_allowed_on_chain(session: Any, hello: dict[str, Any]) -> None:
    r, phases = hello["result"], hello["phases"]
    assert r.verdict is not None and r.verdict.ok, r.verdict.to_json()
    assert r.verdict.compose_hash == r.compose_hash
    assert r.verdict.app_id == r.app_id
    assert session.chain.is_compose_hash_allowed(r.app_id, r.compose_hash)
    assert "registering" in phases and "running" in phases
    from teecloud.node.boot import PHASES

    assert set(PHASES) <= set(r.boot_timings)  # every boot phase ran (and was timed)
    # the app itself, through the official dstack-sdk inside the container
    body = wait_serving(r.urls[0] + "/").json()
    assert body["app_id"] == r.app_id and body["compose_hash"] == r.compose_hash
    assert len(body["key"]) == 64 and len(body["signature_chain"]) == 2


def test_quote_from_inside_the_app_replays_to_the_deployed_hash(session: Any, hello: dict[str, Any]) -> None:
    from teecloud.attestation.verifier import verify_tdx_with_event_log

    nonce = hashlib.sha256(b"app-nonce").digest()
    q = httpx.get(hello["url"] + "/quote", params={"nonce": nonce.hex()}, timeout=10).json()
    p = session.platform
    import dataclasses

    from teecloud.attestation.policy import Policy

    ev = verify_tdx_with_event_log(
        bytes.fromhex(q["quote"]),
        p.collateral(),
        q["event_log"],
        now=int(__import__("time").time()),
        dev_root_der=p.dev_root_der(),
        policy=dataclasses.replace(Policy.default(), allow_simulated=True),
    )
    assert ev.report_data[:32] == nonce
    assert ev.app_info is not None and ev.app_info.compose_hash.hex() == hello["compose_hash"]
    names = [name for name, _ in ev.app_info.events]
    # dstack's boot order, KMS mode, with teecloud's boot-nonce (the KMS's challenge for this boot)
    assert names[:7] == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-nonce",
        "boot-mr-done",
        "os-image-hash",
    ]
    assert names[-3:] == ["key-provider", "storage-fs", "system-ready"]


def test_cli_verify_app_checks_the_running_app(cloud: Any, hello: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app

    env = {"TEECLOUD_HOME": str(cloud.home)}
    r = CliRunner().invoke(app, ["verify", "--app", "hello", "--json"], env=env)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["is_valid"] is True and doc["tee"] == "tdx-simulated"
    assert doc["compose_hash"] == hello["compose_hash"] and doc["app_id"] == hello["app_id"]
    missing = CliRunner().invoke(app, ["verify", "--app", "no-such-app"], env=env)
    assert missing.exit_code != 0 and "Traceback" not in missing.output


def test_same_app_without_the_dev_root_is_not_attested(session: Any, hello: dict[str, Any]) -> None:
    from teecloud.cloud.verify import verify_attestation

    nonce = b"n" * 32
    att = session.node.attestation(hello["instance"], nonce)
    verdict = verify_attestation(
        att,
        nonce,
        collateral=session.platform.collateral(),
        dev_root_der=None,
        chain=session.chain,
        now=int(__import__("time").time()),
    )
    assert not verdict.ok
    assert "development root" in verdict.reason
    # a quote replayed with another nonce is refused
    verdict = verify_attestation(
        att,
        b"m" * 32,
        collateral=session.platform.collateral(),
        dev_root_der=session.platform.dev_root_der(),
        chain=session.chain,
        now=int(__import__("time").time()),
    )
    assert not verdict.ok and "nonce" in verdict.reason


def test_secret_env_reaches_the_app_but_not_the_node_disk(
    cloud: Any, session: Any, hello: dict[str, Any]
) -> None:
    r = httpx.get(hello["url"] + "/secret", timeout=10).json()
    assert r == {"present": True, "sha256": hashlib.sha256(SECRET.encode()).hexdigest()}
    dropped = httpx.get(hello["url"] + "/secret", params={"name": "NOT_ALLOWED"}, timeout=10).json()
    assert dropped["present"] is False  # not in allowed_envs: the CVM dropped it
    assert session.node.get(hello["instance"]).dropped_env == ["NOT_ALLOWED"]
    # not in the instance directory, not in Docker's container config / inspect output
    assert _grep(cloud.home, SECRET.encode()) == []
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project=tc-{hello['instance'][:16]}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert ids
    inspect = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, check=True).stdout
    assert SECRET not in inspect
    for cid in json.loads(inspect):
        cdir = Path("/var/lib/docker/containers") / cid["Id"]
        if cdir.is_dir():
            assert _grep(cdir, SECRET.encode()) == []


def test_volume_data_is_ciphertext_and_survives_stop_start(
    cloud: Any, session: Any, hello: dict[str, Any]
) -> None:
    assert httpx.put(hello["url"] + "/note", content=NOTE, timeout=10).status_code == 200
    inst = cloud.node.store.get(hello["instance"])
    assert _grep(inst.cipher_dir, NOTE.encode()) == []
    assert _grep(cloud.home, NOTE.encode()) == []
    st = session.node.action(hello["instance"], "stop")
    assert st.status == "stopped"
    assert not any(c.state == "running" for c in st.containers)
    assert not (inst.mount_point / "volumes").exists()  # unmounted: nothing readable
    st = session.node.wait(session.node.action(hello["instance"], "start").instance_id)
    assert st.status == "running", st.error
    assert wait_serving(hello["url"] + "/note").json()["note"] == NOTE


def test_upgrade_not_allowed_on_chain_gets_no_keys_and_does_not_start(
    session: Any, tmp_path: Path, hello: dict[str, Any]
) -> None:
    from teecloud.cloud.deploy import upgrade

    r = upgrade(session, hello["instance"], _compose_variant(tmp_path, "unapproved"), register=False)
    assert r.status == "failed"
    assert ("keys" in r.error and "not allowed" in r.error.lower()) or "compose" in r.error.lower(), r.error
    st = session.node.get(hello["instance"])
    assert st.phase == "keys"
    assert not any(c.state == "running" for c in st.containers)
    with pytest.raises(httpx.HTTPError):
        httpx.get(hello["url"] + "/health", timeout=2)


def test_upgrade_inside_its_timelock_delay_gets_no_keys_until_executed(session: Any, tmp_path: Path) -> None:
    """An app owned by a timelock: a queued compose hash is announced but not valid until the delay has
    passed, so a CVM upgraded to it early gets no keys and does not start; after execution it does."""
    from teecloud.cloud.deploy import build_app_compose, deploy, upgrade

    chain = session.chain

    def variant(greeting: str) -> Path:
        p = _compose_variant(tmp_path, greeting)
        p.write_text(p.read_text().replace('"8080:8080"', '"127.0.0.1::8080"'))
        return p

    v1, v2 = variant("timelocked-v1"), variant("timelocked-v2")
    _, hash_v1 = build_app_compose(v1.read_text(), name="timelocked")
    _, hash_v2 = build_app_compose(v2.read_text(), name="timelocked")
    delay = 3600
    timelock = chain.deploy_timelock(chain.address, delay)
    app_id = chain.register_app(timelock, hash_v1)  # owned by the timelock from birth
    r = deploy(session, v1, name="timelocked", app_id=app_id)
    assert r.status == "running", r.error
    try:
        queued = chain.propose_app_change(app_id, "add_compose_hash", hash_v2)
        assert queued["kind"] == "timelock"
        assert not chain.is_compose_hash_allowed(app_id, hash_v2)  # announced, not yet valid

        early = upgrade(session, r.instance_id, v2, register=False)
        assert early.status == "failed" and "not allowed" in early.error.lower(), early.error
        st = session.node.get(r.instance_id)
        assert st.phase == "keys" and not any(c.state == "running" for c in st.containers)

        chain.increase_time(delay + 60)
        chain.timelock_execute(timelock, queued["id"])
        assert chain.is_compose_hash_allowed(app_id, hash_v2)
        late = upgrade(session, r.instance_id, v2, register=False)
        assert late.status == "running", late.error
        assert late.compose_hash == hash_v2.hex()
    finally:
        session.node.remove(r.instance_id)


def test_allowed_upgrade_keeps_data_and_is_attested(
    session: Any, tmp_path: Path, hello: dict[str, Any]
) -> None:
    from teecloud.cloud.deploy import upgrade
    from teecloud.cloud.verify import verify_app

    r = upgrade(session, hello["instance"], _compose_variant(tmp_path, "hello-v2"))
    assert r.status == "running", r.error
    assert r.compose_hash != hello["compose_hash"] and r.app_id == hello["app_id"]
    assert wait_serving(hello["url"] + "/note").json()["note"] == NOTE
    assert httpx.get(hello["url"] + "/secret", timeout=10).json()["present"] is True  # env kept
    verdict = verify_app(session.node, hello["instance"], platform=session.platform, chain=session.chain)
    assert verdict.ok and verdict.compose_hash == r.compose_hash
    hello["compose_hash"] = r.compose_hash


def test_node_restart_brings_the_app_back_attested_with_its_data(
    cloud: Any, session: Any, hello: dict[str, Any]
) -> None:
    from teecloud.cloud.verify import verify_app
    from teecloud.devstack import LocalCloud

    cloud.stop()
    cloud.__init__(cloud.home)  # same data directory, fresh process state
    cloud.start()
    from teecloud.cloud.deploy import Session

    s2 = Session(cloud.home)
    try:
        st = s2.node.wait(hello["instance"])
        assert st.status == "running", st.error
        assert wait_serving(hello["url"] + "/note").json()["note"] == NOTE
        verdict = verify_app(s2.node, hello["instance"], platform=s2.platform, chain=s2.chain)
        assert verdict.ok, verdict.to_json()
        assert isinstance(cloud, LocalCloud)
    finally:
        s2.close()
    session.node = s2.node.__class__(
        s2.endpoints.node, Path(s2.endpoints.node_token_file).read_text().strip()
    )


def test_remove_destroys_the_data(cloud: Any, session: Any, hello: dict[str, Any]) -> None:
    inst = cloud.node.store.get(hello["instance"])
    session.node.remove(hello["instance"])
    assert not inst.dir.exists()
    assert not inst.cipher_dir.exists()
    with pytest.raises(Exception, match="no CVM"):
        session.node.get(hello["instance"])
