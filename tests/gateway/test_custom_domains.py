"""Custom domains (`_dstack-app-address` TXT, dstack's format and wildcard fallback), passthrough only:
names and records are checked, answers cached (positive by TTL, negative <= 10 s), and a custom SNI reaches
the app's own TLS backend through real HAProxy, with a local DNS server (dnslib, 127.0.0.1)."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.chain import ChainClient
from teecloud.gateway import api
from teecloud.gateway.client import register, registration_cert
from teecloud.gateway.customdomain import (
    CustomDomains,
    DnslibResolver,
    TxtAnswer,
    check_domain,
    parse_address,
)
from teecloud.gateway.errors import BadHostName, GatewayUsageError, RegistrationRefused
from teecloud.gateway.haproxy import CustomDomainHook, render_lua
from teecloud.gateway.server import GatewayServer
from tests.gateway.conftest import BASE
from tests.gateway.dns_server import LocalDns
from tests.gateway.test_registration import TOKEN, boot_cvm, chain, make_gateway
from tests.gateway.tls_backend import TlsEchoBackend
from tests.kms.test_quote_oracle import GetQuoteOracle

__all__ = ["chain"]  # the module-scoped chain fixture of test_registration

APP = "c3" * 20


@pytest.fixture
def dns() -> Iterator[LocalDns]:
    d = LocalDns()
    yield d
    d.stop()


def test_names_and_records() -> None:
    assert check_domain("App.Example.COM.") == "app.example.com"
    for bad in (
        "",
        "com",
        "a" * 254,
        "*.example.com",
        "a..example.com",
        "-a.example.com",
        "ex ample.com",
        "exämple.com",
        "a_b.example.com",
        ("x" * 64) + ".com",
        b"\xff.example.com",
    ):
        with pytest.raises(BadHostName):
            check_domain(bad)
    assert parse_address(f" {APP.upper()}:443 ") == (APP, 443)
    for bad in (APP, f"{APP}:", f"{APP}:0", f"{APP}:70000", f"{APP}:08", f"{APP[:-1]}:80", "x:80", ""):
        with pytest.raises(BadHostName):
            parse_address(bad)
    with pytest.raises(GatewayUsageError):
        CustomDomains(DnslibResolver("127.0.0.1"), base_domain=BASE, negative_ttl_s=11)
    with pytest.raises(ValueError):
        render_lua(CustomDomainHook(1, 'x"; os.exit() --'))


class FakeResolver:
    def __init__(self) -> None:
        self.records: dict[str, TxtAnswer] = {}
        self.fail = False

    def txt(self, name: str) -> TxtAnswer | None:
        if self.fail:
            raise OSError("timeout")
        return self.records.get(name)


def test_cache_positive_by_ttl_negative_at_most_10s() -> None:
    now = [1000.0]
    r = FakeResolver()
    cd = CustomDomains(r, base_domain=BASE, clock=lambda: now[0])
    r.records["_dstack-app-address.app.example.com"] = TxtAnswer((f"{APP}:8443",), 60)
    assert cd.lookup("app.example.com") == (APP, 8443)
    r.records.clear()
    now[0] += 59
    assert cd.lookup("app.example.com") == (APP, 8443)  # cached for its TTL
    now[0] += 2
    assert cd.lookup("app.example.com") is None  # expired: asked again, gone
    r.records["_dstack-app-address.app.example.com"] = TxtAnswer((f"{APP}:8443",), 60)
    now[0] += 9
    assert cd.lookup("app.example.com") is None  # negative, still cached
    now[0] += 1.1
    assert cd.lookup("app.example.com") == (APP, 8443)  # at most 10 s later
    # a DNS failure and a malformed record are negative answers too
    r.fail = True
    assert cd.lookup("other.example.com") is None
    r.fail = False
    r.records["_dstack-app-address.bad.example.com"] = TxtAnswer(("not-an-address",), 3600)
    asked = cd.queries
    assert cd.lookup("bad.example.com") is None
    assert cd.lookup("bad.example.com") is None and cd.queries == asked + 1
    with pytest.raises(BadHostName):  # the base domain's names are routed by their label
        cd.lookup(f"{APP}-443s.{BASE}")
    # bounded
    small = CustomDomains(r, base_domain=BASE, max_entries=3, clock=lambda: now[0])
    for i in range(10):
        small.lookup(f"n{i}.example.com")
    assert len(small._cache) == 3


def test_dnslib_resolver_and_wildcard(dns: LocalDns) -> None:
    dns.zone.set("_dstack-app-address.app.example.test", f"{APP}:8443", ttl=120)
    dns.zone.set("_dstack-app-address-wildcard.wild.test", [APP[:20].encode(), f"{APP[20:]}:9443".encode()])
    res = DnslibResolver("127.0.0.1", dns.port)
    assert res.txt("_dstack-app-address.app.example.test") == TxtAnswer((f"{APP}:8443",), 120)
    assert res.txt("_dstack-app-address.nothing.test") is None
    cd = CustomDomains(res, base_domain=BASE)
    assert cd.lookup("app.example.test") == (APP, 8443)
    assert cd.lookup("anything.wild.test") == (APP, 9443)  # the exact names first, then the wildcard
    assert dns.zone.questions[-3:] == [
        "_dstack-app-address.anything.wild.test",
        "_tapp-address.anything.wild.test",  # the legacy prefix (test_custom_domain_legacy.py)
        "_dstack-app-address-wildcard.wild.test",
    ]
    assert cd.lookup("deeper.anything.wild.test") is None  # the wildcard covers one label only
    silent = DnslibResolver("127.0.0.1", 9, timeout_s=0.2)  # nothing answers: an OSError, a negative
    with pytest.raises(OSError):
        silent.txt("_dstack-app-address.app.example.test")


def _handshake(gw: GatewayServer, sni: str, backend: TlsEchoBackend | None = None) -> bytes:
    ctx = ssl.create_default_context(cadata=backend.cert_pem if backend else gw.ca.cert_pem)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", gw.public_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(b"ping")
            assert tls.recv(16) == b"ping"
            der = tls.getpeercert(True)
            assert der is not None
            return der


def test_custom_domain_reaches_the_apps_own_tls_through_haproxy(
    teecloud_home: Path, chain: ChainClient, dns: LocalDns, tmp_path: Path
) -> None:
    cvm = boot_cvm(teecloud_home, chain, "custom")
    other = "d4" * 20  # on chain or not, never registered with this gateway
    custom = CustomDomains(DnslibResolver("127.0.0.1", dns.port), base_domain=BASE)
    dns.zone.set("_dstack-app-address.app.example.test", f"{cvm.app_id}:8443")
    dns.zone.set("_dstack-app-address-wildcard.wild.test", f"{cvm.app_id}:8443", ttl=1)
    dns.zone.set("_dstack-app-address.stranger.test", f"{other}:8443")
    dns.zone.set("_dstack-app-address.malformed.test", "hello world")
    dns.zone.set("_dstack-app-address.wrongport.test", f"{cvm.app_id}:9999")
    with (
        make_gateway(teecloud_home, chain, custom_domains=custom) as gw,
        TlsEchoBackend(tmp_path) as app,
    ):
        host, port = app.address.rsplit(":", 1)
        endpoints = [api.Endpoint(port=8443, host=host, host_port=int(port))]
        # the security rule's attack: a registration certificate over a quote taken after boot (GetQuote)
        # registers nothing, so the app's TXT record routes nothing
        key = ec.generate_private_key(ec.SECP256R1())
        forged = registration_cert(GetQuoteOracle(cvm.agent), key, now=int(time.time()))
        with pytest.raises(RegistrationRefused) as refused:
            register(gw.registration_url, key, forged, endpoints, ca_pem=gw.ca.cert_pem)
        assert refused.value.step == "boot_time"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _handshake(gw, "app.example.test", app)
        # the hook's own port is not a backend a CVM may name
        assert gw.hook is not None
        bad = [api.Endpoint(port=8443, host="127.0.0.1", host_port=gw.hook.port)]
        with pytest.raises(RegistrationRefused) as refused:
            register(gw.registration_url, cvm.key, cvm.cert_der, bad, ca_pem=gw.ca.cert_pem)
        assert refused.value.step == "request" and "gateway's own" in refused.value.reason
        custom = CustomDomains(DnslibResolver("127.0.0.1", dns.port), base_domain=BASE)
        gw.custom_domains = custom  # forget the negative answer cached above (at most 10 s anyway)
        register(
            gw.registration_url,
            cvm.key,
            cvm.cert_der,
            endpoints,
            ca_pem=gw.ca.cert_pem,
        )
        gw.sync()
        # passthrough: the client's TLS ends at the app's own certificate, not the gateway's
        assert _handshake(gw, "app.example.test", app) == app.cert_der
        # the first connection asked the gateway, which pinned the domain into passthrough.map: the next
        # ones do not ask (until the TXT TTL ends)
        gw.sync()  # what the next tick (<= 1 s) does
        assert gw.driver.plan.tcp_map.get("app.example.test", "").startswith("bt")
        asked = custom.found + custom.not_found
        assert _handshake(gw, "App.Example.Test", app) == app.cert_der
        assert custom.found + custom.not_found == asked
        assert _handshake(gw, "www.wild.test", app) == app.cert_der  # TTL 1 s
        gw.sync()
        assert "www.wild.test" in gw.driver.plan.tcp_map
        time.sleep(1.1)
        gw.tick()
        assert "www.wild.test" not in gw.driver.plan.tcp_map  # unpinned when its TTL ended
        assert _handshake(gw, "www.wild.test", app) == app.cert_der  # asked again, pinned again
        # refused: nothing forwarded, the gateway's strict-sni terminator alerts
        for name in (
            "stranger.test",  # a TXT naming an app that is not registered here
            "malformed.test",  # a TXT that is not <app_id>:<port>
            "wrongport.test",  # the app is registered, not for that port
            "nothing.test",  # no TXT
            "x" * 63 + "." + "y" * 63 + "." + "z" * 63 + ".test",  # long, but a name: still no TXT
        ):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _handshake(gw, name, app)
        # hostile names never reach DNS
        asked = len(dns.zone.questions)
        for name in ("a_b.test", "*.wild.test"):
            with pytest.raises((ssl.SSLError, ConnectionError, ValueError)):
                _handshake(gw, name, app)
        assert len(dns.zone.questions) == asked
        # the hook: token required; a bad name is a 400, not a 500; the answer is the passthrough slot
        hook = f"http://127.0.0.1:{gw.hook.port}/resolve/"
        assert httpx.get(hook + "app.example.test").status_code == 401
        auth = {"X-Teecloud-Hook": gw.hook.token}
        assert httpx.get(hook + "a_b.test", headers=auth).status_code == 400
        assert httpx.get(hook + "x" * 400, headers=auth).status_code == 400
        assert httpx.get(hook + "app.example.test", headers=auth).text.startswith("bt")
        assert httpx.get(hook + "stranger.test", headers=auth).text == "-"
        metrics = httpx.get(gw.admin_url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        assert 'teecloud_gateway_custom_domain_lookups_total{result="found"}' in metrics
        # the app's route goes: its custom domain goes with it (the cached TXT does not keep it alive)
        gw.registry.remove(cvm.instance_id)
        gw.sync()
        assert "app.example.test" not in gw.driver.plan.tcp_map  # derived in the same plan as the routes
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _handshake(gw, "app.example.test", app)
