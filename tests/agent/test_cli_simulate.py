from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from dstack_sdk import DstackClient
from typer.testing import CliRunner

from teecloud.cli.agent_cmd import app

from .conftest import COMPOSE


def test_simulate_serves_until_sigterm(sockdir, teecloud_home):
    compose = sockdir / "app-compose.json"
    compose.write_text(json.dumps(COMPOSE))
    sock = sockdir / "d.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from teecloud.cli import main; main()",
            "agent",
            "simulate",
            "--compose",
            str(compose),
            "--socket",
            str(sock),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TEECLOUD_HOME": str(teecloud_home)},
    )
    try:
        deadline = time.time() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.time() < deadline, "agent did not start"
            time.sleep(0.1)
        assert DstackClient(str(sock)).info().app_name == "demo-app"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert str(sock) in out.decode()
    assert not sock.exists()


def test_simulate_bad_inputs_fail_cleanly(sockdir):
    r = CliRunner().invoke(app, ["simulate", "--compose", str(sockdir / "missing.json")])
    assert r.exit_code == 1 and "cannot read" in r.output and "Traceback" not in r.output
    bad = sockdir / "bad.json"
    bad.write_text("{nope")
    r = CliRunner().invoke(app, ["simulate", "--compose", str(bad)])
    assert r.exit_code == 1 and "not valid UTF-8 JSON" in r.output
    r = CliRunner().invoke(app, ["simulate", "--compose", str(bad), "--app-id", "zz"])
    assert r.exit_code == 2
