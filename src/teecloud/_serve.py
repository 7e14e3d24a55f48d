"""Connection limits for every teecloud listener: one config object, one acceptor, one rate-limited log.

uvicorn bounds header size (`h11_max_incomplete_event_size`) and idle keep-alive (`timeout_keep_alive`),
but it accepts every connection (`limit_concurrency` answers 503 only after accepting, and only once a
request arrives), never times out a connection that sends nothing or trickles its headers, and runs TLS
handshakes with asyncio's 60 s default. So here:

    ServeLimits          the limits, with one named instance per listener (KMS_PUBLIC, NODE_API, ...)
    LimitedServer        a uvicorn.Server whose own accept loop enforces the connection cap *before* the
                         TLS handshake (asyncio allocates a 256 KiB buffer per TLS connection at accept) and
                         passes the handshake timeout to asyncio
    LimitedH11Protocol   uvicorn's h11 protocol plus a request-read deadline (headers and body, measured
                         from the connection or the first byte, never reset by a trickle); on stop, an idle
                         connection is aborted instead of waiting for the client's TLS close_notify
    BoundedHTTPServer    the same limits for a stdlib ThreadingHTTPServer (the chain RPC): a thread per
                         connection up to the cap, a reaper for read and keep-alive deadlines
    RateLimitedLog       one log line per interval with counts, instead of a line (or traceback) per event

At the cap, a new connection first evicts the oldest *idle* one (in its TLS handshake, waiting for request
headers, or kept alive between requests; never one whose request is being served) — nginx reuses idle
keep-alive connections the same way — so a flood of idle connections cannot lock out a client that sends a
request. Only when every connection is busy is the newcomer refused, with a reset (no handshake, no buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import platform
import socket
import ssl
import stat
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "AGENT",
    "CHAIN_RPC",
    "KMS_ADMIN",
    "KMS_PUBLIC",
    "NODE_API",
    "PCCS",
    "BoundedHTTPServer",
    "BoundedRequestHandler",
    "LimitedH11Protocol",
    "LimitedServer",
    "RateLimitedLog",
    "ServeLimits",
    "limited_config",
]

log = logging.getLogger("teecloud.serve")


@dataclass(frozen=True)
class ServeLimits:
    """Limits of one listener (the defaults suit a loopback service with a few dozen legitimate clients).

    max_connections         connections held at once, TLS handshakes included; past it the oldest idle one
                            is closed, or the newcomer refused if none is idle
    backlog                 the kernel's queue of connections not yet accepted (listen(2))
    tls_handshake_timeout_s a TLS handshake not finished by then is aborted
    request_read_timeout_s  request headers (and body) must arrive within this, counted from the connection
                            (or from the first byte after a keep-alive pause); a trickle does not reset it
    keep_alive_timeout_s    an idle kept-alive connection is closed after this
    max_header_bytes        request line + headers above this are refused (400)
    log_interval_s          accept/handshake errors are logged at most once per interval, with counts
    shutdown_timeout_s      on stop, in-flight requests get this long before they are cancelled
    """

    max_connections: int = 256
    backlog: int = 128
    tls_handshake_timeout_s: float = 5.0
    request_read_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    max_header_bytes: int = 16 * 1024
    log_interval_s: float = 10.0
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.backlog < 1 or self.max_header_bytes < 1024:
            raise ValueError("max_connections and backlog must be >= 1, max_header_bytes >= 1024")
        for name in ("tls_handshake_timeout_s", "request_read_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


# One instance per listener. Several run in one process under `teecloud up` (KMS, node API, chain RPC,
# one agent per CVM): their caps together stay far below a 20k descriptor limit.
# Public listeners get a deeper accept queue: a burst of connects beyond it makes the kernel drop SYNs,
# and a legitimate client caught in that waits a 1 s retransmit.
KMS_PUBLIC = ServeLimits(max_connections=256, backlog=1024)
KMS_ADMIN = ServeLimits(max_connections=16, backlog=16)
NODE_API = ServeLimits(max_connections=256, backlog=1024, keep_alive_timeout_s=15.0)
AGENT = ServeLimits(max_connections=64, backlog=128)
CHAIN_RPC = ServeLimits(max_connections=64, backlog=256, keep_alive_timeout_s=15.0)
PCCS = ServeLimits(max_connections=64, backlog=256)


# ------------------------------------------------------------------------------------------ rate-limited log


class RateLimitedLog:
    """Counts events by kind; writes at most one line per `interval_s` ("name: 37 handshake timeout, 2 ...
    in the last 10 s"). The first event after a quiet interval is written at once; later ones are counted and
    written when the interval ends (on the next event or `flush_due()`, which servers call on a timer).
    Thread-safe. The number of distinct kinds per interval is bounded (the rest count as "other")."""

    MAX_KINDS = 16

    def __init__(
        self,
        name: str,
        *,
        interval_s: float = 10.0,
        logger: logging.Logger = log,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._logger = logger
        self._level = level
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._last_emit = -float("inf")
        self.total: dict[str, int] = {}  # every event ever counted, for status pages and tests
        self.lines = 0

    def note(self, kind: str, n: int = 1) -> None:
        with self._lock:
            if kind not in self._counts and len(self._counts) >= self.MAX_KINDS:
                kind = "other"
            self._counts[kind] = self._counts.get(kind, 0) + n
            self.total[kind] = self.total.get(kind, 0) + n
            line = self._take_due()
        if line:
            self._logger.log(self._level, "%s", line)

    def flush_due(self) -> None:
        with self._lock:
            line = self._take_due()
        if line:
            self._logger.log(self._level, "%s", line)

    def _take_due(self) -> str:
        now = self._clock()
        if not self._counts or now - self._last_emit < self.interval_s:
            return ""
        window = now - self._last_emit
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self._counts.items(), key=lambda kv: -kv[1]))
        self._counts.clear()
        self._last_emit = now
        self.lines += 1
        if window < 2 * self.interval_s:
            return f"{self.name}: {counts} in the last {self.interval_s:.0f} s"
        return f"{self.name}: {counts} (reported at most once per {self.interval_s:.0f} s)"


class _RepeatFilter(logging.Filter):
    """Lets one record per (logger, message template) through per interval; the next one that passes says
    how many were held back. Installed on uvicorn's and asyncio's loggers, whose per-connection warnings
    ("Invalid HTTP request received.") would otherwise grow the log with a flood."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (-float("inf"), 0))
            if now - last < self.interval_s:
                if len(self._seen) < 1024 or key in self._seen:
                    self._seen[key] = (last, held + 1)
                return False
            self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} similar held back in the last {self.interval_s:.0f} s]"
        return True


