"""Whole system: `teecloud up` (LocalCloud) applies each app's attested port policy at its gateway and,
given a DNS server, serves custom domains. examples/hello is deployed with a port policy listing 8080 only
while its compose publishes 8080 and 8081: 8080 is served through HAProxy, 8081 is refused at the gateway
(421, no route), and a custom domain whose TXT record names the app's port 8080 reaches the app in
passthrough."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import HELLO, _fail_or_skip, hello_image  # noqa: F401 (fixtures)
from tests.gateway.dns_server import LocalDns

TWO_PORTS = (
    (HELLO / "docker-compose.yml").read_text().replace('- "8080:8080"', '- "8080:8080"\n      - "8081:8081"')
)


@pytest.fixture(scope="module")
def dns() -> Iterator[LocalDns]:
    d = LocalDns()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def gw_cloud(hello_image: str, dns: LocalDns, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:  # noqa: F811
    from teecloud.devstack import LocalCloud, check_prerequisites

    missing = check_prerequisites()
    if missing:
        _fail_or_skip("; ".join(missing))
    c = LocalCloud(tmp_path_factory.mktemp("gw-plane-home"), gateway_dns=f"127.0.0.1:{dns.port}")
    c.start()
    if c.gateway is None:
        _fail_or_skip("HAProxy is not installed (scripts/setup.sh installs it)")
    yield c
    try:
        for inst in c.node.store.all():
            c.node.remove(inst.instance_id)
    finally:
        c.stop()


def _through_gateway(gw: dict[str, Any], host: str) -> httpx.Response:
    with httpx.Client(verify=gw["ca_file"], timeout=10) as http:
        return http.get(
            f"https://127.0.0.1:{gw['public_port']}/",
            headers={"Host": host},
            extensions={"sni_hostname": host},
        )


def _first_bytes_for_sni(port: int, sni: str) -> bytes:
    """Send a TLS ClientHello for `sni` to the gateway; the first bytes that come back."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(outgoing.read())
        s.settimeout(10)
        data = b""
        try:
            while len(data) < 4096 and (chunk := s.recv(4096)):
                data += chunk
        except ConnectionResetError:
            pass
        return data


@pytest.mark.slow
@pytest.mark.docker
def test_up_applies_the_port_policy_and_serves_custom_domains(
    gw_cloud: Any, dns: LocalDns, tmp_path: Path
) -> None:
    from teecloud.cloud.deploy import Session, deploy
    from teecloud.cloud.options import AppOptions

    compose = tmp_path / "docker-compose.yml"
    compose.write_text(TWO_PORTS)
    session = Session(gw_cloud.home)
    try:
        gw = session.endpoints.gateway
        assert gw["custom_domains_dns"] == f"127.0.0.1:{dns.port}"
        r = deploy(session, compose, AppOptions.build(name="gw-policy", gateway_ports=["8080"]))
        assert r.status == "running", r.error
        st = session.node.get(r.instance_id)
        published = {int(p["container_port"]) for c in st.containers for p in c.ports if p.get("host_port")}
        assert published == {
            8080,
            8081,
        }  # the node publishes both; the policy decides what the gateway routes
    finally:
        session.close()
    base = gw["base_domain"]
    # the listed port is served through HAProxy by the app itself
    listed = _through_gateway(gw, f"{r.app_id}-8080.{base}")
    assert listed.status_code == 200 and r.app_id in listed.text
    # the unlisted port has no route at all: refused at the gateway, never forwarded
    token = Path(gw["admin_token_file"]).read_text().strip()
    routes = httpx.get(f"{gw['admin']}/admin/routes", headers={"Authorization": f"Bearer {token}"}).json()
    assert sorted({x["port"] for x in routes if x["app_id"] == r.app_id}) == [8080]
    unlisted = _through_gateway(gw, f"{r.app_id}-8081.{base}")
    assert unlisted.status_code == 421 and "no app is registered" in unlisted.text
    # a custom domain: before its TXT record exists, a TLS alert (0x15) from the gateway's terminator
    domain = "shop.example.test"
    assert _first_bytes_for_sni(gw["public_port"], domain)[:1] in (b"\x15", b"")
    dns.zone.set(f"_dstack-app-address.{domain}", f"{r.app_id}:8080", ttl=60)
    deadline = time.monotonic() + 15  # the negative answer is cached for at most 10 s
    first = b""
    while time.monotonic() < deadline:
        first = _first_bytes_for_sni(gw["public_port"], domain)
        if b"Error code: 400" in first:
            break
        time.sleep(0.5)
    # passthrough: the ClientHello reached hello's plain-HTTP server untouched, which answers it as a bad
    # HTTP request (its error page; a TLS app would answer with its own certificate): the gateway
    # terminated nothing
    assert b"Error code: 400" in first, first[:200]
