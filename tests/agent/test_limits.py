"""The guest agent's dstack.sock under a bounded flood of idle and half-sent connections (limits:
teecloud._serve.AGENT with short timeouts): Info keeps answering within 2 s, the flood's connections are
closed by the read deadline, descriptors and memory come back afterwards."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from teecloud import _serve
from teecloud.agent.runner import AgentRunner
from tests.common.flood import assert_flood_ok, run_flood

FAST = dataclasses.replace(_serve.AGENT, request_read_timeout_s=2.0, keep_alive_timeout_s=2.0)


def test_agent_runner_uses_the_named_limits(booted, sockdir) -> None:
    runner = AgentRunner(booted, dstack_sock=sockdir / "dstack.sock")
    assert runner.serve_limits is _serve.AGENT


@pytest.mark.slow
def test_flood_dstack_sock(booted, sockdir) -> None:
    sock = sockdir / "dstack.sock"
    runner = AgentRunner(booted, dstack_sock=sock, serve_limits=FAST).start()
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)),
        timeout=5,
        limits=httpx.Limits(max_keepalive_connections=0),
    )
    try:

        def legit() -> None:
            r = client.get("http://localhost/Info")
            assert r.status_code == 200, r.text

        server = runner._servers[0]
        rep = run_flood(
            target=f"unix:{sock}",
            legit=legit,
            active=lambda: server.active_connections,
            idle_timeout_s=FAST.request_read_timeout_s,
        )
    finally:
        client.close()
        runner.stop()
    print(rep.summary(), server.stats)
    assert_flood_ok(rep, FAST)
    assert server.stats.evicted > 0
