"""The legacy `_tapp-address.<domain>` TXT prefix, resolved as dstack's gateway does (its default
`app_address_ns_compat = true`): the current `_dstack-app-address` name wins when both exist, the legacy one
answers when the current has none, the `_dstack-app-address-wildcard` fallback is asked only when neither
exact name has a record, and there is no legacy wildcard. Same strict value parsing (a malformed record
refuses, never falls through) and the same caching (positive by TTL, negative <= 10 s). Against a local DNS
server (dnslib, 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from teecloud.gateway.customdomain import CustomDomains, DnslibResolver, Resolution
from tests.gateway.conftest import BASE
from tests.gateway.dns_server import LocalDns

APP = "c3" * 20
OTHER = "a1" * 20


@pytest.fixture
def dns() -> Iterator[LocalDns]:
    d = LocalDns()
    yield d
    d.stop()


def _domains(dns: LocalDns, now: list[float] | None = None, **kw: object) -> CustomDomains:
    clock = (lambda: now[0]) if now is not None else None
    extra = {"clock": clock} if clock is not None else {}
    return CustomDomains(DnslibResolver("127.0.0.1", dns.port), base_domain=BASE, **extra, **kw)  # type: ignore[arg-type]


def test_legacy_only(dns: LocalDns) -> None:
    dns.zone.set("_tapp-address.old.example.test", f"{APP}:8443", ttl=120)
    cd = _domains(dns, now=[100.0])
    got = cd.resolve("old.example.test")
    assert got == Resolution((APP, 8443), "_tapp-address.old.example.test", 100.0 + 120)
    # the current name is asked first, then the legacy one; the wildcard is not needed
    assert dns.zone.questions == [
        "_dstack-app-address.old.example.test",
        "_tapp-address.old.example.test",
    ]
    # legacy off (dstack's app_address_ns_compat = false): the record is not read
    strict = _domains(dns, legacy=False)
    assert strict.lookup("old.example.test") is None
    assert "_tapp-address.old.example.test" not in dns.zone.questions[2:]


def test_both_exist_the_current_prefix_wins(dns: LocalDns) -> None:
    dns.zone.set("_dstack-app-address.both.example.test", f"{APP}:443", ttl=60)
    dns.zone.set("_tapp-address.both.example.test", f"{OTHER}:8080", ttl=600)
    cd = _domains(dns)
    got = cd.resolve("both.example.test")
    assert got.address == (APP, 443) and got.source == "_dstack-app-address.both.example.test"
    assert dns.zone.questions == ["_dstack-app-address.both.example.test"]  # decided by the first answer
    assert cd.answers == {"current": 1, "legacy": 0, "wildcard": 0}
    # a malformed legacy record behind a good current one is never read (dstack returns on the first)
    dns.zone.set("_dstack-app-address.mixed.example.test", f"{APP}:443")
    dns.zone.set("_tapp-address.mixed.example.test", "garbage")
    assert cd.lookup("mixed.example.test") == (APP, 443)


def test_wildcard_with_legacy(dns: LocalDns) -> None:
    # an exact legacy record beats the current wildcard (the wildcard is only asked when neither exact exists)
    dns.zone.set("_dstack-app-address-wildcard.wild.test", f"{APP}:9443", ttl=30)
    dns.zone.set("_tapp-address.pinned.wild.test", f"{OTHER}:8443", ttl=30)
    cd = _domains(dns)
    got = cd.resolve("pinned.wild.test")
    assert got.address == (OTHER, 8443) and got.source == "_tapp-address.pinned.wild.test"
    got = cd.resolve("any.wild.test")
    assert got.address == (APP, 9443) and got.source == "_dstack-app-address-wildcard.wild.test"
    assert cd.answers == {"current": 0, "legacy": 1, "wildcard": 1}
    assert 'teecloud_gateway_custom_domain_answers_total{record="legacy"} 1\n' in cd.metrics()
    assert dns.zone.questions[-3:] == [
        "_dstack-app-address.any.wild.test",
        "_tapp-address.any.wild.test",
        "_dstack-app-address-wildcard.wild.test",
    ]
    # dstack has no legacy wildcard: `_tapp-address-wildcard` is never asked and never routes
    dns.zone.set("_tapp-address-wildcard.legacywild.test", f"{APP}:9443")
    asked = len(dns.zone.questions)
    got = cd.resolve("x.legacywild.test")
    assert got.address is None and got.source is None
    assert "_tapp-address-wildcard.legacywild.test" not in dns.zone.questions[asked:]


@pytest.mark.parametrize(
    "value",
    [
        "not-an-address",
        f"{APP}",  # no port
        f"{APP}:0",
        f"{APP}:65536",
        f"{APP}:08443",  # a leading zero
        f"{APP[:-1]}:8443",  # 39 hex digits
        f"{APP}0:8443",  # 41
        f"0x{APP}:8443",
        f"{APP}:8443:1",
        f"{APP}: 8443",
        f"{APP[:-1]}g:8443",  # not hex
    ],
)
def test_malformed_legacy_values_are_refused(dns: LocalDns, value: str) -> None:
    dns.zone.set("_tapp-address.bad.example.test", value, ttl=3600)
    now = [500.0]
    cd = _domains(dns, now=now)
    got = cd.resolve("bad.example.test")
    # refused, and cached as a negative answer (at most 10 s), not for the record's hour
    assert got.address is None and got.source == "_tapp-address.bad.example.test"
    assert got.expires_at == 510.0
    # a malformed legacy record ends the lookup: a wildcard that would match is not taken in its place
    dns.zone.set("_dstack-app-address-wildcard.example.test", f"{APP}:8443")
    assert cd.lookup("bad.example.test") is None  # still the cached negative
    now[0] += 10.5
    asked = len(dns.zone.questions)
    assert cd.lookup("bad.example.test") is None
    assert "_dstack-app-address-wildcard.example.test" not in dns.zone.questions[asked:]
    # the same value under the current prefix is refused too, and the legacy record then is not read
    dns.zone.set("_dstack-app-address.cur.example.test", value)
    dns.zone.set("_tapp-address.cur.example.test", f"{APP}:8443")
    assert cd.lookup("cur.example.test") is None


def test_legacy_cache_positive_by_ttl_negative_at_most_10s(dns: LocalDns) -> None:
    now = [1000.0]
    cd = _domains(dns, now=now)
    dns.zone.set("_tapp-address.app.example.test", f"{APP}:8443", ttl=60)
    assert cd.lookup("app.example.test") == (APP, 8443)
    del dns.zone.records["_tapp-address.app.example.test"]
    now[0] += 59
    asked = len(dns.zone.questions)
    assert cd.lookup("app.example.test") == (APP, 8443)  # cached for its TTL: no question asked
    assert len(dns.zone.questions) == asked
    now[0] += 2
    assert cd.lookup("app.example.test") is None  # expired: asked again, gone
    dns.zone.set("_tapp-address.app.example.test", f"{APP}:8443", ttl=60)
    now[0] += 9
    assert cd.lookup("app.example.test") is None  # negative, still cached
    now[0] += 1.1
    assert cd.lookup("app.example.test") == (APP, 8443)  # at most 10 s later
    # a TTL above the cap is cut to max_ttl_s
    dns.zone.set("_tapp-address.long.example.test", f"{APP}:8443", ttl=86400)
    got = cd.resolve("long.example.test")
    assert got.expires_at == now[0] + cd.max_ttl_s
