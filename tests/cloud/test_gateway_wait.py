"""`teecloud deploy` waits for the app's gateway URL: until the app answers, or briefly once the gateway
routes the name but the backend keeps failing (an app serving its own TLS answers only its `s` name)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from teecloud.cloud import deploy as deploy_mod

GATEWAY = {"base_domain": "teecloud.localhost", "public_port": 8443, "ca_file": "/nonexistent-ca.pem"}
STATUS = SimpleNamespace(
    containers=[SimpleNamespace(ports=[{"container_port": 8000, "protocol": "tcp"}])],
)


def _patch(monkeypatch: pytest.MonkeyPatch, answers: list[int]) -> list[str]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["host"])
        return httpx.Response(answers[min(len(seen), len(answers)) - 1])

    real_client = httpx.Client
    monkeypatch.setattr(
        deploy_mod.httpx, "Client", lambda **_: real_client(transport=httpx.MockTransport(handler))
    )
    monkeypatch.setattr(deploy_mod.time, "sleep", lambda _s: None)
    return seen


def _clock(monkeypatch: pytest.MonkeyPatch, step: float) -> None:
    now = [0.0]

    def monotonic() -> float:
        now[0] += step
        return now[0]

    monkeypatch.setattr(deploy_mod.time, "monotonic", monotonic)


def test_returns_when_the_app_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _patch(monkeypatch, [421, 421, 200])
    urls = deploy_mod.wait_gateway_urls(GATEWAY, "ab" * 20, STATUS)
    assert urls == [f"https://{'ab' * 20}-8000.teecloud.localhost:8443/"]
    assert len(seen) == 3 and seen[0] == f"{'ab' * 20}-8000.teecloud.localhost"


def test_a_routed_name_whose_backend_fails_ends_the_wait_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clock(monkeypatch, 0.25)  # each clock read advances 0.25 s
    seen = _patch(monkeypatch, [421, 502])
    deploy_mod.wait_gateway_urls(GATEWAY, "cd" * 20, STATUS, timeout=20.0, backend_grace=1.0)
    assert 2 <= len(seen) <= 4  # not the 40 tries a 20 s timeout allows


def test_an_unrouted_name_waits_the_whole_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, 0.25)
    seen = _patch(monkeypatch, [421])
    deploy_mod.wait_gateway_urls(GATEWAY, "ef" * 20, STATUS, timeout=5.0, backend_grace=1.0)
    assert len(seen) >= 8
