"""Node API: fuzzed and hostile requests get a 4xx {"error"}, never a 5xx; a refused create/upgrade leaves the
instance list (and the instance's files) unchanged; the node keeps serving."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from teecloud.agent.boot import normalize_app_compose
from teecloud.node.service import Node, make_node_app
from teecloud.tee.simulated import SimulatedTdx
from tests.node.fakes import FakeRuntime
from tests.robustness._fuzz import run_hostile, run_schemathesis

AUTH = {"Authorization": "Bearer t0ken"}


class _NoKeys:
    """Boots fail at the key step; these tests never need a running CVM."""

    name = "none"

    def boot_nonce(self) -> bytes:

        return b""

    def info(self) -> dict[str, str]:
        return {"name": "none", "id": ""}

    def get_app_keys(self, tee: Any, app_id: bytes, instance_id: bytes) -> Any:
        raise RuntimeError("no keys in the robustness tests")


@pytest.fixture
def node(teecloud_home: Path) -> Node:
    # a fake runtime: create checks images through the runtime, and the fuzzed routes must not need dockerd
    return Node(
        key_provider=_NoKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        runtime=FakeRuntime(),
        home=teecloud_home,
    )


def _snapshot(node: Node) -> Any:
    """Every instance with the hash of each file in its directory."""
    out = {}
    for inst in node.store.all():
        files = sorted(p for p in inst.dir.rglob("*") if p.is_file() and p.name != "state.json")
        out[inst.instance_id] = {
            str(p.relative_to(inst.dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
        }
    return out


def _compose(**extra: object) -> str:
    doc = {"name": "x", "runner": "docker-compose", "docker_compose_file": "services:\n  a:\n    image: x\n"}
    return normalize_app_compose({**doc, **extra})


def _fill(existing: str) -> Any:
    return lambda p: p.replace("{ref}", existing).replace("{action}", "frobnicate")


def test_schemathesis_finds_no_5xx_and_refusals_change_nothing(node: Node) -> None:
    app = make_node_app(node, token="t0ken")
    problems = run_schemathesis(app, max_examples=20, headers=AUTH, snapshot=lambda: _snapshot(node))
    assert problems == []
    c = TestClient(app)
    assert c.get("/health").json() == {"ok": True}
    assert c.get("/cvms", headers=AUTH).status_code == 200


def test_hostile_matrix_with_an_existing_cvm(node: Node) -> None:
    app = make_node_app(node, token="t0ken")
    c = TestClient(app, raise_server_exceptions=False)
    r = c.post("/cvms", json={"name": "victim", "app_compose": _compose(), "app_id": "11" * 20}, headers=AUTH)
    assert r.status_code == 200, r.text
    node.wait_all(30)
    iid = r.json()["instance_id"]
    before = _snapshot(node)
    # everything but DELETE first (a DELETE with any body removes the victim, as it should)
    n, problems = run_hostile(
        c, app, _fill(iid), headers=AUTH, snapshot=lambda: _snapshot(node), only=lambda m, p: m != "DELETE"
    )
    assert n > 200
    assert problems == []
    assert _snapshot(node) == before
    # the unauthenticated side: same rules, nothing changes
    _, problems = run_hostile(c, app, _fill("victim"), snapshot=lambda: _snapshot(node))
    assert problems == []
    assert _snapshot(node) == before
    _, problems = run_hostile(c, app, _fill(iid), headers=AUTH, only=lambda m, p: m == "DELETE")
    assert problems == []
    assert _snapshot(node) == {}
    assert c.get("/health").json() == {"ok": True}


def test_refused_creates_leave_the_instance_list_unchanged(node: Node) -> None:
    c = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    ok = {"name": "a", "app_compose": _compose(), "app_id": "11" * 20}
    bad = [
        {**ok, "app_compose": "[" * 100_000 + "]" * 100_000},
        {
            **ok,
            "app_compose": _compose(docker_compose_file="services: {a: " + "[" * 20_000 + "]" * 20_000 + "}"),
        },
        {**ok, "app_compose": '{"name":"\\ud800"}'},
        {**ok, "app_id": "zz"},
        {**ok, "encrypted_env": "0"},
        {**ok, "memory_mb": 1},
        {**ok, "extra": True},
    ]
    for body in bad:
        r = c.post("/cvms", json=body, headers=AUTH)
        assert r.status_code == 400, (str(body)[:80], r.text[:200])
        assert r.json()["error"]
        assert c.get("/cvms", headers=AUTH).json() == []
        assert _snapshot(node) == {}


# -- regressions ------------------------------------------------------------------------------------------


def test_deeply_nested_app_compose_is_400(node: Node) -> None:
    """Was a 500 "Internal Server Error" (RecursionError in json.loads)."""
    c = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    body = {"name": "a", "app_compose": "[" * 5000 + "]" * 5000, "app_id": "11" * 20}
    r = c.post("/cvms", json=body, headers=AUTH)
    assert r.status_code == 400 and "nests deeper" in r.json()["error"]


@pytest.mark.parametrize(
    "yml",
    [
        "services: {a: " + "[" * 5000 + "]" * 5000 + "}",
        "services:\n  a:\n    image: x\n    command:\n" + "      " + "- " * 5000 + "x\n",
    ],
)
def test_deeply_nested_compose_yaml_is_400(node: Node, yml: str) -> None:
    """Was a 500 (RecursionError in PyYAML's composer) or, once py-evm had raised the recursion limit, many
    seconds of CPU per request."""
    c = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    r = c.post(
        "/cvms",
        json={"name": "a", "app_compose": _compose(docker_compose_file=yml), "app_id": "11" * 20},
        headers=AUTH,
    )
    assert r.status_code == 400 and "nests deeper than 64" in r.json()["error"]


def test_lone_surrogate_in_app_compose_is_400(node: Node) -> None:
    c = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    text = json.dumps(
        {"docker_compose_file": "services:\n  a:\n    image: x\n", "name": "\ud800"},
        sort_keys=True,
        separators=(",", ":"),
    )
    r = c.post("/cvms", json={"name": "a", "app_compose": text, "app_id": "11" * 20}, headers=AUTH)
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("PUT", "/cvms", 405), ("PATCH", "/health", 405), ("GET", "/cvms/a/b/c", 404)],
)
def test_unknown_routes_and_methods_use_the_error_shape(
    node: Node, method: str, path: str, status: int
) -> None:
    """Were FastAPI's {"detail": ...}."""
    r = TestClient(make_node_app(node, token="t0ken")).request(method, path, headers=AUTH)
    assert r.status_code == status and r.json()["error"]


@pytest.mark.parametrize(
    ("content", "ctype", "needle"),
    [
        (b"\xb7\xca", "application/json", "error parsing the body"),  # was FastAPI's {"detail"}
        (b"{", "application/json", "not valid JSON"),
        (b"[1]", "application/json", "JSON object"),
        (b'{"a":1}', "text/plain", "JSON object"),
    ],
)
def test_body_errors_say_what_is_wrong(node: Node, content: bytes, ctype: str, needle: str) -> None:
    """Were "invalid request: : Input should be a valid dictionary ..." and "... 1: JSON decode error"."""
    r = TestClient(make_node_app(node, token="t0ken")).post(
        "/cvms", content=content, headers={**AUTH, "content-type": ctype}
    )
    assert r.status_code == 400 and needle in r.json()["error"]


@pytest.mark.parametrize("env", ["0", "abc", "0x00"])
def test_odd_length_encrypted_env_is_400(node: Node, env: str) -> None:
    """ "0" matched the old pattern [0-9a-fA-F]*, then bytes.fromhex raised: a 500 on create and upgrade."""
    c = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    body = {"name": "a", "app_compose": _compose(), "app_id": "11" * 20, "encrypted_env": env}
    r = c.post("/cvms", json=body, headers=AUTH)
    assert r.status_code == 400 and "encrypted_env" in r.json()["error"]
    assert _snapshot(node) == {}
    r = c.post("/cvms", json={**body, "encrypted_env": None}, headers=AUTH)
    assert r.status_code == 200
    node.wait_all(30)
    iid = r.json()["instance_id"]
    before = _snapshot(node)
    r = c.post(f"/cvms/{iid}/upgrade", json={"app_compose": _compose(), "encrypted_env": env}, headers=AUTH)
    assert r.status_code == 400 and "encrypted_env" in r.json()["error"]
    assert _snapshot(node) == before
