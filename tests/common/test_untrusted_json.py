"""Deeply nested JSON must be refused, not crash the process.

py_ecc (imported under the chain client) raises the recursion limit to 100,000, where CPython's C JSON
decoder overflows the C stack; teecloud brings it back down (teecloud._serve.clamp_recursion_limit), and
the parsers below refuse deep nesting before any recursion anyway.
"""

from __future__ import annotations

import eth  # noqa: F401  (raises sys.getrecursionlimit() as a side effect, like the real services)
import httpx
import pytest
from fastapi import FastAPI

from teecloud import _json
from teecloud._asgi import BoundedBody
from teecloud.attestation import eventlog
from teecloud.attestation.errors import MalformedEvidence

DEEP = "[" * 200_000


def test_recursion_limit_is_brought_back_once_the_chain_client_is_imported() -> None:
    """py_ecc raises the limit to 100 000 at import; teecloud.chain (and every listener) clamps it back to
    py-evm's own 12 288 (tests/robustness/test_recursion_limit.py checks it in fresh processes)."""
    import sys

    import teecloud.chain  # noqa: F401

    assert sys.getrecursionlimit() <= 1024 * 12


def test_loads_refuses_deep_nesting() -> None:
    with pytest.raises(_json.JsonTooDeep):
        _json.loads(DEEP)
    # brackets inside strings don't count; ordinary documents pass
    assert _json.loads('{"a": "[[[[[[[[", "b": [1, [2, {"c": []}]]}')["b"][1][1] == {"c": []}


def test_event_log_parser_refuses_deep_nesting() -> None:
    with pytest.raises(MalformedEvidence):
        eventlog.parse_event_log(DEEP)


async def test_bounded_body_middleware() -> None:
    app = FastAPI()
    app.add_middleware(BoundedBody, max_bytes=300_000)

    @app.post("/echo")
    async def echo(body: dict[str, object]) -> dict[str, object]:
        return body

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ok = await client.post("/echo", json={"x": [1, [2]]})
        assert ok.status_code == 200 and ok.json() == {"x": [1, [2]]}
        deep = await client.post("/echo", content=DEEP, headers={"content-type": "application/json"})
        assert deep.status_code == 400 and "deeper" in deep.json()["error"]
        big = await client.post("/echo", content=b"[" + b"0," * 200_000 + b"0]")
        assert big.status_code == 413


def test_depth_check_is_exact_on_random_documents() -> None:
    # documents full of brackets, quotes and backslashes inside strings and keys, at every depth around the
    # bound: the check refuses exactly those nested deeper than allowed
    import json
    import random

    rng = random.Random(3)
    pieces = ["[", "]", "{", "}", '"', "\\", "a", "\\\\", '\\"']

    def gen(d: int) -> object:
        r = rng.random()
        if r < 0.4:
            return [gen(d + 1) for _ in range(rng.randrange(3))]
        if r < 0.65:
            return {rng.choice(pieces) + str(i): gen(d + 1) for i in range(rng.randrange(3))}
        if r < 0.9:
            return "".join(rng.choice(pieces) for _ in range(rng.randrange(6)))
        return rng.randrange(100)

    def depth(x: object) -> int:
        if isinstance(x, list):
            return 1 + max((depth(i) for i in x), default=0)
        if isinstance(x, dict):
            return 1 + max((depth(v) for v in x.values()), default=0)
        return 0

    for _ in range(3000):
        doc = gen(0)
        d = depth(doc)
        text = json.dumps(doc, indent=rng.choice([None, 1]))
        for limit in (d - 1, d):
            if limit < 1:
                continue
            refused = False
            try:
                _json.check_depth(text.encode() if rng.random() < 0.5 else text, limit)
            except _json.JsonTooDeep:
                refused = True
            assert refused == (d > limit), (text[:120], d, limit)
