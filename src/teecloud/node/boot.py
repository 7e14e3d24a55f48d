"""The boot of one CVM on the node, equivalent to dstack's: the guest half (teecloud.agent.guest: measure,
keys, env, storage, agent), then the host half on the docker runtime, which starts the app for the guest:

(1)-(5)  measuring, keys, env, storage, agent   teecloud.agent.guest.boot_guest (a refusal of the keys stops
                                                 the boot at `keys`: no keys, no app)
(6) starting   the compose project is (re)created through the runtime
(7) healthy    every service runs (and passes its healthcheck, if it has one)

On qemu the guest runs (6) and (7) itself, inside the VM. A failure at any phase is a BootFailed(phase) and,
after the keys, leaves nothing decrypted behind (app stopped, agent stopped, volume unmounted, env deleted).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from teecloud.agent.boot import AgentState
from teecloud.agent.errors import GuestBootFailed
from teecloud.agent.guest import GUEST_PHASES, STORAGE_FS, BootedGuest, GuestPaths, boot_guest, shutdown_guest
from teecloud.agent.keyprovider import KeyProvider
from teecloud.agent.runner import AgentRunner
from teecloud.agent.storage import EncryptedVolume
from teecloud.node.errors import BootFailed, KeysDenied, NodeError, RuntimeFailed
from teecloud.node.instance import Instance
from teecloud.node.runtime.base import ComposeSpec, Runtime
from teecloud.node.runtime.docker import ENV_FILE_NAME, project_name, render_env_file
from teecloud.tee.base import TeePlatform

__all__ = [
    "PHASES",
    "STORAGE_FS",
    "BootedCvm",
    "boot_instance",
    "compose_spec",
    "guest_paths",
    "shutdown_instance",
]

log = logging.getLogger("teecloud.node.boot")

PHASES = (*GUEST_PHASES, "starting", "healthy")
HEALTHY_TIMEOUT_S = 60.0

Progress = Callable[[str], None]


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
