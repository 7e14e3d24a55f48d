"""`rm` of an app that failed because Compose refused its file: `compose down` cannot load that file either,
yet nothing of the app may be reported left behind unless it really is (real Docker engine and Compose)."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from teecloud.node.errors import RuntimeFailed
from teecloud.node.runtime.base import ComposeSpec
from teecloud.node.runtime.docker import DockerRuntime

pytestmark = pytest.mark.docker

# What `compose up` refuses (the failed deploy of issue 17): a misspelt key under a service.
REFUSED = "services:\n  web:\n    image: busybox\n    enviroment:\n      A: b\n"


def _spec(tmp_path: Path) -> ComposeSpec:
    work = tmp_path / "compose"
    work.mkdir()
    spec = ComposeSpec(
        project=f"tc-test-{secrets.token_hex(4)}",
        workdir=work,
        agent_dir=tmp_path / "agent",
        volume_root=tmp_path / "data",
    )
    spec.compose_file.write_text(REFUSED)
    spec.override_file.write_text("services:\n  web:\n    labels:\n      x: y\n")
    return spec


def _labelled(kind: str, project: str) -> list[str]:
    r = subprocess.run(
        ["docker", kind, "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return r.stdout.split()


def test_down_of_a_refused_file_reports_nothing_and_removes_by_label(tmp_path: Path) -> None:
    runtime = DockerRuntime()
    spec = _spec(tmp_path)
    # the condition: Compose itself cannot `down` this project from its files
    with pytest.raises(RuntimeFailed):
        runtime._compose_run(spec, "down", "-v")
    # something the project did create before failing (Compose makes the network first)
    made = {kind: f"{spec.project}_{kind}" for kind in ("network", "volume")}
    try:
        for kind, name in made.items():
            subprocess.run(
                ["docker", kind, "create", "--label", f"com.docker.compose.project={spec.project}", name],
                capture_output=True,
                timeout=30,
                check=True,
            )
        assert _labelled("network", spec.project) and _labelled("volume", spec.project)
        runtime.down(spec)  # no error: nothing is left
        assert _labelled("network", spec.project) == [] and _labelled("volume", spec.project) == []
        runtime.down(spec)  # and again, with nothing there at all
    finally:  # whatever happened, this test leaves nothing in the engine
        for kind, name in made.items():
            subprocess.run(["docker", kind, "rm", name], capture_output=True, timeout=30, check=False)
