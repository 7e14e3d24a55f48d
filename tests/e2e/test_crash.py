"""Crash recovery: `teecloud up` killed with SIGKILL (no clean-up at all) and started again brings the app
back, attested, with its encrypted data. Restarting dockerd is covered when TEECLOUD_E2E_RESTART_DOCKERD=1
(it stops every container on the machine, so it is opt-in)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import HELLO, wait_serving

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _project_containers(instance: str) -> list[str]:
    from teecloud.node.runtime.docker import project_name

    out = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project_name(instance)}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out


def _started_at(instance: str) -> dict[str, str]:
    """container id -> State.StartedAt, for the app's running containers."""
    ids = _project_containers(instance)
    if not ids:
        return {}
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.Id}} {{.State.StartedAt}}", *ids], capture_output=True, text=True
    ).stdout.split("\n")
    return {line.split()[0][:12]: line.split()[1] for line in out if line.strip()}


def _published_ports(instance: str) -> set[str]:
    ports: set[str] = set()
    for cid in _project_containers(instance):
        out = subprocess.run(["docker", "port", cid], capture_output=True, text=True).stdout
        ports.update(line.rsplit(":", 1)[1] for line in out.splitlines() if ":" in line)
    return ports


def _start_up(home: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TEECLOUD_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from teecloud.cli import main; main()", "up"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    from teecloud.cloud.endpoints import read_endpoints

    deadline = time.monotonic() + 90
    while read_endpoints(home) is None or read_endpoints(home).pid != proc.pid:  # type: ignore[union-attr]
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(
                f"teecloud up did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
            )
        time.sleep(0.1)
    return proc


def test_sigkill_of_the_node_process_and_restart(hello_image: str, tmp_path: Path) -> None:
    from teecloud.cloud.deploy import Session, deploy
    from teecloud.cloud.verify import verify_app

    home = tmp_path / "home"
    proc = _start_up(home)
    compose = tmp_path / "crash" / "docker-compose.yml"
    compose.parent.mkdir()
    compose.write_text((HELLO / "docker-compose.yml").read_text().replace('"8080:8080"', '"127.0.0.1::8080"'))
    session: Any = Session(home)
    instance = ""
    try:
        r = deploy(session, compose, name="crash")
        assert r.status == "running", r.error
        instance = r.instance_id
        url = r.urls[0]
        wait_serving(url + "/")  # "running" means the containers run; the app may still be binding its port
        assert httpx.put(url + "/note", content="survives-sigkill", timeout=10).status_code == 200

        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        session.close()
        proc = _start_up(home)
        session = Session(home)
        st = session.node.wait(instance)
        assert st.status == "running", st.error
        url = st.urls[0]  # the host port is chosen again on every boot
        assert wait_serving(url + "/note").json()["note"] == "survives-sigkill"
        verdict = verify_app(session.node, instance, platform=session.platform, chain=session.chain)
        assert verdict.ok, verdict.to_json()

        if os.environ.get("TEECLOUD_E2E_RESTART_DOCKERD") == "1":
            # stops the engine scripts/test.sh started, by its recorded PID (never another engine by name)
            root = Path(__file__).resolve().parents[2]
            before = _started_at(instance)
            assert before, "the app's containers are not found"
            subprocess.run(["bash", str(root / "scripts" / "dockerd.sh"), "stop"], check=True)
            time.sleep(2)
            subprocess.run(["bash", str(root / "scripts" / "dockerd.sh")], check=True)
            # restart: unless-stopped brings the containers back (a new start, seen in StartedAt); the agent
            # and the volume never went away; the node reports the host port the engine published this time
            deadline = time.monotonic() + 60
            after: dict[str, str] = {}
            while time.monotonic() < deadline:
                after = _started_at(instance)
                if after and all(after.get(c, "") not in ("", before[c]) for c in before):
                    break
                time.sleep(1)
            assert after and all(after.get(c) not in (None, before[c]) for c in before), (before, after)
            st = session.node.wait(instance)
            assert st.status == "running", st.error
            url = st.urls[0]
            assert url.rsplit(":", 1)[1] in _published_ports(instance), (url, _published_ports(instance))
            assert wait_serving(url + "/note", timeout=60).json()["note"] == "survives-sigkill"
            assert verify_app(session.node, instance, platform=session.platform, chain=session.chain).ok
    finally:
        if instance:
            try:
                session.node.remove(instance)
            except Exception:
                pass
        session.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
