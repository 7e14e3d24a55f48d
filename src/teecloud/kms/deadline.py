"""The KMS client's wire: HTTP/1.1 over one TLS socket, every exchange bounded by one wall-clock deadline
(issue 19: "a deadline on every node call", and the client's CPU per release).

httpx's timeouts bound each network operation, not the exchange: a peer that trickles one byte every few
seconds (in the TLS handshake, the status line and headers, or the body) holds the caller for as long as it
likes. And httpx's per-request layers (its Client, httpcore's pool and stream objects) cost the CVM about as
much CPU as the TLS handshakes of a threshold release. Here the protocol is h11 — the HTTP/1.1 state machine
httpx itself uses, which checks the framing (an answer cut short raises, it never ends as if complete) and
bounds the head — over a standard-library `ssl` socket whose every blocking operation waits at most until the
deadline: CPython bounds a whole `do_handshake()` by the socket's timeout (set to the time left before it),
and each send and receive here sets the time left again, so a trickle ends at the deadline.

    open_connection(host, port, ctx, deadline=..., timeout=...)   TCP connect + TLS handshake by `deadline`
                                                                  (a `time.monotonic()` instant)
    Connection.exchange(method, target, body, deadline=...)        one request, its answer read whole, at
                                                                  most `max_bytes` of body (Answer)
    ConnectionPool(host, port, ctx)                                kept-alive connections over one context,
                                                                  each exchange with its own deadline
    peer_certificate(host, port, ctx, deadline=..., timeout=...)  one handshake, no request: the server's
                                                                  certificate (DER), or None

Errors: DeadlinePassed (the deadline came first; a socket.timeout is one too), WireError (closed, reset,
malformed HTTP, an answer above its bounds); a failed certificate check raises ssl.SSLCertVerificationError
as the ssl module does (the caller re-pins on it); other ssl.SSLError and OSError pass through as they are.
No proxy is ever used: the client's identity probe is direct, so are its requests.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11

from teecloud.kms.errors import KmsClientError

__all__ = [
    "Answer",
    "Connection",
    "ConnectionPool",
    "DeadlinePassed",
    "WireError",
    "encode_json",
    "open_connection",
    "peer_certificate",
]

Clock = Callable[[], float]

MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and headers (h11's max_incomplete_event_size)
READ_BYTES = 64 * 1024
WRITE_BYTES = 16 * 1024
MAX_INFORMATIONAL = 8  # 1xx answers skipped before the real one


class WireError(KmsClientError):
    """The exchange broke off or its answer is malformed or oversized."""


class DeadlinePassed(WireError):
    """The exchange's deadline came before its end."""


@dataclass(frozen=True)
class Answer:
    status: int
    content: bytes
    server_der: bytes | None  # the certificate the server presented on the connection that carried it


def encode_json(body: Any) -> bytes:
    """A request body as httpx's `json=` encodes it (compact, UTF-8, no NaN)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _left(deadline: float, clock: Clock) -> float:
    left = deadline - clock()
    if left <= 0:
        raise DeadlinePassed("the exchange's deadline has passed")
    return left


# getaddrinfo has no timeout of its own: a name is resolved on one of a few threads and the call waits at
# most the time it has left; a resolver that never answers holds one of these threads (never more than
# _RESOLVERS), never the call. An address literal needs no resolver.
_RESOLVERS = 4
_resolver_pool: concurrent.futures.ThreadPoolExecutor | None = None
_resolver_lock = threading.Lock()


def _resolve(host: str, port: int, wait_s: float) -> list[tuple[Any, ...]]:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    global _resolver_pool
    with _resolver_lock:
        if _resolver_pool is None:
            _resolver_pool = concurrent.futures.ThreadPoolExecutor(_RESOLVERS, "kms-resolve")
        pool = _resolver_pool
    future = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return future.result(timeout=max(0.0, wait_s))
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"resolving {host!r} did not finish within the call's deadline") from None


def _connect(host: str, port: int, *, deadline: float, timeout: float, clock: Clock) -> socket.socket:
    """socket.create_connection, but each address's connect waits at most the time left before `deadline`
    (create_connection gives every address the whole timeout: a name with k dead addresses held a call
    k times its deadline; review 12), and the name's resolution too (`_resolve`, R12-7)."""
    error: OSError | None = None
    for family, kind, proto, _, address in _resolve(host, port, min(timeout, _left(deadline, clock))):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(min(timeout, _left(deadline, clock)))
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error if error is not None else OSError(f"{host!r} resolves to no address")


def open_connection(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    deadline: float,
    timeout: float,
    clock: Clock = time.monotonic,
) -> Connection:
    """A TLS connection to host:port: the connect waits at most `timeout` and the whole of it ends by
    `deadline`. The context decides whom it accepts (ssl.SSLCertVerificationError otherwise)."""
    raw = _connect(host, port, deadline=deadline, timeout=timeout, clock=clock)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = ssl_context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        # CPython bounds the whole handshake by the socket's timeout (one deadline over its every wait)
        tls.settimeout(min(timeout, _left(deadline, clock)))
        tls.do_handshake()
        der = tls.getpeercert(binary_form=True)
    except TimeoutError as exc:
        tls.close()
        raise DeadlinePassed("the TLS handshake did not finish by the deadline") from exc
    except BaseException:
        tls.close()
        raise
    return Connection(tls, host, port, bytes(der) if der else None, timeout=timeout, clock=clock)


