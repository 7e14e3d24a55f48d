"""A storage rollback or fork of the receipt log is detected: the proxy remembers the heads it saw and
requires each new head to extend the last (RFC 9162 consistency proof).

The operator cannot sign tree heads (the key lives in the CVM), but it can hand the app an older copy of its
volume, or run a second instance on another copy: the app then signs heads of a log that forgot answers.
Here two fronts with the same keys and different logs stand for the two copies; a relay switches between
them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from teecloud.ai._http import Listener
from teecloud.ai.server import InferenceConfig, make_inference_app
from tests.ai.conftest import MODEL_ID, Stack, relayed_headers

pytestmark = pytest.mark.slow


def front(stack: Stack, receipts: Path) -> Listener:
    config = InferenceConfig(MODEL_ID, stack.config.weights_sha256, stack.engine.url, receipts)
    return Listener(make_inference_app(config, stack.keys, stack.quote), name="fork-front")


@pytest.fixture
def copies(stack: Stack, tmp_path: Path) -> Iterator[tuple[Listener, Listener]]:
    with front(stack, tmp_path / "a") as a, front(stack, tmp_path / "b") as b:
        yield a, b


def test_a_forked_receipt_log_is_refused(stack: Stack, copies: tuple[Listener, Listener]) -> None:
    a, b = copies
    for _ in range(3):  # the other copy's history differs
        httpx.post(
            b.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60
        ).raise_for_status()
    target = {"url": a.url}
    relay = FastAPI()
    http = httpx.AsyncClient(timeout=60)

    @relay.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        r = await http.request(
            request.method,
            f"{target['url']}/{path}",
            params=request.query_params,
            content=await request.body(),
            headers=relayed_headers(request.headers),
        )
        headers = {k: v for k, v in r.headers.items() if k not in ("content-length", "transfer-encoding")}
        return Response(r.content, status_code=r.status_code, headers=headers)

    with Listener(relay, name="fork-relay") as m, stack.proxy(m.url) as p:
        oa = openai.OpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for _ in range(2):  # the log grows consistently
            oa.completions.create(model=MODEL_ID, prompt="hello", max_tokens=2)
        target["url"] = b.url  # now the other copy answers
        with pytest.raises(openai.APIStatusError) as err:
            oa.completions.create(model=MODEL_ID, prompt="hello", max_tokens=2)
        assert err.value.status_code == 502 and "receipt_log:" in err.value.message, err.value.message


def test_the_consistency_route(copies: tuple[Listener, Listener]) -> None:
    a, _ = copies
    for _ in range(3):
        httpx.post(
            a.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60
        ).raise_for_status()
    assert (
        len(httpx.get(a.url + "/v1/receipts/consistency", params={"first": 1, "second": 3}).json()["proof"])
        >= 1
    )
    for first, second in [(0, 1), (2, 1), (1, 99)]:
        r = httpx.get(a.url + "/v1/receipts/consistency", params={"first": first, "second": second})
        assert r.status_code == 400
    assert httpx.get(a.url + "/v1/receipts/consistency", params={"first": "x"}).status_code == 400
