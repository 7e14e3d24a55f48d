"""Node API: the admin token guards management routes; client mistakes get 4xx with a reason, never a 500."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from teecloud.agent.boot import normalize_app_compose
from teecloud.node.service import Node, make_node_app
from tests.node.fakes import FakeRuntime


class _NoKeys:
    name = "none"

    def boot_nonce(self) -> bytes:

        return b""

    def info(self) -> dict[str, str]:
        return {"name": "none", "id": ""}

    def get_app_keys(self, tee, app_id, instance_id):  # pragma: no cover - never reached in these tests
        raise AssertionError("no boot in these tests")


@pytest.fixture
def client(teecloud_home: Path) -> TestClient:
    from teecloud.tee.simulated import SimulatedTdx

    node = Node(
        key_provider=_NoKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        runtime=FakeRuntime(),
        home=teecloud_home,
    )
    return TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)


AUTH = {"Authorization": "Bearer t0ken"}


def _compose(**extra: object) -> str:
    doc = {
        "name": "x",
        "runner": "docker-compose",
        "docker_compose_file": "services:\n  a:\n    image: x\n",
        **extra,
    }
    return normalize_app_compose(doc)


def test_public_routes_and_token(client: TestClient) -> None:
    assert client.get("/health").json() == {"ok": True}
    assert client.get("/info").json()["tee"] == "tdx-simulated"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = client.get("/cvms", headers=headers)
        assert r.status_code == 401 and "token" in r.json()["error"]
    assert client.get("/cvms", headers=AUTH).json() == []


def test_unknown_cvm_is_404_everywhere(client: TestClient) -> None:
    assert client.get("/cvms/nope", headers=AUTH).status_code == 404
    assert client.post("/cvms/nope/stop", headers=AUTH).status_code == 404
    assert client.delete("/cvms/nope", headers=AUTH).status_code == 404
    assert client.get("/cvms/nope/attestation").status_code == 404
    assert client.get("/cvms/nope/logs").status_code == 404


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"name": "a", "app_compose": "{}", "app_id": "zz"}, "app_id"),
        ({"name": "bad name", "app_compose": "{}", "app_id": "11" * 20}, "name"),
        ({"name": "a", "app_compose": "not json", "app_id": "11" * 20}, "JSON"),
        (
            {"name": "a", "app_compose": json.dumps({"b": 1, "a": 2}, indent=2), "app_id": "11" * 20},
            "normalized",
        ),
        ({"name": "a", "app_compose": _compose(runner="bash"), "app_id": "11" * 20}, "runner"),
        (
            {"name": "a", "app_compose": _compose(docker_compose_file="services: {}"), "app_id": "11" * 20},
            "services",
        ),
        ({"name": "a", "app_compose": _compose(allowed_envs="SECRET"), "app_id": "11" * 20}, "allowed_envs"),
        (
            {"name": "a", "app_compose": _compose(), "app_id": "11" * 20, "encrypted_env": "xyz"},
            "encrypted_env",
        ),
    ],
)
def test_bad_create_requests_are_400_with_a_reason(client: TestClient, body: dict, reason: str) -> None:
    r = client.post("/cvms", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]
    assert client.get("/cvms", headers=AUTH).json() == []  # nothing created


def test_a_create_refused_midway_leaves_no_half_instance(client: TestClient) -> None:
    # 40k two-byte characters: within the API's 64k-character limit, over the store's 64 KiB byte limit
    body = {"name": "a", "app_compose": _compose(), "app_id": "11" * 20, "user_config": "é" * 40_000}
    r = client.post("/cvms", json=body, headers=AUTH)
    assert r.status_code in (400, 409) and "user config" in r.json()["error"]
    # no half-written instance directory: listing still works and the name is free
    r = client.get("/cvms", headers=AUTH)
    assert r.status_code == 200 and r.json() == []
