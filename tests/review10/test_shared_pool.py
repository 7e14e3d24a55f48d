"""Review 10: t19-perf's one thread pool per provider (`threshold_client._FanOut`, at most
FAN_OUT_WORKERS = 64 threads, reused across rounds and boots; a call abandoned by the hedge keeps its
thread until its client's own timeout).

Held: answers never cross between concurrent boots (each `_gather` keys results by its own futures).

FINDING R10-1, fixed: one slow node held a pool thread per boot that asked it (the hedge abandons the
call, it runs on); the 65th boot within that node's hold time found every thread taken, its calls to the
four healthy nodes queued behind the abandoned ones, and it waited until the slow node's calls ended, not
hedge_s (httpx's read timeout is per read: a node that sends a byte before each read timeout held a thread
without limit). Now `_FanOut` lets each node hold at most FAN_OUT_WORKERS // n threads; past that a call
to it fails at once as its fault and the round asks another node, never another boot's wait."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from teecloud.kms import threshold_client as tc
from teecloud.kms.threshold_client import ThresholdKeyProvider

HEDGE_S = 0.05


class _Node:
    def __init__(self, index: int, gate: threading.Event | None = None) -> None:
        self.index, self.gate = index, gate


def _provider(gate: threading.Event) -> ThresholdKeyProvider:
    """A provider with its fan-out state only (`_gather` needs nothing else): node 1 answers only when `gate`
    opens (a node that holds its answer back), nodes 2..5 answer at once."""
    p = object.__new__(ThresholdKeyProvider)
    p._clients = {1: _Node(1, gate), **{i: _Node(i) for i in range(2, 6)}}  # type: ignore[dict-item]
    p._hedge_s = HEDGE_S
    p._fan = tc._FanOut(5)
    return p


def _evaluate(tag: int) -> Any:
    def call(node: _Node) -> tuple[int, int]:
        if node.gate is not None:
            node.gate.wait(30)
        return tag, node.index

    return call


def _boot(p: ThresholdKeyProvider, tag: int) -> dict[int, Any]:
    """One boot's evaluation round as `_app_keys` runs it: t = 3 of 5, the first t nodes first."""
    return p._gather(
        [1, 2, 3, 4, 5], _evaluate(tag), lambda _i, a: isinstance(a, tuple), need=3, all_first=False
    )


def test_answers_never_cross_between_concurrent_boots() -> None:
    """Sixteen boots share the pool at once (node 1 open): every boot gets its own answers only."""
    gate = threading.Event()
    gate.set()
    p = _provider(gate)
    try:
        with ThreadPoolExecutor(max_workers=16) as boots:
            got = dict(zip(range(16), boots.map(lambda k: _boot(p, k), range(16)), strict=True))
        for tag, results in got.items():
            answers = {i: r for i, r in results.items() if not isinstance(r, Exception)}
            assert len(answers) >= 3  # a node past its share of the pool is refused at once, never crossed
            assert all(r == (tag, i) for i, r in answers.items()), (tag, results)
    finally:
        p._fan.shutdown()


def test_one_slow_node_does_not_stall_later_boots_beyond_the_hedge() -> None:
    """Boot after boot leaves node 1's call running (the hedge abandons it; 2, 3 and 4 answer at once). Each
    of FAN_OUT_WORKERS + 1 such boots must end in about hedge_s (3 s allowed), as with a pool per round."""
    gate = threading.Event()
    p = _provider(gate)
    try:
        for k in range(tc.FAN_OUT_WORKERS + 1):
            done = threading.Event()
            box: dict[str, Any] = {}

            def boot(tag: int = k, box: dict[str, Any] = box, done: threading.Event = done) -> None:
                box["results"] = _boot(p, tag)
                done.set()

            threading.Thread(target=boot, daemon=True).start()
            assert done.wait(3.0), f"boot {k + 1} still waits after 3 s: the shared pool is taken by node 1"
            assert len(box["results"]) >= 3
    finally:
        gate.set()  # node 1 answers at last: the abandoned calls end, a stalled boot ends
        p._fan.shutdown()