_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
_tuned_lock = threading.Lock()
_tuned = False


# py_ecc (under eth_account -> eth_keys) raises the interpreter's recursion limit to 100 000 when imported.
# At that limit the C JSON parser (json.loads, under starlette's and httpx's .json()) recurses on deeply
# nested input until it overflows the C stack: a segfault, not a RecursionError, and a 100 000-deep `[[[...`
# fits in any request body. py-evm needs 1024 × 12 (its EVM_RECURSION_LIMIT: 1024 nested EVM calls).
SAFE_RECURSION_LIMIT = 1024 * 12


def clamp_recursion_limit() -> None:
    """Bring the recursion limit back to SAFE_RECURSION_LIMIT if a library raised it (called by the chain
    package after its imports and by every listener at start; tests/robustness/test_recursion_limit.py)."""
    if sys.getrecursionlimit() > SAFE_RECURSION_LIMIT:
        sys.setrecursionlimit(SAFE_RECURSION_LIMIT)


def _tune_process() -> None:
    """Once per process, before the first listener: log filters, and a fixed malloc mmap threshold.

    glibc raises its mmap threshold whenever a large block is freed; after that the 256 KiB read buffer
    asyncio allocates for every TLS connection comes from the heap, and a flood's memory stays with the
    process after the flood (fragmentation). A fixed threshold (mallopt M_MMAP_THRESHOLD = -3, malloc.h)
    keeps blocks of 128 KiB and more in their own mappings, which free(3) returns to the kernel."""
    global _tuned
    clamp_recursion_limit()  # every time: a library imported since the first listener may have raised it
    with _tuned_lock:
        if _tuned:
            return
        for name in ("uvicorn.error", "asyncio"):
            logging.getLogger(name).addFilter(_RepeatFilter())
        if _GLIBC:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).mallopt(-3, 128 * 1024)
        _tuned = True


