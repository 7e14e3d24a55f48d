"""The override file: what a CVM's app gets added, and what it is refused (host resources)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from teecloud.node.compose import HOST_BINDING_OPT, load_compose
from teecloud.node.errors import ComposeRejected
from teecloud.node.runtime.docker import (
    ComposeSpec,
    ImageConfig,
    ResourceLimits,
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


def _svc(extra: str) -> str:
    return "services:\n  a:\n    image: x\n" + extra


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # capabilities / security profiles that reach the host kernel
        (_svc("    cap_add: [SYS_ADMIN]\n"), "cap_add"),
        (_svc("    cap_add: [ALL]\n"), "cap_add"),
        (_svc("    cap_add: [CAP_DAC_READ_SEARCH]\n"), "cap_add"),
        (_svc("    security_opt: ['seccomp:unconfined']\n"), "security_opt"),
        (_svc("    security_opt: ['apparmor=unconfined']\n"), "security_opt"),
        (_svc("    privileged: 'true'\n"), "privileged"),
        # namespaces and cgroups outside the CVM
        (_svc("    network_mode: bridge\n"), "network namespace"),
        (_svc("    network_mode: tc-othercvm_default\n"), "network namespace"),
        (_svc("    network_mode: 'service:nosuch'\n"), "network namespace"),
        (_svc("    cgroup: host\n"), "namespace"),
        (_svc("    ipc: 'container:abc'\n"), "namespace"),
        (_svc("    cgroup_parent: /\n"), "cgroup_parent"),
        # devices by other means
        (_svc("    device_cgroup_rules: ['b 8:* rmw']\n"), "devices"),
        (_svc("    gpus: all\n"), "devices"),
        (
            _svc("    deploy: {resources: {reservations: {devices: [{capabilities: [gpu]}]}}}\n"),
            "devices",
        ),
        (_svc("    runtime: sysbox-runc\n"), "runtime"),
        (_svc("    logging: {driver: gelf, options: {gelf-address: 'udp://127.0.0.1:1'}}\n"), "logging"),
        # other containers and host files
        (_svc("    volumes_from: ['container:tc-other-web-1']\n"), "volumes_from"),
        (_svc("    env_file: ../../../admin-token\n"), "env_file"),
        (_svc("    extends: {file: /etc/x.yml, service: y}\n"), "extends"),
        ("include: [/etc/other.yml]\n" + _svc(""), "include"),
        (_svc("    secrets: [s]\nsecrets:\n  s: {file: /etc/shadow}\n"), "host"),
        (_svc("    configs: [c]\nconfigs:\n  c: {file: /root/.ssh/id_rsa}\n"), "host"),
        # another project's volume or network, by name (Compose v2 reuses it with a warning)
        (_svc("    volumes: ['v:/d']\nvolumes:\n  v: {name: tc-victim_v}\n"), "name"),
        (_svc("networks:\n  default: {name: host}\n"), "name"),
        (
            _svc("networks:\n  n: {driver_opts: {com.docker.network.bridge.gateway_mode_ipv4: routed}}\n"),
            "option",
        ),
        (_svc("networks:\n  n: {enable_ipv6: true}\n"), "IPv6"),
        # interpolation would change the file after the checks
        (_svc("    network_mode: '${NOPE:-host}'\n"), "interpolation"),
        (_svc("    pid: '${NOPE:-host}'\n"), "interpolation"),
        (_svc("    volumes: ['$HOME:/host']\nvolumes:\n  $HOME: {}\n"), "interpolation"),
        (_svc("    cap_add: ['${NOPE:-SYS_ADMIN}']\n"), "interpolation"),
    ],
)
def test_escapes_from_the_cvm_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ComposeRejected, match=reason):
        load_compose(text)  # refused before any key is fetched (deploy and the node's create call it)
    with pytest.raises(ComposeRejected, match=reason):
        make_override(
            yaml.safe_load(text),
            SPEC,
            images={"a": ImageConfig(cmd=("x",))},
            limits=ResourceLimits(),
            busybox=BUSYBOX,
        )


@pytest.mark.parametrize(
    "extra",
    [
        "    cap_add: [NET_BIND_SERVICE, chown]\n    cap_drop: [ALL]\n",
        "    security_opt: ['no-new-privileges:true']\n",
        "    network_mode: none\n",
        "    environment: ['A=${A:-x}', 'B=$$C']\n    command: ['sh', '-c', 'echo $$A']\n",
        "    logging: {driver: json-file, options: {max-size: 10m}}\n",
        "    volumes_from: ['b:ro']\n  b:\n    image: x\n    network_mode: 'service:a'\n",
        "    secrets: [s]\nsecrets:\n  s: {environment: S}\n",
    ],
)
def test_what_stays_inside_the_cvm_is_accepted(extra: str) -> None:
    text = _svc(extra)
    images = {name: ImageConfig(cmd=("x",)) for name in load_compose(text)["services"]}
    override(text, images)


def test_deploy_resource_limits_cannot_raise_the_node_caps() -> None:
    ov, _ = override(
        _svc("    deploy: {resources: {limits: {cpus: '64', memory: 64G}}}\n"), {"a": ImageConfig(cmd=("x",))}
    )
    svc = ov["services"]["a"]
    assert svc["deploy"] == {"resources": {"limits": {"cpus": "1.5", "memory": "256M"}}}
    assert svc["cpus"] == 1.5 and svc["mem_limit"] == "256m" and svc["pids_limit"] == 4096


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("    oom_kill_disable: true\n", "oom_kill_disable"),
        ("    oom_kill_disable: 'true'\n", "oom_kill_disable"),
        ("    oom_kill_disable: 1\n", "oom_kill_disable"),
        ("    oom_score_adj: -1000\n", "negative `oom_score_adj`"),
        ("    oom_score_adj: -1\n", "negative `oom_score_adj`"),
        ("    oom_score_adj: '-500'\n", "negative `oom_score_adj`"),
        ("    oom_score_adj: 1001\n", "at most 1000"),
        ("    oom_score_adj: lots\n", "integer"),
        ("    oom_score_adj: true\n", "integer"),
        ("    memswap_limit: [1]\n", "memswap_limit"),
    ],
)
def test_the_host_oom_killer_cannot_be_turned_on_others(extra: str, reason: str) -> None:
    """A CVM that disables its OOM kill or lowers its score makes the host kernel kill host processes or other
    CVMs when memory runs out: refused when the file is loaded, like the other host-reaching keys."""
    with pytest.raises(ComposeRejected, match=reason):
        load_compose(_svc(extra))
    with pytest.raises(ComposeRejected, match=reason):
        make_override(
            yaml.safe_load(_svc(extra)),
            SPEC,
            images={"a": ImageConfig(cmd=("x",))},
            limits=ResourceLimits(),
            busybox=BUSYBOX,
        )


@pytest.mark.parametrize(
    "extra", ["    oom_score_adj: 500\n", "    oom_score_adj: 0\n", "    oom_kill_disable: false\n"]
)
def test_oom_settings_that_only_hurt_the_app_are_accepted(extra: str) -> None:
    ov, _ = override(_svc(extra), {"a": ImageConfig(cmd=("x",))})
    assert "oom_score_adj" not in ov["services"]["a"]  # the app's own file keeps its value


@pytest.mark.parametrize("swap", ["-1", "64g", "300m", "1"])
def test_memswap_limit_is_capped_to_the_node_memory_cap(swap: str) -> None:
    """memswap_limit is memory + swap: -1 (unlimited) or a large value would let the app use the host's swap
    beyond the node's memory cap. Capped to the cap (= mem_limit: no swap), which Docker accepts for any
    value the app wrote (a value below mem_limit would otherwise be a Docker error)."""
    ov, _ = override(_svc(f"    memswap_limit: {swap}\n"), {"a": ImageConfig(cmd=("x",))})
    svc = ov["services"]["a"]
    assert svc["mem_limit"] == "256m" and svc["memswap_limit"] == "256m"


def test_memswap_limit_untouched_without_a_node_memory_cap_or_an_app_value() -> None:
    ov, _ = override(_svc(""), {"a": ImageConfig(cmd=("x",))})
    assert "memswap_limit" not in ov["services"]["a"]  # Docker's default (2x mem_limit) as before
    ov, _ = make_override(
        load_compose(_svc("    memswap_limit: 1g\n")),
        SPEC,
        images={"a": ImageConfig(cmd=("x",))},
        limits=ResourceLimits(),
        busybox=BUSYBOX,
    )
    assert "memswap_limit" not in ov["services"]["a"]  # no node cap: nothing to escape
