"""The guest half of a CVM's boot, equivalent to dstack's (dstack-util system_setup), up to the point where
the app can start:

(1) measuring  a fresh TEE context (RTMR3 from zero, as in a VM reboot); `boot()` measures system-preparing,
               app-id, compose-hash, instance-id, [boot-nonce], [gpu-evidence: the GPU gate, `gpu`],
               boot-mr-done (+ the KMS-mode events) into RTMR3
(2) keys       the key provider (the KMS, over mutual RA-TLS) returns the app's keys only if the quote, the
               replayed event log and the chain (`isAppAllowed`) agree; then key-provider, storage-fs and
               system-ready are measured. A refusal stops the boot here: no keys, no app.
(3) env        the encrypted env is decrypted with the env key; only names in app-compose `allowed_envs` are
               kept; the result is written (in the runtime's format) to a file in tmpfs only
(4) storage    the encrypted volume (keyed by the disk key) is mounted: gocryptfs by default (the docker
               backend), or the `volume` the caller passes (LUKS2 on a VM's data disk: the qemu guest)
(5) agent      dstack.sock and tappd.sock start answering

What then starts the app is the runtime's (teecloud.node.boot on the docker runtime; inside the VM on qemu).
A failure at any step raises GuestBootFailed(phase) and leaves nothing decrypted behind: no agent, no mount,
no env file. `shutdown_guest` is the same undo for a CVM that ran (a power-off).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from teecloud.agent.boot import AgentState, BootError, GpuGate, boot
from teecloud.agent.errors import GuestBootFailed, StorageError
from teecloud.agent.keyprovider import KeyProvider
from teecloud.agent.runner import AgentRunner
from teecloud.agent.storage import EncryptedVolume
from teecloud.keys.appkeys import AppKeys
from teecloud.tee.base import TeePlatform

__all__ = [
    "GUEST_PHASES",
    "STORAGE_FS",
    "BootedGuest",
    "GuestPaths",
    "GuestVolume",
    "boot_guest",
    "shutdown_guest",
]

GUEST_PHASES = ("measuring", "keys", "env", "storage", "agent")
STORAGE_FS = "gocryptfs"

Progress = Callable[[str], None]
RenderEnv = Callable[[Mapping[str, str]], bytes]


class GuestVolume(Protocol):
    """The encrypted volume the guest half mounts with the disk key (EncryptedVolume, LuksVolume)."""

    def mount(self, key: bytes, *, previous_key: bytes | None = None) -> None: ...
    def unmount(self) -> None: ...
    def ensure_dirs(self, relative: list[str]) -> None: ...


@dataclass(frozen=True)
class GuestPaths:
    """Where the guest half puts what the app sees: agent sockets, the env file (tmpfs), the encrypted disk
    (ciphertext directory) and its plaintext view."""

    dstack_sock: Path
    tappd_sock: Path
    env_file: Path
    cipher_dir: Path
    mount_point: Path


@dataclass
class BootedGuest:
    state: AgentState
    runner: AgentRunner
    volume: GuestVolume
    has_env: bool = False
    dropped_env: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class _TimedProvider:
    """Wraps the key provider to time the key fetch apart from measuring."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.elapsed = 0.0

    @property
    def name(self) -> str:
        return self.inner.name

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    @property
    def env_shared_secret(self) -> bytes | None:
        """A threshold provider's X25519 secret of the bound encrypted env (None: decrypt with the key)."""
        secret = getattr(self.inner, "env_shared_secret", None)
        return secret if isinstance(secret, bytes) else None

    def bind_encrypted_env(self, blob: bytes | None) -> None:
        bind = getattr(self.inner, "bind_encrypted_env", None)
        if callable(bind):
            bind(blob)

    def bind_app_compose(self, app_compose: str) -> None:
        bind = getattr(self.inner, "bind_app_compose", None)
        if callable(bind):
            bind(app_compose)

    def boot_nonce(self) -> bytes:
        t0 = time.perf_counter()
        try:
            return self.inner.boot_nonce()
        finally:
            self.elapsed += time.perf_counter() - t0

    def get_app_keys(self, tee: TeePlatform, app_id: bytes, instance_id: bytes) -> AppKeys:
        t0 = time.perf_counter()
        try:
            return self.inner.get_app_keys(tee, app_id, instance_id)
        finally:
            self.elapsed += time.perf_counter() - t0

    def get_previous_app_keys(self, tee: TeePlatform, app_id: bytes, instance_id: bytes) -> AppKeys | None:
        previous = getattr(self.inner, "get_previous_app_keys", None)
        if not callable(previous):
            return None
        t0 = time.perf_counter()
        try:
            return previous(tee, app_id, instance_id)  # type: ignore[no-any-return]
        finally:
            self.elapsed += time.perf_counter() - t0


