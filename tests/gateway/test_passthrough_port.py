"""Passthrough without the hop: `DataPlaneLimits(passthrough_port=N)` (`teecloud gateway up --passthrough-port
N`) serves `s` names and custom domains on a second public port (a TCP frontend routing by SNI) while the
main port terminates TLS itself, with no ClientHello reader and no unix-socket hop. Through real HAProxy:
an `s` name on the passthrough port reaches the app's own certificate; on the main port it gets 421 (a
custom domain there: the TLS alert), as with passthrough off; a plain name or an unknown one on the
passthrough port is closed with nothing forwarded; a custom domain on the passthrough port reaches its app."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teecloud.chain import ChainClient
from teecloud.cli import app as cli_app
from teecloud.gateway import api
from teecloud.gateway.client import register
from teecloud.gateway.customdomain import CustomDomains, DnslibResolver
from teecloud.gateway.errors import GatewayUsageError, RegistrationRefused
from teecloud.gateway.haproxy import CustomDomainHook, HaproxyPaths, needs_split, render_config
from teecloud.gateway.routing import DataPlaneLimits, Plan, Route

from .conftest import APP, BASE, INST1, Backend, Gateway, driver_gateway, free_port
from .dns_server import LocalDns
from .test_registration import boot_cvm, chain, make_gateway
from .tls_backend import TlsEchoBackend

__all__ = ["chain"]  # the module-scoped chain fixture of test_registration

PATHS = HaproxyPaths("/run/gw", "teecloud-gw-test")


def _limits(passthrough_port: int) -> DataPlaneLimits:
    return DataPlaneLimits(
        http_backends=8, tcp_backends=8, servers_per_backend=2, passthrough_port=passthrough_port
    )


def test_rendered_on_two_ports_without_the_hop() -> None:
    limits = _limits(9443)
    hook = CustomDomainHook(9999, "ab" * 16)
    assert not needs_split(limits, hook) and needs_split(DataPlaneLimits(), None)
    cfg = render_config(
        bind_host="127.0.0.1",
        port=8443,
        paths=PATHS,
        limits=limits,
        plan=Plan(),
        custom_domains=hook,
        base_domain=BASE,
    )
    assert "be_terminate" not in cfg and "abns@" not in cfg and "accept-proxy" not in cfg
    assert "    bind 127.0.0.1:8443 ssl crt /run/gw/certs/ strict-sni alpn h2,http/1.1" in cfg
    fe_sni = cfg.split("frontend fe_sni\n", 1)[1].split("\n\n", 1)[0]
    assert "    bind 127.0.0.1:9443" in fe_sni and "default_backend" not in fe_sni
    assert "lua.teecloud_custom_domain" in fe_sni  # custom domains are asked on the passthrough port
    # anything that is not a passthrough name or a custom domain is rejected there, before `accept`
    rules = [line for line in fe_sni.splitlines() if "tcp-request content" in line]
    assert "reject if { req.ssl_hello_type 1 }" in rules[1] and "txn.custom_backend" in rules[1]
    assert rules[2].endswith("accept if { req.ssl_hello_type 1 }") and rules[3].endswith("reject")
    # the same port twice, and a passthrough port without passthrough, are usage errors
    with pytest.raises(ValueError, match="differ"):
        render_config(bind_host="127.0.0.1", port=9443, paths=PATHS, limits=limits, plan=Plan())
    with pytest.raises(GatewayUsageError, match="passthrough"):
        DataPlaneLimits(passthrough=False, passthrough_port=9443)
    for bad in (-1, 65536):
        with pytest.raises(GatewayUsageError):
            DataPlaneLimits(passthrough_port=bad)


@pytest.fixture
def two_ports(tmp_path: Path) -> Iterator[tuple[Gateway, int]]:
    passthrough_port = free_port()
    with driver_gateway(tmp_path, _limits(passthrough_port)) as gw:
        yield gw, passthrough_port


def _tls(port: int, sni: str, ctx: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        tls.sendall(b"ping")
        assert tls.recv(16) == b"ping"
        der = tls.getpeercert(True)
        assert der is not None
        return der


def test_s_names_on_the_passthrough_port_plain_names_on_the_main_port(
    two_ports: tuple[Gateway, int], backends: list[Backend], tmp_path: Path
) -> None:
    gw, pt_port = two_ports
    with TlsEchoBackend(tmp_path) as app:
        gw.driver.apply([Route(APP, INST1, 8080, backends[0].address), Route(APP, INST1, 8443, app.address)])
        app_ctx = ssl.create_default_context(cadata=app.cert_pem)
        app_ctx.check_hostname = False
        # the passthrough port: the client's TLS ends at the app's own certificate (app and instance names)
        for name in (f"{APP}-8443s.{BASE}", f"{INST1}-8443s.{BASE}"):
            assert _tls(pt_port, name, app_ctx) == app.cert_der
        reached = app.accepted
        # the main port terminates TLS itself: plain names served, the client address without a hop
        r = gw.get(f"{APP}-8080.{BASE}", "/x")
        assert r.status_code == 200 and r.text == "one /x xff=127.0.0.1"
        # an `s` name there is no route (as with passthrough off): 421, the app never sees a connection
        assert gw.get(f"{APP}-8443s.{BASE}").status_code == 421
        assert app.accepted == reached
        # a plain name, an unknown name, no SNI, not TLS at all: closed on the passthrough port, nothing
        # forwarded (no TLS of the gateway's answers there)
        before = backends[0].requests
        gw_ctx = gw.client_context()
        for name in (f"{APP}-8080.{BASE}", f"{'ee' * 20}-8443s.{BASE}", "other.example"):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _tls(pt_port, name, gw_ctx)
        no_sni = ssl.create_default_context(cadata=app.cert_pem)
        no_sni.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with socket.create_connection(("127.0.0.1", pt_port), timeout=10) as raw:
                no_sni.wrap_socket(raw)
        with socket.create_connection(("127.0.0.1", pt_port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert raw.recv(64) == b""
        assert backends[0].requests == before and app.accepted == reached
        # routes move at run time on both ports: no reload
        gw.driver.apply([Route(APP, INST1, 8080, backends[1].address), Route(APP, INST1, 8443, app.address)])
        assert gw.get(f"{APP}-8080.{BASE}").text.startswith("two ")
        assert _tls(pt_port, f"{APP}-8443s.{BASE}", app_ctx) == app.cert_der
        gw.driver.apply([Route(APP, INST1, 8080, backends[1].address)])
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _tls(pt_port, f"{APP}-8443s.{BASE}", app_ctx)
        assert gw.driver.reloads == 0


@pytest.fixture
def dns() -> Iterator[LocalDns]:
    d = LocalDns()
    yield d
    d.stop()


def test_custom_domain_on_the_passthrough_port(
    teecloud_home: Path, chain: ChainClient, dns: LocalDns, tmp_path: Path
) -> None:
    cvm = boot_cvm(teecloud_home, chain, "two-ports")
    dns.zone.set("_dstack-app-address.app.example.test", f"{cvm.app_id}:8443")
    custom = CustomDomains(DnslibResolver("127.0.0.1", dns.port), base_domain=BASE)
    pt_port = free_port()
    with (
        make_gateway(teecloud_home, chain, custom_domains=custom, limits=_limits(pt_port)) as gw,
        TlsEchoBackend(tmp_path) as app,
    ):
        assert gw.status().passthrough_port == pt_port
        assert gw.passthrough_url == f"https://<app_id>-<port>s.{BASE}:{pt_port}/"
        host, port = app.address.rsplit(":", 1)
        # the passthrough port is the gateway's own: no CVM may name it as its backend
        with pytest.raises(RegistrationRefused) as refused:
            register(
                gw.registration_url,
                cvm.key,
                cvm.cert_der,
                [api.Endpoint(port=8443, host="127.0.0.1", host_port=pt_port)],
                ca_pem=gw.ca.cert_pem,
            )
        assert refused.value.step == "request" and "gateway's own" in refused.value.reason
        register(
            gw.registration_url,
            cvm.key,
            cvm.cert_der,
            [api.Endpoint(port=8443, host=host, host_port=int(port))],
            ca_pem=gw.ca.cert_pem,
        )
        gw.sync()
        app_ctx = ssl.create_default_context(cadata=app.cert_pem)
        app_ctx.check_hostname = False
        # the passthrough port: the custom domain and the `s` name reach the app's own certificate
        assert _tls(pt_port, "app.example.test", app_ctx) == app.cert_der
        assert _tls(pt_port, f"{cvm.app_id}-8443s.{BASE}", app_ctx) == app.cert_der
        reached = app.accepted
        # the main port: the gateway never terminates a custom domain (strict-sni: a TLS alert)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _tls(gw.public_port, "app.example.test", app_ctx)
        # a domain whose TXT names no app here: closed on the passthrough port, nothing forwarded
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _tls(pt_port, "nothing.example.test", app_ctx)
        assert app.accepted == reached
        gw.sync()  # pinned into passthrough.map by the tick, served without asking again
        assert gw.driver.plan.tcp_map.get("app.example.test", "").startswith("bt")
        assert _tls(pt_port, "app.example.test", app_ctx) == app.cert_der


def test_gateway_up_option_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    base = ["gateway", "up", "--trust-dev-root"]
    for extra, message in (
        (["--passthrough-port", "9443", "--no-passthrough"], "--no-passthrough"),
        (["--passthrough-port", "9443", "--port", "9443"], "other than --port"),
        (["--passthrough-port", "70000"], "1..65535"),
    ):
        result = CliRunner().invoke(cli_app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "gateway-server").exists()


def test_up_prints_both_urls() -> None:
    from teecloud.cli.cloud_cmd import gateway_url_rows

    info = {"base_domain": BASE, "public_port": 8443, "passthrough_port": 9443}
    assert gateway_url_rows(info) == [
        ("gateway (HTTPS)", f"https://<app_id>-<port>.{BASE}:8443/"),
        ("gateway passthrough (TLS to the app)", f"https://<app_id>-<port>s.{BASE}:9443/"),
    ]
    assert gateway_url_rows({**info, "passthrough_port": 0})[1][1].endswith(f"s.{BASE}:8443/")
    # a bad port fails before anything starts
    from teecloud.devstack import LocalCloud
    from teecloud.node.errors import NodeError

    with pytest.raises(NodeError, match="passthrough-port"):
        LocalCloud(Path("/nonexistent-teecloud-home"), gateway_passthrough_port=70000)
