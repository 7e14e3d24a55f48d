"""PROXY protocol v2 toward the CVM for ports the app's port_policy marks `pp`, through real HAProxy: the
backend (tests/gateway/proxy_backend.py, its own parser) sees each client's real address, in terminated and
passthrough (`s`) mode, one header per client connection; a port not marked `pp` gets no header."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import pytest

from teecloud.gateway.routing import Route
from tests.gateway.conftest import APP, BASE, INST1, Backend, Gateway
from tests.gateway.proxy_backend import ProxyV2Backend


@pytest.fixture
def pp_backend() -> Iterator[ProxyV2Backend]:
    b = ProxyV2Backend()
    yield b
    b.stop()


def tls_get(gw: Gateway, host: str) -> tuple[int, bytes]:
    """GET / over a TLS connection of our own: (our local port, the response)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
        local_port = int(raw.getsockname()[1])
        with gw.client_context().wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return local_port, data


def client_hello(sni: str) -> bytes:
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def test_pp_port_gets_the_client_address_and_other_ports_do_not(
    gateway: Gateway, pp_backend: ProxyV2Backend, backends: list[Backend]
) -> None:
    gateway.driver.apply(
        [
            Route(APP, INST1, 8080, pp_backend.address, proxy_protocol=True),
            Route(APP, INST1, 9090, backends[0].address),
        ]
    )
    # terminated at the gateway: two clients, each seen with its own address (no connection shared)
    ports = []
    for _ in range(2):
        port, answer = tls_get(gateway, f"{APP}-8080.{BASE}")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert answer.endswith(f"pp src=127.0.0.1:{port}".encode())
        ports.append(port)
    assert [h[:2] for h in pp_backend.headers] == [("127.0.0.1", p) for p in ports]
    assert pp_backend.bad == []
    # the port without `pp` is unchanged: a plain HTTP server answers (a header would be a bad request)
    seen = len(pp_backend.headers)
    _port, answer = tls_get(gateway, f"{APP}-9090.{BASE}")
    assert answer.startswith(b"HTTP/1.1 200") and b"one / xff=127.0.0.1" in answer
    assert len(pp_backend.headers) == seen and backends[0].requests == 1
    # passthrough: the header, then the client's bytes untouched
    hello = client_hello(f"{APP}-8080s.{BASE}")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        local_port = int(s.getsockname()[1])
        s.sendall(hello)
        s.settimeout(10)
        assert s.recv(1) == b""  # the backend closes after recording what came
    assert pp_backend.headers[-1][:2] == ("127.0.0.1", local_port)
    assert pp_backend.headers[-1][2:] == ("127.0.0.1", gateway.port)  # where the client connected
    assert pp_backend.raw_after_header[-1] == hello
