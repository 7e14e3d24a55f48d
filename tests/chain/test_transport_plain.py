"""HttpTransport's http.client path (`_PlainHttp`, issue 19's per-request CPU): the same answers and errors
as the httpx path, kept-alive connections that a server closed are never written to (so no request is
sent twice), and proxies and https:// still go through httpx."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from teecloud.chain.embedded import EmbeddedChain
from teecloud.chain.errors import ChainError, ChainUnreachable
from teecloud.chain.rpcserver import ChainRpcServer
from teecloud.chain.transport import HttpTransport, _plain_http


@pytest.fixture
def rpc(tmp_path: Path) -> Iterator[ChainRpcServer]:
    server = ChainRpcServer(EmbeddedChain(tmp_path / "chain")).start()
    try:
        yield server
    finally:
        server.stop()


def test_a_plain_http_endpoint_is_asked_over_kept_alive_connections(rpc: ChainRpcServer) -> None:
    fast = HttpTransport(rpc.url)
    slow = HttpTransport(rpc.url)
    slow._plain = None
    assert fast._plain is not None
    try:
        for method, params in (
            ("eth_chainId", []),
            ("eth_blockNumber", []),
            ("eth_getBalance", ["0x" + "00" * 20, "latest"]),
        ):
            assert fast.request(method, params) == slow.request(method, params)
        calls = [("eth_chainId", []), ("eth_getBlockByNumber", ["latest", False])]
        assert fast.request_batch(calls) == slow.request_batch(calls)
        errors = []
        for transport in (fast, slow):  # a JSON-RPC error object: the same ChainError either way
            with pytest.raises(ChainError) as caught:
                transport.request("eth_noSuchMethod", [])
            errors.append((type(caught.value), str(caught.value)))
        assert errors[0] == errors[1]
        for _ in range(20):
            fast.request("eth_chainId", [])
        assert len(fast._plain._idle) == 1  # one connection, reused
    finally:
        fast.close()
        slow.close()


def test_concurrent_callers_each_get_their_own_answer(rpc: ChainRpcServer) -> None:
    transport = HttpTransport(rpc.url)
    chain_id = transport.request("eth_chainId", [])
    wrong: list[object] = []

    def run() -> None:
        for _ in range(30):
            got = transport.request_batch([("eth_chainId", []), ("eth_blockNumber", [])])
            if got[0] != chain_id:
                wrong.append(got)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    transport.close()
    assert not wrong
    assert 1 <= len(transport._plain._idle) <= 6 or transport._plain._idle == []  # closed by close()


class _RawServer:
    """A one-thread HTTP/1.1 server on 127.0.0.1 that answers each request with `answer(request_no)`:
    (raw response bytes, close after it). Counts the requests it received."""

    def __init__(self, answer: Callable[[int], tuple[bytes, bool]]) -> None:
        self.answer = answer
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b"\r\n\r\n" not in buf:
                        break
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    length = int(
                        next(
                            line.split(b":", 1)[1]
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        )
                    )
                    while len(buf) < length:
                        buf += conn.recv(65536)
                    body, buf = buf[:length], buf[length:]
                    self.requests += 1
                    rid = json.loads(body)["id"]
                    raw, close = self.answer(self.requests)
                    conn.sendall(raw.replace(b"RID", str(rid).encode()))
                    if close:
                        break

    def close(self) -> None:
        self.sock.close()


def _ok(result: str = '"0x1"') -> bytes:
    body = b'{"jsonrpc":"2.0","id":RID,"result":' + result.encode() + b"}"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (len(body) - 3 + 1)
        + body
    )


def test_a_connection_the_server_closed_is_not_reused() -> None:
    """The server closes after every answer without saying so (no Connection: close): every call still
    gets its answer (a new connection, or a read sent again when the close raced the write)."""
    server = _RawServer(lambda n: (_ok(), True))
    transport = HttpTransport(server.url)
    try:
        for _ in range(5):
            assert transport.request("eth_chainId", []) == "0x1"
        assert 5 <= server.requests <= 10
    finally:
        transport.close()
        server.close()


@pytest.mark.parametrize(
    ("method", "sent", "answered"),
    [("eth_chainId", 3, True), ("eth_getBlockByNumber", 3, True), ("eth_sendRawTransaction", 2, False)],
)
def test_only_a_read_is_sent_again_when_a_kept_connection_drops_it(
    method: str, sent: int, answered: bool
) -> None:
    """The server answers the first call on a kept-alive connection, then reads the second and closes
    without an answer: a read goes once more on a new connection and is answered; a transaction is not
    sent again (the caller sees the failure)."""
    server = _RawServer(lambda n: (b"", True) if n == 2 else (_ok(), False))
    transport = HttpTransport(server.url)
    try:
        assert transport.request("eth_chainId", []) == "0x1"
        if answered:
            assert transport.request(method, []) == "0x1"
        else:
            with pytest.raises(ChainUnreachable, match="cannot reach the chain"):
                transport.request(method, ["0x00"])
        assert server.requests == sent
    finally:
        transport.close()
        server.close()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n", "answered HTTP 500"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "did not answer JSON-RPC"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"[" * 1000 + b"]" * 1000,
            "did not answer JSON-RPC",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "cannot reach the chain"),  # cut short
        (b"garbage\r\n\r\n", "cannot reach the chain"),
    ],
)
def test_a_bad_answer_is_a_chain_unreachable_error(raw: bytes, match: str) -> None:
    server = _RawServer(lambda n: (raw, True))
    transport = HttpTransport(server.url)
    try:
        with pytest.raises(ChainUnreachable, match=match):
            transport.request("eth_chainId", [])
    finally:
        transport.close()
        server.close()


def test_no_answer_within_the_timeout_and_no_server_are_chain_unreachable() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    transport = HttpTransport(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
    try:
        with pytest.raises(ChainUnreachable, match="within the timeout"):
            transport.request("eth_chainId", [])
    finally:
        transport.close()
        port = silent.getsockname()[1]
        silent.close()
    transport = HttpTransport(f"http://127.0.0.1:{port}")
    with pytest.raises(ChainUnreachable, match="cannot reach the chain"):
        transport.request("eth_chainId", [])


def test_https_and_proxied_endpoints_go_through_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert _plain_http("https://rpc.example:8545", 1.0) is None
    assert _plain_http("http://rpc.example:8545/v1?k=x", 1.0) is not None
    assert _plain_http("http://user:secret@rpc.example:8545", 1.0) is None  # httpx sends it as basic auth
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert _plain_http("http://rpc.example:8545", 1.0) is None  # httpx honours the proxy
    assert HttpTransport("http://rpc.example:8545")._plain is None
    monkeypatch.setenv("NO_PROXY", "rpc.example")  # httpx's reading of NO_PROXY, not a second one here
    assert _plain_http("http://rpc.example:8545", 1.0) is None
