"""Runtime `docker`: a CVM's app as one Docker Compose project on a real Docker Engine.

The app's compose file is used unchanged. Everything teecloud needs is added by an override file
(`docker compose -f app.yaml -f teecloud.override.yaml`), built by `make_override` from the parsed file:
  - every service sees the guest agent at /var/run/dstack.sock and /var/run/tappd.sock;
  - published ports bind to 127.0.0.1 (bridge option `com.docker.network.bridge.host_binding_ipv4` on
    every network of the project; an explicit non-loopback host address is refused);
  - every network is the project's own bridge (one per CVM; Docker isolates bridges from each other);
  - named and anonymous volumes (including an image's VOLUMEs) are bind mounts into the CVM's encrypted
    filesystem, so their data is ciphertext on the host;
  - decrypted env vars never enter the container's configuration (which Docker stores on the host disk and
    shows in `docker inspect`): the container starts through a busybox shell that sources them from a file in
    tmpfs, then execs the original entrypoint + command;
  - per-service resource limits (an app's `memswap_limit` is capped to the node's memory cap: no swap
    beyond it).
What a CVM may not ask for (host paths, host namespaces, non-loopback ports, ...) is refused before this
module sees the file, by the compose policy (teecloud.node.compose), at create; `make_override` applies it
again to whatever it is given.

Compose v2 (`docker compose`) is preferred, v1 (`docker-compose` >= 1.27, the Compose Spec) works too.
Containers are found through the `com.docker.compose.project` label both versions set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from teecloud._docker_inspect import container_states
from teecloud._fs import atomic_write
from teecloud._proc import LogStream
from teecloud.node.compose import (
    AGENT_SOCKET_SOURCES,
    HOST_BINDING_OPT,
    LOOPBACK,
    check_isolation,
    check_mount_target,
    load_compose,
    parse_volume,
)
from teecloud.node.errors import BadRequest, ComposeRejected, RuntimeFailed, RuntimeUnavailable
from teecloud.node.runtime.base import ComposeSpec, ContainerState, ResourceLimits

__all__ = [
    "AGENT_SOCKETS",
    "ComposeSpec",
    "ContainerState",
    "DockerRuntime",
    "ImageConfig",
    "LogStream",
    "ResourceLimits",
    "detect_compose",
    "make_override",
    "project_name",
    "render_env_file",
]

# Paths at which dstack apps expect the guest agent (dstack OS: /var/run == /run).
AGENT_SOCKETS = {"/var/run/dstack.sock": "dstack.sock", "/var/run/tappd.sock": "tappd.sock"}
IN_CONTAINER_DIR = "/.teecloud"
ENV_FILE_NAME = "env.sh"
ENTRY_SCRIPT = f'. {IN_CONTAINER_DIR}/{ENV_FILE_NAME} && exec "$@"'
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ImageConfig:
    """What `docker image inspect` says about an image: its default argv and declared volumes."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()


def project_name(instance_id: str) -> str:
    return f"tc-{instance_id[:16].lower()}"


