"""The engine's own embeddings (llama.cpp `/v1/embeddings`) through the inference front and the verifying
proxy, and the AI agent's memory built on them (docs/ai.md "AI agents")."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from teecloud.ai.agent import (
    Agent,
    EmbeddingsUnavailable,
    InferenceClient,
    InferenceFailed,
    select_embedder,
)
from teecloud.ai.memory import VectorMemory
from teecloud.ai.receipts import SignedReceipt, verify_receipt
from tests.ai.conftest import MODEL_ID, Stack, running_stack

pytestmark = pytest.mark.slow

N_EMBD = 64  # the tiny model's width (examples/llm/tinymodel.py)


@pytest.fixture(scope="module")
def estack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("ai-emb-home"), embeddings=True) as s:
        yield s


def test_the_front_serves_the_engines_embeddings_with_a_receipt(estack: Stack) -> None:
    body = json.dumps({"model": MODEL_ID, "input": ["the price rose", "hello"]}).encode()
    r = httpx.post(
        estack.front.url + "/v1/embeddings",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2
    # a model without a pooling type: one vector per token, each the model's width
    assert all(isinstance(t, list) and len(t) == N_EMBD for d in data for t in d["embedding"])
    doc = httpx.get(f"{estack.front.url}/v1/receipts/{r.headers['x-receipt-id']}", timeout=30).json()
    rb = verify_receipt(
        SignedReceipt.from_json(doc["receipt"]),
        kms_root_public_key=estack.provider.root.k256_public_key,
        expected_app_id=estack.app_id,
        request_body=body,
        response_body=r.content,
    )
    assert rb.model == MODEL_ID


@pytest.mark.parametrize(
    "req,needle",
    [
        ({"input": ""}, "'input'"),
        ({"input": []}, "'input'"),
        ({"input": ["a", 3]}, "'input'"),
        ({"input": ["x"] * 65}, "'input'"),
        ({"input": "x", "stream": True}, "'stream'"),
        ({"input": "x", "encoding_format": "base64"}, "'encoding_format'"),
    ],
)
def test_bad_embedding_requests_are_400_naming_the_field(
    estack: Stack, req: dict[str, Any], needle: str
) -> None:
    r = httpx.post(estack.front.url + "/v1/embeddings", json={"model": MODEL_ID, **req}, timeout=30)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_a_front_whose_engine_serves_no_embeddings_says_404(stack: Stack) -> None:
    r = httpx.post(stack.front.url + "/v1/embeddings", json={"model": MODEL_ID, "input": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "embeddings_unavailable"
    name, _, dim = select_embedder(InferenceClient(stack.front.url, MODEL_ID), "auto", hashing_dim=128)
    assert (name, dim) == ("hashing", 128)
    with pytest.raises(EmbeddingsUnavailable):
        select_embedder(InferenceClient(stack.front.url, MODEL_ID), "engine", hashing_dim=128)


def test_the_agent_embeds_through_the_verifying_proxy(estack: Stack, tmp_path: Path) -> None:
    proxy = estack.proxy().start()
    try:
        client = InferenceClient(proxy.url, MODEL_ID)
        name, embed, dim = select_embedder(client, "auto", hashing_dim=256)
        assert (name, dim) == ("engine", N_EMBD)
        a, b = embed("the price rose five percent"), embed("the price rose five percent")
        assert a == b and math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-9)
        assert embed("hello world") != a
        # the proxy checked the embedding's receipt like any answer
        r = httpx.post(proxy.url + "/v1/embeddings", json={"model": MODEL_ID, "input": "x"}, timeout=60)
        assert r.status_code == 200 and r.headers["x-teecloud-verified"] == "receipt"

        class Log:
            def __init__(self) -> None:
                self.seq = 0

            def record(self, decision_hash: bytes, memo: str = "") -> tuple[int, dict[str, object]]:
                self.seq += 1
                return self.seq, {"transactionHash": "0x" + "ab" * 32}

        with VectorMemory(tmp_path / "memory.db", dim=dim) as memory:
            agent = Agent(inference=client, memory=memory, embed=embed, log=Log())
            agent.step("the ETH price rose five percent")
            second = agent.step("the ETH price rose five percent again")
            assert len(memory) == 4
            # the nearest memory to the second observation is the first one, by the engine's vectors
            assert second.recalled and second.recalled[0].text == "the ETH price rose five percent"
        client.close()
    finally:
        proxy.stop()


def _client(answer: Any, status: int = 200) -> InferenceClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=answer)

    return InferenceClient("http://inference", MODEL_ID, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "answer",
    [
        {"data": []},
        {"object": "list"},
        {"data": [{"embedding": []}]},
        {"data": [{"embedding": [[1.0, 2.0], [1.0]]}]},  # tokens of different widths
        {"data": [{"embedding": [1.0, "2"]}]},
        {"data": [{"embedding": [True, 1.0]}]},
        {"data": [{"embedding": [0.0, 0.0]}]},  # the zero vector has no direction
        {"data": [{"embedding": [1.0] * 5000}]},  # wider than the memory allows
    ],
)
def test_malformed_embedding_answers_are_refused(answer: Any) -> None:
    with pytest.raises(InferenceFailed):
        _client(answer).embed("x")


def test_per_token_vectors_are_mean_pooled_and_normalized() -> None:
    v = _client({"data": [{"embedding": [[3.0, 0.0], [1.0, 4.0]]}]}).embed("x")
    assert v == pytest.approx([2 / math.sqrt(8), 2 / math.sqrt(8)])


def test_an_engine_down_at_start_is_waited_for_not_replaced() -> None:
    calls, slept = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 3:
            return httpx.Response(503, json={"error": {"message": "engine"}})
        return httpx.Response(200, json={"data": [{"embedding": [0.0, 2.0]}]})

    client = InferenceClient("http://inference", MODEL_ID, transport=httpx.MockTransport(handler))
    name, _, dim = select_embedder(client, "auto", hashing_dim=256, sleep=slept.append)
    assert (name, dim) == ("engine", 2) and len(slept) == 2
    down = _client({"error": {}}, status=503)
    with pytest.raises(InferenceFailed):
        select_embedder(down, "auto", hashing_dim=256, attempts=2, sleep=slept.append)
    with pytest.raises(ValueError):
        select_embedder(down, "semantic", hashing_dim=256)
    assert select_embedder(down, "hashing", hashing_dim=64)[2] == 64
