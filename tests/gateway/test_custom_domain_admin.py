"""The admin API's listing of pinned custom domains (`GET /admin/domains`) and `teecloud gateway domains`:
behind the admin token, bounded (page limit 1..1000, `after` cursor, the pin cap), and true to the data plane
(a domain is listed once the hook resolved it to a registered app port, with the TXT name that answered,
and goes when its cached answer expires). Through a real GatewayServer (HAProxy) and a local DNS server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from teecloud.chain import ChainClient
from teecloud.cli import app as cli
from teecloud.gateway import api
from teecloud.gateway.client import register
from teecloud.gateway.customdomain import CustomDomains, DnslibResolver
from teecloud.gateway.http import make_admin_app
from teecloud.gateway.server import GatewayServer
from teecloud.gateway.service import GatewayService
from tests.gateway.conftest import BASE
from tests.gateway.dns_server import LocalDns
from tests.gateway.test_registration import TOKEN, boot_cvm, chain, make_gateway
from tests.gateway.tls_backend import TlsEchoBackend

__all__ = ["chain"]  # the module-scoped chain fixture of test_registration

APP = "c3" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _view(i: int) -> api.CustomDomainView:
    return api.CustomDomainView(
        domain=f"d{i:02d}.example.test",
        app_id=APP,
        port=8443,
        source=f"_dstack-app-address.d{i:02d}.example.test",
        expires_in_s=60,
    )


def _admin(pinned: list[api.CustomDomainView] | None) -> TestClient:
    app = make_admin_app(
        cast(GatewayService, object()),  # the domains route never touches the registration service
        token=TOKEN,
        status=lambda: cast(api.GatewayStatus, None),
        haproxy_metrics=lambda: b"",
        custom_domains=(lambda: pinned) if pinned is not None else None,
    )
    return TestClient(app)


def test_listing_needs_the_token_and_is_bounded() -> None:
    c = _admin([_view(i) for i in range(25)])
    assert c.get("/admin/domains").status_code == 401
    assert c.get("/admin/domains", headers={"Authorization": "Bearer wrong-token-123456"}).status_code == 401
    assert c.get("/admin/domains", headers={"Authorization": TOKEN}).status_code == 401
    # bounds: a clear 400 for a client's mistake, never a 500
    for params in ({"limit": 0}, {"limit": api.DOMAINS_PAGE_MAX + 1}, {"limit": "x"}, {"after": "a" * 254}):
        r = c.get("/admin/domains", params=params, headers=AUTH)
        assert r.status_code == 400, params
        assert r.json()["step"] == "request"
    # pages in name order, each at most `limit`, `next_after` leading to the next one
    seen: list[str] = []
    after = ""
    for _ in range(10):
        page = api.CustomDomainList.model_validate(
            c.get("/admin/domains", params={"limit": 10, "after": after}, headers=AUTH).json()
        )
        assert page.enabled and page.total == 25 and len(page.domains) <= 10
        seen += [d.domain for d in page.domains]
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == [f"d{i:02d}.example.test" for i in range(25)]
    # the default page is DOMAINS_PAGE_DEFAULT
    many = _admin([_view(i) for i in range(api.DOMAINS_PAGE_DEFAULT + 5)])
    page = api.CustomDomainList.model_validate(many.get("/admin/domains", headers=AUTH).json())
    assert len(page.domains) == api.DOMAINS_PAGE_DEFAULT and page.next_after is not None
    # a gateway without custom domains says so
    off = _admin(None).get("/admin/domains", headers=AUTH).json()
    assert off == {"enabled": False, "total": 0, "domains": [], "next_after": None}


def test_cli_without_a_gateway_is_a_usage_error(tmp_path: Path) -> None:
    run = CliRunner().invoke
    out = run(cli, ["gateway", "domains"])  # no running `teecloud up` in this TEECLOUD_HOME
    assert out.exit_code == 2 and "no gateway found" in out.output
    missing = tmp_path / "nope"
    out = run(cli, ["gateway", "domains", "--admin-url", "http://127.0.0.1:9", "--token-file", str(missing)])
    assert out.exit_code == 2 and "admin token" in out.output
    token = tmp_path / "token"
    token.write_text(TOKEN)
    out = run(cli, ["gateway", "domains", "--admin-url", "http://127.0.0.1:9", "--token-file", str(token)])
    assert out.exit_code == 1 and "did not answer" in out.output  # nothing listens on port 9


@pytest.fixture
def dns() -> Iterator[LocalDns]:
    d = LocalDns()
    yield d
    d.stop()


def _resolve(gw: GatewayServer, name: str) -> str:
    assert gw.hook is not None
    r = httpx.get(
        f"http://127.0.0.1:{gw.hook.port}/resolve/{name}", headers={"X-Teecloud-Hook": gw.hook.token}
    )
    assert r.status_code == 200
    return r.text


def _list(gw: GatewayServer, **params: Any) -> api.CustomDomainList:
    r = httpx.get(gw.admin_url + "/admin/domains", params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    return api.CustomDomainList.model_validate(r.json())


@pytest.mark.slow
def test_pinned_domains_listed_expire_and_cli(
    teecloud_home: Path, chain: ChainClient, dns: LocalDns, tmp_path: Path
) -> None:
    cvm = boot_cvm(teecloud_home, chain, "domains")
    dns.zone.set("_dstack-app-address.new.example.test", f"{cvm.app_id}:8443", ttl=300)
    dns.zone.set("_tapp-address.old.example.test", f"{cvm.app_id}:8443", ttl=300)
    dns.zone.set("_dstack-app-address-wildcard.wild.test", f"{cvm.app_id}:8443", ttl=1)
    dns.zone.set("_tapp-address.unregistered.test", f"{'d4' * 20}:8443")
    # the pin cap is the cache's bound: 4 here
    custom = CustomDomains(DnslibResolver("127.0.0.1", dns.port), base_domain=BASE, max_entries=4)
    with (
        make_gateway(teecloud_home, chain, custom_domains=custom) as gw,
        TlsEchoBackend(tmp_path) as app,
    ):
        assert _list(gw).domains == []
        host, port = app.address.rsplit(":", 1)
        endpoints = [api.Endpoint(port=8443, host=host, host_port=int(port))]
        register(gw.registration_url, cvm.key, cvm.cert_der, endpoints, ca_pem=gw.ca.cert_pem)
        gw.sync()
        assert _resolve(gw, "new.example.test").startswith("bt")
        assert _resolve(gw, "Old.Example.Test").startswith("bt")  # the legacy record routes too
        assert _resolve(gw, "a.wild.test").startswith("bt")
        assert _resolve(gw, "unregistered.test") == "-"  # resolved, but no app here: not pinned
        listing = _list(gw)
        assert listing.enabled and listing.total == 3 and listing.next_after is None
        got = {d.domain: d for d in listing.domains}
        assert list(got) == ["a.wild.test", "new.example.test", "old.example.test"]
        assert all(d.app_id == cvm.app_id and d.port == 8443 for d in got.values())
        assert got["new.example.test"].source == "_dstack-app-address.new.example.test"
        assert got["old.example.test"].source == "_tapp-address.old.example.test"
        assert got["a.wild.test"].source == "_dstack-app-address-wildcard.wild.test"
        assert 290 <= got["old.example.test"].expires_in_s <= 300
        assert got["a.wild.test"].expires_in_s <= 1
        # the listing is what the data plane serves
        gw.sync()
        assert set(gw.driver.plan.tcp_map) >= set(got)
        # expiry drops it: from the listing at once, from the data plane at the next tick
        time.sleep(1.1)
        assert [d.domain for d in _list(gw).domains] == ["new.example.test", "old.example.test"]
        gw.tick()
        assert "a.wild.test" not in gw.driver.plan.tcp_map
        # the cap: at most max_entries pinned, however many names resolve
        dns.zone.set("_dstack-app-address-wildcard.wild.test", f"{cvm.app_id}:8443", ttl=300)
        for label in ("b", "c", "d", "e"):
            _resolve(gw, f"{label}.wild.test")
        assert _list(gw).total == 4
        # pages
        first = _list(gw, limit=3)
        assert len(first.domains) == 3 and first.next_after == first.domains[-1].domain
        rest = _list(gw, limit=3, after=first.next_after)
        assert len(rest.domains) == 1 and rest.next_after is None
        # the token is required
        assert httpx.get(gw.admin_url + "/admin/domains").status_code == 401

        # `teecloud gateway domains`
        token_file = tmp_path / "admin-token"
        token_file.write_text(TOKEN + "\n")
        run = CliRunner().invoke
        base = ["gateway", "domains", "--admin-url", gw.admin_url, "--token-file", str(token_file)]
        out = run(cli, [*base, "--json", "--limit", "1", "--all"])
        assert out.exit_code == 0, out.output
        data = json.loads(out.stdout)
        assert data["total"] == 4 and data["next_after"] is None
        assert [d["domain"] for d in data["domains"]] == [d.domain for d in _list(gw).domains]
        out = run(cli, [*base, "--limit", "2"])
        assert out.exit_code == 0, out.output
        assert "b.wild.test" in out.stdout and "c.wild.test" in out.stdout and "8443" in out.stdout
        assert "old.example.test" not in out.stdout  # on the next page
        assert "more: --after c.wild.test" in out.stdout
        token_file.write_text("wrong-token-0123456789")
        out = run(cli, [*base, "--json"])
        assert out.exit_code == 1 and "401" in out.output
        assert run(cli, [*base, "--limit", "0"]).exit_code == 2
        assert (
            run(
                cli, ["gateway", "domains", "--admin-url", "ftp://x", "--token-file", str(token_file)]
            ).exit_code
            == 2
        )
