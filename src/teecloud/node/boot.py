"""The boot sequence of one CVM on the docker runtime, equivalent to dstack's (dstack-util system_setup):

(1) measuring  a fresh TEE context (RTMR3 from zero, as in a VM reboot); the agent's `boot()` emits
               system-preparing, app-id, compose-hash, instance-id, boot-mr-done into RTMR3
(2) keys       the key provider (the KMS, over mutual RA-TLS) returns the app's keys only if the quote,
               the replayed event log and the chain (`isAppAllowed`) agree; then key-provider,
               storage-fs and system-ready are measured. A refusal stops the boot here: no keys, no app.
(3) env        .encrypted-env is decrypted with the env key; only names in app-compose `allowed_envs` are
               kept; the result goes to tmpfs only
(4) storage    the encrypted volume (gocryptfs, keyed by the disk key) is mounted
(5) agent      /var/run/dstack.sock and /var/run/tappd.sock start answering
(6) starting   the compose project is (re)created
(7) healthy    every service runs (and passes its healthcheck, if it has one)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teecloud.agent.boot import AgentState, BootError, boot
from teecloud.agent.keyprovider import KeyProvider
from teecloud.agent.server import AgentRunner
from teecloud.keys.appkeys import AppKeys
from teecloud.node.errors import BootFailed, KeysDenied, NodeError, RuntimeFailed
from teecloud.node.instance import Instance
from teecloud.node.runtime.docker import (
    ENV_FILE_NAME,
    ComposeSpec,
    DockerRuntime,
    project_name,
    render_env_file,
)
from teecloud.node.storage import EncryptedVolume
from teecloud.tee.base import TeePlatform

__all__ = ["PHASES", "BootedCvm", "boot_instance", "compose_spec", "shutdown_instance"]

log = logging.getLogger("teecloud.node.boot")

PHASES = ("measuring", "keys", "env", "storage", "agent", "starting", "healthy")
STORAGE_FS = "gocryptfs"
HEALTHY_TIMEOUT_S = 60.0

Progress = Callable[[str], None]


@dataclass
class BootedCvm:
    state: AgentState
    runner: AgentRunner
    volume: EncryptedVolume
    timings: dict[str, float] = field(default_factory=dict)
    dropped_env: list[str] = field(default_factory=list)


class _TimedProvider:
    """Wraps the key provider to time the key fetch apart from measuring (and to map its errors)."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.elapsed = 0.0

    @property
    def name(self) -> str:
        return self.inner.name

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def get_app_keys(self, tee: TeePlatform, app_id: bytes, instance_id: bytes) -> AppKeys:
        t0 = time.perf_counter()
        try:
            return self.inner.get_app_keys(tee, app_id, instance_id)
        finally:
            self.elapsed += time.perf_counter() - t0


def _kms_mode_events(tee: TeePlatform) -> list[tuple[str, bytes]]:
    """dstack in KMS mode measures the OS image hash after boot-mr-done (the KMS reads it from the event
    log to check the OS image against KmsAuth's allowlist)."""
    os_image_hash = getattr(tee, "os_image_hash", None)
    if isinstance(os_image_hash, bytes) and len(os_image_hash) == 32:
        return [("os-image-hash", os_image_hash)]
    return []


def compose_spec(inst: Instance, *, with_env: bool) -> ComposeSpec:
    return ComposeSpec(
        project=project_name(inst.instance_id),
        workdir=inst.compose_dir,
        agent_dir=inst.agent_dir,
        volume_root=inst.mount_point,
        env_dir=inst.env_dir if with_env else None,
    )


def _decrypt_env(inst: Instance, keys: AppKeys, allowed: list[str]) -> tuple[dict[str, str], list[str]]:
    from teecloud.keys.envcrypt import decrypt_env

    blob = inst.encrypted_env()
    if not blob:
        return {}, []
    try:
        env = decrypt_env(keys.env_crypt_key, blob)
    except Exception as exc:  # any failure of hostile ciphertext is a boot failure with a reason
        raise BootFailed("env", f"the encrypted env does not decrypt with this app's key: {exc}") from exc
    kept = {k: v for k, v in env.items() if k in allowed}
    dropped = sorted(k for k in env if k not in allowed)
    return kept, dropped


