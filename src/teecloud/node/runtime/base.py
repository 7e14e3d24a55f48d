"""The runtime seam of the node: what runs a CVM, behind one interface.

`CvmBackend` is all the node's lifecycle (teecloud.node.service) asks of a backend: `launch(instance,
limits) -> Cvm` boots one CVM (measure, keys, env, encrypted volume, agent, app) and returns a handle whose
`containers / logs / stats / attestation / stop / remove` are the only ways the node reaches the CVM; the
node never touches a container, a guest agent or a volume itself. Two backends implement it:

    docker  (teecloud.node.runtime.docker_cvm)  the guest half of boot in the node's process, the app on the
            host's Docker Engine + Compose (`Runtime` below), a gocryptfs `Volume`; local development
    qemu    (teecloud.node.runtime.qemu)        one confidential VM per app (tdx, sev-snp, or plain under
            TCG); the guest agent boots inside the VM, LUKS2 `Volume` in the guest

Each backend chooses its isolation policy (the compose policy of teecloud.node.compose is the docker
backend's: the app shares the host's kernel there). The attestation a `Cvm` gives is over a caller's
*nonce*, bound by the node API's fixed domain prefix inside the backend: no backend offers a quote over
bytes the host chooses.

`Runtime`, below, is the docker backend's container engine (compose-on-host verbs); it gets the app's
compose file already accepted by the compose policy, and the places the CVM's guest half uses on the host
(`ComposeSpec`: agent sockets, the plaintext view of the encrypted disk, the tmpfs env file).

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
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from teecloud.node.errors import ComposeRejected

if TYPE_CHECKING:  # instance.py imports ResourceLimits from here
    from teecloud.node.instance import Instance

__all__ = [
    "BOOT_PHASES",
    "ComposeSpec",
    "ContainerState",
    "Cvm",
    "CvmAttestation",
    "CvmBackend",
    "LogSource",
    "Progress",
    "ResourceLimits",
    "Runtime",
    "Volume",
]

# The phases of a CVM boot as the node reports them: the guest's (measuring, keys, env, storage, agent), then
# the app's start and health (run by the host's engine on docker, by the guest agent inside the VM on qemu).
BOOT_PHASES = ("measuring", "keys", "env", "storage", "agent", "starting", "healthy")

Progress = Callable[[str], None]


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


class Volume(Protocol):
    """A CVM's encrypted data volume, keyed by the KMS disk key (gocryptfs on docker, LUKS2 in a VM)."""

    def ensure_dirs(self, relative: list[str]) -> None: ...
    def unmount(self) -> None: ...
    def shred(self) -> None: ...


@dataclass(frozen=True)
class CvmAttestation:
    """A quote of a running CVM over the node API's report_data for a caller's nonce, with what it binds."""

    app_id: str
    compose_hash: str
    quote: str
    event_log: str
    report_data: str
    vm_config: str
    app_compose: str


@runtime_checkable
class Cvm(Protocol):
    """A handle on one CVM of a backend; a handle from `attach` (no boot in this process) can list, log,
    stop and remove, and has no attestation (`booted` is False)."""

    instance_id: str
    timings: dict[str, float]
    dropped_env: list[str]

    @property
    def booted(self) -> bool: ...
    @property
    def public_tcbinfo(self) -> bool: ...
    def containers(self) -> list[ContainerState]: ...
    def logs(self, *, service: str | None = None, tail: int = 200, follow: bool = False) -> LogSource: ...
    def stats(self) -> list[dict[str, Any]]: ...
    def attestation(self, nonce: bytes) -> CvmAttestation: ...
    def stop(self) -> None: ...
    def remove(self) -> list[str]: ...


@runtime_checkable
class CvmBackend(Protocol):
    """What runs the CVMs of a node (see the module docstring)."""

    kind: str

    def check(self) -> None: ...
    def check_images(self, refs: Sequence[str]) -> None: ...
    def describe(self) -> str: ...
    def launch(self, instance: Instance, limits: ResourceLimits, *, progress: Progress = ...) -> Cvm: ...
    def attach(self, instance: Instance) -> Cvm: ...