class Connection:
    """One TLS connection and its HTTP/1.1 state; one exchange at a time (ConnectionPool hands it to one
    caller)."""

    def __init__(
        self,
        tls: ssl.SSLSocket,
        host: str,
        port: int,
        server_der: bytes | None,
        *,
        timeout: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self._tls = tls
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal (RFC 3986 §3.2.2)
        self._authority = name if port == 443 else f"{name}:{port}"
        self.server_der = server_der
        self._timeout = timeout
        self._clock = clock
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = clock()
        self.reusable = True

    def close(self) -> None:
        self.reusable = False
        self._tls.close()

    def still_open(self) -> bool:
        """An idle connection the server has not closed (nothing to read on it: no EOF, no stray bytes)."""
        try:
            readable, _, _ = select.select([self._tls], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable and self._tls.pending() == 0

    def _wait(self, deadline: float) -> None:
        self._tls.settimeout(min(self._timeout, _left(deadline, self._clock)))

    def exchange(
        self, method: str, target: str, body: bytes | None, *, deadline: float, max_bytes: int
    ) -> Answer:
        """Send one request and read its whole answer, all by `deadline`; at most `max_bytes` of body (the
        rest is never read). On any failure the connection is closed."""
        try:
            return self._exchange(method, target, body, deadline, max_bytes)
        except BaseException:
            self.close()
            raise

    def _exchange(
        self, method: str, target: str, body: bytes | None, deadline: float, max_bytes: int
    ) -> Answer:
        headers = [("host", self._authority), ("accept", "application/json")]
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        conn = self._h11
        out = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body is not None:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        view = memoryview(out)
        try:
            while view:
                self._wait(deadline)
                sent = self._tls.send(view[:WRITE_BYTES])
                view = view[sent:]
            status, parts, size, informational = 0, [], 0, 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    self._wait(deadline)
                    data = self._tls.recv(READ_BYTES)
                    if not data and conn.their_state is h11.SEND_RESPONSE and not status:
                        raise WireError("the connection was closed without an answer")
                    conn.receive_data(data)
                elif isinstance(event, h11.InformationalResponse):
                    informational += 1
                    if informational > MAX_INFORMATIONAL:
                        raise WireError("too many informational answers")
                elif isinstance(event, h11.Response):
                    # h11 bounds an incomplete head; one that arrived whole in a large read, here
                    if (
                        len(event.reason) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                        > MAX_HEAD_BYTES
                    ):
                        raise WireError("the answer's head is oversized")
                    status = event.status_code
                    length = [v for k, v in event.headers if k == b"content-length"]
                    if length and any(k == b"transfer-encoding" for k, _ in event.headers):
                        # RFC 9112 §6.3 (3): both framings "ought to be handled as an error" (smuggling)
                        raise WireError("an answer with both Content-Length and Transfer-Encoding")
                    if length and int(length[0]) > max_bytes:
                        raise WireError(f"the answer is larger than {max_bytes} bytes")
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > max_bytes:
                        raise WireError(f"the answer is larger than {max_bytes} bytes")
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed before the end of the answer
                    raise WireError("the connection was closed before the answer's end")
        except TimeoutError as exc:
            if self._clock() >= deadline:
                raise DeadlinePassed("the answer did not come by the deadline") from exc
            raise WireError(f"no answer within {self._timeout:g} s") from exc
        except h11.ProtocolError as exc:
            raise WireError(f"malformed or cut HTTP answer: {exc}") from exc
        except (ssl.SSLError, ConnectionError) as exc:
            raise WireError(f"the connection broke: {type(exc).__name__}: {exc}") from exc
        if conn.trailing_data[0]:  # bytes after the answer's end: never read as the next request's answer
            self.reusable = False
            return Answer(status, b"".join(parts), self.server_der)
        try:
            conn.start_next_cycle()
            self.idle_since = self._clock()
        except h11.LocalProtocolError:  # the server closes it (Connection: close), or HTTP/1.0
            self.reusable = False
        return Answer(status, b"".join(parts), self.server_der)


class ConnectionPool:
    """Kept-alive connections to host:port over one TLS context (at most `max_idle` idle, none reused past
    `idle_s` — below the KMS's 5 s keep-alive — or once the server closed it). Exchanges run at once on
    connections of their own. After close(), nothing is kept and a running exchange's connection is closed
    when it ends."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        timeout: float,
        max_idle: int = 4,
        idle_s: float = 4.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.host, self.port, self.ssl_context = host, port, ssl_context
        self._timeout, self._max_idle, self._idle_s, self._clock = timeout, max_idle, idle_s, clock
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self.opened = 0  # connections made (tests: one handshake for many calls)

    def _take(self) -> Connection | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()  # the most recently used first
                if self._clock() - conn.idle_since < self._idle_s and conn.still_open():
                    return conn
                conn.close()
        return None

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            if conn.reusable and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def exchange(
        self, method: str, target: str, body: bytes | None, *, deadline: float, max_bytes: int
    ) -> Answer:
        conn = self._take()
        if conn is None:
            if self._closed:
                raise WireError("the connection pool is closed")
            conn = open_connection(
                self.host,
                self.port,
                self.ssl_context,
                deadline=deadline,
                timeout=self._timeout,
                clock=self._clock,
            )
            with self._lock:
                self.opened += 1
        answer = conn.exchange(method, target, body, deadline=deadline, max_bytes=max_bytes)
        self._give_back(conn)
        return answer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def peer_certificate(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    deadline: float,
    timeout: float,
    clock: Clock = time.monotonic,
) -> bytes | None:
    """One TLS handshake with `host`:`port` and no request, the connect waiting at most `timeout` and all
    of it ending by `deadline`: the certificate (DER) the server presented, None when there was none or the
    handshake did not finish (refused, failed, or too slow). The caller checks the certificate."""
    try:
        conn = open_connection(host, port, ssl_context, deadline=deadline, timeout=timeout, clock=clock)
    except (WireError, OSError):  # ssl.SSLError is an OSError
        return None
    conn.close()
    return conn.server_der