def boot_instance(
    inst: Instance,
    *,
    key_provider: KeyProvider,
    tee_factory: Callable[[], TeePlatform],
    runtime: DockerRuntime,
    progress: Progress = lambda phase: None,
    healthy_timeout: float = HEALTHY_TIMEOUT_S,
) -> BootedCvm:
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def mark(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[phase] = now - t
        t = now

    # (1) + (2)
    progress("measuring")
    tee = tee_factory()
    provider = _TimedProvider(key_provider)
    info = inst.info()
    try:
        state = boot(
            tee,
            inst.app_compose_bytes(),
            bytes.fromhex(info["app_id"]),
            bytes.fromhex(info["instance_id"]),
            provider,
            extra_events=_kms_mode_events(tee),
            storage_fs=STORAGE_FS,
        )
    except BootError as exc:
        raise BootFailed("measuring", str(exc)) from exc
    except NodeError:
        raise
    except Exception as exc:  # the key provider's refusal or failure: KmsDenied, KmsClientError, ...
        raise KeysDenied(str(exc) or type(exc).__name__) from exc
    total = time.perf_counter() - t
    timings["measuring"] = total - provider.elapsed
    timings["keys"] = provider.elapsed
    t = time.perf_counter()
    progress("keys")
    if state.compose_hash != inst.compose_hash():
        raise BootFailed("measuring", "app-compose.json is not in the normalized form its hash is taken over")

    # (3)
    progress("env")
    allowed = state.app_compose.get("allowed_envs") or []
    env, dropped = _decrypt_env(inst, state.keys, [a for a in allowed if isinstance(a, str)])
    if dropped:
        log.warning("CVM %s: env vars not in allowed_envs dropped: %s", inst.instance_id, ", ".join(dropped))
    inst.env_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    env_file = inst.env_dir / ENV_FILE_NAME
    volume = EncryptedVolume(inst.cipher_dir, inst.mount_point)
    runner: AgentRunner | None = None
    started: ComposeSpec | None = None
    try:
        env_file.write_bytes(render_env_file(env))  # tmpfs
        env_file.chmod(0o644)  # readable by the app's (possibly non-root) user inside the container
        mark("env")

        # (4)
        progress("storage")
        volume.mount(state.keys.disk_crypt_key)
        mark("storage")

        # (5)
        progress("agent")
        runner = AgentRunner(
            state, dstack_sock=inst.agent_dir / "dstack.sock", tappd_sock=inst.agent_dir / "tappd.sock"
        ).start()
        mark("agent")

        # (6)
        progress("starting")
        spec = compose_spec(inst, with_env=bool(env))
        text = state.app_compose.get("docker_compose_file")
        if not isinstance(text, str):
            raise BootFailed("starting", "app-compose.json has no docker_compose_file")
        volume.ensure_dirs(runtime.prepare(spec, text, inst.limits()))
        started = spec
        runtime.up(spec)
        mark("starting")

        # (7)
        progress("healthy")
        wait_healthy(runtime, spec.project, timeout=healthy_timeout)
        mark("healthy")
    except BaseException:
        # a boot that fails after the keys leaves nothing decrypted behind: no app containers still running
        # (a failed CVM is powered off), no agent, no mount, no env file
        if started is not None:
            with contextlib.suppress(NodeError):
                runtime.stop(started)
        if runner is not None:
            runner.stop()
        with contextlib.suppress(NodeError):
            volume.unmount()
        with contextlib.suppress(FileNotFoundError):
            env_file.unlink()
        raise
    return BootedCvm(state=state, runner=runner, volume=volume, timings=timings, dropped_env=dropped)


def wait_healthy(runtime: DockerRuntime, project: str, *, timeout: float) -> None:
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


def shutdown_instance(inst: Instance, booted: BootedCvm | None, runtime: DockerRuntime) -> None:
    """Stop the app, the agent, unmount the volume and wipe the tmpfs state (a CVM power-off)."""
    spec = compose_spec(inst, with_env=False)
    errors: list[str] = []
    try:
        runtime.stop(spec)
    except RuntimeFailed as exc:
        errors.append(str(exc))
    if booted is not None:
        booted.runner.stop()
    volume = booted.volume if booted is not None else EncryptedVolume(inst.cipher_dir, inst.mount_point)
    try:
        volume.unmount()
    except NodeError as exc:
        errors.append(str(exc))
    env_file = inst.env_dir / ENV_FILE_NAME
    with contextlib.suppress(FileNotFoundError):
        env_file.unlink()
    if errors:
        raise RuntimeFailed("; ".join(errors))