def _malloc_trim() -> None:
    """Give free heap pages back to the kernel (glibc malloc_trim(3)): after a flood, OpenSSL's and
    Python's smaller blocks leave the heap fragmented and the RSS high even though they are free."""
    if _GLIBC:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


# ------------------------------------------------------------------------------------------- uvicorn side


def limited_config(app: Any, limits: ServeLimits, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn.Config carrying `limits` (keep-alive, header size, backlog) for a LimitedServer. The
    protocol class (`http=`) must be LimitedH11Protocol or a subclass; it is the default."""
    kwargs.setdefault("http", LimitedH11Protocol)
    if not (isinstance(kwargs["http"], type) and issubclass(kwargs["http"], LimitedH11Protocol)):
        raise TypeError("a LimitedServer needs http=LimitedH11Protocol (or a subclass)")
    # uvicorn's default, "auto", would switch every listener to uvloop wherever it happens to be installed
    # (it is, for the AI proxy): a listener runs on asyncio unless it asks for another loop.
    kwargs.setdefault("loop", "asyncio")
    kwargs.setdefault("log_level", "warning")
    kwargs.setdefault("access_log", False)
    kwargs.setdefault("lifespan", "off")
    return uvicorn.Config(
        app,
        timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]  # uvicorn types it int
        h11_max_incomplete_event_size=limits.max_header_bytes,
        backlog=limits.backlog,
        timeout_graceful_shutdown=max(1, round(limits.shutdown_timeout_s)),
        **kwargs,
    )


@dataclass(eq=False)
class _Slot:
    """One accepted connection, from accept until it closes."""

    conn: socket.socket
    peer: str
    handshake: asyncio.Task[Any] | None = None
    protocol: LimitedH11Protocol | None = None
    closed: bool = False
    evicted: bool = False
    started: bool = False  # handed to asyncio (which then owns and closes the socket)

    def idle(self) -> bool:
        return self.protocol is None or self.protocol.idle()


@dataclass
class ServeStats:
    accepted: int = 0
    refused: int = 0  # at the cap with every connection busy
    evicted: int = 0  # idle connections closed to admit a newer one
    handshake_failed: int = 0
    handshake_timeouts: int = 0
    read_timeouts: int = 0
    accept_errors: int = 0
    peak: int = 0


TlsErrorHook = Callable[[BaseException, str], None]


class _Acceptor:
    """Accepts on one listening socket and admits connections within the cap (see the module docstring).
    Quacks like the asyncio.Server uvicorn keeps in `Server.servers` (sockets, close, wait_closed)."""

    def __init__(
        self,
        sock: socket.socket,
        make_protocol: Callable[[_Slot], LimitedH11Protocol],
        limits: ServeLimits,
        *,
        ssl_context: ssl.SSLContext | None,
        errors: RateLimitedLog,
        on_tls_error: TlsErrorHook | None,
    ) -> None:
        self.sockets = [sock]
        self._sock = sock
        self._make_protocol = make_protocol
        self.limits = limits
        self._ssl = ssl_context
        self.errors = errors
        self._on_tls_error = on_tls_error
        self._slots: OrderedDict[int, _Slot] = OrderedDict()  # by accept order: oldest first
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self.stats = ServeStats()
        self.churn = 0  # connections closed since the last heap trim
        self._batch = max(1, min(limits.backlog, limits.max_connections // 8))
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def active(self) -> int:
        return len(self._slots)

    def _on_readable(self) -> None:
        # A small batch, then the loop runs: a connection accepted in a burst must get its request read
        # (and become busy) before `max_connections` newer ones arrive, or it is the oldest idle one and
        # evicted. Its read takes two or three loop iterations, hence cap / 8 per iteration.
        for _ in range(self._batch):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.stats.accept_errors += 1
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: stop accepting briefly instead of spinning on a socket
                    # that stays readable (the kernel backlog holds, then refuses, the rest).
                    self.errors.note(f"accept failed ({errno.errorcode.get(exc.errno or 0, exc)}), paused")
                    self._pause(0.5)
                    return
                self.errors.note(f"accept failed ({type(exc).__name__})")
                continue
            self._admit(conn, _peer(addr))

    def _pause(self, delay: float) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _admit(self, conn: socket.socket, peer: str) -> None:
        if self._closed:
            _reset(conn)
            return
        if len(self._slots) >= self.limits.max_connections:
            victim = next((s for s in self._slots.values() if s.idle()), None)
            if victim is None:
                self.stats.refused += 1
                self.errors.note("refused (every connection busy at the cap)")
                _reset(conn)
                return
            self.stats.evicted += 1
            self.errors.note("idle connection closed for a newer one (cap reached)")
            self._drop(victim)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio's connect_accepted_socket (unlike its own accept path) leaves Nagle on: a response
            # written in two sends then waits for the client's delayed ACK, ≈40 ms per keep-alive request.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats.accepted += 1
        slot = _Slot(conn=conn, peer=peer)
        self._slots[id(slot)] = slot
        self.stats.peak = max(self.stats.peak, len(self._slots))
        slot.handshake = self._loop.create_task(self._connect(conn, slot))

    async def _connect(self, conn: socket.socket, slot: _Slot) -> None:
        slot.started = True
        try:
            await self._loop.connect_accepted_socket(
                lambda: self._make_protocol(slot),
                sock=conn,
                ssl=self._ssl,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout_s if self._ssl else None,
                # close_notify exchange on close: bounded too, or a peer that never answers holds the fd 30 s
                ssl_shutdown_timeout=self.limits.tls_handshake_timeout_s if self._ssl else None,
            )
        except BaseException as exc:  # a failed handshake: counted, reported, never a traceback
            # asyncio has closed (or will close) the socket with its transport. The traceback is never
            # shown; dropping it breaks exc -> frame -> waiter -> exc, a cycle that would keep this
            # connection's transport and 256 KiB TLS buffer alive until a full garbage collection.
            exc.__traceback__ = None
            self.release(slot)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            if slot.evicted or self._closed:
                return
            kind = tls_failure_kind(exc)
            if kind == "tls handshake timeout":
                self.stats.handshake_timeouts += 1
            else:
                self.stats.handshake_failed += 1
            self.errors.note(kind)
            if self._on_tls_error is not None:
                try:
                    self._on_tls_error(exc, slot.peer)
                except Exception as hook_exc:  # the hook must not take the listener down
                    self.errors.note(f"tls error hook failed ({type(hook_exc).__name__})")
        finally:
            slot.handshake = None

    def _drop(self, slot: _Slot) -> None:
        self.release(slot)
        slot.evicted = True
        if slot.protocol is not None and slot.protocol.transport is not None:
            slot.protocol.transport.abort()
        elif not slot.started:
            # accepted in this same batch, not yet handed to asyncio: no transport, no buffer to free
            if slot.handshake is not None:
                slot.handshake.cancel()
            _reset(slot.conn)
        else:
            # In its TLS handshake: end the TCP connection under the transport, which then fails the
            # handshake at once and closes the socket itself (asyncio owns it now).
            _reset(slot.conn, close=False)

    def release(self, slot: _Slot) -> None:
        if not slot.closed:
            slot.closed = True
            self._slots.pop(id(slot), None)
            self.churn += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for slot in list(self._slots.values()):
            if slot.protocol is None:
                self._drop(slot)

    async def wait_closed(self) -> None:
        pending = [s.handshake for s in list(self._slots.values()) if s.handshake is not None]
        if pending:
            await asyncio.wait(pending, timeout=self.limits.shutdown_timeout_s)


def tls_failure_kind(exc: BaseException) -> str:
    """A short, bounded description of why a TLS handshake failed (no peer-controlled text)."""
    if isinstance(exc, ConnectionAbortedError) and "handshake is taking longer" in str(exc):
        return "tls handshake timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or "").strip()[:60]
        return f"client certificate rejected ({detail or 'verify failed'})"
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", "") or "").upper()
        if reason == "HTTP_REQUEST":
            return "plain HTTP on the TLS port"
        if reason in ("EXCESSIVE_MESSAGE_SIZE", "CERT_LENGTH_MISMATCH", "TOO_MANY_CERTIFICATES"):
            return f"client certificate too large ({reason.lower()})"
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return "client certificate rejected (verify failed)"
        return f"tls error ({reason.lower()[:60] or type(exc).__name__})"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)) or (
        isinstance(exc, ConnectionError) and not isinstance(exc, ConnectionAbortedError)
    ):
        return "client left during the tls handshake"
    return f"tls handshake failed ({type(exc).__name__})"


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return "unix" if not addr else str(addr)


def _reset(conn: socket.socket, *, close: bool = True) -> None:
    """End a connection with RST (SO_LINGER 0): no FIN handshake, no TIME_WAIT, nothing buffered. With
    close=False the descriptor stays open for its owner (asyncio) to close; reads on it return EOF."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        if close:
            conn.close()
        else:
            conn.shutdown(socket.SHUT_RDWR)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-read deadline and idle/busy state for the acceptor."""

    _slot: _Slot | None = None
    _acceptor: _Acceptor | None = None
    _read_timer: asyncio.TimerHandle | None = None

    def attach(self, slot: _Slot, acceptor: _Acceptor) -> None:
        self._slot = slot
        self._acceptor = acceptor

    def idle(self) -> bool:
        """No request is being served (waiting for headers, or kept alive between requests)."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._slot is not None:
            self._slot.protocol = self
            if self._slot.closed:  # evicted while its handshake completed: not counted, so not kept
                transport.abort()
                return
        self._update_read_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_read_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_read_timer()

    def shutdown(self) -> None:
        """On stop: an idle connection is aborted at once; one serving a request finishes it (uvicorn's
        graceful shutdown). uvicorn closes an idle one instead, and asyncio's TLS close then waits up to
        ssl_shutdown_timeout for the client's close_notify — which a pooling client (httpx) sends only when
        it next touches the connection — so every stop with a kept-alive client connected took that long."""
        if self.transport is not None and self.idle():
            self.transport.abort()
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)
        if self._acceptor is not None and self._slot is not None:
            self._acceptor.release(self._slot)

    def _reading(self) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return True
        if state is h11.IDLE:
            # a fresh connection, or a partial request after a keep-alive pause (the pause itself is
            # uvicorn's keep-alive timer)
            return self.cycle is None or bool(self.conn.trailing_data[0])
        return False

    def _update_read_timer(self) -> None:
        if self._acceptor is None:
            return
        if not self._reading():
            self._cancel_read_timer()
        elif self._read_timer is None:
            self._read_timer = self.loop.call_later(
                self._acceptor.limits.request_read_timeout_s, self._on_read_timeout
            )

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _on_read_timeout(self) -> None:
        self._read_timer = None
        if not self._reading() or self._acceptor is None:
            return
        self._acceptor.stats.read_timeouts += 1
        if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:
            # a partial request: say why before closing (nothing else was sent on this connection)
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            )
            self.transport.close()
        else:
            self.transport.abort()


