"""teecloud._serve: the connection cap (evict the oldest idle, refuse when all are busy), the TLS handshake,
request-read and keep-alive deadlines, the rate-limited error log, and the same for BoundedHTTPServer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teecloud import _serve
from teecloud._serve import (
    BoundedHTTPServer,
    BoundedRequestHandler,
    LimitedServer,
    RateLimitedLog,
    ServeLimits,
    limited_config,
)
from tests.common.flood import (
    PARTIAL_HTTP,
    assert_flood_ok,
    captured_logs,
    fresh_connection_client,
    run_flood,
)

FAST = ServeLimits(
    max_connections=8,
    backlog=16,
    tls_handshake_timeout_s=1.0,
    request_read_timeout_s=1.0,
    keep_alive_timeout_s=1.0,
)


class _App:
    """`/` answers at once; `/hold` waits until `release` is set (a request in progress)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        body = b"ok"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(limits: ServeLimits, *, ssl_ctx: ssl.SSLContext | None = None, **kw: Any) -> Iterator[Any]:
    app = _App()
    extra: dict[str, Any] = {}
    if ssl_ctx is not None:
        extra["ssl_context_factory"] = lambda _c, _d: ssl_ctx
    server = LimitedServer(
        limited_config(app, limits, host="127.0.0.1", port=0, **extra), limits, name="t", **kw
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    server.port = server.servers[0].sockets[0].getsockname()[1]
    server.app = app
    server.thread = thread
    try:
        yield server
    finally:
        app.release.set()
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def _closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(4096) == b"" or True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        ServeLimits(max_connections=0)
    with pytest.raises(ValueError):
        ServeLimits(request_read_timeout_s=0)


def test_idle_connections_are_evicted_for_a_request_at_the_cap() -> None:
    with serving(FAST) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(FAST.max_connections)]
        assert _wait(lambda: srv.active_connections == FAST.max_connections)
        r = httpx.get(f"http://127.0.0.1:{srv.port}/", timeout=5)
        assert r.status_code == 200
        assert srv.stats.evicted >= 1 and srv.active_connections <= FAST.max_connections
        assert _closed_by_peer(idle[0])  # the oldest idle one made room
        for s in idle:
            s.close()


def test_a_newcomer_is_refused_when_every_connection_is_busy() -> None:
    with serving(FAST) as srv:
        busy = []
        for _ in range(FAST.max_connections):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            busy.append(s)
        assert _wait(lambda: srv.active_connections == FAST.max_connections)
        time.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{srv.port}/", timeout=5)
        assert time.monotonic() - t0 < 1.0  # refused at once, not queued
        assert srv.stats.refused >= 1 and srv.stats.evicted == 0
        srv.app.release.set()  # the busy requests complete and are answered
        for s in busy:
            s.settimeout(5)
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
            s.close()


def test_silent_and_trickling_connections_are_closed_after_the_read_timeout() -> None:
    with serving(FAST) as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port))
        trickle = socket.create_connection(("127.0.0.1", srv.port))
        trickle.sendall(PARTIAL_HTTP)
        t0 = time.monotonic()
        for _ in range(3):  # a byte every 0.3 s does not extend the deadline
            time.sleep(0.3)
            with contextlib.suppress(OSError):
                trickle.sendall(b"a")
        trickle.settimeout(3)
        answer = trickle.recv(1024)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - t0 < FAST.request_read_timeout_s + 1.0
        assert _closed_by_peer(silent, 3)
        assert _wait(lambda: srv.active_connections == 0)
        assert srv.stats.read_timeouts == 2
        silent.close()
        trickle.close()


def test_keep_alive_connection_is_closed_when_idle() -> None:
    with serving(FAST) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(3)
        got = b""
        while not got.endswith(b"ok"):
            got += s.recv(1024)
        assert got.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert s.recv(1024) == b""
        assert time.monotonic() - t0 < FAST.keep_alive_timeout_s + 1.0
        s.close()


def _self_signed(tmp: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = time.time()

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC))
        .sign(key, hashes.SHA256())
    )
    pem = tmp / "server.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pem))
    return ctx


def test_tls_handshake_timeout_and_hook(tmp_path: Path) -> None:
    seen: list[str] = []
    with serving(
        FAST, ssl_ctx=_self_signed(tmp_path), on_tls_error=lambda exc, peer: seen.append(peer)
    ) as srv:
        half_open = socket.create_connection(("127.0.0.1", srv.port))  # never sends a ClientHello
        t0 = time.monotonic()
        assert _closed_by_peer(half_open, 4)
        assert time.monotonic() - t0 < FAST.tls_handshake_timeout_s + 1.0
        assert _wait(lambda: srv.stats.handshake_timeouts == 1)
        assert len(seen) == 1 and seen[0].startswith("127.0.0.1:")
        assert httpx.get(f"https://127.0.0.1:{srv.port}/", verify=False, timeout=5).status_code == 200
        assert srv.active_connections <= 1
        half_open.close()


