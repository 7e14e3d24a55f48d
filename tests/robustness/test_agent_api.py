"""Guest agent (dstack.sock, tappd.sock, public): fuzzed and hostile requests get a 4xx {"error"}, never a
5xx; a refused request leaves RTMR3 and the event log as they were; the agent keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from teecloud.agent import LocalDevKeyProvider, boot
from teecloud.agent.boot import BootError, parse_app_compose
from teecloud.agent.http import make_agent_app, make_public_app, make_tappd_app
from teecloud.agent.service import AgentService
from teecloud.tee.simulated import SimulatedTdx
from tests.agent.conftest import COMPOSE
from tests.robustness._fuzz import run_hostile, run_schemathesis


@pytest.fixture
def svc(teecloud_home: Path) -> AgentService:
    tee = SimulatedTdx(teecloud_home)
    state = boot(tee, json.dumps(COMPOSE, indent=2), None, None, LocalDevKeyProvider(teecloud_home))
    return AgentService(state)


def _tee_state(svc: AgentService) -> Any:
    tee = svc.state.tee
    return tee.measurements()["rtmr3"], [e.to_json() for e in tee.event_log()]


def _serving(svc: AgentService, reference_key: dict[str, Any]) -> None:
    c = TestClient(make_agent_app(svc))
    assert c.post("/Version", json={}).status_code == 200
    assert c.post("/GetKey", json={"path": "robustness"}).json() == reference_key


@pytest.mark.parametrize("which", ["agent", "tappd", "public"])
def test_schemathesis_finds_no_5xx_and_state_is_kept(svc: AgentService, which: str) -> None:
    app = {"agent": make_agent_app, "tappd": make_tappd_app, "public": make_public_app}[which](svc)
    reference = TestClient(make_agent_app(svc)).post("/GetKey", json={"path": "robustness"}).json()
    problems = run_schemathesis(app, max_examples=25, snapshot=lambda: _tee_state(svc))
    assert problems == []
    _serving(svc, reference)


@pytest.mark.parametrize("which", ["agent", "tappd"])
def test_hostile_matrix(svc: AgentService, which: str) -> None:
    app = make_agent_app(svc) if which == "agent" else make_tappd_app(svc)
    reference = TestClient(make_agent_app(svc)).post("/GetKey", json={"path": "robustness"}).json()
    n, problems = run_hostile(
        TestClient(app, raise_server_exceptions=False), app, lambda p: p, snapshot=lambda: _tee_state(svc)
    )
    assert n > 200
    assert problems == []
    _serving(svc, reference)


def test_refused_emit_event_leaves_rtmr3_and_log_unchanged(svc: AgentService) -> None:
    c = TestClient(make_agent_app(svc))
    before = _tee_state(svc)
    for body in (
        {"event": "compose-hash", "payload": "00"},  # reserved boot event
        {"event": "a:b", "payload": ""},
        {"event": "x", "payload": "zz"},
        {"event": "x", "payload": "00" * (svc.limits.max_event_payload + 1)},
        {"event": "\ud800", "payload": ""},
        {"event": "x" * 300, "payload": ""},
        {"payload": "00"},
    ):
        r = c.post("/EmitEvent", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"], (body, r.text)
        assert _tee_state(svc) == before
    assert c.post("/EmitEvent", json={"event": "ok-event", "payload": "01"}).status_code == 200
    assert _tee_state(svc) != before  # the accepted one is measured


# -- regressions (each was a 500 "internal error in the guest agent") --------------------------------------


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/GetKey", b'{"path": "\\ud800"}'),
        ("/GetKey", b'{"purpose": "\\udfff"}'),
        ("/GetTlsKey", b'{"subject": "\\ud800"}'),
        ("/Sign", b'{"algorithm": "ed25519", "data": "00", "x": ["\\ud800"]}'),
    ],
)
def test_lone_surrogate_is_400(svc: AgentService, path: str, raw: bytes) -> None:
    r = TestClient(make_agent_app(svc)).post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "not valid Unicode" in r.json()["error"]


def test_tappd_lone_surrogate_is_400(svc: AgentService) -> None:
    r = TestClient(make_tappd_app(svc)).post(
        "/prpc/Tappd.DeriveKey", content=b'{"path": "\\ud800"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]


def test_long_tls_subject_is_400(svc: AgentService) -> None:
    c = TestClient(make_agent_app(svc))
    r = c.post("/GetTlsKey", json={"subject": "a" * 65})
    assert r.status_code == 400 and "at most 64 bytes" in r.json()["error"]
    assert c.post("/GetTlsKey", json={"subject": "a" * 64}).status_code == 200
    r = c.post("/GetTlsKey", json={"subject": "é" * 33})  # 66 bytes of UTF-8
    assert r.status_code == 400 and "at most 64 bytes" in r.json()["error"]
    assert c.post("/GetTlsKey", json={"subject": "é" * 32}).status_code == 200
    t = TestClient(make_tappd_app(svc))
    r = t.post("/prpc/Tappd.DeriveKey", json={"subject": "é" * 65})
    assert r.status_code == 400 and "at most 64 bytes" in r.json()["error"]


def test_tappd_long_path_without_subject_is_served(svc: AgentService) -> None:
    # the path stands in for the certificate's CN when no subject is given; a long one was a 500
    t = TestClient(make_tappd_app(svc))
    for path in ("p" * 500, "é" * 65, "😀" * 40):
        r = t.post("/prpc/Tappd.DeriveKey", json={"path": path})
        assert r.status_code == 200, r.text


def test_long_app_name_does_not_break_info(teecloud_home: Path) -> None:
    tee = SimulatedTdx(teecloud_home)
    compose = {**COMPOSE, "name": "né" * 100}
    state = boot(tee, json.dumps(compose), None, None, LocalDevKeyProvider(teecloud_home))
    c = TestClient(make_agent_app(state))
    assert c.post("/Info", json={}).status_code == 200
    assert c.post("/GetTlsKey", json={}).status_code == 200


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests deeper"),  # was RecursionError
        ('{"name": "\\ud800"}', "not valid Unicode"),  # was UnicodeEncodeError hashing the compose
        ('{"name": "\ud800"}', "UTF-8"),  # a str holding a surrogate
    ],
)
def test_parse_app_compose_refuses_clearly(text: str, needle: str) -> None:
    with pytest.raises(BootError, match=needle):
        parse_app_compose(text)
