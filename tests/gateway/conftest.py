"""Gateway test harness: real HAProxy on 127.0.0.1, small HTTP / WebSocket backends, a TLS client that
validates the gateway's dev CA and sends the route name as SNI and Host (`*.localhost` needs no DNS)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from teecloud.gateway.acme import LocalChallengeDns
from teecloud.gateway.devca import DevCa
from teecloud.gateway.driver import HaproxyDriver
from teecloud.gateway.routing import DataPlaneLimits

from .pebble import Pebble

BASE = "teecloud.localhost"
APP = "a1" * 20
INST1 = "b1" * 20
INST2 = "b2" * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Backend:
    """An HTTP/1.1 server answering `<name> <path>` (what the app behind the gateway would be)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests += 1
                body = f"{outer.name} {self.path} xff={self.headers.get('X-Forwarded-For')}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client (HAProxy) closing a kept-alive connection is not a test failure

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.address = f"127.0.0.1:{self.port}"
        self._t = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._t.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Gateway:
    def __init__(self, driver: HaproxyDriver, ca: DevCa, ca_file: Path) -> None:
        self.driver = driver
        self.ca = ca
        self.ca_file = ca_file
        self.port = driver.port

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca.cert_pem)

    def get(self, host: str, path: str = "/", *, timeout: float = 10.0, **kw: object) -> httpx.Response:
        """GET https://<host>:<port><path> through the gateway, the dev CA validated, SNI = host."""
        with httpx.Client(verify=self.client_context(), timeout=timeout) as c:
            return c.get(
                f"https://127.0.0.1:{self.port}{path}",
                headers={"Host": host, **kw.pop("headers", {})},  # type: ignore[dict-item]
                extensions={"sni_hostname": host},
            )


@contextlib.contextmanager
def driver_gateway(tmp_path: Path, limits: DataPlaneLimits, **kw: object) -> Iterator[Gateway]:
    """HAProxy with the dev CA's wildcard, driven by HaproxyDriver(limits, **kw), until the block ends."""
    ca = DevCa(now=int(time.time()))
    cert = ca.issue_wildcard(BASE, now=int(time.time()))
    driver = HaproxyDriver(
        tmp_path / "run",
        base_domain=BASE,
        port=free_port(),
        cert=cert,
        chain_pem=ca.cert_pem,
        limits=limits,
        **kw,  # type: ignore[arg-type]
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca.cert_pem)
    driver.start()
    try:
        yield Gateway(driver, ca, ca_file)
    finally:
        driver.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with driver_gateway(
        tmp_path, DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2)
    ) as gw:
        yield gw


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    made = [Backend("one"), Backend("two")]
    yield made
    for b in made:
        b.stop()


@pytest.fixture(scope="module")
def dns() -> Iterator[LocalChallengeDns]:
    """The ACME challenge DNS server (one per test module; a module may define its own `dns`)."""
    server = LocalChallengeDns()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, dns: LocalChallengeDns) -> Iterator[Pebble]:
    """pebble resolving through `dns` (one per test module)."""
    p = Pebble(tmp_path_factory.mktemp("pebble"), dns.port)
    yield p
    p.stop()