def _decrypt_env(
    blob: bytes | None, keys: AppKeys, allowed: Sequence[str], shared: bytes | None = None
) -> tuple[dict[str, str], list[str]]:
    """`shared`: the X25519 secret a threshold key provider computed from t nodes' partials (the env key
    itself exists nowhere); else the app's env key."""
    from teecloud.keys.envcrypt import decrypt_env, decrypt_env_with_shared_secret

    if not blob:
        return {}, []
    try:
        if shared is not None:
            env = decrypt_env_with_shared_secret(shared, blob)
        else:
            env = decrypt_env(keys.env_crypt_key, blob)
    except Exception as exc:  # any failure of hostile ciphertext is a boot failure with a reason
        raise GuestBootFailed(
            "env", f"the encrypted env does not decrypt with this app's key: {exc}"
        ) from exc
    kept = {k: v for k, v in env.items() if k in allowed}
    dropped = sorted(k for k in env if k not in allowed)
    return kept, dropped


def boot_guest(
    *,
    tee: TeePlatform,
    app_compose: bytes,
    app_id: bytes,
    instance_id: bytes,
    key_provider: KeyProvider,
    encrypted_env: bytes | None,
    paths: GuestPaths,
    render_env: RenderEnv,
    extra_events: Sequence[tuple[str, bytes]] = (),
    progress: Progress = lambda phase: None,
    gpu: GpuGate | None = None,
    volume: GuestVolume | None = None,
    storage_fs: str = STORAGE_FS,
) -> BootedGuest:
    """(1)-(5) of the module docstring; raises GuestBootFailed(phase, reason). `volume` (default: gocryptfs
    on `paths.cipher_dir`) is what (4) mounts; `storage_fs` is measured as the `storage-fs` event."""
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def mark(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[phase] = now - t
        t = now

    # (1) + (2)
    progress("measuring")
    provider = _TimedProvider(key_provider)
    provider.bind_encrypted_env(encrypted_env)  # a threshold provider asks for its partials at boot time
    try:
        state = boot(
            tee,
            app_compose,
            app_id,
            instance_id,
            provider,
            extra_events=extra_events,
            storage_fs=storage_fs,
            gpu=gpu,
        )
    except BootError as exc:  # GpuGateFailed ("gpu: ...") included: the GPU gate stops before any key
        raise GuestBootFailed("measuring", str(exc)) from exc
    except Exception as exc:  # the key provider's refusal or failure: KmsDenied, KmsClientError, ...
        raise GuestBootFailed("keys", str(exc) or type(exc).__name__) from exc
    total = time.perf_counter() - t
    timings["measuring"] = total - provider.elapsed
    timings["keys"] = provider.elapsed
    t = time.perf_counter()
    progress("keys")

    # (3)
    progress("env")
    allowed = state.app_compose.get("allowed_envs") or []
    env, dropped = _decrypt_env(
        encrypted_env, state.keys, [a for a in allowed if isinstance(a, str)], provider.env_shared_secret
    )
    paths.env_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if volume is None:
        volume = EncryptedVolume(paths.cipher_dir, paths.mount_point)
    runner: AgentRunner | None = None
    phase = "env"
    try:
        paths.env_file.write_bytes(render_env(env))  # tmpfs
        paths.env_file.chmod(0o644)  # readable by the app's (possibly non-root) user inside the container
        mark("env")

        # (4)
        phase = "storage"
        progress("storage")
        # an app migrating to a new root epoch: a volume still under the previous epoch's disk key is
        # re-wrapped to this one first (teecloud.agent.storage.EncryptedVolume.rewrap)
        previous = state.previous_keys
        state.previous_keys = None
        volume.mount(state.keys.disk_crypt_key, previous_key=previous.disk_crypt_key if previous else None)
        mark("storage")

        # (5)
        phase = "agent"
        progress("agent")
        runner = AgentRunner(state, dstack_sock=paths.dstack_sock, tappd_sock=paths.tappd_sock).start()
        mark("agent")
    except BaseException as exc:
        _undo(runner, volume, paths)
        if isinstance(exc, GuestBootFailed | KeyboardInterrupt | SystemExit):
            raise
        if isinstance(exc, Exception):
            raise GuestBootFailed(phase, str(exc) or type(exc).__name__) from exc
        raise
    return BootedGuest(
        state=state, runner=runner, volume=volume, has_env=bool(env), dropped_env=dropped, timings=timings
    )


def _undo(runner: AgentRunner | None, volume: GuestVolume, paths: GuestPaths) -> list[str]:
    errors: list[str] = []
    if runner is not None:
        runner.stop()
    try:
        volume.unmount()
    except StorageError as exc:
        errors.append(str(exc))
    with contextlib.suppress(FileNotFoundError):
        paths.env_file.unlink()
    return errors


def shutdown_guest(guest: BootedGuest | None, paths: GuestPaths) -> list[str]:
    """Power the guest half off: agent stopped, volume unmounted, env file deleted. -> what failed."""
    volume = guest.volume if guest is not None else EncryptedVolume(paths.cipher_dir, paths.mount_point)
    return _undo(guest.runner if guest is not None else None, volume, paths)
