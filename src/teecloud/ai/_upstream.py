"""A lean HTTP/1.1 client for the AI relays' answer paths (the verifying proxy to the inference front, the
front to its engine): h11, the protocol library httpx itself uses, over kept asyncio connections, without
httpx's and httpcore's per-request layers (≈0.5 ms less per request on this CPU: docs/benchmarks.md, AI
round 7). Everything off the answer paths (attestation, receipt fetches, health checks) stays on httpx.

Bounds: a connect timeout; a timeout on every read; the response head (and each chunk-size line) at most
`max_header_bytes` (h11's `max_incomplete_event_size`); the body's size is the caller's bound
(`UpstreamResponse.aread(limit)`, or counted while iterating). h11 checks the framing: an answer cut short
(closed before its last chunk or its Content-Length) raises, it never ends as if complete.

The TLS key of every connection is read once, when it is made (`UpstreamResponse.spki_sha256`); the TLS
context must refuse renegotiation (`ssl.OP_NO_RENEGOTIATION`, checked here), so that key is the key of every
byte the connection carries. Kept connections: at most `max_idle_connections`, none reused after `idle_s`
(below the servers' keep-alive) or once the server closed it; a request on a kept connection that the server
closed before answering a single byte is sent again once on a new connection.

Errors: every failure is an UpstreamError (connect, timeout, connection closed or reset, malformed HTTP,
a repeated header the caller reads, a body above the caller's bound), raised `from` the cause.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

__all__ = ["UpstreamClient", "UpstreamError", "UpstreamLimits", "UpstreamResponse"]


class UpstreamError(Exception):
    """The upstream could not be reached, or its answer broke off or was malformed."""


@dataclass(frozen=True)
class UpstreamLimits:
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 300.0  # each read (a streamed answer may take long, each token does not)
    max_header_bytes: int = 64 * 1024  # the response head; each chunk-size line
    max_idle_connections: int = 16
    idle_s: float = 5.0  # uvicorn closes an idle connection after its keep-alive (15 s for the AI listeners)
    read_bytes: int = 64 * 1024
    max_informational: int = 8  # 1xx answers skipped before the real one


def _spki_sha256(writer: asyncio.StreamWriter) -> bytes | None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(True)
    if not der:
        raise UpstreamError("the upstream presented no TLS certificate")
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(spki).digest()


class _Connection:
    __slots__ = (
        "broken",
        "drained",
        "h11",
        "idle_since",
        "read_timeout_s",
        "reader",
        "spki_sha256",
        "waiting_since",
        "watchdog",
        "writer",
    )

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_header_bytes: int,
        read_timeout_s: float = 300.0,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.spki_sha256: bytes | None = None
        self.idle_since = 0.0
        self.broken: h11.ProtocolError | None = None  # raised once the bytes before it are handed out
        self.drained = False  # h11 said NEED_DATA and has had no bytes since: read before asking it again
        self.read_timeout_s = read_timeout_s
        self.waiting_since: float | None = None  # loop time a body read began waiting (None: not waiting)
        self.watchdog: asyncio.TimerHandle | None = None  # _watch, armed while a wait may need it

    def reusable(self, now: float, idle_s: float) -> bool:
        return (
            self.h11.our_state is h11.IDLE
            and self.h11.their_state is h11.IDLE
            and now - self.idle_since < idle_s
            and not self.reader.at_eof()
            and not self.writer.transport.is_closing()
        )

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.writer.close()


class UpstreamResponse:
    """An answer whose head is in; its body is read with `aiter_raw` or `aread`, once. `aclose` (the
    iterators call it at their end) keeps the connection only when the answer ended cleanly."""

    def __init__(self, client: UpstreamClient, conn: _Connection, head: h11.Response) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status_code = head.status_code
        self._headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
        self.spki_sha256 = conn.spki_sha256
        self._ended = False

    def _finish(self) -> None:
        self._ended = True
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._release(conn)

    def header(self, name: str) -> str | None:
        """The header's value (names compare case-insensitively); UpstreamError when it is repeated."""
        name = name.lower()
        values = [v for k, v in self._headers if k == name]
        if len(values) > 1:
            raise UpstreamError(f"the upstream repeated the {name} header")
        return values[0] if values else None

    async def aiter_raw(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives: every piece one read brought, joined (never an empty piece); raises
        UpstreamError when it breaks off before its end."""
        try:
            while not self._ended:
                conn = self._conn
                if conn is None:
                    raise UpstreamError("the answer was closed before its end")
                parts, ended = await self._client._read_body(conn)
                if ended:
                    self._finish()
                if parts:
                    yield b"".join(parts)
        finally:
            await self.aclose()

    async def aread(self, limit: int) -> bytes:
        """The whole body; UpstreamError when it is above `limit` bytes (reading stops there)."""
        parts, size = [], 0
        async for piece in self.aiter_raw():
            size += len(piece)
            if size > limit:
                raise UpstreamError(f"the upstream's answer is above {limit} bytes")
            parts.append(piece)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Ended cleanly: the connection was kept already. Otherwise (read partly, failed): closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _drain(conn: _Connection) -> tuple[list[bytes], bool]:
    """The body bytes h11 holds without another read, and whether the answer ended."""
    parts: list[bytes] = []
    while True:
        if conn.broken is not None:
            raise conn.broken
        try:
            event = conn.h11.next_event()
        except h11.ProtocolError as exc:
            if not parts:
                raise
            conn.broken = exc  # the bytes before the fault go out first
            return parts, False
        if isinstance(event, h11.Data):
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return parts, True
        elif event is h11.NEED_DATA:
            conn.drained = True
            return parts, False
        else:  # ConnectionClosed before the end (h11 raises for a cut framing; this is the rest)
            raise UpstreamError("the upstream's answer broke off before its end")


class UpstreamClient:
    """POSTs to one upstream (`base_url`: http or https, host and port; a path prefix is not supported)."""

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: UpstreamLimits = UpstreamLimits(),
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.path.strip("/"):
            raise ValueError(f"an upstream URL is http(s)://host[:port], not {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.authority = url.netloc.rsplit("@", 1)[-1]
        if url.scheme == "https":
            if ssl_context is None:
                ssl_context = ssl.create_default_context()  # the system's roots, host name checked
                ssl_context.options |= ssl.OP_NO_RENEGOTIATION
            if not ssl_context.options & ssl.OP_NO_RENEGOTIATION:
                # The TLS key is read once per connection: a renegotiation must not be able to change it.
                raise ValueError("the upstream's TLS context must set ssl.OP_NO_RENEGOTIATION")
        elif ssl_context is not None:
            raise ValueError("a TLS context for a plain-HTTP upstream")
        self.ssl_context = ssl_context
        self.limits = limits
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        lim = self.limits
        try:
            async with asyncio.timeout(lim.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None,
                    limit=lim.read_bytes,
                )
        except TimeoutError as exc:
            raise UpstreamError("connecting to the upstream timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to the upstream: {type(exc).__name__}") from exc
        conn = _Connection(reader, writer, lim.max_header_bytes, lim.read_timeout_s)
        try:
            conn.spki_sha256 = _spki_sha256(writer)
        except Exception:
            conn.close()
            raise
        return conn

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used first
            if conn.reusable(now, self.limits.idle_s):
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        try:
            conn.h11.start_next_cycle()
        except h11.LocalProtocolError:  # the server asked to close (Connection: close)
            conn.close()
            return
        conn.idle_since = time.monotonic()
        if len(self._idle) >= self.limits.max_idle_connections:
            conn.close()
            return
        self._idle.append(conn)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send the request and read the answer's head. `headers` must not set host or content-length."""
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, path, body, headers, reused=True)
            except _StaleConnection:
                pass  # closed by the server while idle, before answering anything: once more, anew
        return await self._exchange(await self._connect(), path, body, headers, reused=False)

    async def _exchange(
        self, conn: _Connection, path: str, body: bytes, headers: dict[str, str], *, reused: bool
    ) -> UpstreamResponse:
        fields = [("host", self.authority), ("content-length", str(len(body)))]
        fields += [(k, v) for k, v in headers.items()]
        got_bytes = False
        conn.drained = False
        try:
            data = conn.h11.send(h11.Request(method="POST", target=path, headers=fields))
            data += conn.h11.send(h11.Data(data=body)) + conn.h11.send(h11.EndOfMessage())
            conn.writer.write(data)
            async with asyncio.timeout(self.limits.read_timeout_s):
                await conn.writer.drain()
                informational = 0
                while True:
                    event = conn.h11.next_event()
                    if event is h11.NEED_DATA:
                        chunk = await conn.reader.read(self.limits.read_bytes)
                        if chunk:
                            got_bytes = True
                        elif reused and not got_bytes:
                            raise _StaleConnection
                        conn.h11.receive_data(chunk)
                        continue
                    if isinstance(event, h11.InformationalResponse):
                        informational += 1
                        if informational > self.limits.max_informational:
                            raise UpstreamError("the upstream sent too many informational answers")
                        continue
                    if isinstance(event, h11.Response):
                        # h11 bounds an incomplete head; one that arrived whole in a large read, here.
                        size = len(event.reason) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                        if size > self.limits.max_header_bytes:
                            raise UpstreamError("the upstream's answer head is oversized")
                        return UpstreamResponse(self, conn, event)  # its body: read by aiter_raw
                    # h11.ConnectionClosed (or anything else) before the answer's head
                    raise UpstreamError("the upstream closed the connection without answering")
        except _StaleConnection:
            conn.close()
            raise
        except (ConnectionError, ssl.SSLError) as exc:
            conn.close()
            if reused and not got_bytes and isinstance(exc, ConnectionError):
                raise _StaleConnection from exc
            raise UpstreamError(f"the upstream connection failed: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            conn.close()
            raise UpstreamError("the upstream did not answer in time") from exc
        except h11.ProtocolError as exc:
            conn.close()
            if conn.reader.at_eof():
                raise UpstreamError("the upstream closed the connection without answering") from exc
            raise UpstreamError(f"the upstream's answer is malformed HTTP: {exc}") from exc
        except BaseException:  # UpstreamError, cancelled: the connection's state is unknown
            conn.close()
            raise

    async def _read_body(self, conn: _Connection) -> tuple[list[bytes], bool]:
        """The body bytes h11 holds (those that came with the head, or with the last read), else those of
        the next read; and whether the answer ended. Bounded by read_timeout_s, as `asyncio.timeout` around
        the call would bound it, through the connection's watchdog (_watch): `asyncio.timeout` makes and
        drops a timer per call, ≈20 µs per streamed event on uvloop (docs/benchmarks.md, AI round 8)."""
        try:
            if not conn.drained:  # (drained: asking h11 again would only say NEED_DATA again)
                parts, ended = _drain(conn)
                if parts or ended:
                    return parts, ended
            loop = asyncio.get_running_loop()
            conn.waiting_since = loop.time()
            if conn.watchdog is None:
                conn.watchdog = loop.call_at(conn.waiting_since + self.limits.read_timeout_s, _watch, conn)
            try:
                while True:
                    conn.h11.receive_data(await conn.reader.read(self.limits.read_bytes))
                    conn.drained = False
                    parts, ended = _drain(conn)
                    if parts or ended:
                        return parts, ended
            finally:
                conn.waiting_since = None
        except (ConnectionError, ssl.SSLError) as exc:
            raise UpstreamError(f"the upstream's answer broke off: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise UpstreamError("the upstream's answer stalled") from exc
        except h11.ProtocolError as exc:
            raise UpstreamError(f"the upstream's answer broke off or is malformed: {exc}") from exc


def _watch(conn: _Connection) -> None:
    """The read watchdog: one timer per connection, re-armed only when it fires during a wait that began
    later than it was armed for; a wait that has lasted read_timeout_s ends with TimeoutError (raised by
    the reader: the connection is not used again)."""
    conn.watchdog = None
    since = conn.waiting_since
    if since is None or conn.writer.transport.is_closing():
        return
    loop = asyncio.get_running_loop()
    due = since + conn.read_timeout_s
    if loop.time() < due - 0.001:  # (a loop may run a timer up to its clock's resolution early)
        conn.watchdog = loop.call_at(due, _watch, conn)
        return
    conn.reader.set_exception(TimeoutError())


class _StaleConnection(Exception):
    """A kept connection the server had closed: the request is sent again on a new one."""
