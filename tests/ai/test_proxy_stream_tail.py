"""The verifying proxy's streamed answers, as the bytes come: it starts fetching the receipt when the
front's closing piece arrives (so the round trip overlaps the stream's last bytes) but checks it only
against every byte received once the stream has ended. A stream cut into arbitrary pieces by whatever
sits between (TCP, a gateway) verifies like the whole; bytes that follow the closing piece are refused."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from teecloud.ai._http import Listener
from tests.ai.conftest import MODEL_ID, Stack, relayed_headers

pytestmark = pytest.mark.slow

Rechunk = Callable[[bytes], list[bytes]]


def relay(stack: Stack, rechunk: Rechunk, seen: dict[str, bytes]) -> Listener:
    """A streaming upstream in the middle (the operator, the gateway): the front's answer, its bytes cut
    into other pieces (or added to) by `rechunk`; what it passed on is kept in `seen` by receipt id."""
    app = FastAPI()
    http = httpx.AsyncClient(base_url=stack.front.url, timeout=60)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Any:
        req = http.build_request(
            request.method,
            "/" + path,
            params=request.query_params,
            content=await request.body(),
            headers=relayed_headers(request.headers),
        )
        r = await http.send(req, stream=True)
        body = await r.aread()
        await r.aclose()
        pieces = rechunk(body) if path.endswith("completions") else [body]
        seen[r.headers.get("x-receipt-id", path)] = b"".join(pieces)

        async def gen() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        headers = {
            k: v for k, v in r.headers.items() if k in ("x-receipt-id", "content-type", "x-teecloud-receipt")
        }
        return StreamingResponse(gen(), status_code=r.status_code, headers=headers)

    return Listener(app, name="test-rechunking-relay")


def stream_through(url: str, *, max_tokens: int = 6) -> tuple[list[str], str]:
    """(the SSE lines a client gets through the proxy, the receipt id)."""
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "split me"}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line], r.headers.get("x-receipt-id", "")


def content_of(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line.startswith("data: {"):
            doc = json.loads(line[6:])
            assert "error" not in doc, doc
            out += [c["delta"].get("content") or "" for c in doc["choices"]]
    return "".join(out)


@pytest.mark.parametrize("receipts", ["inline", "fetch"])
@pytest.mark.parametrize("e2ee", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_stream_cut_at_arbitrary_byte_boundaries_verifies_like_the_whole(
    stack: Stack, e2ee: bool, seed: int, receipts: str
) -> None:
    rng = random.Random(seed)

    def arbitrary(data: bytes) -> list[bytes]:  # 1..9 bytes each: events, CRLFs and [DONE] split anywhere
        pieces, i = [], 0
        while i < len(data):
            n = rng.randint(1, 9)
            pieces.append(data[i : i + n])
            i += n
        return pieces

    seen: dict[str, bytes] = {}
    with relay(stack, arbitrary, seen) as m, stack.proxy(m.url, e2ee=e2ee, receipts=receipts) as p:
        lines, rid = stream_through(p.url)
    with stack.proxy(e2ee=e2ee, receipts=receipts) as p:
        whole, _ = stream_through(p.url)  # the same prompt straight from the front (temperature 0)
    assert lines[-1] == whole[-1] == "data: [DONE]", lines[-3:]
    assert content_of(lines) == content_of(whole) != ""
    assert not any("teecloud-receipt" in line for line in lines)  # the inline receipt is not passed on
    # The receipt the proxy checked covers exactly the bytes that crossed the relay, in whatever pieces
    # (inline: all but the receipt event, which came once, just before the closing piece).
    receipt = httpx.get(f"{stack.front.url}/v1/receipts/{rid}", timeout=10).json()["receipt"]
    crossed = seen[rid]
    if receipts == "inline":
        start = crossed.index(b"event: teecloud-receipt\n")
        end = crossed.index(b"\n\n", start) + 2
        assert json.loads(crossed[start:end].split(b"data: ", 1)[1])["receipt"] == receipt
        assert crossed.count(b"event: teecloud-receipt") == 1
        closing = crossed[end:]
        assert closing == b"data: [DONE]\n\n" if not e2ee else closing.count(b"\n\n") == 1
        crossed = crossed[:start] + closing
    assert receipt["body"]["response_sha256"] == hashlib.sha256(crossed).hexdigest()
    assert receipt["body"]["stream"] is True and receipt["body"]["e2ee"] is e2ee


@pytest.mark.parametrize("e2ee", [False, True])
@pytest.mark.parametrize(
    "extra",
    [b'data: {"choices":[{"index":0,"delta":{"content":" injected"}}]}\n\n', b"data: [DONE]\n\n", b"\n"],
)
def test_bytes_after_the_closing_piece_are_refused(stack: Stack, e2ee: bool, extra: bytes) -> None:
    """The receipt fetch starts at the closing piece; what comes after it is still part of the answer and
    must be covered by the receipt: it is not, so the client gets an error event, never [DONE]."""
    seen: dict[str, bytes] = {}
    with relay(stack, lambda data: [data, extra], seen) as m, stack.proxy(m.url, e2ee=e2ee) as p:
        lines, _ = stream_through(p.url)
    assert "data: [DONE]" not in lines
    err = json.loads(lines[-1].removeprefix("data: "))
    assert "teecloud proxy refused" in err["error"]["message"], err
    assert ("e2ee:" if e2ee and extra.strip() else "response:") in err["error"]["message"], err
