"""Append-only audit log of KMS decisions: one JSON object per line, never key material.

Each record names the endpoint, the caller (address and SHA-256 of its certificate), the `boot_info` the
decision was made on, the decision ("allowed" / "denied") and its reason. Lines are appended with one
write(2) on an O_APPEND descriptor (`teecloud._fs.append_line`), so concurrent writers never interleave.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from teecloud._fs import append_line
from teecloud.kms.api import AuditRecord

__all__ = ["FORBIDDEN_AUDIT_KEYS", "AuditLog", "new_request_id"]

# Field names that would mean key material leaked into the log; `record` refuses them (defence in depth).
FORBIDDEN_AUDIT_KEYS = frozenset(
    {"ca_key", "disk_crypt_key", "env_crypt_key", "k256_key", "temp_ca_key", "private_key", "secret"}
)

# Longest line we write: append_line is atomic for short lines; a reason is truncated rather than split.
_MAX_REASON = 1000


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def _check_no_secrets(obj: Any) -> None:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if key in FORBIDDEN_AUDIT_KEYS:
                raise ValueError(f"refusing to audit a field named {key!r}: audit records never hold keys")
            _check_no_secrets(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _check_no_secrets(value)


class AuditLog:
    """The audit log at `path` (normally data_home()/kms/audit.jsonl)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.allowed = 0
        self.denied = 0

    def record(
        self,
        *,
        ts: int,
        endpoint: str,
        decision: str,
        reason: str,
        step: str = "",
        peer: str = "",
        cert_sha256: str = "",
        boot_info: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> AuditRecord:
        if decision not in ("allowed", "denied"):
            raise ValueError(f"decision must be 'allowed' or 'denied', not {decision!r}")
        if boot_info is not None:
            _check_no_secrets(boot_info)
        rec = AuditRecord(
            ts=ts,
            request_id=request_id or new_request_id(),
            endpoint=endpoint,
            peer=peer,
            cert_sha256=cert_sha256,
            decision=decision,
            reason=reason[:_MAX_REASON],
            step=step,
            boot_info=dict(boot_info) if boot_info is not None else None,
        )
        line = json.dumps(rec.model_dump(), sort_keys=True, separators=(",", ":"))
        # append_line is one O_APPEND write(2) + fsync: lines never interleave, so no lock is held across
        # the fsync and concurrent requests' fsyncs overlap.
        append_line(self.path, line)
        with self._lock:
            if decision == "allowed":
                self.allowed += 1
            else:
                self.denied += 1
        return rec

    def __iter__(self) -> Iterator[AuditRecord]:
        return iter(self.read())

    def read(self, *, limit: int | None = None) -> list[AuditRecord]:
        """Records oldest first (the last `limit` when given). Unparseable lines are skipped, not fatal."""
        if not self.path.exists():
            return []
        out: list[AuditRecord] = []
        with self.path.open("r", encoding="utf-8", errors="replace") as f:
            for raw in f:
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    out.append(AuditRecord.model_validate(json.loads(raw)))
                except (ValueError, TypeError):
                    continue
        if limit is not None:
            out = out[-limit:] if limit > 0 else []
        return out
