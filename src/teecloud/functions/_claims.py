"""At most one answer per (function, request id), across restarts: an append-only journal of taken
request ids (one line each, written and fdatasync'ed before the function runs), loaded at start.

A request id is taken before its function runs, so a runtime that stops mid-request (crash, restart)
never runs it again: the caller gets its answer once, or times out. Expired claims are dropped when the
journal is compacted at start (their results would be refused as expired anyway)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from teecloud._fs import atomic_write

from .errors import NotAllowed

__all__ = ["ClaimJournal"]


class ClaimJournal:
    def __init__(
        self, path: Path, *, clock: Callable[[], float], max_claims: int = 1_000_000, durable: bool = True
    ):
        self.path = path
        self._clock = clock
        self._max = max_claims
        self._durable = durable
        self._lock = threading.Lock()
        self._taken: dict[str, int] = {}
        self._load_and_compact()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _load_and_compact(self) -> None:
        now = self._clock()
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            lines = []
        for ln in lines:
            key, _, exp = ln.partition(" ")
            if exp.isdigit() and int(exp) >= now:
                self._taken[key] = int(exp)
        atomic_write(self.path, "".join(f"{k} {e}\n" for k, e in self._taken.items()).encode())

    def claim(self, function_hash: bytes, request_id: bytes, expiry: int) -> None:
        key = function_hash.hex() + request_id.hex()
        with self._lock:
            if key in self._taken:
                raise NotAllowed(f"request 0x{request_id.hex()} was already taken (at most once)")
            if len(self._taken) >= self._max:
                now = self._clock()
                self._taken = {k: e for k, e in self._taken.items() if e >= now}
                if len(self._taken) >= self._max:
                    raise NotAllowed("too many requests in flight within their validity; try later")
            os.write(self._fd, f"{key} {expiry}\n".encode())
            if self._durable:
                os.fdatasync(self._fd)
            self._taken[key] = expiry

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
