"""cloud.deploy.upgrade against the embedded chain and a recording node: the chain is checked before the node
is touched; a hash still pending under the app's timelock never reaches the node (the current version keeps
running); --commit executes the call once it may run and rolls out; a failed rollout is returned to the
previous compose; allowed envs are merged."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from teecloud.chain import ChainClient
from teecloud.cloud.deploy import build_app_compose, upgrade
from teecloud.cloud.options import AppOptions
from teecloud.node.api import CvmStatus

V1 = "services:\n  web:\n    image: x\n    environment:\n      - V=1\n"
V2 = "services:\n  web:\n    image: x\n    environment:\n      - V=2\n"


class RecordingNode:
    """The node API's client, recording what it is asked; `fail_next` makes the next rollout fail."""

    def __init__(self, app_id: str, app_compose: bytes) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_next = False
        self.st = CvmStatus(
            instance_id="ab" * 20,
            name="shop",
            app_id=app_id.removeprefix("0x").lower(),
            compose_hash=hashlib.sha256(app_compose).hexdigest(),
            status="running",
            app_compose=app_compose.decode(),
        )

    def get(self, ref: str) -> CvmStatus:
        return self.st

    def check(self, req: Any) -> None:
        self.calls.append(("check", None))

    def upgrade(self, ref: str, req: Any) -> CvmStatus:
        self.calls.append(("upgrade", json.loads(req.app_compose)))
        failed = self.fail_next
        self.fail_next = False
        raw = req.app_compose.encode()
        self.st = self.st.model_copy(
            update={
                "app_compose": req.app_compose,
                "compose_hash": hashlib.sha256(raw).hexdigest(),
                "status": "failed" if failed else "running",
                "error": "container exited with code 3" if failed else "",
            }
        )
        return self.st

    def wait(self, instance_id: str, **kw: Any) -> CvmStatus:
        return self.st

    def upgrades(self) -> list[Any]:
        return [c[1] for c in self.calls if c[0] == "upgrade"]


@pytest.fixture
def chain(teecloud_home: Path) -> Iterator[ChainClient]:
    with ChainClient.embedded(teecloud_home) as c:
        c.deploy()
        yield c


def _files(tmp_path: Path) -> tuple[Path, Path]:
    v1, v2 = tmp_path / "v1.yml", tmp_path / "v2.yml"
    v1.write_text(V1)
    v2.write_text(V2)
    return v1, v2


def _app(chain: ChainClient, owner: str | None, allowed_envs: list[str]) -> tuple[str, RecordingNode, Any]:
    compose, h = build_app_compose(V1, name="shop", allowed_envs=allowed_envs)
    app_id = chain.register_app(owner, h)
    node = RecordingNode(app_id, compose)
    return app_id, node, SimpleNamespace(chain=chain, node=node)


def test_a_pending_hash_never_reaches_the_node(chain: ChainClient, tmp_path: Path) -> None:
    _, v2 = _files(tmp_path)
    tl = chain.deploy_timelock(chain.address, 3600)
    app_id, node, session = _app(chain, tl, ["DB"])
    before = node.st.compose_hash
    r = upgrade(session, "shop", v2, AppOptions.build(), verify=False)
    assert r.status == "pending" and r.pending is not None and r.pending.kind == "timelock"
    assert r.previous_compose_hash == before and node.upgrades() == []  # the running version is untouched
    # again, and with --commit before the ETA: still nothing sent to the node, no second queued call
    r = upgrade(session, "shop", v2, AppOptions.build(), commit=True, verify=False)
    assert r.status == "pending" and node.upgrades() == [] and r.done == []
    assert not chain.is_compose_hash_allowed(app_id, bytes.fromhex(r.compose_hash))
    chain.increase_time(3601)
    r = upgrade(session, "shop", v2, AppOptions.build(), commit=True, verify=False)
    assert r.status == "running" and [d for d in r.done if d.startswith("executed timelock")]
    (sent,) = node.upgrades()
    assert sent["docker_compose_file"] == V2 and sent["allowed_envs"] == ["DB"]  # allowed envs kept


def test_without_commit_an_executable_call_is_not_run(chain: ChainClient, tmp_path: Path) -> None:
    _, v2 = _files(tmp_path)
    tl = chain.deploy_timelock(chain.address, 60)
    _, node, session = _app(chain, tl, [])
    assert upgrade(session, "shop", v2, AppOptions.build(), verify=False).status == "pending"
    chain.increase_time(61)
    r = upgrade(session, "shop", v2, AppOptions.build(), verify=False)
    assert r.status == "pending" and r.pending is not None and r.pending.executable
    assert node.upgrades() == []


def test_failed_rollout_returns_to_the_previous_compose(chain: ChainClient, tmp_path: Path) -> None:
    _, v2 = _files(tmp_path)
    _, node, session = _app(chain, None, ["DB"])
    old = node.st.app_compose
    node.fail_next = True
    r = upgrade(session, "shop", v2, AppOptions.build(), verify=False)
    assert r.status == "rolled-back" and "exited with code 3" in r.error
    first, second = node.upgrades()
    assert (
        first["docker_compose_file"] == V2
        and json.dumps(second, separators=(",", ":"), sort_keys=True) == old
    )
    assert node.st.status == "running" and node.st.app_compose == old


def test_allowed_envs_merge_and_replace_on_upgrade(chain: ChainClient, tmp_path: Path) -> None:
    _, v2 = _files(tmp_path)
    _, node, session = _app(chain, None, ["DB", "TOKEN"])
    warnings: list[str] = []
    r = upgrade(
        session,
        "shop",
        v2,
        AppOptions.build(allowed_envs=["NEW"]),
        verify=False,
        progress=lambda phase, d: warnings.append(d) if phase == "warning" else None,
    )
    assert r.status == "running" and node.upgrades()[-1]["allowed_envs"] == ["DB", "NEW", "TOKEN"]
    assert warnings == []
    v3 = tmp_path / "v3.yml"
    v3.write_text(V2.replace("V=2", "V=3"))
    r = upgrade(
        session,
        "shop",
        v3,
        AppOptions.build(allowed_envs=["NEW"], replace_allowed_envs=True),
        verify=False,
        progress=lambda phase, d: warnings.append(d) if phase == "warning" else None,
    )
    assert node.upgrades()[-1]["allowed_envs"] == ["NEW"]
    assert len(warnings) == 2 and all("no longer in allowed_envs" in w for w in warnings)


def test_the_running_version_again_is_nothing_to_do(chain: ChainClient, tmp_path: Path) -> None:
    v1, _ = _files(tmp_path)
    _, node, session = _app(chain, None, [])
    r = upgrade(session, "shop", v1, AppOptions.build(), verify=False)
    assert r.status == "unchanged" and node.calls == []
