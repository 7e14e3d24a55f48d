"""The compose policy runs at create, before anything is registered or any key is fetched (issue 10, F6),
and bounds YAML aliases before anything walks the document (F5)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from teecloud.appcompose import normalize_app_compose
from teecloud.cloud import deploy as deploy_mod
from teecloud.node.api import CreateCvmRequest, NodeClient
from teecloud.node.compose import MAX_YAML_ALIASES, MAX_YAML_NODES, load_compose
from teecloud.node.errors import ComposeRejected
from teecloud.node.service import Node, make_node_app
from teecloud.tee.simulated import SimulatedTdx
from tests.node.fakes import FakeRuntime

AUTH = {"Authorization": "Bearer t0ken"}


def billion_laughs(levels: int = 9) -> str:
    """The classic shape: each level a list of nine aliases of the level below (9**levels strings)."""
    lines = ['x-l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"x-l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    lines.append("services:\n  a:\n    image: x\n    labels:\n      boom: *l" + str(levels))
    return "\n".join(lines) + "\n"


class CountingKeys:
    """Counts every key request (the KMS stand-in: a refusal at create must never reach it)."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def boot_nonce(self) -> bytes:

        return b""

    def info(self) -> dict[str, str]:
        return {"name": "counting", "id": ""}

    def get_app_keys(self, tee: Any, app_id: bytes, instance_id: bytes) -> Any:
        self.calls += 1
        raise RuntimeError("no keys in this test")


def _app(compose_text: str) -> str:
    return normalize_app_compose(
        {"name": "x", "runner": "docker-compose", "docker_compose_file": compose_text}
    )


# --------------------------------------------------------------------------------------------- F5: aliases


def test_billion_laughs_is_refused_by_its_expanded_size() -> None:
    text = billion_laughs()
    assert len(text) < 1024
    with pytest.raises(ComposeRejected, match=f"more than {MAX_YAML_NODES} YAML nodes"):
        load_compose(text)


def test_many_aliases_are_refused() -> None:
    text = "x-a: &a 1\nx-b: [" + ", ".join(["*a"] * (MAX_YAML_ALIASES + 1)) + "]\n"
    with pytest.raises(ComposeRejected, match="aliases"):
        load_compose(text + "services:\n  a:\n    image: x\n")


def test_ordinary_anchors_and_merge_keys_still_work() -> None:
    doc = load_compose(
        "x-common: &common\n  restart: unless-stopped\n  environment: {A: '1'}\n"
        "services:\n  a:\n    <<: *common\n    image: x\n  b:\n    <<: *common\n    image: y\n"
    )
    assert doc["services"]["b"]["restart"] == "unless-stopped" and doc["services"]["a"]["image"] == "x"


def test_billion_laughs_through_the_node_api_is_a_clear_400(teecloud_home: Path) -> None:
    keys = CountingKeys()
    node = Node(
        key_provider=keys,
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        runtime=FakeRuntime(),
        home=teecloud_home,
    )
    client = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    body = {"name": "a", "app_compose": _app(billion_laughs()), "app_id": "11" * 20}
    r = client.post("/cvms", json=body, headers=AUTH)
    assert r.status_code == 400 and "aliases are expanded" in r.json()["error"]
    assert node.store.all() == [] and keys.calls == 0


# ------------------------------------------------------------------------------- F6: refusals at create

REFUSED = [
    ("services:\n  a:\n    image: x\n    volumes: ['/:/host']\n", "host path '/'"),
    (
        "services:\n  a:\n    image: x\n    volumes: ['/var/run/docker.sock:/var/run/docker.sock']\n",
        "Docker socket",
    ),
    (
        "services:\n  a:\n    image: x\n    volumes: [{type: bind, source: /etc, target: /etc}]\n",
        "host path '/etc'",
    ),
    ("services:\n  a:\n    image: x\n    ports: ['0.0.0.0:8080:80']\n", "on 0.0.0.0"),
    ("services:\n  a:\n    image: x\n    ports: ['[::]:8080:80']\n", "IPv6"),
    ("services:\n  a:\n    image: x\n    ports: [{target: 80, published: 8080, host_ip: '::'}]\n", "on ::"),
    ("services:\n  a:\n    image: x\n    volumes: ['d:/d']\nvolumes:\n  d: {external: true}\n", "external"),
    ("services:\n  a:\n    image: x\nnetworks:\n  n: {external: true}\n", "external"),
    ("services:\n  a:\n    image: x\nnetworks:\n  n: {driver: macvlan}\n", "macvlan"),
    ("services:\n  a:\n    image: x\n    volumes: ['nodecl:/d']\n", "not declared"),
    (
        "services:\n  a:\n    image: x\nvolumes:\n  d: {driver_opts: {type: none, o: bind, device: /}}\n",
        "driver_opts",
    ),
    ("services:\n  a:\n    image: not-on-this-node\n", "not on this node"),
]


