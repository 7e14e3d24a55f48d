"""Review 12: the KMS client's h11 wire (kms.deadline) against a hostile node's framing, byte for byte.

Each test is the attacker's steps: a pinned-or-not TLS peer (the framing is judged before any pin or
model) answers one request with a crafted answer; the client must end with a WireError (a KmsClientError,
never a traceback), read exactly the answer the framing says, and never keep a connection whose state is
in doubt."""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from teecloud.kms.deadline import ConnectionPool, DeadlinePassed, WireError
from teecloud.kms.errors import KmsClientError
from tests.kms.test_threshold_dkg_deadline import _client_context
from tests.review12._scripted import Scripted, read_request


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    start = time.monotonic()
    yield
    assert time.monotonic() - start < 40


def _answering(*answers: bytes, then_close: bool = False):  # type: ignore[no-untyped-def]
    """A handler that answers the k-th request on a connection with answers[k] (the last one repeats)."""

    def handler(tls: ssl.SSLSocket) -> None:
        k = 0
        while read_request(tls):
            tls.sendall(answers[min(k, len(answers) - 1)])
            k += 1
            if then_close:
                return

    return handler


def _one(answer: bytes, **kw: float) -> bytes:
    server = Scripted(_answering(answer))
    try:
        conn = server.connect()
        return conn.exchange(
            "POST", "/x", b"{}", deadline=time.monotonic() + kw.get("deadline_s", 10), max_bytes=1 << 20
        ).content
    finally:
        server.stop()


def _pool(server: Scripted) -> ConnectionPool:
    return ConnectionPool("127.0.0.1", server.port, _client_context(), timeout=10)


def _twice(answer: bytes) -> tuple[list[bytes], int]:
    """Two exchanges on one pool: the answers and how many connections the pool opened."""
    server = Scripted(_answering(answer))
    pool = _pool(server)
    try:
        got = [
            pool.exchange("GET", "/x", None, deadline=time.monotonic() + 10, max_bytes=1 << 20).content
            for _ in range(2)
        ]
        return got, pool.opened
    finally:
        pool.close()
        server.stop()


# --- response splitting / smuggling


def test_two_different_content_lengths_are_refused() -> None:
    with pytest.raises(WireError):
        _one(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 30\r\n\r\n{}")


def test_content_length_and_chunked_together_are_refused() -> None:
    """RFC 9112 §6.3 (3): both framings in one answer "ought to be handled as an error" (a smuggling
    attempt); this project parses strictly. The attacker's answer says 2 bytes by length, 8 by chunks."""
    with pytest.raises(WireError, match="Content-Length and Transfer-Encoding"):
        _one(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'8\r\n{"a":12}\r\n0\r\n\r\n'
        )


@pytest.mark.parametrize(
    "length", [b"-1", b"1e3", b"0x10", b"99999999999999999999999999", b"2, 3", b" ", b"+2"]
)
def test_a_malformed_content_length_is_a_wire_error(length: bytes) -> None:
    with pytest.raises(WireError):
        _one(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\n{}")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}",  # bare LF
    ],
)
def test_a_malformed_head_is_a_wire_error_never_a_traceback(head: bytes) -> None:
    try:
        _one(head)
    except WireError:
        return
    except Exception as exc:  # the finding would be exactly this
        pytest.fail(f"a non-domain error escaped: {type(exc).__name__}: {exc}")


