"""HAProxy driven by teecloud.gateway.driver: TLS terminated with the dev CA's wildcard, passthrough,
balancing, pinning, refusals for unknown names, and route changes at run time without a reload."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from teecloud.gateway.routing import Route
from tests.gateway.conftest import APP, BASE, INST1, INST2, Backend, Gateway, free_port


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


def test_websocket_echo_through_the_gateway(gateway: Gateway) -> None:
    from websockets.sync.client import connect
    from websockets.sync.server import ServerConnection, serve

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", 0) as server:
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        port = server.socket.getsockname()[1]
        gateway.driver.apply([Route(APP, INST1, 8080, f"127.0.0.1:{port}")])
        host = f"{APP}-8080.{BASE}"
        raw = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        with connect(f"wss://{host}:{gateway.port}/", sock=raw, ssl=gateway.client_context()) as ws:
            for i in range(3):
                ws.send(f"hello {i}")
                assert ws.recv(timeout=10) == f"hello {i}"
        server.shutdown()


@pytest.mark.slow
def test_route_churn_under_load_loses_no_request(gateway: Gateway, backends: list[Backend]) -> None:
    """A bounded load loop (4 s, keep-alive clients) on one app while its second instance and other apps'
    routes come and go through the runtime API: every request answered 200, HAProxy never reloaded."""
    stable = Route(APP, INST1, 8080, backends[0].address)
    extra = Route(APP, INST2, 8080, backends[1].address)
    other = Route("c1" * 20, "c2" * 20, 9000, backends[1].address)
    gateway.driver.apply([stable])
    pid = gateway.driver.pid
    host = f"{APP}-8080.{BASE}"
    stop = time.monotonic() + 4.0
    results: list[int | str] = []
    lock = threading.Lock()

    def load() -> None:
        with httpx.Client(verify=gateway.client_context(), timeout=10) as c:
            n = 0
            while time.monotonic() < stop and n < 5000:
                n += 1
                try:
                    r = c.get(
                        f"https://127.0.0.1:{gateway.port}/",
                        headers={"Host": host},
                        extensions={"sni_hostname": host},
                    )
                    code: int | str = r.status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                with lock:
                    results.append(code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    changes = 0
    while time.monotonic() < stop - 0.3:
        gateway.driver.apply([stable, extra, other])
        time.sleep(0.05)
        gateway.driver.apply([stable])
        time.sleep(0.05)
        changes += 2
    for t in threads:
        t.join()
    errors = [c for c in results if c != 200]
    assert len(results) > 100 and changes > 10
    assert errors == [], f"{len(errors)} of {len(results)} requests failed: {errors[:5]}"
    assert gateway.driver.pid == pid


@pytest.mark.slow
def test_slow_clients_are_cut(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A client that never sends a ClientHello, or trickles its request headers, is closed after the
    configured bound (here 2 s), not held."""
    from teecloud.gateway.devca import DevCa
    from teecloud.gateway.driver import HaproxyDriver
    from teecloud.gateway.haproxy import HaproxyTimeouts
    from teecloud.gateway.routing import DataPlaneLimits
    from tests.gateway.conftest import free_port

    ca = DevCa(now=int(time.time()))
    driver = HaproxyDriver(
        tmp_path / "run",
        base_domain=BASE,
        port=free_port(),
        cert=ca.issue_wildcard(BASE, now=int(time.time())),
        chain_pem=ca.cert_pem,
        limits=DataPlaneLimits(http_backends=2, tcp_backends=2, servers_per_backend=1),
        timeouts=HaproxyTimeouts(hello_timeout_s=2, http_request_s=2),
    ).start()
    backend = Backend("slow")
    try:
        driver.apply([Route(APP, INST1, 80, backend.address)])
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", driver.port), timeout=10) as raw:
            assert raw.recv(10) == b""  # nothing sent: closed after the hello bound
        assert 1.5 < time.monotonic() - t0 < 5
        ctx = ssl.create_default_context(cadata=ca.cert_pem)
        with socket.create_connection(("127.0.0.1", driver.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=f"{APP}.{BASE}") as tls:
                t0 = time.monotonic()
                tls.sendall(b"GET / HTTP/1.1\r\nHost: " + f"{APP}.{BASE}".encode() + b"\r\n")
                answer = b""
                with contextlib.suppress(OSError):
                    for _ in range(20):
                        tls.sendall(b"X-Slow: 1\r\n")
                        time.sleep(0.25)
                        if tls.pending():
                            break
                    answer = tls.recv(200)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
                assert time.monotonic() - t0 < 5
        assert backend.requests == 0
    finally:
        driver.stop()
        backend.stop()


def test_passthrough_ratls_certificate_verifies_with_teecloud_verify(gateway: Gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The app (a simulated CVM) serves its own RA-TLS certificate; through an `s` name the client gets
    exactly that certificate, and `teecloud verify` accepts the quote in it, bound to its key."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from typer.testing import CliRunner

    from teecloud.cli import app as cli
    from teecloud.keys.ratls import make_ratls_cert, parse_ratls_cert, ratls_report_data
    from teecloud.tee.simulated import SimulatedTdx
    from tests.gateway.tls_backend import TlsEchoBackend
    from tests.kms.conftest import boot_app

    tee = SimulatedTdx(tmp_path / "home")
    boot_app(tee, bytes.fromhex(APP), b"\x01" * 32, bytes.fromhex(INST1))
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    cert = make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject="app",
        usage="app:tls",
        not_before=now - 60,
        not_after=now + 3600,
        server_auth=True,
    )
    with TlsEchoBackend(tmp_path, cert=cert, key=key) as app:
        gateway.driver.apply([Route(APP, INST1, 443, app.address)])
        ctx = ssl.create_default_context(cadata=app.cert_pem)
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=f"{APP}-443s.{BASE}") as tls:
                der = tls.getpeercert(binary_form=True)
    assert der == app.cert_der
    claims = parse_ratls_cert(der)
    (tmp_path / "quote.bin").write_bytes(claims.quote)
    (tmp_path / "events.json").write_text(claims.event_log)
    (tmp_path / "collateral.json").write_bytes(tee.collateral())
    (tmp_path / "root.der").write_bytes(tee.dev_root_der())
    result = CliRunner().invoke(
        cli,
        [
            "verify",
            str(tmp_path / "quote.bin"),
            "--collateral",
            str(tmp_path / "collateral.json"),
            "--dev-root",
            str(tmp_path / "root.der"),
            "--event-log",
            str(tmp_path / "events.json"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["is_valid"] is True
    assert verdict["report_data"] == ratls_report_data(claims.public_key_der).hex()
    assert verdict["app_info"]["app_id"] == APP


def test_tcp_terminate_mode_serves_http_and_refuses_unknown_names(tmp_path, backends: list[Backend]) -> None:  # type: ignore[no-untyped-def]
    """terminate_mode="tcp": TLS ends at the gateway, the byte stream goes to the app unchanged."""
    from teecloud.gateway.devca import DevCa
    from teecloud.gateway.driver import HaproxyDriver
    from teecloud.gateway.routing import DataPlaneLimits
    from tests.gateway.conftest import free_port

    ca = DevCa(now=int(time.time()))
    driver = HaproxyDriver(
        tmp_path / "run",
        base_domain=BASE,
        port=free_port(),
        cert=ca.issue_wildcard(BASE, now=int(time.time())),
        chain_pem=ca.cert_pem,
        limits=DataPlaneLimits(http_backends=2, tcp_backends=2, servers_per_backend=1),
        terminate_mode="tcp",
    ).start()
    gw = Gateway(driver, ca, tmp_path / "ca.pem")
    try:
        driver.apply([Route(APP, INST1, 8080, backends[0].address)])
        r = gw.get(f"{APP}-8080.{BASE}", "/tcp")
        assert r.status_code == 200 and r.text.startswith("one /tcp")
        with pytest.raises(httpx.HTTPError):
            gw.get(f"{'c' * 40}-8080.{BASE}")
        assert backends[0].requests == 1
    finally:
        driver.stop()


def test_a_refused_runtime_command_resyncs_by_reload(gateway: Gateway, backends: list[Backend]) -> None:
    """If HAProxy's state drifted from the driver's (here: an entry deleted behind its back), the refused
    command is reported and HAProxy reloads the whole rendered state, so routes are right again."""
    from teecloud.gateway.errors import DataPlaneError

    r1 = Route(APP, INST1, 8080, backends[0].address)
    gateway.driver.apply([r1])
    gateway.driver.command(f"del map {gateway.driver.paths.http_map} {APP}-8080.{BASE}")
    with pytest.raises(DataPlaneError):
        gateway.driver.apply([])  # its "del map" of that entry is refused
    assert gateway.driver.reloads == 1
    assert gateway.get(f"{APP}-8080.{BASE}").status_code == 421  # the new worker has the rendered state
    gateway.driver.apply([r1])
    assert gateway.get(f"{APP}-8080.{BASE}").status_code == 200


@pytest.mark.slow
def test_a_killed_gateway_leaves_no_haproxy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import sys

    code = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "src")!r})
from teecloud.gateway.devca import DevCa
from teecloud.gateway.driver import HaproxyDriver
from teecloud.gateway.routing import DataPlaneLimits
ca = DevCa(now=int(time.time()))
d = HaproxyDriver({str(tmp_path / "run")!r}, base_domain={BASE!r}, port={free_port()},
                  cert=ca.issue_wildcard({BASE!r}, now=int(time.time())), chain_pem=ca.cert_pem,
                  limits=DataPlaneLimits(http_backends=1, tcp_backends=1, servers_per_backend=1)).start()
print(d.pid, flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        haproxy_pid = int(proc.stdout.readline())
        os.kill(haproxy_pid, 0)  # running
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.kill(haproxy_pid, 0)
            except ProcessLookupError:
                break
            # reaped by init once it exits; a zombie still answers kill(0): look at its state
            state = Path(f"/proc/{haproxy_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            assert time.monotonic() < deadline, "HAProxy outlived its gateway"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
