"""A CVM's instance directory on the node: the host-shared files dstack's VMM writes (reference/dstack.md
§7), plus the node's own bookkeeping.

    <node home>/instances/<instance_id>/
        app-compose.json    the app's manifest, byte for byte what is measured (compose_hash = sha256(file))
        .instance-info      {"app_id", "instance_id_seed", "instance_id"[, "launch_nonce"]} (hex; the nonce
                            when the node's operator is in the seed, teecloud.node.vouch)
        .sys-config.json    {"kms_urls", "gateway_urls", "pccs_url", "docker_registry", "host_api_url",
                            "vm_config"}
        .encrypted-env      the env vars, encrypted to the app's KMS env key (dstack format); may be absent
        .user-config        free text for the app (dstack's user_config); may be absent
        .node-state.json    node bookkeeping: name, desired state, limits, history (nothing secret)
        disk/               the gocryptfs cipher directory (ciphertext only)
        compose/            the app's compose file (unchanged) and teecloud's override (nothing secret)

Per-boot runtime state (agent sockets, the decrypted env file, the plaintext mount) lives in tmpfs under
`runtime_root()`, never here. Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teecloud._fs import atomic_write, atomic_write_json, data_home
from teecloud.node.errors import InstanceNotFound, InstanceStateError
from teecloud.node.runtime.base import ResourceLimits
from teecloud.node.vouch import launch_seed, new_launch_nonce

__all__ = ["Instance", "InstanceStore", "instance_id_for", "node_home", "runtime_root"]

MAX_ENCRYPTED_ENV = 256 * 1024
MAX_USER_CONFIG = 64 * 1024
# `.node-state.json` history keeps the latest entries only (a boot loop would otherwise grow it, and every
# status response, without end)
MAX_HISTORY = 100

# One lock per state file: `Instance` objects are cheap views made afresh by every look-up, so the lock cannot
# live on them. Read-modify-write of `.node-state.json` holds it (the write itself is atomic on disk).
_STATE_LOCKS: dict[Path, threading.RLock] = {}
_STATE_LOCKS_GUARD = threading.Lock()


def _state_lock(path: Path) -> threading.RLock:
    key = path.absolute()
    with _STATE_LOCKS_GUARD:
        lock = _STATE_LOCKS.get(key)
        if lock is None:
            lock = _STATE_LOCKS[key] = threading.RLock()
        return lock


def node_home(home: Path | None = None) -> Path:
    return (Path(home) if home is not None else data_home()) / "node"


def runtime_root(home: Path | None = None) -> Path:
    """Per-boot state in tmpfs (/dev/shm), one directory per data home; short, so socket paths fit."""
    base = Path(home) if home is not None else data_home()
    tag = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:10]
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() else Path("/run")
    return root / f"teecloud-{tag}"


def instance_id_for(seed: bytes, app_id: bytes) -> bytes:
    """dstack: instance_id = sha256(instance_id_seed ‖ app_id)[:20]."""
    return hashlib.sha256(seed + app_id).digest()[:20]


@dataclass
class Instance:
    """One CVM's directory. Paths and small typed accessors; no lifecycle logic."""

    dir: Path
    runtime_dir: Path

    @property
    def instance_id(self) -> str:
        return self.dir.name

    # -- paths
    @property
    def app_compose_path(self) -> Path:
        return self.dir / "app-compose.json"

    @property
    def info_path(self) -> Path:
        return self.dir / ".instance-info"

    @property
    def sys_config_path(self) -> Path:
        return self.dir / ".sys-config.json"

    @property
    def encrypted_env_path(self) -> Path:
        return self.dir / ".encrypted-env"

    @property
    def user_config_path(self) -> Path:
        return self.dir / ".user-config"

    @property
    def state_path(self) -> Path:
        return self.dir / ".node-state.json"

    @property
    def cipher_dir(self) -> Path:
        return self.dir / "disk"

    @property
    def compose_dir(self) -> Path:
        return self.dir / "compose"

    @property
    def agent_dir(self) -> Path:
        return self.runtime_dir / "agent"

    @property
    def env_dir(self) -> Path:
        return self.runtime_dir / "env"

    @property
    def mount_point(self) -> Path:
        return self.runtime_dir / "mnt"

    # -- contents
    def app_compose_bytes(self) -> bytes:
        return self.app_compose_path.read_bytes()

    def app_compose(self) -> dict[str, Any]:
        doc = json.loads(self.app_compose_bytes())
        if not isinstance(doc, dict):
            raise InstanceStateError(f"{self.app_compose_path} is not a JSON object")
        return doc

    def compose_hash(self) -> bytes:
        return hashlib.sha256(self.app_compose_bytes()).digest()

    def info(self) -> dict[str, str]:
        data = json.loads(self.info_path.read_text())
        return {k: str(v) for k, v in data.items()}

    @property
    def app_id(self) -> bytes:
        return bytes.fromhex(self.info()["app_id"])

    def launch_nonce(self) -> bytes:
        """The nonce its seed was derived from with the node's operator (teecloud.node.vouch); ValueError
        for an instance launched without one."""
        nonce = bytes.fromhex(self.info().get("launch_nonce", ""))
        if len(nonce) != 32:
            raise ValueError(f"instance {self.instance_id[:12]} has no launch nonce")
        return nonce

    def sys_config(self) -> dict[str, Any]:
        data = json.loads(self.sys_config_path.read_text())
        return data if isinstance(data, dict) else {}

    def encrypted_env(self) -> bytes | None:
        try:
            return self.encrypted_env_path.read_bytes()
        except FileNotFoundError:
            return None

    def state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def modify_state(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read the state, let `change` edit it in place, write it back, all under the instance's lock, so
        concurrent updates (an API call and a boot thread) never lose one another's changes."""
        with _state_lock(self.state_path):
            state = self.state()
            change(state)
            atomic_write_json(self.state_path, state)
            return state

    def update_state(self, **changes: Any) -> dict[str, Any]:
        return self.modify_state(lambda state: state.update(changes))

    def add_history(self, event: str, /, *, state: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append `{"at", "event", **fields}` to the history (and apply `state` changes) in one update."""

        def change(doc: dict[str, Any]) -> None:
            doc.update(state or {})
            history = doc.get("history")
            doc["history"] = [
                *(history if isinstance(history, list) else []),
                {"at": int(time.time()), "event": event, **fields},
            ][-MAX_HISTORY:]

        self.modify_state(change)

    def limits(self) -> ResourceLimits:
        raw = self.state().get("limits") or {}
        return ResourceLimits(
            cpus=raw.get("cpus"), memory_mb=raw.get("memory_mb"), pids=raw.get("pids", 4096)
        )

    def write_manifest(
        self, app_compose: bytes, encrypted_env: bytes | None, user_config: str | None
    ) -> None:
        if encrypted_env is not None and len(encrypted_env) > MAX_ENCRYPTED_ENV:
            raise InstanceStateError(f"the encrypted env is larger than {MAX_ENCRYPTED_ENV} bytes")
        if user_config is not None and len(user_config.encode()) > MAX_USER_CONFIG:
            raise InstanceStateError(f"the user config is larger than {MAX_USER_CONFIG} bytes")
        atomic_write(self.app_compose_path, app_compose, mode=0o644)
        if encrypted_env is not None:
            atomic_write(self.encrypted_env_path, encrypted_env)
        if user_config is not None:
            atomic_write(self.user_config_path, user_config.encode())


class InstanceStore:
    """The node's instance directories."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else data_home()
        self.root = node_home(self.home) / "instances"
        self.runtime = runtime_root(self.home)

    def _instance(self, instance_id: str) -> Instance:
        return Instance(self.root / instance_id, self.runtime / instance_id[:16])

    def create(
        self,
        *,
        app_compose: bytes,
        app_id: bytes,
        name: str,
        encrypted_env: bytes | None,
        user_config: str | None,
        sys_config: dict[str, Any],
        limits: ResourceLimits,
        launcher: str | None = None,
    ) -> Instance:
        if len(app_id) != 20:
            raise InstanceStateError("app_id must be 20 bytes")
        # with `launcher` (the node's operator address) the seed commits to it, so the node can vouch for
        # this instance's addresses and no other node can (teecloud.node.vouch); else random, as dstack's
        launch_nonce = new_launch_nonce() if launcher is not None else None
        seed = launch_seed(launcher, launch_nonce) if launcher and launch_nonce else secrets.token_bytes(32)
        instance_id = instance_id_for(seed, app_id)
        inst = self._instance(instance_id.hex())
        inst.dir.mkdir(parents=True, mode=0o700)
        # `.instance-info` marks a complete instance (`all()` lists only those), so it is written last; a
        # failure (or a crash) before it leaves nothing that is listed or resumed, and a failure removes the
        # directory.
        try:
            atomic_write_json(inst.sys_config_path, sys_config, mode=0o644)
            inst.write_manifest(app_compose, encrypted_env, user_config)
            inst.update_state(
                name=name,
                desired="running",
                created_at=int(time.time()),
                limits={"cpus": limits.cpus, "memory_mb": limits.memory_mb, "pids": limits.pids},
                history=[
                    {
                        "at": int(time.time()),
                        "event": "created",
                        "compose_hash": hashlib.sha256(app_compose).hexdigest(),
                    }
                ],
            )
            atomic_write_json(
                inst.info_path,
                {
                    "app_id": app_id.hex(),
                    "instance_id_seed": seed.hex(),
                    "instance_id": instance_id.hex(),
                    **({"launch_nonce": launch_nonce.hex()} if launch_nonce is not None else {}),
                },
            )
        except BaseException:
            shutil.rmtree(inst.dir, ignore_errors=True)
            raise
        return inst

    def get(self, ref: str) -> Instance:
        """By instance id (full or a unique prefix of at least 8 hex digits) or by name."""
        name = ref.strip()
        ref = name.lower().removeprefix("0x")  # instance ids are lowercase hex; names are case-sensitive
        matches = []
        for inst in self.all():
            if inst.instance_id == ref:
                return inst
            if (len(ref) >= 8 and inst.instance_id.startswith(ref)) or inst.state().get("name") == name:
                matches.append(inst)
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InstanceNotFound(f"{ref!r} matches {len(matches)} CVMs; use the instance id")
        raise InstanceNotFound(f"no CVM {name!r} on this node")

    def all(self) -> list[Instance]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and (d / ".instance-info").exists():
                out.append(self._instance(d.name))
        return out

    def delete(self, inst: Instance) -> None:
        shutil.rmtree(inst.dir, ignore_errors=False)
        shutil.rmtree(inst.runtime_dir, ignore_errors=True)

    def prepare_runtime(self, inst: Instance) -> None:
        for d in (inst.runtime_dir, inst.agent_dir, inst.env_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
        os.chmod(self.runtime, 0o700)
