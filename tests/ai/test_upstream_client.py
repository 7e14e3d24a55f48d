"""The answer paths' lean HTTP client (teecloud.ai._upstream: h11 over kept connections), used by the
verifying proxy towards the front and by the front towards its engine: kept connections reused and a stale
one replaced, every malformed, oversized, cut or stalled answer an UpstreamError (never a partial answer
that looks complete), the TLS key read per connection; and through the real proxy: a malformed upstream
answer and an upstream closing mid-stream reach the client as errors (no `[DONE]`), and a new connection
presenting another TLS key than the pinned one is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import select
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teecloud.ai._upstream import UpstreamClient, UpstreamError, UpstreamLimits
from tests.ai.conftest import MODEL_ID
from tests.ai.test_proxy_inline_receipts import Setup

_OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
Script = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


class Scripted:
    """A raw HTTP server on 127.0.0.1 that answers each connection as `script` says (connection number,
    reader, writer); counts connections and requests."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script, self.tls = script, tls
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(self.connections, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.tls)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def answering(*answers: bytes, close_after: bool = False) -> Script:
    """Each connection: read a request, send the next answer, for as many requests as come."""

    async def script(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await _read_request(reader)
            writer.write(answer)
            await writer.drain()
            if close_after:
                return
        await reader.read()

    return script


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_one_kept_connection_serves_every_request() -> None:
    async def main() -> None:
        async with Scripted(answering(_OK, _OK, _OK)) as srv:
            client = UpstreamClient(srv.url)
            for _ in range(3):
                resp = await client.post("/v1/x", b"{}", {"content-type": "application/json"})
                assert resp.status_code == 200 and await resp.aread(100) == b"{}"
            assert srv.connections == 1
            await client.aclose()

    run(main())


def test_a_connection_the_server_closed_is_replaced() -> None:
    async def main() -> None:
        async with Scripted(answering(_OK, close_after=True)) as srv:
            client = UpstreamClient(srv.url)
            for _ in range(3):
                resp = await client.post("/v1/x", b"{}", {})
                assert await resp.aread(100) == b"{}"
                await asyncio.sleep(0.05)  # the server's close arrives while the connection is idle
            assert srv.connections == 3
            await client.aclose()

    run(main())


def test_a_stale_connection_whose_close_is_not_seen_yet_is_retried_once() -> None:
    async def main() -> None:
        async with Scripted(answering(_OK, close_after=True)) as srv:
            client = UpstreamClient(srv.url)
            assert await (await client.post("/v1/x", b"{}", {})).aread(100) == b"{}"
            # No pause: the kept connection looks alive, the server has closed it; sent again anew.
            assert await (await client.post("/v1/x", b"{}", {})).aread(100) == b"{}"
            assert srv.connections == 2
            await client.aclose()

    run(main())


@pytest.mark.parametrize(
    "answer, why",
    [
        (b"HTTP/9 200 OK\r\n\r\n", "malformed"),
        (b"SMTP ready\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}", "malformed"),
        (b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", "oversized|malformed"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + _OK, "informational"),
        (b"", "without answering"),
        (b"HTTP/1.1 200 O", "without answering"),
    ],
    ids=["version", "not-http", "length", "two-lengths", "big-head", "many-1xx", "closed", "cut-head"],
)
def test_a_malformed_or_oversized_head_is_an_error(answer: bytes, why: str) -> None:
    async def main() -> None:
        async with Scripted(answering(answer, close_after=True)) as srv:
            client = UpstreamClient(srv.url)
            with pytest.raises(UpstreamError, match=why):
                await client.post("/v1/x", b"{}", {})
            assert client._idle == []  # nothing kept of it

    run(main())


def test_a_body_above_the_bound_is_an_error() -> None:
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"a" * 5000

    async def main() -> None:
        async with Scripted(answering(big)) as srv:
            resp = await UpstreamClient(srv.url).post("/v1/x", b"{}", {})
            with pytest.raises(UpstreamError, match="above 4096 bytes"):
                await resp.aread(4096)

    run(main())


@pytest.mark.parametrize(
    "answer",
    [
        _SSE_HEAD + b"\r\n" + b"8\r\ndata: 1\n\r\n" + b"8\r\ndata: 2\n\r\n",  # chunked, no last chunk
        _SSE_HEAD + b"\r\n" + b"8\r\ndata: 1\n\r\n" + b"ff\r\ndata: 2",  # cut inside a chunk
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\ndata: 1\n\n",  # shorter than its length
        _SSE_HEAD + b"\r\n" + b"8\r\ndata: 1\n\r\n" + b"zz\r\n",  # a malformed chunk size
    ],
    ids=["no-last-chunk", "inside-chunk", "short-length", "bad-chunk-size"],
)
def test_an_answer_cut_short_raises_after_the_bytes_before(answer: bytes) -> None:
    async def main() -> None:
        async with Scripted(answering(answer, close_after=True)) as srv:
            client = UpstreamClient(srv.url)
            resp = await client.post("/v1/x", b"{}", {})
            got = b""
            with pytest.raises(UpstreamError):
                async for piece in resp.aiter_raw():
                    got += piece
            assert got.startswith(b"data: 1\n")
            assert client._idle == []

    run(main())


def test_a_stalled_upstream_times_out() -> None:
    async def stall(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_SSE_HEAD + b"\r\n" + b"8\r\ndata: 1\n\r\n")
        await asyncio.sleep(5)

    async def main() -> None:
        async with Scripted(stall) as srv:
            client = UpstreamClient(srv.url, limits=UpstreamLimits(read_timeout_s=0.3))
            resp = await client.post("/v1/x", b"{}", {})
            pieces = resp.aiter_raw()
            assert await anext(pieces) == b"data: 1\n"
            with pytest.raises(UpstreamError, match="stalled"):
                await anext(pieces)

    run(main())


def test_a_repeated_header_is_refused_and_a_reused_connection_that_breaks_mid_answer_is_not_retried() -> None:
    twice = b"HTTP/1.1 200 OK\r\nx-receipt-id: a\r\nx-receipt-id: b\r\ncontent-length: 2\r\n\r\n{}"

    async def cut_second(_: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_OK)
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")  # then the connection closes

    async def main() -> None:
        async with Scripted(cut_second) as srv:
            client = UpstreamClient(srv.url)
            assert await (await client.post("/v1/x", b"{}", {})).aread(100) == b"{}"
            with pytest.raises(UpstreamError, match="without answering"):
                await client.post("/v1/x", b"{}", {})  # bytes came, then the close: not sent again
            assert srv.connections == 1
        async with Scripted(answering(twice)) as srv:
            resp = await UpstreamClient(srv.url).post("/v1/x", b"{}", {})
            with pytest.raises(UpstreamError, match="repeated"):
                resp.header("X-Receipt-Id")

    run(main())


def test_urls_and_tls_contexts_are_checked() -> None:
    with pytest.raises(ValueError, match="OP_NO_RENEGOTIATION"):
        UpstreamClient("https://127.0.0.1:1", ssl_context=ssl.create_default_context())
    default = UpstreamClient("https://127.0.0.1:1").ssl_context  # no context given: one that refuses it
    assert default is not None and default.options & ssl.OP_NO_RENEGOTIATION
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    with pytest.raises(ValueError, match="plain-HTTP"):
        UpstreamClient("http://127.0.0.1:1", ssl_context=_client_tls())
    with pytest.raises(ValueError):
        UpstreamClient("http://127.0.0.1:1/prefix")
    with pytest.raises(ValueError):
        UpstreamClient("ftp://127.0.0.1:1")

    async def main() -> None:
        client = UpstreamClient("http://127.0.0.1:1", limits=UpstreamLimits(connect_timeout_s=2))
        with pytest.raises(UpstreamError, match="cannot connect"):
            await client.post("/v1/x", b"{}", {})

    run(main())


# --- TLS: the key of each connection


def _tls_identity(tmp: Path, name: str) -> tuple[ssl.SSLContext, bytes]:
    """A self-signed server context and the sha256 of its certificate's SPKI."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / f"{name}.pem", tmp / f"{name}.key")
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ctx, hashlib.sha256(spki).digest()


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def test_the_tls_key_is_read_per_connection(tmp_path: Path) -> None:
    server_ctx, spki = _tls_identity(tmp_path, "a")

    async def main() -> None:
        async with Scripted(answering(_OK, _OK), tls=server_ctx) as srv:
            client = UpstreamClient(srv.url, ssl_context=_client_tls())
            for _ in range(2):
                resp = await client.post("/v1/x", b"{}", {})
                assert resp.spki_sha256 == spki and await resp.aread(10) == b"{}"
            assert srv.connections == 1

    run(main())


# --- through the real proxy


@pytest.fixture()
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.close()


class ThreadServer:
    """A raw TCP server in a thread: `handle(connection number, socket)` per connection."""

    def __init__(self, handle: Callable[[int, socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.handle, self.count = handle, 0
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            threading.Thread(target=self._one, args=(self.count, conn), daemon=True).start()

    def _one(self, n: int, conn: socket.socket) -> None:
        with conn:
            try:
                self.handle(n, conn)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _recv_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(65536)


def _chat(url: str, stream: bool) -> httpx.Response:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-receipt-id: a\r\nx-receipt-id: b\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 400 Bad\r\ncontent-length: 100000\r\n\r\n" + b"a" * 100000,  # an oversized error body
    ],
    ids=["two-receipt-ids", "garbage", "big-error-body"],
)
def test_the_proxy_refuses_a_malformed_upstream_answer(setup: Setup, answer: bytes) -> None:
    def handle(_: int, conn: socket.socket) -> None:
        _recv_request(conn)
        conn.sendall(answer)

    upstream = ThreadServer(handle)
    try:
        with setup.proxy(upstream.url) as p:
            for stream in (True, False):
                r = _chat(p.url, stream)
                assert r.status_code == 502 and "forward" in r.json()["error"]["message"]
    finally:
        upstream.close()


def test_the_proxy_ends_a_stream_cut_mid_answer_with_an_error_and_no_done(setup: Setup) -> None:
    """The front's real first events, then the connection closes before the stream's end."""
    answer = httpx.post(
        setup.front.url + "/v1/chat/completions",
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"x-teecloud-receipt": "inline"},
    )
    rid = answer.headers["x-receipt-id"]
    first_event = answer.content.split(b"\n\n")[0] + b"\n\n"

    def handle(_: int, conn: socket.socket) -> None:
        _recv_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-receipt-id: " + rid.encode() + b"\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            + f"{len(first_event):x}\r\n".encode()
            + first_event
            + b"\r\n"
        )

    upstream = ThreadServer(handle)
    try:
        with setup.proxy(upstream.url, e2ee=False) as p:
            r = _chat(p.url, True)
            assert r.status_code == 200
            assert r.content.startswith(first_event)
            assert b"the upstream stream broke" in r.content and b"[DONE]" not in r.content
            r = _chat(p.url, False)
            assert r.status_code == 502 and "broke off" in r.json()["error"]["message"]
    finally:
        upstream.close()


def test_a_new_connection_with_another_tls_key_is_refused(setup: Setup, tmp_path: Path) -> None:
    """A TLS relay before the front: its first connection presents the pinned key, then it closes that
    connection after the answer; the proxy's next connection meets another key and is refused."""
    pinned_ctx, pinned_spki = _tls_identity(tmp_path, "pinned")
    other_ctx, _ = _tls_identity(tmp_path, "other")
    front_port = int(setup.front.url.rsplit(":", 1)[1])

    def handle(n: int, raw: socket.socket) -> None:
        # One thread per connection moves both directions (an SSL socket is not used from two threads).
        conn = (pinned_ctx if n == 1 else other_ctx).wrap_socket(raw, server_side=True)
        with conn, socket.create_connection(("127.0.0.1", front_port)) as front:
            seen = b""
            while True:
                ready = [conn] if conn.pending() else select.select([conn, front], [], [], 30)[0]
                if not ready:
                    return
                if conn in ready:
                    if not (data := conn.recv(65536)):
                        return
                    front.sendall(data)
                if front in ready:
                    if not (data := front.recv(65536)):
                        return
                    conn.sendall(data)
                    seen = (seen + data)[-16:]
                    if seen.endswith(b"0\r\n\r\n"):  # the streamed answer's last chunk: close this one
                        return

    relay = ThreadServer(handle)
    try:
        ks = setup.keys.keyset
        app_upstream = dataclasses.replace(setup.upstream(), tls_pinned=True)
        app_upstream = dataclasses.replace(
            app_upstream, keyset=dataclasses.replace(ks, tls_spki_sha256=pinned_spki)
        )
        https = relay.url.replace("http://", "https://")
        with setup.proxy(https) as p:
            setup.verifier.pinned = app_upstream  # type: ignore[union-attr]
            r = _chat(p.url, True)
            assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
            r = _chat(p.url, True)
            assert r.status_code == 502 and "tls_pin" in r.json()["error"]["message"]
            assert relay.count == 2
    finally:
        relay.close()
