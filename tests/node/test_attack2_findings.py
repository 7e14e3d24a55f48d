"""Second independent review of the compose policy (after the fix of finding 1, `volumes/.`).

Each test states what an isolated CVM needs and FAILS while the finding is open. No Docker is needed here
(except the Compose v1 `config` check, which skips without docker-compose); the live reproducers are in
tests/e2e/test_attack2_findings.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from teecloud.node.compose import load_compose, parse_volume
from teecloud.node.errors import ComposeRejected
from teecloud.node.runtime.base import ComposeSpec, ResourceLimits
from teecloud.node.runtime.docker import ImageConfig, make_override

# Finding A: the app's file binds the *host's* /var/run/dstack.sock at a target where it also mounts a named
# volume. make_override skips the socket bind (the target is already "seen") and so writes no override entry
# for that target; Compose keeps the app's last entry per target: the host path.
SOCKET_AFTER_VOLUME = """
services:
  a:
    image: x
    volumes:
      - data:/hostagent
      - /var/run/dstack.sock:/hostagent
volumes:
  data: {}
"""

# Finding B: a volume mounted at /dev. runc (1.1.5 here) bind-mounts "/dev/null" over Docker's masked paths
# (/proc/keys, /proc/timer_list, /proc/kcore, ...) and follows a symlink the app left there
# (CVE-2025-31133); the same for an anonymous volume or an image VOLUME at /dev.
DEV_VOLUME = """
services:
  prep:
    image: x
    entrypoint: ["sh", "-c", "rm -rf /v/null; ln -s /proc/keys /v/null"]
    volumes: [devvol:/v]
  b:
    image: x
    depends_on: {prep: {condition: service_completed_successfully}}
    volumes: [devvol:/dev]
volumes:
  devvol: {}
"""


def _spec(tmp_path: Path) -> ComposeSpec:
    return ComposeSpec(
        project="tc-attack2",
        workdir=tmp_path / "compose",
        agent_dir=tmp_path / "agent",
        volume_root=tmp_path / "mnt",
        env_dir=None,
    )


def _override(text: str, tmp_path: Path, images: dict[str, ImageConfig] | None = None) -> dict:
    compose = load_compose(text)
    imgs = images or {n: ImageConfig(cmd=("sh",)) for n in compose["services"]}
    override, _dirs = make_override(
        compose,
        _spec(tmp_path),
        images=imgs,
        limits=ResourceLimits(cpus=1, memory_mb=64, pids=64),
        busybox=None,
    )
    return override


def _targets_overridden(text: str, override: dict) -> list[str]:
    """Targets at which the app's own file binds a host path and the override puts nothing (so Compose keeps
    the app's host bind)."""
    compose = yaml.safe_load(text)
    missing = []
    for name, svc in compose["services"].items():
        out_targets = {v["target"] for v in override["services"][name]["volumes"]}
        for vol in svc.get("volumes") or []:
            kind, _source, target, _mode = parse_volume(name, vol)
            if kind == "bind" and target not in out_targets:
                missing.append(target)
    return missing


def test_findingA_every_agent_socket_bind_is_replaced_by_the_override(tmp_path: Path) -> None:
    try:
        override = _override(SOCKET_AFTER_VOLUME, tmp_path)
    except ComposeRejected:
        return  # refusing two mounts at one target is a fix too
    assert _targets_overridden(SOCKET_AFTER_VOLUME, override) == [], (
        "the app's bind of the host's /var/run/dstack.sock reaches Compose unchanged"
    )


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) not installed")
def test_findingA_compose_sees_no_host_bind_source(tmp_path: Path) -> None:
    """What Compose actually runs: every bind source of the merged file is one of the CVM's own paths."""
    try:
        override = _override(SOCKET_AFTER_VOLUME, tmp_path)
    except ComposeRejected:
        return
    spec = _spec(tmp_path)
    spec.workdir.mkdir(parents=True)
    spec.compose_file.write_text(SOCKET_AFTER_VOLUME)
    spec.override_file.write_text(yaml.safe_dump(override))
    r = subprocess.run(
        [
            "docker-compose",
            "-p",
            spec.project,
            "-f",
            str(spec.compose_file),
            "-f",
            str(spec.override_file),
            "config",
        ],
        cwd=spec.workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    merged = yaml.safe_load(r.stdout)
    sources = []
    for vol in merged["services"]["a"]["volumes"]:
        src = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
        if isinstance(vol, str) or vol.get("type") == "bind":
            sources.append(src)
    outside = [s for s in sources if not s.startswith(str(tmp_path))]
    assert outside == [], f"Compose bind-mounts host paths into the app: {outside}"


@pytest.mark.parametrize(
    "text",
    [
        DEV_VOLUME,
        "services:\n  b:\n    image: x\n    volumes: [/dev]\n",  # anonymous: persists across boots
        "services:\n  b:\n    image: x\n    volumes: [{type: volume, source: d, target: /dev/}]\n"
        "volumes: {d: {}}\n",
        "services:\n  b:\n    image: x\n    volumes: ['dv:/./dev']\nvolumes: {dv: {}}\n",
    ],
    ids=["named", "anonymous", "long-trailing-slash", "dot-component"],
)
def test_findingB_no_app_mount_over_dev(text: str) -> None:
    with pytest.raises(ComposeRejected):
        load_compose(text)


def test_findingB_no_image_volume_over_dev(tmp_path: Path) -> None:
    """An image's `VOLUME /dev` becomes a persistent bind mount at /dev in make_override."""
    try:
        override = _override(
            "services:\n  b:\n    image: x\n", tmp_path, {"b": ImageConfig(volumes=("/dev",))}
        )
    except ComposeRejected:
        return
    targets = [v["target"] for v in override["services"]["b"]["volumes"]]
    assert "/dev" not in targets


def test_findingC_reserved_labels_cannot_be_spelled_through_interpolation() -> None:
    """`_check_labels` reads the label name as written; Compose interpolates list-form labels first."""
    text = 'services:\n  a:\n    image: x\n    labels: ["${UNSET:-com.docker.compose.project}=tc-victim"]\n'
    with pytest.raises(ComposeRejected):
        load_compose(text)


@pytest.mark.parametrize("opt", ["rbind", "bind", "remount", "rshared"])
def test_findingD_tmpfs_options_are_checked(opt: str) -> None:
    """Service-level `tmpfs` strings go to runc as mount flags unchecked (`/x:rbind` makes runc bind-mount
    the path `tmpfs` relative to its bundle directory)."""
    with pytest.raises(ComposeRejected):
        load_compose(f"services:\n  a:\n    image: x\n    tmpfs: ['/x:{opt}']\n")
