"""Append-only audit log of KMS decisions: one JSON object per line, never key material.

Each record names the endpoint, the caller (address and SHA-256 of its certificate), the `boot_info` the
decision was made on, the decision ("allowed" / "denied") and its reason.

Durability (group commit): `record` hands its line to one writer thread and returns only after an fsync(2)
that covers it. The writer takes every line queued so far, in the order they were queued, appends them with
one write(2) on an O_APPEND descriptor and fsyncs once; lines queued while that fsync runs form the next
batch. So a caller that was answered has its record on disk, records are never dropped or reordered, and
under load one fsync serves many requests instead of one each (fsyncs of one file serialize in the kernel).
A batch is whole lines in one O_APPEND write, so other processes appending to the same file (a second KMS
process, `teecloud._fs.append_line`) never split a line. If the write or fsync fails, every caller of that
batch gets the OSError: the KMS answers nothing it could not record.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

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
    """The audit log at `path` (normally data_home()/kms/audit.jsonl); group commit: module docstring."""

    def __init__(self, path: Path, *, max_batch_bytes: int = 1 << 20) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.allowed = 0
        self.denied = 0
        self._max_batch = max_batch_bytes
        self._cv = threading.Condition()
        self._pending: deque[tuple[bytes, bool, Future[None]]] = deque()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # fsyncs done (one per batch): records / batches = the group-commit factor
        self.records_written = 0

    def prepare(
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
        """Validate and build a record (no I/O). Refuses key-named fields anywhere in boot_info."""
        if decision not in ("allowed", "denied"):
            raise ValueError(f"decision must be 'allowed' or 'denied', not {decision!r}")
        if boot_info is not None:
            _check_no_secrets(boot_info)
        return AuditRecord(
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

    def submit(self, rec: AuditRecord) -> Future[None]:
        """Queue a record; the future completes once it is on disk (fsync'ed), or fails with the OSError.
        Async callers `await asyncio.wrap_future(...)`; `record` waits on it."""
        line = json.dumps(rec.model_dump(), sort_keys=True, separators=(",", ":")) + "\n"
        fut: Future[None] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the audit log is closed")
            self._pending.append((line.encode(), rec.decision == "allowed", fut))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="kms-audit-writer", daemon=True)
                self._writer.start()
            self._cv.notify()
        return fut

    def record(self, **fields: Any) -> AuditRecord:
        """Build, append and fsync one record (see `prepare` for the fields); returns once it is durable."""
        rec = self.prepare(**fields)
        self.submit(rec).result()
        return rec

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return  # closed and drained
                batch: list[tuple[bytes, bool, Future[None]]] = []
                size = 0
                while self._pending and (not batch or size + len(self._pending[0][0]) <= self._max_batch):
                    item = self._pending.popleft()
                    batch.append(item)
                    size += len(item[0])
            try:
                self._append_durably(b"".join(line for line, _, _ in batch))
            except OSError as exc:
                for _, _, fut in batch:
                    fut.set_exception(exc)
                continue
            allowed = sum(1 for _, ok, _ in batch if ok)
            with self._lock:
                self.allowed += allowed
                self.denied += len(batch) - allowed
                self.batches += 1
                self.records_written += len(batch)
            for _, _, fut in batch:
                fut.set_result(None)

    def _append_durably(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:  # a regular file takes the whole write unless the disk is full (then OSError)
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Write what is queued, then stop the writer thread (records after this raise)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join(timeout=30)

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
