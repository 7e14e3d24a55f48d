"""One app cannot bloat the node process through its agent (issue 10, F4): EmitEvent is bounded per CVM in
count and bytes, so every response that carries the event log (GetQuote, Info, tappd TdxQuote, the node's
attestation route) stays under a stated size. GetTlsKey refuses alt names that are no DNS name (a NUL
byte)."""

from __future__ import annotations

import json

import httpx
import pytest
from cryptography import x509

from teecloud.agent import api
from teecloud.agent.service import AgentService

LIMITS = api.AgentLimits()
# What one event costs in the event-log JSON besides its name and hex payload: {"imr":3,"event_type":...,
# "digest":"<96 hex>","event":"","event_payload":""} and a comma.
EVENT_JSON_OVERHEAD = 200
# The stated bound of the event log JSON a response carries: boot events (a few KB) + the app's events.
MAX_EVENT_LOG_JSON = 16 * 1024 + LIMITS.max_app_events * EVENT_JSON_OVERHEAD + 2 * LIMITS.max_app_event_bytes


@pytest.fixture
def http(agent):
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(agent.dstack_sock)), base_url="http://localhost"
    ) as c:
        yield c


@pytest.fixture
def tappd(agent):
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(agent.tappd_sock)), base_url="http://localhost"
    ) as c:
        yield c


def test_event_bytes_are_bounded_per_cvm(agent, http, tappd) -> None:
    payload = "ab" * LIMITS.max_event_payload  # 64 KiB each, the largest single event
    accepted = 0
    for _ in range(20):  # 1.25 MiB asked for
        r = http.post("/EmitEvent", json={"event": "big", "payload": payload})
        if r.status_code != 200:
            break
        accepted += 1
    assert r.status_code == 400 and "event log full" in r.json()["error"], r.text
    assert accepted == LIMITS.max_app_event_bytes // (LIMITS.max_event_payload + len("big"))
    # the log holds what was accepted, nothing of the refused call
    log = agent.service.state.tee.event_log()
    app_bytes = sum(len(e.event_payload) for e in log if e.event == "big")
    assert app_bytes == accepted * LIMITS.max_event_payload <= LIMITS.max_app_event_bytes
    # every response carrying the log stays under the stated size
    q = http.post("/GetQuote", json={"report_data": "00"})
    assert q.status_code == 200 and len(q.content) < MAX_EVENT_LOG_JSON + 32 * 1024
    info = http.post("/Info", json={})
    assert info.status_code == 200 and len(info.content) < 2 * MAX_EVENT_LOG_JSON + 64 * 1024
    t = tappd.post("/prpc/Tappd.TdxQuote", json={"report_data": "00"})
    assert t.status_code == 200 and len(t.content) < MAX_EVENT_LOG_JSON + 32 * 1024
    # still serving, and small events still fit where room is left
    assert http.post("/Version", json={}).status_code == 200


def test_event_count_is_bounded_per_cvm(booted) -> None:
    svc = AgentService(booted)
    for i in range(LIMITS.max_app_events):
        svc.emit_event(api.EmitEventRequest(event=f"e{i}", payload=""))
    with pytest.raises(Exception, match=f"already emitted {LIMITS.max_app_events} events"):
        svc.emit_event(api.EmitEventRequest(event="one-more", payload=""))
    text = svc.get_quote(api.GetQuoteRequest(report_data=""))["event_log"]
    assert len(json.loads(text)) <= LIMITS.max_app_events + 16
    assert len(text) < MAX_EVENT_LOG_JSON


def test_a_refused_event_is_not_counted(booted) -> None:
    svc = AgentService(booted, api.AgentLimits(max_app_events=2))
    with pytest.raises(Exception, match="event"):
        svc.emit_event(api.EmitEventRequest(event="bad:name", payload=""))  # the TEE refuses ':'
    svc.emit_event(api.EmitEventRequest(event="a", payload=""))
    svc.emit_event(api.EmitEventRequest(event="b", payload=""))
    with pytest.raises(Exception, match="event log full"):
        svc.emit_event(api.EmitEventRequest(event="c", payload=""))


@pytest.mark.parametrize(
    "name",
    [
        "evil.example\x00.good.example",  # the NUL byte of the finding
        "a b.example",
        "a/b.example",
        "under_score.example",
        "-lead.example",
        "trail-.example",
        "x" * 64 + ".example",  # a label above 63
        ".".join(["a" * 60] * 5),  # above 253 in all
        "a..b",
        "example.",
        "*",
        "*.com.*",
        "",
    ],
)
def test_get_tls_key_refuses_names_that_are_no_dns_name(http, tappd, name: str) -> None:
    r = http.post("/GetTlsKey", json={"alt_names": [name]})
    assert r.status_code == 400 and "invalid alt name" in r.json()["error"], r.text
    r = tappd.post("/prpc/Tappd.DeriveKey", json={"path": "p", "alt_names": [name]})
    assert r.status_code == 400 and "invalid alt name" in r.json()["error"], r.text


def test_get_tls_key_keeps_good_names(http) -> None:
    names = ["app.example.com", "*.apps.example.com", "xn--bcher-kva.example", "127.0.0.1", "::1", "a" * 63]
    r = http.post("/GetTlsKey", json={"alt_names": names})
    assert r.status_code == 200, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate_chain"][0].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(
        n for n in names if ":" not in n and n[0] != "1"
    )


def test_hostile_attest_envelopes_do_not_leak() -> None:
    """An invalid UTF-8 string in a CBOR envelope: cbor2's C decoder kept each failure alive (cbor2 #257);
    decode_attestation uses the pure decoder, so failures are collected."""
    import gc

    import pytest as _pytest

    from teecloud.agent.api import decode_attestation

    bad = b"\xa1\x61\xff\x00"  # map{ text(1) = 0xff (not UTF-8) : ... }
    for _ in range(2000):
        with _pytest.raises(ValueError, match="not CBOR"):
            decode_attestation(bad)
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o).__name__.startswith("CBORDecode")]
    assert len(alive) < 10, len(alive)
