"""Node bounds and engine errors: a failing container engine is a named 502, an absent one 503 (never a bare
500); a full node refuses more CVMs before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from teecloud.node.api import CreateCvmRequest
from teecloud.node.errors import RuntimeFailed, RuntimeUnavailable
from teecloud.node.service import make_node_app
from tests.node.fakes import FakeBoots, FakeRuntime, app_compose, make_node


class BrokenLogs(FakeRuntime):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def logs(self, *_a: Any, **_k: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "needle"),
    [
        (RuntimeFailed("docker logs exited 1"), 502, "container engine failed"),
        (RuntimeUnavailable("the Docker engine is not reachable"), 503, "not reachable"),
    ],
)
def test_engine_errors_map_to_gateway_statuses(
    teecloud_home: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, needle: str
) -> None:
    node = make_node(teecloud_home, BrokenLogs(error), FakeBoots(), monkeypatch)
    st = node.create(CreateCvmRequest(name="hello", app_compose=app_compose(), app_id="11" * 20))
    node.wait_all(30)
    client = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    r = client.get(f"/cvms/{st.instance_id}/logs", headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_a_full_node_refuses_more_cvms_before_anything_is_written(
    teecloud_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teecloud.node.errors import InstanceStateError

    node = make_node(teecloud_home, FakeRuntime(), FakeBoots(), monkeypatch)
    node.max_cvms = 2
    for i in range(2):
        node.create(CreateCvmRequest(name=f"a{i}", app_compose=app_compose(), app_id="11" * 20))
    with pytest.raises(InstanceStateError, match="maximum of 2 CVMs"):
        node.create(CreateCvmRequest(name="a2", app_compose=app_compose(), app_id="11" * 20))
    assert len(node.store.all()) == 2
    client = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    body = {"name": "a3", "app_compose": app_compose()}
    r = client.post("/cvms/check", json=body, headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == 409 and "maximum" in r.json()["error"]
