"""`DataPlaneLimits(passthrough=False)` without custom domains: HAProxy terminates TLS on the public port
itself (no ClientHello reader, no unix-socket hop: docs/benchmarks.md). Rendered that way only then; routes,
421s, the TLS alert for foreign names, X-Forwarded-For and route changes without a reload work as with the
hop; `s` names are not served; custom domains (passthrough only) refuse the combination."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from teecloud.gateway.devca import DevCa
from teecloud.gateway.driver import HaproxyDriver
from teecloud.gateway.haproxy import CustomDomainHook, HaproxyPaths, HaproxyTimeouts, render_config
from teecloud.gateway.routing import DataPlaneLimits, Plan, Route, plan

from .conftest import APP, BASE, INST1, Backend, Gateway, free_port

NO_PASSTHROUGH = DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2, passthrough=False)
PATHS = HaproxyPaths("/run/gw", "teecloud-gw-test")


def test_rendered_without_the_hop_only_without_passthrough_and_custom_domains() -> None:
    split = render_config(
        bind_host="127.0.0.1", port=8443, paths=PATHS, limits=DataPlaneLimits(), plan=Plan()
    )
    assert "frontend fe_sni" in split and "backend be_terminate" in split
    assert "bind abns@teecloud-gw-test accept-proxy ssl crt" in split
    direct = render_config(bind_host="127.0.0.1", port=8443, paths=PATHS, limits=NO_PASSTHROUGH, plan=Plan())
    assert "fe_sni" not in direct and "be_terminate" not in direct and "abns@" not in direct
    assert "    bind 127.0.0.1:8443 ssl crt /run/gw/certs/ strict-sni alpn h2,http/1.1" in direct
    tcp = render_config(
        bind_host="127.0.0.1",
        port=8443,
        paths=PATHS,
        limits=NO_PASSTHROUGH,
        plan=Plan(),
        terminate_mode="tcp",
    )
    assert (
        "fe_sni" not in tcp
        and "    bind 127.0.0.1:8443 ssl crt /run/gw/certs/ strict-sni alpn http/1.1" in tcp
    )
    with pytest.raises(ValueError, match="passthrough"):
        render_config(
            bind_host="127.0.0.1",
            port=8443,
            paths=PATHS,
            limits=NO_PASSTHROUGH,
            plan=Plan(),
            custom_domains=CustomDomainHook(9999, "ab" * 16),
            base_domain=BASE,
        )
    # no `s` names are planned
    routes = [Route(APP, INST1, 8080, "127.0.0.1:9000")]
    assert plan(routes, BASE, NO_PASSTHROUGH).tcp_map == {}
    assert plan(routes, BASE, DataPlaneLimits()).tcp_map


@pytest.fixture
def direct_gateway(tmp_path: Path) -> Iterator[Gateway]:
    ca = DevCa(now=int(time.time()))
    driver = HaproxyDriver(
        tmp_path / "run",
        base_domain=BASE,
        port=free_port(),
        cert=ca.issue_wildcard(BASE, now=int(time.time())),
        chain_pem=ca.cert_pem,
        limits=NO_PASSTHROUGH,
        timeouts=HaproxyTimeouts(client_s=2),
    )
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    driver.start()
    try:
        yield Gateway(driver, ca, tmp_path / "ca.pem")
    finally:
        driver.stop()


def test_served_through_haproxy_without_the_hop(direct_gateway: Gateway, backends: list[Backend]) -> None:
    gw = direct_gateway
    pid = gw.driver.pid
    gw.driver.apply([Route(APP, INST1, 8080, backends[0].address)])
    r = gw.get(f"{APP}-8080.{BASE}", "/x")
    assert r.status_code == 200 and r.text == "one /x xff=127.0.0.1"  # the client address, no PROXY hop
    # a name without a route, and a Host that is not the TLS name: 421, nothing forwarded
    assert gw.get(f"{'ee' * 20}-8080.{BASE}").status_code == 421
    assert gw.get(f"{APP}-8080.{BASE}", headers={"Host": f"x.{BASE}"}).status_code == 421
    # `s` names are not served here: no passthrough (421, the backend never sees the connection)
    before = backends[0].requests
    assert gw.get(f"{APP}-8080s.{BASE}").status_code == 421
    assert backends[0].requests == before
    # a name outside the base domain: a TLS alert (strict-sni)
    ctx = gw.client_context()
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw:
        ctx.wrap_socket(raw, server_hostname="other.example")
    # a route change is no reload
    gw.driver.apply([Route(APP, INST1, 8080, backends[1].address)])
    assert gw.get(f"{APP}-8080.{BASE}").text.startswith("two ")
    assert gw.driver.pid == pid and gw.driver.reloads == 0


def test_silent_client_is_cut_by_the_client_timeout(direct_gateway: Gateway) -> None:
    """Without fe_sni's ClientHello deadline, a client that sends nothing is bounded by `timeout client`."""
    with socket.create_connection(("127.0.0.1", direct_gateway.port), timeout=10) as s:
        t0 = time.monotonic()
        assert s.recv(1) == b""  # closed by HAProxy
        assert time.monotonic() - t0 < 5