def _argv(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ComposeRejected(f"cannot split {what} {value!r}: {exc}") from exc
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise ComposeRejected(f"{what} must be a string or a list of strings")


def _escape(value: str) -> str:
    """Compose interpolates `$` in every file it reads, the override included."""
    return value.replace("$", "$$")


def _anon_dir(service: str, target: str) -> str:
    return f"anon/{service}/{hashlib.sha256(target.encode()).hexdigest()[:16]}"


def make_override(
    compose: Mapping[str, Any],
    spec: ComposeSpec,
    *,
    images: Mapping[str, ImageConfig],
    limits: ResourceLimits,
    busybox: Path | None,
) -> tuple[dict[str, Any], list[str]]:
    """Build the override document for `compose` (already checked by `load_compose`).

    Returns (override, volume_dirs): volume_dirs are paths relative to `spec.volume_root` that must exist
    before the project starts. Raises ComposeRejected when the app asks for host resources.
    """
    check_isolation(compose)  # also when called with a document load_compose did not check
    services_in: dict[str, Any] = compose["services"]
    services_out: dict[str, Any] = {}
    volume_dirs: list[str] = []
    declared_volumes = compose.get("volumes") or {}
    if not isinstance(declared_volumes, dict):
        raise ComposeRejected("top-level `volumes` must be a mapping")
    used_named: set[str] = set()

    for name, svc in services_in.items():
        # (1) what would reach the host was refused by check_isolation above
        out: dict[str, Any] = {}
        # (2) volumes: agent sockets, encrypted backing store, no host paths
        vols: list[dict[str, Any]] = []
        for target, sock in AGENT_SOCKETS.items():
            vols.append({"type": "bind", "source": str(spec.agent_dir / sock), "target": target})
        seen_targets = set(AGENT_SOCKETS)
        for vol in svc.get("volumes") or []:
            kind, source, target, _mode = parse_volume(name, vol)
            if kind == "bind":
                assert source is not None
                if source in AGENT_SOCKET_SOURCES:
                    if target not in seen_targets:
                        sock = AGENT_SOCKET_SOURCES[source]
                        vols.append({"type": "bind", "source": str(spec.agent_dir / sock), "target": target})
                        seen_targets.add(target)
                    continue
                raise ComposeRejected(
                    f"service {name!r} bind-mounts the host path {source!r}: a CVM cannot see the host's "
                    "files; "
                    "use a named volume (stored encrypted)"
                )
            if kind == "anonymous":
                rel = _anon_dir(name, target)
                volume_dirs.append(rel)
                vols.append(
                    {
                        "type": "bind",
                        "source": str(spec.volume_root / rel),
                        "target": target,
                        "read_only": False,
                    }
                )
                seen_targets.add(target)
            elif kind == "volume":
                assert source is not None
                if source not in declared_volumes:
                    raise ComposeRejected(
                        f"service {name!r} uses volume {source!r}, not declared in `volumes`"
                    )
                used_named.add(source)
                seen_targets.add(target)
        image = images.get(name, ImageConfig())
        for target in image.volumes:
            check_mount_target(name, target)  # an image's VOLUME /dev is a volume at /dev too
            if target not in seen_targets:  # an image VOLUME would land unencrypted in Docker's storage
                rel = _anon_dir(name, target)
                volume_dirs.append(rel)
                vols.append({"type": "bind", "source": str(spec.volume_root / rel), "target": target})
        out["volumes"] = vols

        # (3) env vars from tmpfs, through a busybox shell, then the original argv
        if spec.env_dir is not None:
            if busybox is None:
                raise ComposeRejected(
                    "env vars need a static busybox on the node (apt-get install busybox-static)"
                )
            # Values from the user's file are copied as written (compose interpolates them once, as it would
            # in the user's file); values from the image are literal, so their `$` is escaped.
            if "entrypoint" in svc:
                entrypoint = _argv(svc["entrypoint"], "entrypoint")
            else:
                entrypoint = [_escape(a) for a in image.entrypoint]
            if "command" in svc:
                command = _argv(svc["command"], "command")
            elif "entrypoint" in svc:
                command = []  # Docker drops the image's CMD when the entrypoint is replaced
            else:
                command = [_escape(a) for a in image.cmd]
            argv = entrypoint + command
            if not argv:
                raise ComposeRejected(
                    f"service {name!r} has no command (neither in the image nor in the file)"
                )
            vols.append(
                {
                    "type": "bind",
                    "source": str(busybox),
                    "target": f"{IN_CONTAINER_DIR}/busybox",
                    "read_only": True,
                }
            )
            vols.append(
                {
                    "type": "bind",
                    "source": str(spec.env_dir / ENV_FILE_NAME),
                    "target": f"{IN_CONTAINER_DIR}/{ENV_FILE_NAME}",
                    "read_only": True,
                }
            )
            out["entrypoint"] = [
                f"{IN_CONTAINER_DIR}/busybox",
                "sh",
                "-c",
                _escape(ENTRY_SCRIPT),
                "teecloud-env",
            ]
            out["command"] = argv

        # An init process as PID 1 forwards SIGTERM, so `stop` is prompt even for apps without handlers.
        if "init" not in svc:
            out["init"] = True

        # (4) resource limits
        if limits.cpus is not None:
            out["cpus"] = limits.cpus
        if limits.memory_mb is not None:
            out["mem_limit"] = f"{limits.memory_mb}m"
            if "memswap_limit" in svc:
                # memory + swap: the app's value (-1 = unlimited swap) would let it use the host's swap
                # beyond the node's memory cap; capped to that cap (= mem_limit, i.e. no swap), the lowest
                # value Docker accepts next to mem_limit.
                out["memswap_limit"] = f"{limits.memory_mb}m"
        if limits.pids is not None:
            out["pids_limit"] = limits.pids
        # Compose v2 lets `deploy.resources.limits` win over cpus/mem_limit/pids_limit: cap those too.
        deploy = svc.get("deploy")
        user_limits = (deploy.get("resources") or {}).get("limits") if isinstance(deploy, dict) else None
        if isinstance(user_limits, dict) and user_limits:
            capped: dict[str, Any] = {}  # only the keys the user set (older file formats lack `pids`)
            if limits.cpus is not None and "cpus" in user_limits:
                capped["cpus"] = str(limits.cpus)
            if limits.memory_mb is not None and "memory" in user_limits:
                capped["memory"] = f"{limits.memory_mb}M"
            if limits.pids is not None and "pids" in user_limits:
                capped["pids"] = limits.pids
            if capped:
                out["deploy"] = {"resources": {"limits": capped}}
        out.setdefault("labels", {})["io.teecloud.project"] = spec.project
        services_out[name] = out

    # (5) named volumes: bind mounts into the encrypted filesystem
    volumes_out: dict[str, Any] = {}
    for vname, vdef in declared_volumes.items():
        if isinstance(vdef, dict) and vdef.get("external"):
            raise ComposeRejected(
                f"volume {vname!r} is external: a CVM's data lives in its own encrypted disk"
            )
        rel = f"volumes/{vname}"
        volume_dirs.append(rel)
        volumes_out[vname] = {
            "driver": "local",
            "driver_opts": {"type": "none", "o": "bind", "device": str(spec.volume_root / rel)},
        }

    # (6) networks: the project's own bridges, ports bound to loopback
    networks_out: dict[str, Any] = {
        "default": {"driver": "bridge", "driver_opts": {HOST_BINDING_OPT: LOOPBACK}}
    }
    user_networks = compose.get("networks") or {}
    if not isinstance(user_networks, dict):
        raise ComposeRejected("top-level `networks` must be a mapping")
    for nname, ndef in user_networks.items():
        ndef = dict(ndef or {})
        if ndef.get("external"):
            raise ComposeRejected(f"network {nname!r} is external: each CVM has its own networks")
        if ndef.get("driver", "bridge") != "bridge":
            raise ComposeRejected(f"network {nname!r}: only bridge networks are supported")
        opts = dict(ndef.get("driver_opts") or {})
        opts[HOST_BINDING_OPT] = LOOPBACK
        ndef["driver_opts"] = opts
        networks_out[nname] = ndef

    override: dict[str, Any] = {"services": services_out, "networks": networks_out}
    if volumes_out:
        override["volumes"] = volumes_out
    if "version" in compose:  # v1 requires both files to agree on the format version
        override["version"] = compose["version"]
    return override, volume_dirs


def render_env_file(env: Mapping[str, str]) -> bytes:
    """Shell (`. file`) text exporting `env`; values are single-quoted, so any byte but NUL is safe."""
    lines = []
    for key, value in sorted(env.items()):
        if not _ENV_NAME.match(key):
            raise ComposeRejected(f"invalid env var name {key!r}")
        if "\0" in value:
            raise ComposeRejected(f"env var {key} contains a NUL byte")
        lines.append(f"export {key}='" + value.replace("'", "'\\''") + "'")
    return ("\n".join(lines) + "\n").encode()


def detect_compose(docker: str = "docker") -> list[str]:
    """The Compose command: $TEECLOUD_COMPOSE, else `docker compose` (v2), else `docker-compose` (v1)."""
    forced = os.environ.get("TEECLOUD_COMPOSE")
    if forced:
        return shlex.split(forced)
    if shutil.which(docker):
        r = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeUnavailable(
        "Docker Compose is missing: install the v2 plugin (apt-get install docker-compose-plugin) or v1 "
        "(apt-get install docker-compose)"
    )


class DockerRuntime:
    """Runs CVM apps as Compose projects. All calls are synchronous CLI invocations of docker/compose."""

    def __init__(self, *, docker: str = "docker", compose: list[str] | None = None) -> None:
        self.docker = docker
        self._compose = compose
        busybox = shutil.which("busybox")
        self.busybox = Path(busybox) if busybox else None

    @property
    def compose(self) -> list[str]:
        if self._compose is None:
            self._compose = detect_compose(self.docker)
        return self._compose

    def describe(self) -> str:
        """The Compose command in use ("" until detected)."""
        return " ".join(self._compose or [])

    # -- engine ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise RuntimeUnavailable with an install/start hint unless the engine and Compose answer."""
        if shutil.which(self.docker) is None:
            raise RuntimeUnavailable("the docker CLI is missing: apt-get install docker.io")
        r = subprocess.run(
            [self.docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeUnavailable(
                "the Docker engine is not reachable (start it: `bash scripts/dockerd.sh` or `systemctl start "
                f"docker`): {r.stderr.strip()[:300]}"
            )
        self.compose  # noqa: B018 - detection raises with an install hint

    def _docker(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        try:
            r = subprocess.run([self.docker, *args], capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError as exc:
            raise RuntimeUnavailable("the docker CLI is missing: apt-get install docker.io") from exc
        except subprocess.TimeoutExpired as exc:
            raise RuntimeFailed(f"docker {args[0]} timed out after {timeout:.0f} s") from exc
        if check and r.returncode != 0:
            raise RuntimeFailed(f"docker {args[0]} failed: {r.stderr.strip()[-800:]}")
        return r

    def image_config(self, ref: str) -> ImageConfig:
        r = self._docker("image", "inspect", ref, check=False)
        if r.returncode != 0:
            raise ComposeRejected(
                f"image {ref!r} is not on this node and no registry is configured; build or load it first "
                "(e.g. `docker build`, `docker load`)"
            )
        cfg = json.loads(r.stdout)[0].get("Config") or {}
        return ImageConfig(
            entrypoint=tuple(cfg.get("Entrypoint") or ()),
            cmd=tuple(cfg.get("Cmd") or ()),
            volumes=tuple(sorted((cfg.get("Volumes") or {}).keys())),
        )

    def check_images(self, refs: Sequence[str]) -> None:
        """Raise ComposeRejected naming every image in `refs` that is not on this node."""
        missing = [ref for ref in refs if self._docker("image", "inspect", ref, check=False).returncode != 0]
        if missing:
            names = ", ".join(repr(m) for m in missing)
            raise ComposeRejected(
                f"image {names} is not on this node and no registry is configured; build or load it first "
                "(e.g. `docker build`, `docker load`)"
            )

    # -- project lifecycle ----------------------------------------------------------------------------
    def prepare(self, spec: ComposeSpec, compose_text: str, limits: ResourceLimits) -> list[str]:
        """Write the app's compose file (unchanged) and the override; returns dirs to create in the volume."""
        compose = load_compose(compose_text)
        images = {name: self.image_config(svc["image"]) for name, svc in compose["services"].items()}
        override, volume_dirs = make_override(
            compose, spec, images=images, limits=limits, busybox=self.busybox
        )
        spec.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write(spec.compose_file, compose_text.encode(), mode=0o644)
        header = b"# generated by teecloud for this CVM; the app's own file is docker-compose.yaml\n"
        atomic_write(
            spec.override_file, header + yaml.safe_dump(override, sort_keys=True).encode(), mode=0o644
        )
        return volume_dirs

    def _compose_run(
        self, spec: ComposeSpec, *args: str, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            *self.compose,
            "-p",
            spec.project,
            "-f",
            str(spec.compose_file),
            "-f",
            str(spec.override_file),
            *args,
        ]
        # A minimal environment: nothing of the node's (never an app secret) is interpolated into the file.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG")}
        env["COMPOSE_INTERACTIVE_NO_CLI"] = "1"
        try:
            r = subprocess.run(
                cmd, cwd=spec.workdir, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeFailed(f"compose {args[0]} timed out after {timeout:.0f} s") from exc
        if r.returncode != 0:
            raise RuntimeFailed(f"compose {args[0]} failed: {r.stderr.strip()[-1500:]}")
        return r

    def up(self, spec: ComposeSpec) -> None:
        """Start the app with fresh containers (a CVM boot: nothing survives but the volumes)."""
        self._compose_run(spec, "up", "-d", "--force-recreate", "--remove-orphans", "--no-build")

    def stop(self, spec: ComposeSpec) -> None:
        if spec.compose_file.exists():
            self._compose_run(spec, "stop", "-t", "5")
        else:
            self._stop_by_label(spec.project)

    def down(self, spec: ComposeSpec) -> None:
        """Remove containers, networks and the project's volumes (whose data lives in the encrypted dir).

        `compose down` must load the app's file; a file Compose refuses (the app failed at `up` for that
        very reason) makes it fail though nothing was ever created. Then, and without the files, the
        project's objects are removed by their Compose label, and only what still exists is an error."""
        failure: RuntimeFailed | None = None
        if spec.compose_file.exists() and spec.override_file.exists():
            try:
                self._compose_run(spec, "down", "-v", "--remove-orphans", "-t", "5")
                return
            except RuntimeFailed as exc:
                failure = exc
        label = f"label=com.docker.compose.project={spec.project}"
        ids = self._container_ids(spec.project)
        if ids:
            self._docker("rm", "-f", "-v", *ids, check=False)
        for kind in ("network", "volume"):
            names = self._docker(kind, "ls", "-q", "--filter", label).stdout.split()
            if names:
                self._docker(kind, "rm", *names, check=False)
        remaining = [
            f"{len(found)} {kind}(s)"
            for kind, found in (
                ("container", self._container_ids(spec.project)),
                ("network", self._docker("network", "ls", "-q", "--filter", label).stdout.split()),
                ("volume", self._docker("volume", "ls", "-q", "--filter", label).stdout.split()),
            )
            if found
        ]
        if remaining:
            detail = f" ({failure})" if failure is not None else ""
            raise RuntimeFailed(f"{', '.join(remaining)} of project {spec.project} remain{detail}")

    def _stop_by_label(self, project: str) -> None:
        ids = self._container_ids(project)
        if ids:
            self._docker("stop", "-t", "5", *ids, check=False)

    def _container_ids(self, project: str) -> list[str]:
        r = self._docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}")
        return r.stdout.split()

    def ps(self, project: str) -> list[ContainerState]:
        ids = self._container_ids(project)
        if not ids:
            return []
        r = self._docker("inspect", *ids, check=False)
        if r.returncode != 0:  # a container vanished between the two calls
            return []
        return [ContainerState(**c) for c in container_states(r.stdout)]

    def logs(
        self, project: str, *, service: str | None = None, tail: int = 200, follow: bool = False
    ) -> LogStream:
        """Container output, oldest first, one chunk per line (`service | line`). The containers are looked
        up now; each `docker logs` process starts when the stream is read. Close the stream when done."""
        containers = [c for c in self.ps(project) if service is None or c.service == service]
        if follow and len(containers) > 1:
            raise BadRequest("follow one service at a time (pass a service name)")
        commands = []
        for c in containers:
            argv = [self.docker, "logs", "--tail", str(max(0, tail))]
            if follow:
                argv.append("--follow")
            commands.append((c.service, [*argv, c.container]))
        return LogStream(commands)

    def stats(self, project: str) -> list[dict[str, Any]]:
        containers = self.ps(project)
        running = [c.container for c in containers if c.state == "running"]
        if not running:
            return []
        r = self._docker("stats", "--no-stream", "--format", "{{json .}}", *running, check=False)
        out = []
        for line in r.stdout.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.append(
                {
                    "container": row.get("Name"),
                    "cpu": row.get("CPUPerc"),
                    "memory": row.get("MemUsage"),
                    "net_io": row.get("NetIO"),
                    "block_io": row.get("BlockIO"),
                    "pids": row.get("PIDs"),
                }
            )
        return out
