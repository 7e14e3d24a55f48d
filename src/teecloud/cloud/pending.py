"""The plan of an upgrade that waits on chain, kept so `teecloud upgrade APP --commit` needs no file.

When the new compose hash is pending under the app's multisig or timelock, `cloud.deploy.upgrade` stores
what it would roll out: the exact app-compose.json (whose sha256 is the hash the owners approve), the env
already encrypted to the app's env key (ciphertext only the CVM can open; the node never sees plaintext),
and the warnings. One file per app under `data_home()/pending-upgrades/<app_id>.json`, written atomically
(temp file, then os.replace); a later plan for the same app replaces it; a rollout removes it.

Nothing here is trusted for security: the chain decides whether the hash may run and the KMS releases keys
only to a boot whose measured compose hash the chain allows. A damaged file (app-compose.json that does not
hash to the stored hash, wrong app) is refused with a sentence saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teecloud._fs import atomic_write_json, data_home
from teecloud.cloud.errors import DeployError

__all__ = ["MAX_PLAN_BYTES", "PendingPlan", "discard_plan", "load_plan", "plan_path", "save_plan"]

PENDING_DIR = "pending-upgrades"
MAX_PLAN_BYTES = 4 * 1024 * 1024  # app-compose.json (bounded by the node) plus an encrypted env
_APP_ID = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class PendingPlan:
    app_id: str  # 40 hex digits, lower case, no 0x
    instance_id: str
    name: str
    app_compose: bytes  # the exact app-compose.json; sha256 of it is compose_hash
    compose_hash: bytes
    previous_compose_hash: str
    encrypted_env: str | None = None  # None: keep the app's current encrypted env
    warnings: list[str] = field(default_factory=list)
    created_at: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "instance_id": self.instance_id,
            "name": self.name,
            "app_compose": self.app_compose.decode(),
            "compose_hash": self.compose_hash.hex(),
            "previous_compose_hash": self.previous_compose_hash,
            "encrypted_env": self.encrypted_env,
            "warnings": list(self.warnings),
            "created_at": self.created_at,
        }


def _app_id(app_id: str) -> str:
    norm = app_id.lower().removeprefix("0x")
    if not _APP_ID.fullmatch(norm):
        raise DeployError(f"{app_id!r} is not an app id (40 hex digits)")
    return norm


def plan_path(app_id: str, home: Path | None = None) -> Path:
    return (home or data_home()) / PENDING_DIR / f"{_app_id(app_id)}.json"


def save_plan(plan: PendingPlan, home: Path | None = None) -> Path:
    """Store (or replace) the app's pending plan atomically; returns its path."""
    if hashlib.sha256(plan.app_compose).digest() != plan.compose_hash:
        raise ValueError("a pending plan's compose_hash must be the sha256 of its app-compose.json")
    path = plan_path(plan.app_id, home)
    data = {**plan.to_json(), "created_at": plan.created_at or int(time.time())}
    if len(json.dumps(data)) > MAX_PLAN_BYTES:
        raise DeployError(f"the upgrade plan is larger than {MAX_PLAN_BYTES} bytes; it cannot be kept")
    atomic_write_json(path, data)
    return path


def load_plan(app_id: str, home: Path | None = None) -> PendingPlan | None:
    """The app's stored plan, None when there is none. A damaged file raises DeployError."""
    path = plan_path(app_id, home)
    damaged = (
        f"the stored upgrade plan of app 0x{_app_id(app_id)} is damaged; run `teecloud upgrade` with the "
        "compose file again (it replaces the plan)"
    )
    try:
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise DeployError(f"{damaged} (larger than {MAX_PLAN_BYTES} bytes)")
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DeployError(f"{damaged} ({type(exc).__name__})") from exc
    try:
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        env = raw.get("encrypted_env")
        plan = PendingPlan(
            app_id=_app_id(str(raw["app_id"])),
            instance_id=str(raw["instance_id"]),
            name=str(raw["name"]),
            app_compose=str(raw["app_compose"]).encode(),
            compose_hash=bytes.fromhex(str(raw["compose_hash"])),
            previous_compose_hash=str(raw.get("previous_compose_hash", "")),
            encrypted_env=str(env) if env is not None else None,
            warnings=[str(w) for w in raw.get("warnings", []) if isinstance(w, str)],
            created_at=int(raw.get("created_at", 0)),
        )
    except (KeyError, TypeError, ValueError, DeployError) as exc:
        missing = f"no field {exc.args[0]}" if isinstance(exc, KeyError) else type(exc).__name__
        raise DeployError(f"{damaged} ({missing})") from exc
    if plan.app_id != _app_id(app_id):
        raise DeployError(f"{damaged} (it is for another app, 0x{plan.app_id})")
    if hashlib.sha256(plan.app_compose).digest() != plan.compose_hash:
        raise DeployError(f"{damaged} (its app-compose.json does not hash to its compose hash)")
    return plan


def discard_plan(app_id: str, home: Path | None = None) -> None:
    plan_path(app_id, home).unlink(missing_ok=True)
