"""Agent fixtures: a booted simulated CVM with the local dev key provider, served on short Unix socket
paths (sun_path is 107 bytes) and on 127.0.0.1:<free port>."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from teecloud.agent import AgentRunner, LocalDevKeyProvider, boot
from teecloud.tee.simulated import SimulatedTdx

COMPOSE = {
    "manifest_version": 2,
    "name": "demo-app",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  web:\n    image: nginx\n",
    "kms_enabled": False,
    "gateway_enabled": False,
    "public_logs": True,
    "public_sysinfo": True,
    "public_tcbinfo": True,
    "allowed_envs": ["API_KEY"],
    "no_instance_id": False,
    "secure_time": False,
}


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="tca-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def booted(teecloud_home):
    tee = SimulatedTdx(teecloud_home)
    state = boot(tee, json.dumps(COMPOSE, indent=2), None, None, LocalDevKeyProvider(teecloud_home))
    return state


@pytest.fixture
def agent(booted, sockdir):
    runner = AgentRunner(
        booted, dstack_sock=sockdir / "dstack.sock", tappd_sock=sockdir / "tappd.sock", port=0
    )
    runner.start()
    yield runner
    runner.stop()
