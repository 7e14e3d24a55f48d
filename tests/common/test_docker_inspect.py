"""teecloud._docker_inspect: container states from real `docker inspect` output (tests/common/data/README.md),
and the two readers of it, the node's Docker backend and the guest agent, agree on them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from teecloud._docker_inspect import container_states
from teecloud.agent import vm_agent
from teecloud.node.runtime.base import ContainerState
from teecloud.node.runtime.docker import DockerRuntime

INSPECT = Path(__file__).parent / "data" / "docker-inspect-compose.json"

WEB = {
    "service": "web",
    "container": "dupes7-capture-web",
    "state": "running",
    "health": "starting",
    "exit_code": 0,
    "ports": [
        {"container_port": 5353, "protocol": "udp", "host_ip": "127.0.0.1", "host_port": 32768},
        {"container_port": 8000, "protocol": "tcp", "host_ip": "127.0.0.1", "host_port": 32768},
    ],
}
JOB = {
    "service": "job",
    "container": "dupes7-capture-job",
    "state": "exited",
    "health": None,
    "exit_code": 3,
    "ports": [],
}


def test_real_inspect_output_reads_as_container_states() -> None:
    # sorted by container name: the job (inspected second) comes first
    assert container_states(INSPECT.read_bytes()) == [JOB, WEB]
    assert container_states(INSPECT.read_text()) == [JOB, WEB]


def test_published_ports_one_per_host_binding_sorted() -> None:
    doc = json.loads(INSPECT.read_text())
    web = doc[0]
    web["NetworkSettings"]["Ports"] = {
        "8000/tcp": [
            {"HostIp": "127.0.0.1", "HostPort": "40002"},
            {"HostIp": "::1", "HostPort": "40001"},
        ],
        "9000/tcp": None,  # exposed, not published
        "53": [{"HostIp": "", "HostPort": "40053"}],  # no protocol: Docker's default, tcp
    }
    [state] = container_states(json.dumps([web]))
    assert state["ports"] == [
        {"container_port": 53, "protocol": "tcp", "host_ip": "", "host_port": 40053},
        {"container_port": 8000, "protocol": "tcp", "host_ip": "::1", "host_port": 40001},
        {"container_port": 8000, "protocol": "tcp", "host_ip": "127.0.0.1", "host_port": 40002},
    ]


def test_missing_sections_read_as_defaults() -> None:
    assert container_states(b'[{"Name": "/bare"}]') == [
        {
            "service": "?",
            "container": "bare",
            "state": "unknown",
            "health": None,
            "exit_code": 0,
            "ports": [],
        }
    ]
    assert container_states(b"[]") == []


@pytest.fixture
def docker_cli(tmp_path: Path) -> Path:
    """A stand-in `docker` CLI (simulated): `ps -aq` lists the two captured containers, `inspect` prints the
    captured output."""
    ids = " ".join(c["Id"] for c in json.loads(INSPECT.read_text()))
    cli = tmp_path / "bin" / "docker"
    cli.parent.mkdir()
    cli.write_text(
        "#!/bin/sh\n"
        f'case "$1" in\n  ps) echo "{ids}" ;;\n  inspect) cat "{INSPECT}" ;;\n  *) exit 2 ;;\nesac\n'
    )
    cli.chmod(cli.stat().st_mode | stat.S_IXUSR)
    return cli


def test_docker_backend_and_guest_agent_read_the_same_states(
    docker_cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = DockerRuntime(docker=str(docker_cli)).ps("dupes7cap")
    assert backend == [ContainerState(**JOB), ContainerState(**WEB)]
    monkeypatch.setenv("PATH", f"{docker_cli.parent}{os.pathsep}{os.environ['PATH']}")
    assert vm_agent.list_containers("dupes7cap") == [JOB, WEB]
