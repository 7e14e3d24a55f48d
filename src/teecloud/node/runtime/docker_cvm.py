"""The docker backend (`DockerBackend`): a CVM is the guest half of boot run in the node's process plus a
compose project on the host's Docker Engine. Its boot is equivalent to dstack's: the guest half
(teecloud.agent.guest: measure, keys, env, storage, agent), then the host half on the docker runtime, which
starts the app for the guest:

(1)-(5)  measuring, keys, env, storage, agent   teecloud.agent.guest.boot_guest (a refusal of the keys stops
                                                 the boot at `keys`: no keys, no app)
(6) starting   the compose project is (re)created through the runtime
(7) healthy    every service runs (and passes its healthcheck, if it has one)

On qemu the guest runs (6) and (7) itself, inside the VM. A failure at any phase is a BootFailed(phase) and,
after the keys, leaves nothing decrypted behind (app stopped, agent stopped, volume unmounted, env deleted).

Its volume is gocryptfs (teecloud.agent.storage.EncryptedVolume) and its isolation policy is the compose
policy (teecloud.node.compose), applied by DockerRuntime: the app shares the host's kernel here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from teecloud.agent.api import GetQuoteRequest
from teecloud.agent.boot import AgentState, GpuGate
from teecloud.agent.errors import GuestBootFailed, StorageError
from teecloud.agent.guest import GUEST_PHASES, STORAGE_FS, BootedGuest, GuestPaths, boot_guest, shutdown_guest
from teecloud.agent.keyprovider import KeyProvider
from teecloud.agent.runner import AgentRunner
from teecloud.agent.storage import EncryptedVolume
from teecloud.node.api import attest_report_data
from teecloud.node.errors import (
    BadRequest,
    BootFailed,
    InstanceStateError,
    KeysDenied,
    NodeError,
    RuntimeFailed,
)
from teecloud.node.instance import Instance
from teecloud.node.runtime.base import (
    BOOT_PHASES,
    ComposeSpec,
    ContainerState,
    CvmAttestation,
    LogSource,
    Progress,
    ResourceLimits,
    Runtime,
    Volume,
)
from teecloud.node.runtime.docker import ENV_FILE_NAME, DockerRuntime, project_name, render_env_file
from teecloud.tee.base import TeePlatform

__all__ = [
    "PHASES",
    "STORAGE_FS",
    "BootedCvm",
    "DockerBackend",
    "DockerCvm",
    "boot_instance",
    "compose_spec",
    "guest_paths",
    "shutdown_instance",
]

log = logging.getLogger("teecloud.node.runtime.docker_cvm")

PHASES = (*GUEST_PHASES, "starting", "healthy")
assert PHASES == BOOT_PHASES, "the docker backend reports the seam's boot phases"
HEALTHY_TIMEOUT_S = 60.0


@dataclass
class BootedCvm:
    state: AgentState
    runner: AgentRunner
    volume: EncryptedVolume
    timings: dict[str, float] = field(default_factory=dict)
    dropped_env: list[str] = field(default_factory=list)
    guest: BootedGuest | None = None


def _kms_mode_events(tee: TeePlatform) -> list[tuple[str, bytes]]:
    """dstack in KMS mode measures the OS image hash after boot-mr-done (the KMS reads it from the event
    log to check the OS image against KmsAuth's allowlist)."""
    return [("os-image-hash", tee.os_image_hash)] if len(tee.os_image_hash) == 32 else []


def compose_spec(inst: Instance, *, with_env: bool) -> ComposeSpec:
    return ComposeSpec(
        project=project_name(inst.instance_id),
        workdir=inst.compose_dir,
        agent_dir=inst.agent_dir,
        volume_root=inst.mount_point,
        env_dir=inst.env_dir if with_env else None,
    )


def guest_paths(inst: Instance) -> GuestPaths:
    return GuestPaths(
        dstack_sock=inst.agent_dir / "dstack.sock",
        tappd_sock=inst.agent_dir / "tappd.sock",
        env_file=inst.env_dir / ENV_FILE_NAME,
        cipher_dir=inst.cipher_dir,
        mount_point=inst.mount_point,
    )


def boot_instance(
    inst: Instance,
    *,
    key_provider: KeyProvider,
    tee_factory: Callable[[], TeePlatform],
    runtime: Runtime,
    progress: Progress = lambda phase: None,
    healthy_timeout: float = HEALTHY_TIMEOUT_S,
    gpu: GpuGate | None = None,
) -> BootedCvm:
    # (1)-(5): the guest half
    info = inst.info()
    tee = tee_factory()
    try:
        guest = boot_guest(
            tee=tee,
            app_compose=inst.app_compose_bytes(),
            app_id=bytes.fromhex(info["app_id"]),
            instance_id=bytes.fromhex(info["instance_id"]),
            key_provider=key_provider,
            encrypted_env=inst.encrypted_env(),
            paths=guest_paths(inst),
            render_env=render_env_file,
            extra_events=_kms_mode_events(tee),
            progress=progress,
            gpu=gpu,  # the node's GPUs (teecloud.node.gpus): the guest's GPU gate
        )
    except GuestBootFailed as exc:
        if exc.phase == "keys":
            raise KeysDenied(exc.reason) from exc
        raise BootFailed(exc.phase, exc.reason) from exc
    timings = dict(guest.timings)
    if guest.dropped_env:
        log.warning(
            "CVM %s: env vars not in allowed_envs dropped: %s", inst.instance_id, ", ".join(guest.dropped_env)
        )
    t = time.perf_counter()

    def mark(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[phase] = now - t
        t = now

    started: ComposeSpec | None = None
    phase = "starting"
    try:
        if guest.state.compose_hash != inst.compose_hash():
            raise BootFailed(
                "measuring", "app-compose.json is not in the normalized form its hash is taken over"
            )
        # (6)
        progress("starting")
        spec = compose_spec(inst, with_env=guest.has_env)
        text = guest.state.app_compose.get("docker_compose_file")
        if not isinstance(text, str):
            raise BootFailed("starting", "app-compose.json has no docker_compose_file")
        guest.volume.ensure_dirs(runtime.prepare(spec, text, inst.limits()))
        started = spec
        runtime.up(spec)
        mark("starting")

        # (7)
        phase = "healthy"
        progress("healthy")
        wait_healthy(runtime, spec.project, timeout=healthy_timeout)
        mark("healthy")
    except BaseException as exc:
        # a boot that fails after the keys leaves nothing decrypted behind: no app containers still running
        # (a failed CVM is powered off), no agent, no mount, no env file
        if started is not None:
            with contextlib.suppress(NodeError):
                runtime.stop(started)
        shutdown_guest(guest, guest_paths(inst))
        if isinstance(exc, NodeError) and not isinstance(exc, BootFailed):
            raise BootFailed(phase, str(exc)) from exc  # the phase where the runtime failed
        raise
    assert isinstance(guest.volume, EncryptedVolume)  # boot_guest's default volume: gocryptfs
    return BootedCvm(
        state=guest.state,
        runner=guest.runner,
        volume=guest.volume,
        timings=timings,
        dropped_env=guest.dropped_env,
        guest=guest,
    )


def wait_healthy(runtime: Runtime, project: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no containers"
    while time.monotonic() < deadline:
        states = runtime.ps(project)
        if states:
            bad = [c for c in states if c.state in ("exited", "dead")]
            if bad:
                c = bad[0]
                tail = b"".join(runtime.logs(project, service=c.service, tail=10)).decode(errors="replace")
                raise BootFailed("healthy", f"service {c.service} exited with code {c.exit_code}:\n{tail}")
            waiting = [c for c in states if c.state != "running" or c.health not in (None, "healthy")]
            if not waiting:
                return
            last = ", ".join(f"{c.service}={c.state}/{c.health}" for c in waiting)
        time.sleep(0.1)
    raise BootFailed("healthy", f"services not healthy after {timeout:.0f} s: {last}")


def shutdown_instance(inst: Instance, booted: BootedCvm | None, runtime: Runtime) -> None:
    """Stop the app, then the guest half (agent, volume, env file): a CVM power-off."""
    errors: list[str] = []
    try:
        runtime.stop(compose_spec(inst, with_env=False))
    except RuntimeFailed as exc:
        errors.append(str(exc))
    guest = booted.guest if booted is not None else None
    if booted is not None and guest is None:  # a BootedCvm made by hand (tests): stop what it holds
        guest = BootedGuest(state=booted.state, runner=booted.runner, volume=booted.volume)
    errors += shutdown_guest(guest, guest_paths(inst))
    if errors:
        raise RuntimeFailed("; ".join(errors))


class DockerCvm:
    """A CVM of the docker backend: `booted` (the guest half's agent and keys, in this process) or None for
    a handle on a CVM this process did not boot (listing, logs, stop and remove still work)."""

    def __init__(self, inst: Instance, runtime: Runtime, booted: BootedCvm | None = None) -> None:
        self.inst = inst
        self.instance_id = inst.instance_id
        self.runtime = runtime
        self._booted = booted
        self.timings: dict[str, float] = dict(booted.timings) if booted else {}
        self.dropped_env: list[str] = list(booted.dropped_env) if booted else []

    @property
    def booted(self) -> bool:
        return self._booted is not None

    @property
    def public_tcbinfo(self) -> bool:
        return self._booted is not None and bool(self._booted.state.public_tcbinfo)

    @property
    def project(self) -> str:
        return project_name(self.instance_id)

    def containers(self) -> list[ContainerState]:
        return self.runtime.ps(self.project)

    def logs(self, *, service: str | None = None, tail: int = 200, follow: bool = False) -> LogSource:
        return self.runtime.logs(self.project, service=service, tail=tail, follow=follow)

    def stats(self) -> list[dict[str, Any]]:
        return self.runtime.stats(self.project)

    def attestation(self, nonce: bytes) -> CvmAttestation:
        """A quote over attest_report_data(nonce): the caller's nonce behind a fixed domain prefix, so no
        caller (nor the host) chooses the report_data (an RA-TLS binding would then be one request away)."""
        booted = self._booted
        if booted is None:
            raise InstanceStateError(f"CVM {self.instance_id} is not running: no attestation")
        try:
            report_data = attest_report_data(nonce)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        q = booted.runner.service.get_quote(GetQuoteRequest(report_data=report_data.hex()))
        return CvmAttestation(
            app_id=booted.state.app_id.hex(),
            compose_hash=booted.state.compose_hash.hex(),
            quote=q["quote"],
            event_log=q["event_log"],
            report_data=q["report_data"],
            vm_config=q["vm_config"],
            app_compose=booted.state.app_compose_text,
        )

    def stop(self) -> None:
        """Power off: the app stopped, then the guest half (agent, volume, env file)."""
        booted, self._booted = self._booted, None
        shutdown_instance(self.inst, booted, self.runtime)

    def remove(self) -> list[str]:
        """Best effort, never half-way: each step runs even when an earlier one failed (keys forgotten,
        containers and volumes removed, volume unmounted, ciphertext shredded); returns what remains."""
        leftovers: list[str] = []
        booted, self._booted = self._booted, None  # the only reference to the app's keys
        if booted is not None:
            try:
                booted.runner.stop()
            except Exception as exc:  # the agent's own failure must not stop the removal
                leftovers.append(f"the guest agent did not stop cleanly: {exc}")
        spec = compose_spec(self.inst, with_env=False)
        try:
            self.runtime.down(spec)
        except NodeError as exc:
            leftovers.append(
                f"containers, networks and volumes of compose project {spec.project} may remain ({exc}); "
                f"once the engine answers: docker compose -p {spec.project} down -v --remove-orphans"
            )
        inst = self.inst
        volume: Volume = EncryptedVolume(inst.cipher_dir, inst.mount_point)
        if booted is not None:
            volume = booted.volume
        try:
            volume.unmount()
        except StorageError as exc:
            leftovers.append(f"the plaintext view {self.inst.mount_point} is still mounted: {exc}")
        try:
            volume.shred()
        except StorageError as exc:
            leftovers.append(str(exc))
        return leftovers


class DockerBackend:
    """The `docker` CvmBackend: boot_instance on a Runtime (default: DockerRuntime)."""

    kind = "docker"

    def __init__(
        self,
        *,
        key_provider: KeyProvider,
        guest_tee_factory: Callable[[], TeePlatform],
        runtime: Runtime | None = None,
        healthy_timeout: float = HEALTHY_TIMEOUT_S,
        gpu_gate: GpuGate | None = None,
    ) -> None:
        self.key_provider = key_provider
        self.gpu_gate = gpu_gate
        self.guest_tee_factory = guest_tee_factory
        self.runtime: Runtime = runtime or DockerRuntime()
        self.healthy_timeout = healthy_timeout

    def check(self) -> None:
        self.runtime.check()

    def check_images(self, refs: Sequence[str]) -> None:
        self.runtime.check_images(refs)

    def describe(self) -> str:
        return self.runtime.describe()

    def launch(
        self, instance: Instance, limits: ResourceLimits, *, progress: Progress = lambda _p: None
    ) -> DockerCvm:
        # the limits are the instance's own (written at create); the host paths of its guest half made here
        del limits
        _prepare_host_dirs(instance)
        booted = boot_instance(
            instance,
            key_provider=self.key_provider,
            tee_factory=self.guest_tee_factory,
            runtime=self.runtime,
            progress=progress,
            healthy_timeout=self.healthy_timeout,
            gpu=self.gpu_gate,
        )
        return DockerCvm(instance, self.runtime, booted)

    def attach(self, instance: Instance) -> DockerCvm:
        return DockerCvm(instance, self.runtime)


def _prepare_host_dirs(inst: Instance) -> None:
    """The tmpfs directories of the guest half on the host (agent sockets, env file), owner-only."""
    for d in (inst.runtime_dir.parent, inst.runtime_dir, inst.agent_dir, inst.env_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