@pytest.mark.parametrize(("compose_text", "reason"), REFUSED)
def test_each_refusal_happens_at_create_with_nothing_registered(
    teecloud_home: Path, compose_text: str, reason: str
) -> None:
    keys = CountingKeys()
    runtime = FakeRuntime()
    node = Node(
        key_provider=keys,
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        runtime=runtime,
        home=teecloud_home,
    )
    client = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    body = {"name": "a", "app_compose": _app(compose_text), "app_id": "11" * 20}
    r = client.post("/cvms", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]
    node.wait_all(5)
    # nothing written, nothing booted, no key asked for, nothing handed to the runtime beyond the image check
    assert node.store.all() == [] and keys.calls == 0
    assert [c for c, _ in runtime.calls if c != "check_images"] == []
    assert not (node.store.root.exists() and any(node.store.root.iterdir()))


class CountingChain:
    """The chain stand-in of a deploy: any registration is recorded (a refused deploy must make none)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def register_app(self, *a: Any, **kw: Any) -> str:
        self.calls.append("register_app")
        return "0x" + "22" * 20

    def is_compose_hash_allowed(self, *a: Any) -> bool:
        self.calls.append("is_compose_hash_allowed")
        return False

    def add_compose_hash(self, *a: Any) -> None:
        self.calls.append("add_compose_hash")


def _session(node: Node) -> Any:
    client = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    return SimpleNamespace(
        chain=CountingChain(),
        node=NodeClient("http://node", "t0ken", transport=client._transport),  # type: ignore[attr-defined]
        kms_client=lambda: pytest.fail("the KMS must not be asked"),
    )


@pytest.mark.parametrize(("compose_text", "reason"), REFUSED)
def test_deploy_is_refused_before_the_chain(
    teecloud_home: Path, tmp_path: Path, compose_text: str, reason: str
) -> None:
    keys = CountingKeys()
    node = Node(
        key_provider=keys,
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        runtime=FakeRuntime(),
        home=teecloud_home,
    )
    session = _session(node)
    path = tmp_path / "docker-compose.yml"
    path.write_text(compose_text)
    with pytest.raises(deploy_mod.DeployError, match=reason.replace("[", r"\[")):
        deploy_mod.deploy(session, path, name="a", verify=False)
    assert session.chain.calls == [] and keys.calls == 0 and node.store.all() == []


def test_deploy_checks_the_name_is_free_before_registering(teecloud_home: Path, tmp_path: Path) -> None:
    node = Node(
        key_provider=CountingKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        runtime=FakeRuntime(),
        home=teecloud_home,
    )
    text = "services:\n  a:\n    image: x\n"
    node.store.create(
        app_compose=_app(text).encode(),
        app_id=b"\x11" * 20,
        name="hello",
        encrypted_env=None,
        user_config=None,
        sys_config={},
        limits=node._limits(None, None),
    )
    session = _session(node)
    path = tmp_path / "docker-compose.yml"
    path.write_text(text)
    with pytest.raises(deploy_mod.DeployError, match="named 'hello' already exists"):
        deploy_mod.deploy(session, path, name="hello", verify=False)
    assert session.chain.calls == []  # nothing registered on chain for an app that cannot be created


# ---------------------------------------------------------------------------- default memory limit


def test_an_app_without_a_memory_limit_gets_the_nodes_default(teecloud_home: Path) -> None:
    node = Node(
        key_provider=CountingKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        runtime=FakeRuntime(),
        home=teecloud_home,
        memory_mb=4096,
    )
    assert node.default_memory_mb == 1024
    st = node.create(
        CreateCvmRequest(name="a", app_compose=_app("services:\n  a:\n    image: x\n"), app_id="11" * 20)
    )
    assert node.store.get(st.instance_id).limits().memory_mb == 1024
    st = node.create(
        CreateCvmRequest(
            name="b", app_compose=_app("services:\n  a:\n    image: x\n"), app_id="11" * 20, memory_mb=300
        )
    )
    assert node.store.get(st.instance_id).limits().memory_mb == 300  # the deployment's own limit wins
    client = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    body = {"name": "c", "app_compose": _app("services:\n  a:\n    image: x\n"), "app_id": "11" * 20}
    r = client.post("/cvms", json={**body, "memory_mb": 5000}, headers=AUTH)
    assert r.status_code == 400 and "above this node's memory" in r.json()["error"]
    node.wait_all(10)
    # a default node takes its size from the host
    assert (
        Node(
            key_provider=CountingKeys(), tee_factory=lambda: SimulatedTdx(teecloud_home), home=teecloud_home
        ).default_memory_mb
        >= 64
    )


def test_an_instance_created_without_a_cap_boots_with_the_default(
    teecloud_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teecloud.node.runtime.base import ResourceLimits
    from tests.node.fakes import FakeBoots, make_node

    node = make_node(teecloud_home, FakeRuntime(), FakeBoots(), monkeypatch)
    inst = node.store.create(  # as an older node wrote it: no memory cap
        app_compose=_app("services:\n  a:\n    image: x\n").encode(),
        app_id=b"\x11" * 20,
        name="old",
        encrypted_env=None,
        user_config=None,
        sys_config={},
        limits=ResourceLimits(),
    )
    assert inst.limits().memory_mb is None
    node.resume()
    node.wait_all(10)
    assert inst.limits().memory_mb == node.default_memory_mb
