"""The chain's JSON-RPC server (a ThreadingHTTPServer) under a bounded flood of idle and half-sent
connections (limits: teecloud._serve.CHAIN_RPC with short timeouts): a thread per connection only up to the
cap, eth_blockNumber keeps answering within 2 s, the flood's connections are cut by the reaper's deadline,
descriptors and memory come back afterwards."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from teecloud import _serve
from teecloud.chain import ChainRpcServer, EmbeddedChain
from tests.common.flood import assert_flood_ok, fresh_connection_client, run_flood

FAST = dataclasses.replace(_serve.CHAIN_RPC, request_read_timeout_s=2.0, keep_alive_timeout_s=2.0)
ASK = {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []}


@pytest.mark.slow
def test_flood_chain_rpc(teecloud_home: Path) -> None:
    chain = EmbeddedChain(teecloud_home / "chain")
    server = ChainRpcServer(chain, limits=FAST).start()
    client = fresh_connection_client()
    threads_before = threading.active_count()
    peak_threads = [0]
    try:

        def legit() -> None:
            r = client.post(server.url, json=ASK)
            assert r.status_code == 200 and "result" in r.json(), r.text
            peak_threads[0] = max(peak_threads[0], threading.active_count())

        def active() -> int:
            peak_threads[0] = max(peak_threads[0], threading.active_count())
            return server.httpd.active_connections

        rep = run_flood(
            target=f"tcp:127.0.0.1:{server.port}",
            legit=legit,
            active=active,
            idle_timeout_s=FAST.request_read_timeout_s,
        )
    finally:
        client.close()
        server.stop()
    print(rep.summary(), server.httpd.stats, f"threads {threads_before} -> peak {peak_threads[0]}")
    assert_flood_ok(rep, FAST)
    assert server.httpd.stats.evicted > 0
    assert peak_threads[0] <= threads_before + FAST.max_connections + 2  # bounded threads
