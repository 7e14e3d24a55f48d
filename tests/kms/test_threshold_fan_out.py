"""The provider's shared fan-out pool (`threshold_client._FanOut`, review 10 R10-1): a node whose earlier
calls still run may hold at most `per_node` threads; its next call fails at once as its fault, and a thread
it held is given back when that call ends. Since n · per_node ≤ the pool's threads, a call is never queued
behind another node's held threads."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold_client import _FanOut


def test_a_node_past_its_share_of_the_pool_fails_at_once_and_gets_it_back_when_a_call_ends() -> None:
    fan = _FanOut(nodes=4, workers=8)
    assert fan.per_node == 2
    gate = threading.Event()

    def held(_client: Any) -> str:
        gate.wait(10)
        return "late"

    try:
        first = [fan.submit(1, held, None) for _ in range(2)]  # type: ignore[arg-type]
        refused = fan.submit(1, held, None)  # type: ignore[arg-type]
        assert refused.done()
        with pytest.raises(KmsClientError, match="KMS node 1: 2 earlier calls to it are still running"):
            refused.result()
        # another node is not affected by node 1's held threads
        assert fan.submit(2, lambda _c: "at once", None).result(timeout=5) == "at once"  # type: ignore[arg-type]
        gate.set()
        assert [f.result(timeout=5) for f in first] == ["late", "late"]
        # both threads given back: node 1 is asked again
        assert fan.submit(1, lambda _c: "again", None).result(timeout=5) == "again"  # type: ignore[arg-type]
    finally:
        gate.set()
        fan.shutdown()
