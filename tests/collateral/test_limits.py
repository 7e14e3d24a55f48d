"""The PCCS listener under a bounded flood of idle and half-sent connections (limits: teecloud._serve.PCCS
with short timeouts): it keeps answering within 2 s, the flood's connections are closed by the read
deadline, descriptors and memory come back afterwards."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from teecloud import _serve
from teecloud.collateral import pccs_server
from tests.common.flood import assert_flood_ok, fresh_connection_client, run_flood

FAST = dataclasses.replace(_serve.PCCS, request_read_timeout_s=2.0, keep_alive_timeout_s=2.0)


@pytest.mark.slow
def test_flood_pccs() -> None:
    server = pccs_server({}, port=0, limits=FAST)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = fresh_connection_client()
    try:

        def legit() -> None:
            r = client.get(f"http://127.0.0.1:{port}/sgx/certification/v4/rootcacrl")
            assert r.status_code == 404 and "no collateral" in r.text, r.text  # served: the store is empty

        rep = run_flood(
            target=f"tcp:127.0.0.1:{port}",
            legit=legit,
            active=lambda: server.active_connections,
            idle_timeout_s=FAST.request_read_timeout_s,
        )
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)
    print(rep.summary(), server.stats)
    assert_flood_ok(rep, FAST)
    assert server.stats.evicted > 0
