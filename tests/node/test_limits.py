"""The node API under a bounded flood of idle and half-sent connections (limits: teecloud._serve.NODE_API,
with short timeouts so the test is quick): /health keeps answering within 2 s, the flood's connections are
closed by the read deadline, descriptors and memory come back afterwards."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from teecloud import _serve
from teecloud.node.service import Node, NodeServer
from teecloud.tee.simulated import SimulatedTdx
from tests.common.flood import assert_flood_ok, fresh_connection_client, run_flood
from tests.node.fakes import FakeRuntime
from tests.robustness.test_node_api import _NoKeys

FAST = dataclasses.replace(_serve.NODE_API, request_read_timeout_s=2.0, keep_alive_timeout_s=2.0)


def test_node_server_uses_the_named_limits(teecloud_home: Path) -> None:
    node = Node(key_provider=_NoKeys(), tee_factory=lambda: SimulatedTdx(teecloud_home), home=teecloud_home)
    server = NodeServer(node, token="t0ken")
    assert server.limits is _serve.NODE_API
    assert server._server.config.timeout_keep_alive == _serve.NODE_API.keep_alive_timeout_s


@pytest.mark.slow
def test_flood_node_api(teecloud_home: Path) -> None:
    node = Node(
        key_provider=_NoKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        runtime=FakeRuntime(),
        home=teecloud_home,
    )
    server = NodeServer(node, token="t0ken", limits=FAST).start()
    client = fresh_connection_client()
    try:

        def legit() -> None:
            r = client.get(server.url + "/health")
            assert r.status_code == 200, r.text

        rep = run_flood(
            target=f"tcp:127.0.0.1:{server.port}",
            legit=legit,
            active=lambda: server._server.active_connections,
            idle_timeout_s=FAST.request_read_timeout_s,
        )
    finally:
        client.close()
        server.stop()
    print(rep.summary(), server._server.stats)
    assert_flood_ok(rep, FAST)
    assert server._server.stats.evicted > 0
