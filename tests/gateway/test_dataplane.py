"""HAProxy driven by teecloud.gateway.driver: TLS terminated with the dev CA's wildcard, passthrough,
balancing, pinning, refusals for unknown names, and route changes at run time without a reload."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import httpx
import pytest

from teecloud.gateway.routing import Route
from tests.gateway.conftest import APP, BASE, INST1, INST2, Backend, Gateway


def test_terminated_https_with_the_dev_ca_reaches_the_app(gateway: Gateway, backends: list[Backend]) -> None:
    pid = gateway.driver.pid
    gateway.driver.apply([Route(APP, INST1, 8080, backends[0].address)])
    r = gateway.get(f"{APP}-8080.{BASE}", "/hello")
    assert r.status_code == 200 and r.text.startswith("one /hello")
    assert "xff=127.0.0.1" in r.text  # the client address reaches the app (PROXY v2 between frontends)
    assert gateway.driver.pid == pid  # a route change is no reload


def test_curl_with_the_ca_file_works(gateway: Gateway, backends: list[Backend]) -> None:
    gateway.driver.apply([Route(APP, INST1, 80, backends[0].address)])
    host = f"{APP}.{BASE}"  # port 80 needs no -<port>
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(gateway.ca_file),
            "--resolve",
            f"{host}:{gateway.port}:127.0.0.1",
            f"https://{host}:{gateway.port}/x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("one /x")


def test_app_name_balances_and_instance_name_pins(gateway: Gateway, backends: list[Backend]) -> None:
    gateway.driver.apply(
        [Route(APP, INST1, 8080, backends[0].address), Route(APP, INST2, 8080, backends[1].address)]
    )
    seen = {gateway.get(f"{APP}-8080.{BASE}").text.split()[0] for _ in range(12)}
    assert seen == {"one", "two"}
    assert {gateway.get(f"{INST2}-8080.{BASE}").text.split()[0] for _ in range(6)} == {"two"}


def test_unknown_names_are_refused_and_nothing_is_forwarded(
    gateway: Gateway, backends: list[Backend]
) -> None:
    gateway.driver.apply([Route(APP, INST1, 8080, backends[0].address)])
    # A name under the base domain with no route: the wildcard answers TLS, then 421.
    r = gateway.get(f"{'c' * 40}-8080.{BASE}")
    assert r.status_code == 421
    # The Host header naming another app than the TLS server name: 421 (no domain fronting).
    with httpx.Client(verify=gateway.client_context(), timeout=10) as c:
        r = c.get(
            f"https://127.0.0.1:{gateway.port}/",
            headers={"Host": f"{INST2}-8080.{BASE}"},
            extensions={"sni_hostname": f"{APP}-8080.{BASE}"},
        )
    assert r.status_code == 421
    # Names no certificate covers (another domain, two labels deep, overlong): a TLS alert.
    for host in ("example.com", f"x.{APP}-8080.{BASE}", "a" * 63 + "." + "b" * 63 + ".example"):
        with pytest.raises(httpx.ConnectError):
            gateway.get(host)
    # No SNI at all, and a client that sends no ClientHello: refused.
    ctx = gateway.client_context()
    ctx.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        ctx.wrap_socket(raw).do_handshake()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.recv(100) == b""
    assert backends[0].requests == 0


def test_oversized_headers_get_a_clear_error(gateway: Gateway, backends: list[Backend]) -> None:
    gateway.driver.apply([Route(APP, INST1, 8080, backends[0].address)])
    r = gateway.get(f"{APP}-8080.{BASE}", headers={"X-Big": "a" * 40000})
    assert r.status_code == 400
    assert backends[0].requests == 0


def test_backend_down_is_an_immediate_503(gateway: Gateway, backends: list[Backend]) -> None:
    dead = Backend("dead")
    dead.stop()
    gateway.driver.apply([Route(APP, INST1, 8080, dead.address)])
    t0 = time.monotonic()
    r = gateway.get(f"{APP}-8080.{BASE}")
    assert r.status_code == 503
    assert time.monotonic() - t0 < 5


def test_passthrough_presents_the_apps_own_certificate(gateway: Gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.gateway.tls_backend import TlsEchoBackend

    with TlsEchoBackend(tmp_path) as app:
        gateway.driver.apply([Route(APP, INST1, 443, app.address)])
        host = f"{APP}-443s.{BASE}"
        ctx = ssl.create_default_context(cadata=app.cert_pem)
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
                tls.sendall(b"ping")
                assert tls.recv(10) == b"ping"
        assert der == app.cert_der  # end to end: the gateway never held this key
