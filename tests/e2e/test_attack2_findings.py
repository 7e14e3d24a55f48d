"""Second independent review: live reproducers on a real Docker engine (the hello image), through the node's
own DockerRuntime (policy + make_override + docker-compose), without a whole cloud. Each test FAILS while its
finding is open. Project names `tc-attack2-*`; everything is removed afterwards.

Finding A writes, and then removes, a directory at the host's /run/dstack.sock: the test skips if that path
already exists (it would then hand the host's own agent to the app).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from teecloud.agent.storage import EncryptedVolume
from teecloud.node.errors import ComposeRejected
from teecloud.node.runtime.base import ComposeSpec, ResourceLimits
from teecloud.node.runtime.docker import DockerRuntime

pytestmark = pytest.mark.docker


@pytest.fixture
def run_app(hello_image: str, tmp_path: Path) -> Iterator:
    rt = DockerRuntime()
    started: list[ComposeSpec] = []

    def run(name: str, text: str, wait: float = 8.0) -> tuple[DockerRuntime, ComposeSpec]:
        text = text.replace("IMAGE", hello_image)
        spec = ComposeSpec(
            project=f"tc-attack2-{name}",
            workdir=tmp_path / name / "compose",
            agent_dir=tmp_path / name / "agent",
            volume_root=tmp_path / name / "mnt",
        )
        spec.agent_dir.mkdir(parents=True)
        spec.volume_root.mkdir(parents=True)
        for sock in ("dstack.sock", "tappd.sock"):
            (spec.agent_dir / sock).touch()
        dirs = rt.prepare(spec, text, ResourceLimits(cpus=1, memory_mb=128, pids=100))  # policy + override
        EncryptedVolume(tmp_path / name / "cipher", spec.volume_root).ensure_dirs(dirs)
        started.append(spec)
        rt.up(spec)
        time.sleep(wait)
        return rt, spec

    yield run
    for spec in started:
        rt.down(spec)


def _logs(rt: DockerRuntime, spec: ComposeSpec, service: str) -> str:
    return b"".join(rt.logs(spec.project, service=service, tail=200)).decode(errors="replace")


def test_findingA_app_gets_no_host_path_through_the_agent_socket_bind(run_app) -> None:
    host = Path("/run/dstack.sock")
    if host.exists() or Path("/var/run/dstack.sock").exists():
        pytest.skip("the host has a /run/dstack.sock: this test would hand it to the app")
    text = """
services:
  a:
    image: IMAGE
    entrypoint: ["sh", "-c", "id > /hostagent/written-by-app; sleep 600"]
    volumes:
      - data:/hostagent
      - /var/run/dstack.sock:/hostagent
volumes:
  data: {}
"""
    try:
        rt, spec = run_app("a", text, wait=3)
    except ComposeRejected:
        return
    try:
        ids = rt._container_ids(spec.project)
        binds = json.loads(rt._docker("inspect", *ids).stdout)[0]["HostConfig"]["Binds"] or []
        created = host.is_dir()
        written = (host / "written-by-app").exists()
    finally:
        rt.down(spec)
        if host.is_dir():
            (host / "written-by-app").unlink(missing_ok=True)
            host.rmdir()
    assert not created and not written, f"dockerd bind-mounted the host's /var/run/dstack.sock: {binds}"


def test_findingB_app_cannot_redirect_dockers_masked_paths(run_app) -> None:
    text = """
services:
  prep:
    image: IMAGE
    entrypoint: ["sh", "-c", "rm -rf /v/null; ln -s /proc/keys /v/null"]
    volumes: [devvol:/v]
  b:
    image: IMAGE
    entrypoint:
      - sh
      - -c
      - grep -E ' /proc/(keys|timer_list) ' /proc/self/mountinfo; echo KEYS $$(wc -l < /proc/keys); sleep 600
    depends_on: {prep: {condition: service_completed_successfully}}
    volumes: [devvol:/dev]
volumes:
  devvol: {}
"""
    try:
        rt, spec = run_app("b", text)
    except ComposeRejected:
        return
    out = _logs(rt, spec, "b")
    # Docker masks /proc/keys and /proc/timer_list with /dev/null; runc followed the app's symlink instead
    assert "/keys /proc/timer_list" not in out and "/keys /proc/keys" not in out, out