def test_informational_answers_are_bounded_and_101_is_refused() -> None:
    flood = b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    with pytest.raises(WireError, match="informational"):
        _one(flood)
    early = b"HTTP/1.1 103 Early\r\n\r\n" * 3
    assert _one(early + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") == b"{}"
    with pytest.raises(WireError):
        _one(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n{}")


def test_http10_keep_alive_is_never_reused() -> None:
    got, opened = _twice(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")
    assert got == [b"{}", b"{}"] and opened == 2


def test_connection_close_is_never_reused() -> None:
    got, opened = _twice(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    assert got == [b"{}", b"{}"] and opened == 2


def test_trailers_are_read_past_and_the_body_is_the_chunks() -> None:
    got, opened = _twice(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=1\r\n{\r\n1\r\n}\r\n0\r\n"
        b"Content-Length: 99\r\nX-Trailer: y\r\n\r\n"
    )
    assert got == [b"{}", b"{}"] and opened == 1


def test_a_huge_chunk_extension_is_refused() -> None:
    with pytest.raises(WireError):
        _one(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;"
            + b"x" * (200 * 1024)
            + b"\r\n{}\r\n0\r\n\r\n"
        )


def test_many_headers_past_the_head_bound_are_refused() -> None:
    with pytest.raises(WireError):
        _one(b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * 20000 + b"Content-Length: 2\r\n\r\n{}")


def test_an_answer_sent_before_the_request_is_read_is_taken_once_and_not_kept() -> None:
    """The node answers at connect, before reading the request, and a second (pipelined) answer follows
    the first in the same write: the client takes the first and keeps nothing."""

    def early(tls: ssl.SSLSocket) -> None:
        tls.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
            b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"a":1}'
        )
        while read_request(tls):
            pass

    server = Scripted(early)
    pool = _pool(server)
    try:
        first = pool.exchange("POST", "/x", b"{}", deadline=time.monotonic() + 10, max_bytes=1 << 20)
        second = pool.exchange("POST", "/x", b"{}", deadline=time.monotonic() + 10, max_bytes=1 << 20)
        assert first.content == b"{}" and second.content == b"{}"
        assert pool.opened == 2
    finally:
        pool.close()
        server.stop()


def test_stray_bytes_arriving_after_the_answer_drop_the_kept_connection() -> None:
    """The second answer comes 0.3 s after the first (another TLS record): still_open sees it and the pool
    opens a new connection instead of reading it as the next answer."""

    def late(tls: ssl.SSLSocket) -> None:
        read_request(tls)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        time.sleep(0.3)
        tls.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"a":1}')
        while read_request(tls):
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    server = Scripted(late)
    pool = _pool(server)
    try:
        got = pool.exchange("GET", "/x", None, deadline=time.monotonic() + 10, max_bytes=1 << 20)
        assert got.content == b"{}"
        time.sleep(0.8)
        got = pool.exchange("GET", "/x", None, deadline=time.monotonic() + 10, max_bytes=1 << 20)
        assert got.content == b"{}"
        assert pool.opened == 2
    finally:
        pool.close()
        server.stop()


# --- deadlines


def _stall_after_headers(tls: ssl.SSLSocket) -> None:
    read_request(tls)
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
    time.sleep(15)


def _trickle_status(tls: ssl.SSLSocket) -> None:
    read_request(tls)
    for b in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
        tls.sendall(bytes([b]))
        time.sleep(0.2)


def _infinite_chunks(tls: ssl.SSLSocket) -> None:
    read_request(tls)
    tls.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    end = time.monotonic() + 15
    while time.monotonic() < end:
        tls.sendall(b"0001;" + b"e" * 50 + b"\r\nx\r\n")
        time.sleep(0.01)


def _infinite_empty_headers(tls: ssl.SSLSocket) -> None:
    read_request(tls)
    tls.sendall(b"HTTP/1.1 200 OK\r\n")
    end = time.monotonic() + 15
    while time.monotonic() < end:
        tls.sendall(b"a: b\r\n")
        time.sleep(0.05)


@pytest.mark.parametrize(
    "handler", [_stall_after_headers, _trickle_status, _infinite_chunks, _infinite_empty_headers]
)
def test_a_hostile_pace_ends_by_the_deadline(handler) -> None:  # type: ignore[no-untyped-def]
    server = Scripted(handler)
    try:
        conn = server.connect()
        start = time.monotonic()
        with pytest.raises(WireError):
            conn.exchange("POST", "/x", b"{}", deadline=start + 2.0, max_bytes=1 << 20)
        assert time.monotonic() - start < 2.0 + 1.5
    finally:
        server.stop()


def test_an_exchange_with_a_per_read_timeout_longer_than_the_deadline_names_the_deadline() -> None:
    server = Scripted(_stall_after_headers)
    try:
        conn = server.connect(timeout=30)
        with pytest.raises(DeadlinePassed):
            conn.exchange("POST", "/x", b"{}", deadline=time.monotonic() + 1.0, max_bytes=1 << 20)
    finally:
        server.stop()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_or_thread_leak_after_many_failed_exchanges() -> None:
    """60 failures of four kinds (garbage, cut body, deadline mid-body, close without answer) on one pool:
    every failed connection is closed, none is kept, no thread of the client's is left."""

    def hostile(tls: ssl.SSLSocket) -> None:
        kind = int.from_bytes(os.urandom(1), "big") % 4
        read_request(tls)
        if kind == 0:
            tls.sendall(b"garbage\r\n\r\n")
        elif kind == 1:
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
        elif kind == 2:
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{")
            time.sleep(1.0)

    server = Scripted(hostile)
    pool = _pool(server)
    try:
        # warm up the ssl module and the server
        with pytest.raises(WireError):
            pool.exchange("POST", "/x", b"{}", deadline=time.monotonic() + 0.2, max_bytes=1 << 20)
        time.sleep(1.2)
        fds, threads = _fds(), threading.active_count()
        for _ in range(60):
            with pytest.raises(KmsClientError):
                pool.exchange("POST", "/x", b"{}", deadline=time.monotonic() + 0.1, max_bytes=1 << 20)
        assert pool._idle == []
        time.sleep(1.5)  # the server's handler threads end
        assert _fds() <= fds + 1
        assert threading.active_count() <= threads + 1
    finally:
        pool.close()
        server.stop()


def test_after_a_timeout_mid_body_the_pool_never_reads_the_old_bodys_tail() -> None:
    """First exchange: headers, half the body, a stall past the deadline, then the rest of the body and a
    forged second answer on the same connection. The pool must open a new connection for the next
    exchange and read that one's own answer."""
    calls = {"n": 0}

    def handler(tls: ssl.SSLSocket) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            _answering(b'HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"good"')(tls)
            return
        read_request(tls)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n{}")
        time.sleep(1.5)
        tls.sendall(b'{}HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"forged"')
        while read_request(tls):
            tls.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"forged"')

    server = Scripted(handler)
    pool = _pool(server)
    try:
        with pytest.raises(DeadlinePassed):
            pool.exchange("GET", "/x", None, deadline=time.monotonic() + 0.5, max_bytes=1 << 20)
        time.sleep(1.5)
        got = pool.exchange("GET", "/x", None, deadline=time.monotonic() + 5, max_bytes=1 << 20)
        assert got.content == b'"good"' and pool.opened == 2
    finally:
        pool.close()
        server.stop()


@pytest.mark.parametrize(
    "answer",
    [
        b"\x16\x03\x01garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}",
        b"HTTP/1.1 100 Continue\r\n\r\n" * 20,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_a_hostile_answer_reaches_the_kms_client_caller_as_a_kms_client_error(answer: bytes) -> None:
    """Through KmsClient (its identity probe, pin, kept pool): garbage, a cut body, a 1xx flood and a
    double framing end as a KmsClientError naming the node's URL, never h11's or ssl's own exception."""
    from teecloud.kms import api
    from teecloud.kms.client import KmsClient, UnsafeNoServerCheck

    server = Scripted(_answering(answer, then_close=True))
    client = KmsClient(f"https://127.0.0.1:{server.port}", server_check=UnsafeNoServerCheck(), timeout=5)
    try:
        with pytest.raises(KmsClientError, match=f"127.0.0.1:{server.port}") as info:
            client._call("GET", api.PATH_GET_META, api.KmsMeta)
        assert type(info.value) is KmsClientError
    finally:
        client.close()
        server.stop()
