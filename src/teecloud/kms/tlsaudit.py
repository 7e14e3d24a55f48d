"""Audit records for refusals at the KMS's TLS layer (step "tls"), rate-limited.

A handshake refused by OpenSSL (client certificate not issued by the temporary CA, a certificate list above
OpenSSL's size bound, plain HTTP on the TLS port, a handshake that times out) never reaches KmsService, so
it is recorded here. A flood must not fill the disk: per kind of refusal, the first one in an interval is
recorded at once with its peer; the rest of that interval become one record with their count, written when
the interval ends. So at most two records per kind per interval (kinds are a small fixed set, bounded by
RateLimitedLog.MAX_KINDS).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from teecloud._serve import tls_failure_kind
from teecloud.kms.audit import AuditLog

__all__ = ["TLS_AUDIT_ENDPOINT", "TlsRejectionAudit"]

TLS_AUDIT_ENDPOINT = "tls"
_MAX_KINDS = 16

log = logging.getLogger("teecloud.kms")


@dataclass
class _Window:
    start: float
    count: int = 0  # refusals after the first, not yet recorded
    last_peer: str = ""


class TlsRejectionAudit:
    """Call with (exception, peer) for every failed handshake; `flush_due()` on a timer; `flush()` on stop."""

    def __init__(
        self,
        audit: AuditLog,
        *,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.audit = audit
        self.interval_s = interval_s
        self._clock = clock
        self._mono = monotonic
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self.refusals = 0  # every refusal seen, recorded individually or in a count

    def __call__(self, exc: BaseException, peer: str) -> None:
        self.note(tls_failure_kind(exc), peer)

    def note(self, kind: str, peer: str) -> None:
        now = self._mono()
        out: list[tuple[str, str]] = []
        with self._lock:
            self.refusals += 1
            w = self._windows.get(kind)
            if w is not None and now - w.start < self.interval_s:
                w.count += 1
                w.last_peer = peer
                return
            if w is not None and w.count:
                out.append(self._summary(kind, w))
            if w is None and len(self._windows) >= _MAX_KINDS:
                kind = "other tls refusal"
            self._windows[kind] = _Window(start=now)
            out.append((f"TLS handshake refused: {kind}", peer))
        self._write(out)

    def flush_due(self) -> None:
        self._flush(force=False)

    def flush(self) -> None:
        self._flush(force=True)

    def _flush(self, *, force: bool) -> None:
        now = self._mono()
        out: list[tuple[str, str]] = []
        with self._lock:
            for kind, w in list(self._windows.items()):
                if force or now - w.start >= self.interval_s:
                    if w.count:
                        out.append(self._summary(kind, w))
                    del self._windows[kind]
        self._write(out)

    def _summary(self, kind: str, w: _Window) -> tuple[str, str]:
        return (
            f"TLS handshake refused: {kind} — {w.count} more in the {self.interval_s:.0f} s after the one "
            f"recorded before (last from {w.last_peer or 'unknown'})",
            "",
        )

    def _write(self, records: list[tuple[str, str]]) -> None:
        for reason, peer in records:
            try:
                rec = self.audit.prepare(
                    ts=int(self._clock()),
                    endpoint=TLS_AUDIT_ENDPOINT,
                    decision="denied",
                    reason=reason,
                    step="tls",
                    peer=peer,
                )
                # not waited for: the event loop must not block on an fsync; a failure is logged
                self.audit.submit(rec).add_done_callback(_log_failure)
            except (OSError, RuntimeError) as exc:
                log.warning("cannot audit a TLS refusal: %s", exc)


def _log_failure(fut: Future[None]) -> None:
    exc = fut.exception()
    if exc is not None:
        log.warning("cannot audit a TLS refusal: %s", exc)
