"""The override file: what a CVM's app gets added, and what it is refused (host resources)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from teecloud.node.errors import ComposeRejected
from teecloud.node.runtime.docker import (
    HOST_BINDING_OPT,
    ComposeSpec,
    ImageConfig,
    ResourceLimits,
    load_compose,
    make_override,
    render_env_file,
)

SPEC = ComposeSpec(
    project="tc-test",
    workdir=Path("/w"),
    agent_dir=Path("/rt/agent"),
    volume_root=Path("/rt/mnt"),
    env_dir=Path("/rt/env"),
)
BUSYBOX = Path("/bin/busybox")


def override(text: str, images: dict[str, ImageConfig] | None = None, spec: ComposeSpec = SPEC):
    return make_override(
        load_compose(text),
        spec,
        images=images or {},
        limits=ResourceLimits(cpus=1.5, memory_mb=256),
        busybox=BUSYBOX,
    )


def test_agent_sockets_loopback_network_and_encrypted_named_volume() -> None:
    ov, dirs = override(
        """
services:
  web:
    image: x
    ports: ["8080:80"]
    volumes: ["data:/data", "/var/run/dstack.sock:/var/run/dstack.sock"]
volumes:
  data: {}
""",
        {"web": ImageConfig(cmd=("python3", "app.py"))},
    )
    vols = {v["target"]: v["source"] for v in ov["services"]["web"]["volumes"]}
    assert vols["/var/run/dstack.sock"] == "/rt/agent/dstack.sock"
    assert vols["/var/run/tappd.sock"] == "/rt/agent/tappd.sock"
    assert ov["networks"]["default"]["driver_opts"][HOST_BINDING_OPT] == "127.0.0.1"
    assert ov["volumes"]["data"]["driver_opts"]["device"] == "/rt/mnt/volumes/data"
    assert "volumes/data" in dirs
    svc = ov["services"]["web"]
    assert svc["cpus"] == 1.5 and svc["mem_limit"] == "256m"
    # env vars come from tmpfs through busybox, then the image's own command
    assert svc["entrypoint"][0] == "/.teecloud/busybox"
    assert svc["command"] == ["python3", "app.py"]


def test_entrypoint_override_drops_image_cmd_and_escapes_dollars() -> None:
    ov, _ = override(
        'services:\n  a:\n    image: x\n    entrypoint: ["sh", "-c", "echo $$HOME"]\n',
        {"a": ImageConfig(entrypoint=("/init",), cmd=("serve",))},
    )
    # Docker drops the image CMD when the entrypoint is replaced; `$` is escaped for compose interpolation
    assert ov["services"]["a"]["command"] == ["sh", "-c", "echo $$HOME"]


def test_no_env_leaves_the_command_alone() -> None:
    spec = ComposeSpec("tc-x", Path("/w"), Path("/a"), Path("/m"), env_dir=None)
    ov, _ = override("services:\n  a:\n    image: x\n", spec=spec)
    assert "entrypoint" not in ov["services"]["a"] and "command" not in ov["services"]["a"]


def test_anonymous_and_image_volumes_are_encrypted_binds() -> None:
    ov, dirs = override(
        "services:\n  a:\n    image: x\n    command: run\n    volumes: ['/cache']\n",
        {"a": ImageConfig(volumes=("/var/lib/db",))},
    )
    srcs = {v["target"]: v["source"] for v in ov["services"]["a"]["volumes"]}
    assert srcs["/cache"].startswith("/rt/mnt/anon/a/")
    assert srcs["/var/lib/db"].startswith("/rt/mnt/anon/a/")
    assert len([d for d in dirs if d.startswith("anon/")]) == 2


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("services:\n  a:\n    image: x\n    privileged: true\n", "privileged"),
        ("services:\n  a:\n    image: x\n    network_mode: host\n", "namespace"),
        ("services:\n  a:\n    image: x\n    pid: host\n", "namespace"),
        ("services:\n  a:\n    image: x\n    volumes: ['/etc:/host-etc']\n", "host path"),
        (
            "services:\n  a:\n    image: x\n    volumes: ['/var/run/docker.sock:/var/run/docker.sock']\n",
            "host path",
        ),
        ("services:\n  a:\n    image: x\n    volumes: ['./data:/data']\n", "host path"),
        ("services:\n  a:\n    image: x\n    ports: ['0.0.0.0:80:80']\n", "127.0.0.1"),
        ("services:\n  a:\n    image: x\n    ports: [{target: 80, host_ip: 10.0.0.1}]\n", "127.0.0.1"),
        ("services:\n  a:\n    image: x\n    devices: ['/dev/sda']\n", "devices"),
        (
            "services:\n  a:\n    image: x\n    volumes: ['v:/d']\nvolumes:\n  v: {external: true}\n",
            "external",
        ),
        ("services:\n  a:\n    image: x\nnetworks:\n  n: {external: true}\n", "external"),
        ("services:\n  a:\n    image: x\n    volumes: ['undeclared:/d']\n", "not declared"),
    ],
)
def test_host_resources_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ComposeRejected, match=reason):
        override(text, {"a": ImageConfig(cmd=("x",))})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "services"),
        ("[1, 2]", "mapping"),
        ("services: {}", "no `services`"),
        ("services:\n  a:\n    build: .\n", "build"),
        ("services:\n  a: {}\n", "no `image`"),
        ("services:\n  'bad name':\n    image: x\n", "invalid service name"),
        ("services: [\n", "not valid YAML"),
    ],
)
def test_bad_compose_files_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ComposeRejected, match=reason):
        load_compose(text)


def test_user_networks_get_loopback_binding_too() -> None:
    ov, _ = override(
        "services:\n  a:\n    image: x\nnetworks:\n  back: {driver: bridge}\n", {"a": ImageConfig(cmd=("x",))}
    )
    assert ov["networks"]["back"]["driver_opts"][HOST_BINDING_OPT] == "127.0.0.1"
    yaml.safe_dump(ov)  # serializable


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static not installed")
def test_env_file_round_trips_any_value_through_busybox_sh(tmp_path: Path) -> None:
    nasty = 'it\'s "quoted" $HOME `id` \\ \n newline; rm -rf /'
    f = tmp_path / "env.sh"
    f.write_bytes(render_env_file({"SECRET": nasty, "B": ""}))
    r = subprocess.run(
        ["busybox", "sh", "-c", f'. {f} && printf %s "$SECRET"'], capture_output=True, text=True, check=True
    )
    assert r.stdout == nasty


@pytest.mark.parametrize("env", [{"1BAD": "x"}, {"A-B": "x"}, {"A": "nul\0"}])
def test_env_file_rejects_bad_names_and_nul(env: dict[str, str]) -> None:
    with pytest.raises(ComposeRejected):
        render_env_file(env)


def test_image_argv_dollars_are_escaped() -> None:
    ov, _ = override("services:\n  a:\n    image: x\n", {"a": ImageConfig(cmd=("echo", "$HOME"))})
    assert ov["services"]["a"]["command"] == ["echo", "$$HOME"]