class LimitedServer(uvicorn.Server):
    """uvicorn.Server with ServeLimits enforced by its own accept loop (module docstring). Build its config
    with `limited_config`. `on_tls_error(exc, peer)` is told of every failed TLS handshake (the KMS audits
    them); `stats` and `errors` report what the limits did."""

    def __init__(
        self,
        config: uvicorn.Config,
        limits: ServeLimits,
        *,
        name: str = "listener",
        on_tls_error: TlsErrorHook | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_tick = on_tick
        self.limits = limits
        self.name = name
        self.errors = RateLimitedLog(name, interval_s=limits.log_interval_s)
        self._on_tls_error = on_tls_error
        self._acceptor: _Acceptor | None = None
        _tune_process()

    @property
    def stats(self) -> ServeStats:
        return self._acceptor.stats if self._acceptor is not None else ServeStats()

    @property
    def active_connections(self) -> int:
        return self._acceptor.active if self._acceptor is not None else 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            self.should_exit = True
            return
        config = self.config
        if sockets:
            raise ValueError("LimitedServer binds its own socket (host/port or uds)")
        sock = _bind(config, self.limits.backlog)
        loop = asyncio.get_running_loop()

        def make_protocol(slot: _Slot) -> LimitedH11Protocol:
            proto = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=loop
            )
            assert isinstance(proto, LimitedH11Protocol)
            assert self._acceptor is not None
            proto.attach(slot, self._acceptor)
            return proto

        self._acceptor = _Acceptor(
            sock,
            make_protocol,
            self.limits,
            ssl_context=config.ssl,
            errors=self.errors,
            on_tls_error=self._on_tls_error,
        )
        self.servers = [self._acceptor]  # type: ignore[list-item]
        self.started = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, without its fixed 0.1 s pause (for connections to close) when, once the
        listener is closed and the idle connections are aborted, no connection and no task is left to wait
        for (most stops of a test server). A request in flight gets uvicorn's graceful shutdown."""
        for server in self.servers:
            server.close()  # stop accepting (idempotent: uvicorn's shutdown closes it again)
        conns = self.server_state.connections
        for conn in list(conns):
            if isinstance(conn, LimitedH11Protocol) and conn.idle():
                conn.shutdown()  # aborted: gone once its connection_lost has run, a few loop turns later
        for _ in range(20):
            if not conns:
                break
            await asyncio.sleep(0.001)
        if sockets or conns or self.server_state.tasks:
            await super().shutdown(sockets)
            return
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:  # once a second (uvicorn ticks every 0.1 s)
            self.errors.flush_due()
            if self._on_tick is not None:
                self._on_tick()
            acc = self._acceptor
            cap = self.limits.max_connections
            if acc is not None and acc.churn >= max(64, cap // 4) and acc.active <= cap // 2:
                acc.churn = 0  # a burst has passed: return its memory (once, not during the burst)
                _malloc_trim()
        return await super().on_tick(counter)


def _bind(config: uvicorn.Config, backlog: int) -> socket.socket:
    if config.uds:
        path = Path(config.uds)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o666)  # noqa: S103  # as uvicorn does: the directory decides who may connect
        except BaseException:
            sock.close()
            raise
    else:
        host = config.host or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, config.port))
        except BaseException:
            sock.close()
            raise
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


