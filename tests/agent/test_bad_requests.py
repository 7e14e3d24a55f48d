"""Client mistakes get a 400 (404 for unknown methods) with a clear {"error"}; the agent keeps serving."""

from __future__ import annotations

import httpx
import pytest


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


CASES = [
    ("/GetQuote", {"report_data": "zz"}, "report_data: not a valid hex"),
    ("/GetQuote", {"report_data": "0x" + "00" * 65}, "at most 64 bytes"),
    ("/GetQuote", {"report_data": 12}, "report_data"),
    ("/Attest", {"report_data": "ab" * 65}, "at most 64 bytes"),
    ("/GetKey", {"path": 5}, "path"),
    ("/GetKey", {"path": "a", "algorithm": "rsa"}, "unknown algorithm"),
    ("/GetKey", ["not", "an", "object"], "JSON object"),
    ("/GetTlsKey", {"alt_names": "x"}, "alt_names"),
    ("/GetTlsKey", {"usage_ra_tls": "yes"}, "usage_ra_tls"),
    ("/GetTlsKey", {"not_before": 100, "not_after": 50}, "not_after"),
    ("/GetTlsKey", {"alt_names": ["bad name with spaces"]}, "alt name"),
    ("/Sign", {"algorithm": "rsa", "data": "00"}, "unknown algorithm"),
    ("/Sign", {"algorithm": "secp256k1_prehashed", "data": "00"}, "32-byte digest"),
    ("/Sign", {"data": "00"}, "algorithm"),
    ("/Verify", {"algorithm": "ed25519", "data": "00", "signature": "xyz", "public_key": "00"}, "signature"),
    (
        "/Verify",
        {"algorithm": "foo", "data": "00", "signature": "00", "public_key": "00"},
        "unknown algorithm",
    ),
    ("/EmitEvent", {"event": "", "payload": ""}, "empty"),
    ("/EmitEvent", {"event": "a:b", "payload": ""}, "event"),
    ("/EmitEvent", {"event": "x", "payload": "q"}, "payload"),
    ("/EmitEvent", {"payload": "00"}, "event"),
]


@pytest.mark.parametrize(("path", "body", "needle"), CASES)
def test_bad_json_requests_are_400(http, path, body, needle):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    assert http.post("/Version", json={}).status_code == 200  # still serving


def test_non_json_body(http):
    r = http.post("/GetKey", content=b"\x08\x01protobuf?", headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_oversized_body(http, agent):
    limit = agent.service.limits.max_body_bytes
    r = http.post(
        "/GetKey", content=b"{" + b" " * (limit + 10) + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "limit" in r.json()["error"]

    # without a Content-Length (chunked), the streamed size is enforced too
    def gen():
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    r = http.post("/GetKey", content=gen(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and "limit" in r.json()["error"]
    assert http.post("/GetKey", json={"path": "ok"}).status_code == 200


def test_unknown_method_is_404_json(http, tappd):
    r = http.post("/NoSuchMethod", json={})
    assert r.status_code == 404 and "unknown method" in r.json()["error"]
    r = tappd.post("/prpc/Tappd.Nope", json={})
    assert r.status_code == 404 and "error" in r.json()


def test_get_with_query_and_0x_and_json_flag(http):
    a = http.get("/GetKey", params={"path": "p", "purpose": "x"}).json()
    b = http.post("/GetKey", json={"path": "p", "purpose": "x"}).json()
    assert a == b
    q = http.get("/GetQuote?json", params={"report_data": "0xABCD"}).json()
    assert q["report_data"].startswith("abcd") and len(q["report_data"]) == 128
    t = http.get("/GetTlsKey", params={"usage_ra_tls": "false", "alt_names": ["a.example", "b.example"]})
    assert t.status_code == 200
    assert http.get("/GetTlsKey", params={"usage_ra_tls": "maybe"}).status_code == 400


def test_tappd_bad_hash_algorithm_and_raw_too_long(tappd):
    r = tappd.post("/prpc/Tappd.TdxQuote", json={"report_data": "00", "hash_algorithm": "md5"})
    assert r.status_code == 400 and "hash_algorithm" in r.json()["error"]
    r = tappd.post("/prpc/Tappd.TdxQuote?json", json={"report_data": "00" * 65, "hash_algorithm": "raw"})
    assert r.status_code == 400
    ok = tappd.post("/prpc/Tappd.TdxQuote?json", json={"report_data": "00" * 200, "hash_algorithm": "sha512"})
    assert ok.status_code == 200 and ok.json()["prefix"] == "app-data:"


def test_wrong_http_method(http):
    r = http.put("/GetKey", json={})
    assert r.status_code == 405 and "error" in r.json()


def test_openapi_schema_lists_methods(agent):
    from teecloud.agent.http import make_agent_app

    schema = make_agent_app(agent.service).openapi()
    assert {"/GetKey", "/GetQuote", "/Info", "/Sign"} <= set(schema["paths"])