def test_stop_aborts_idle_kept_alive_tls_connections_and_finishes_requests(tmp_path: Path) -> None:
    """On stop, a kept-alive TLS connection its client leaves idle (as an httpx pool does) is ended at once,
    not closed with a wait for the client's close_notify (up to shutdown_timeout_s: 5 s a stop before);
    a request in flight is still answered."""
    limits = dataclasses.replace(
        FAST, tls_handshake_timeout_s=60.0, keep_alive_timeout_s=60.0, shutdown_timeout_s=30.0
    )
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    with serving(limits, ssl_ctx=_self_signed(tmp_path)) as srv:
        idle = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while not got.endswith(b"ok"):
            got += idle.recv(1024)
        assert got.startswith(b"HTTP/1.1 200") and b"connection: close" not in got.lower()  # kept alive
        held = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        held.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _wait(lambda: srv.active_connections == 2)
        time.sleep(0.2)  # the held request reaches the app
        t0 = time.monotonic()
        srv.should_exit = True
        time.sleep(0.3)
        srv.app.release.set()
        answer = b""
        while not answer.endswith(b"ok"):
            answer += held.recv(1024)
        assert answer.startswith(b"HTTP/1.1 200")
        held.close()
        srv.thread.join(20)
        assert not srv.thread.is_alive()
        # the idle client never read or closed its connection: the stop did not wait for it
        assert time.monotonic() - t0 < 10.0 < limits.shutdown_timeout_s
        with contextlib.suppress(OSError):
            assert idle.recv(1024) == b""
        idle.close()


def test_rate_limited_log_writes_one_line_per_interval() -> None:
    now = [0.0]
    lines: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    lg = logging.getLogger("teecloud.test-ratelimit")
    lg.addHandler(H())
    lg.propagate = False
    rl = RateLimitedLog("listener", interval_s=10, logger=lg, clock=lambda: now[0])
    for i in range(1000):
        now[0] = i * 0.01  # 1000 events over 10 s
        rl.note("handshake timeout" if i % 2 else "plain HTTP on the TLS port")
    assert len(lines) == 1  # the first, at once
    now[0] = 10.5
    rl.flush_due()
    assert len(lines) == 2
    assert "500 handshake timeout, 499 plain HTTP on the TLS port in the last 10 s" in lines[1]
    for i in range(100):
        rl.note(f"kind {i}")  # distinct kinds are bounded
    now[0] = 30
    rl.flush_due()
    assert len(lines) == 3 and "84 other" in lines[-1]
    assert sum(rl.total.values()) == 1100


def test_uvicorn_warnings_are_rate_limited() -> None:
    with serving(FAST) as srv, captured_logs() as lines:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"\x00garbage\r\n\r\n")
            s.settimeout(3)
            with contextlib.suppress(OSError):
                s.recv(1024)
            s.close()
    invalid = [line for line in lines if "Invalid HTTP request" in line]
    assert 1 <= len(invalid) <= 2, lines


@pytest.mark.slow
def test_flood_generic_listener() -> None:
    limits = dataclasses.replace(_serve.NODE_API, request_read_timeout_s=2.0, keep_alive_timeout_s=2.0)
    with serving(limits) as srv:
        client = fresh_connection_client()

        def legit() -> None:
            r = client.get(f"http://127.0.0.1:{srv.port}/")
            assert r.status_code == 200

        rep = run_flood(
            target=f"tcp:127.0.0.1:{srv.port}",
            legit=legit,
            active=lambda: srv.active_connections,
            idle_timeout_s=2.0,
        )
        client.close()
    print(rep.summary())
    assert_flood_ok(rep, limits)


class _Handler(BoundedRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        if self.path == "/hold":
            self.server.release.wait(10)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


@contextlib.contextmanager
def threaded(limits: ServeLimits) -> Iterator[BoundedHTTPServer]:
    srv = BoundedHTTPServer(("127.0.0.1", 0), _Handler, limits, name="t")
    srv.release = threading.Event()  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.release.set()  # type: ignore[attr-defined]
        srv.shutdown()
        srv.server_close()
        srv.cut_all()


def test_threaded_server_caps_evicts_and_times_out() -> None:
    with threaded(FAST) as srv:
        port = srv.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(FAST.max_connections + 4)]
        assert _wait(lambda: srv.stats.accepted >= FAST.max_connections + 4)
        assert srv.active_connections <= FAST.max_connections
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
        assert srv.stats.evicted >= 5
        assert _wait(lambda: srv.active_connections == 0, FAST.request_read_timeout_s + 2)
        for s in idle:
            s.close()


def test_threaded_server_refuses_when_all_busy() -> None:
    with threaded(FAST) as srv:
        port = srv.server_address[1]
        busy = []
        for _ in range(FAST.max_connections):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            busy.append(s)
        assert _wait(lambda: srv.active_connections == FAST.max_connections)
        time.sleep(0.2)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert srv.stats.refused >= 1
        srv.release.set()  # type: ignore[attr-defined]
        for s in busy:
            s.settimeout(5)
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
            s.close()


def test_accepted_tcp_connections_have_nagle_off() -> None:
    """asyncio's connect_accepted_socket leaves Nagle on; with it a kept-alive request waited ≈40 ms for the
    client's delayed ACK (bench/bench_kms.py: 44 ms per request at one client instead of ≈2 ms)."""
    with serving(FAST) as srv:
        c = socket.create_connection(("127.0.0.1", srv.port))
        try:
            assert _wait(lambda: srv.active_connections == 1)
            slots = list(srv._acceptor._slots.values())
            assert slots and slots[0].conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            c.close()
