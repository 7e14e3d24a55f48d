"""The runtime seam of the node: what runs a CVM's app, behind one interface.

`Runtime` is everything the node's lifecycle (teecloud.node.service) and the host half of boot
(teecloud.node.boot) ask of a runtime; `docker` (teecloud.node.runtime.docker: Docker Engine + Compose, one
project per CVM) implements it now, `qemu` (one confidential VM per app) is the next. A runtime gets the
app's compose file already accepted by the compose policy (teecloud.node.compose), and the places the CVM's
guest half uses on the host (`ComposeSpec`: agent sockets, the plaintext view of the encrypted disk, the
tmpfs env file).

    check()                        the runtime is usable (else RuntimeUnavailable with an install hint)
    check_images(refs)             every image is present (else ComposeRejected naming the missing ones)
    prepare(spec, text, limits)    write what `up` needs; -> directories to create in the encrypted volume
    up(spec) / stop(spec) / down(spec)   start fresh / power off / remove with the project's volumes
    ps(project) -> [ContainerState]      what runs now
    logs(project, service, tail, follow) -> LogSource   the app's output, one chunk per line
    stats(project) -> [dict]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from teecloud.node.errors import ComposeRejected

__all__ = ["ComposeSpec", "ContainerState", "LogSource", "ResourceLimits", "Runtime"]


@dataclass(frozen=True)
class ResourceLimits:
    """Caps applied to each service of the CVM (None = no cap)."""

    cpus: float | None = None
    memory_mb: int | None = None
    pids: int | None = 4096

    def __post_init__(self) -> None:
        if self.cpus is not None and not (0 < self.cpus <= 1024):
            raise ComposeRejected(f"cpus must be in (0, 1024], got {self.cpus}")
        if self.memory_mb is not None and not (6 <= self.memory_mb <= 16 * 1024 * 1024):
            raise ComposeRejected(f"memory must be at least 6 MB, got {self.memory_mb}")
        if self.pids is not None and self.pids < 1:
            raise ComposeRejected("pids limit must be positive")


@dataclass(frozen=True)
class ComposeSpec:
    """Where a CVM's compose project lives on the host."""

    project: str  # compose project name, `tc-<instance>`
    workdir: Path  # holds the app's compose file (unchanged) and the override
    agent_dir: Path  # holds dstack.sock and tappd.sock
    volume_root: Path  # plaintext view of the encrypted filesystem
    env_dir: Path | None = None  # tmpfs directory holding env.sh (None: no env vars for the app)

    @property
    def compose_file(self) -> Path:
        return self.workdir / "docker-compose.yaml"

    @property
    def override_file(self) -> Path:
        return self.workdir / "teecloud.override.yaml"


@dataclass
class ContainerState:
    service: str
    container: str
    state: str  # created | running | restarting | exited | paused | dead
    health: str | None
    exit_code: int
    ports: list[dict[str, Any]] = field(
        default_factory=list
    )  # [{container_port, protocol, host_ip, host_port}]


class LogSource(Protocol):
    """A stream of log chunks that must be closed (it may hold a process); `on_close` runs once, then."""

    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...
    def close(self) -> None: ...
    def on_close(self, callback: Callable[[], None]) -> None: ...


@runtime_checkable
class Runtime(Protocol):
    """What runs the CVMs of a node (see the module docstring)."""

    def check(self) -> None: ...
    def check_images(self, refs: Sequence[str]) -> None: ...
    def prepare(self, spec: ComposeSpec, compose_text: str, limits: ResourceLimits) -> list[str]: ...
    def up(self, spec: ComposeSpec) -> None: ...
    def stop(self, spec: ComposeSpec) -> None: ...
    def down(self, spec: ComposeSpec) -> None: ...
    def ps(self, project: str) -> list[ContainerState]: ...
    def logs(
        self, project: str, *, service: str | None = None, tail: int = 200, follow: bool = False
    ) -> LogSource: ...
    def stats(self, project: str) -> list[dict[str, Any]]: ...
    def describe(self) -> str: ...