# ------------------------------------------------------------------------------------ ThreadingHTTPServer


@dataclass(eq=False)
class _ThreadSlot:
    conn: socket.socket
    since: float
    state: str = "new"  # new (no request yet) | keepalive | body | busy
    served: int = 0
    cut: bool = False  # closed for a newcomer; its thread is on its way out


# Idle connections closed at once when a newcomer finds the cap reached. One at a time, every accept waited
# for one victim's thread to wake and leave (milliseconds each on a loaded machine, serially): under a flood
# the accept loop fell behind, the kernel's accept queue overflowed (handshakes completed seconds later, from
# SYN-ACK retransmits, long after the flood) and a request queued behind the flood waited seconds.
EVICT_BATCH = 8


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """Request handler for BoundedHTTPServer: reports its phase so the server can enforce deadlines.
    Call `reading_body()` before reading a request body and `busy()` once it is read."""

    server: BoundedHTTPServer

    def setup(self) -> None:
        super().setup()
        lim = self.server.limits
        self.connection.settimeout(max(lim.request_read_timeout_s, lim.keep_alive_timeout_s))  # backstop

    def handle_one_request(self) -> None:
        self.server._mark(self.connection, "keepalive")
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server._mark(self.connection, "busy")
        return ok

    def reading_body(self) -> None:
        self.server._mark(self.connection, "body")

    def busy(self) -> None:
        self.server._mark(self.connection, "busy")


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with ServeLimits: at most `max_connections` handler threads (idle ones are
    evicted for newcomers, as above); a reaper thread closes connections past the read deadline (no request
    headers, or no body, within request_read_timeout_s) or idle past keep_alive_timeout_s. Handler errors and
    accept errors go to a RateLimitedLog instead of a traceback each."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self, addr: tuple[str, int], handler: type[BoundedRequestHandler], limits: ServeLimits, *, name: str
    ) -> None:
        self.limits = limits
        self.request_queue_size = limits.backlog
        self.errors = RateLimitedLog(name, interval_s=limits.log_interval_s)
        self.stats = ServeStats()
        _tune_process()
        self._slots_lock = threading.Lock()
        self._slots: OrderedDict[socket.socket, _ThreadSlot] = OrderedDict()
        self._free = threading.BoundedSemaphore(limits.max_connections)
        self._stop_reaper = threading.Event()
        super().__init__(addr, handler)
        self._reaper = threading.Thread(target=self._reap_loop, name=f"{name}-reaper", daemon=True)
        self._reaper.start()

    @property
    def active_connections(self) -> int:
        with self._slots_lock:
            return len(self._slots)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            self.stats.accept_errors += 1
            self.errors.note(f"accept failed ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})")
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.5)  # the listening socket stays readable: do not spin
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._free.acquire(blocking=False):
            with self._slots_lock:
                leaving = any(s.cut for s in self._slots.values())
                idle = [s for s in self._slots.values() if s.state not in ("busy", "body") and not s.cut]
                # oldest first; a batch, unless victims of earlier newcomers are still leaving
                victims = idle[: 1 if leaving else EVICT_BATCH]
                for v in victims:
                    v.cut = True
            if not victims and not leaving:
                self.stats.refused += 1
                self.errors.note("refused (every connection busy at the cap)")
                _reset(request)
                return
            for v in victims:
                self.stats.evicted += 1
                self.errors.note("idle connection closed for a newer one (cap reached)")
                _cut(v.conn)
            if not self._free.acquire(timeout=2.0):  # a victim's thread is leaving
                self.stats.refused += 1
                _reset(request)
                return
        with self._slots_lock:
            self._slots[request] = _ThreadSlot(conn=request, since=time.monotonic())
            self.stats.accepted += 1
            self.stats.peak = max(self.stats.peak, len(self._slots))
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: socket.socket) -> None:
        with self._slots_lock:
            slot = self._slots.pop(request, None)
        if slot is not None:
            self._free.release()

    def _mark(self, conn: socket.socket, state: str) -> None:
        with self._slots_lock:
            slot = self._slots.get(conn)
            if slot is None:
                return
            if state == "keepalive" and slot.state == "new":
                return  # the first request's deadline runs from accept
            if state == "busy" and slot.state in ("keepalive", "new"):
                slot.served += 1
            slot.state = state
            slot.since = time.monotonic()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        self.errors.note(f"connection error ({type(exc).__name__})")

    def _reap_loop(self) -> None:
        lim = self.limits
        while not self._stop_reaper.wait(0.25):
            now = time.monotonic()
            cut: list[socket.socket] = []
            with self._slots_lock:
                for slot in self._slots.values():
                    if slot.state in ("new", "body") and now - slot.since > lim.request_read_timeout_s:
                        cut.append(slot.conn)
                    elif slot.state == "keepalive" and now - slot.since > lim.keep_alive_timeout_s:
                        cut.append(slot.conn)
            for conn in cut:
                self.stats.read_timeouts += 1
                _cut(conn)
            self.errors.flush_due()

    def server_close(self) -> None:
        self._stop_reaper.set()
        super().server_close()

    def cut_all(self) -> None:
        """Close every connection (used on stop: kept-alive connections would otherwise stay served)."""
        with self._slots_lock:
            conns = list(self._slots)
        for conn in conns:
            _cut(conn)


def _cut(conn: socket.socket) -> None:
    """Wake the thread blocked on this connection (its recv returns) so it exits and frees its slot."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
