"""An AI agent as a teecloud app (examples/ai-agent, docs/ai.md "AI agents").

One step of the agent: embed the observation, recall the nearest memories from its vector memory (on the
encrypted volume), ask the inference app (OpenAI-compatible; ideally through `teecloud ai proxy`, which
verifies it) what to do, remember the observation and the decision, and record the decision on chain
(AgentLog) with a transaction signed by the agent's own wallet.

The wallet key is derived by the KMS for this app through the guest API (`GetKey(WALLET_KEY_PATH,
WALLET_KEY_PURPOSE)`, secp256k1): every replica and every restart of the app gets the same key, another app
gets another, and it never leaves the CVM (nobody, the owner included, can read it; an upgrade that would
export it has to pass the app's governance like any compose change). Its GetKey signature chain proves to
anyone holding the KMS root's k256 key that the KMS issued the address to this app.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from eth_utils.address import to_checksum_address

from teecloud.ai._jcs import jcs_sha256
from teecloud.ai.errors import AiError, MalformedInput
from teecloud.ai.keyset import chain_from_hex, eth_address
from teecloud.ai.memory import MAX_DIM, HashingEmbedder, Recall, VectorMemory
from teecloud.keys.sigchain import k256_public_key, verify_key_signature_chain

__all__ = [
    "MAX_OBSERVATION_BYTES",
    "WALLET_KEY_PATH",
    "WALLET_KEY_PURPOSE",
    "Agent",
    "AgentStep",
    "AgentWallet",
    "DecisionLog",
    "EmbeddingsUnavailable",
    "InferenceClient",
    "InferenceFailed",
    "ObservationSource",
    "decision_hash",
    "run_loop",
    "select_embedder",
]

WALLET_KEY_PATH = "teecloud/ai-agent/wallet"
WALLET_KEY_PURPOSE = "ethereum"
log = logging.getLogger(__name__)

MAX_OBSERVATION_BYTES = 4096
MAX_DECISION_CHARS = 512
MAX_ANSWER_BYTES = 1 << 20
# per-token vectors (a model without a pooling type) are large: up to the front's own answer limit
MAX_EMBEDDING_ANSWER_BYTES = 8 << 20
_RECEIPT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # teecloud.ai.receiptlog's receipt ids


class InferenceFailed(AiError):
    """The inference app did not answer usably (unreachable, an error status, a malformed answer)."""


class EmbeddingsUnavailable(InferenceFailed):
    """The inference app's engine serves no embeddings (its /v1/embeddings answered 404)."""


@dataclass(frozen=True, repr=False)
class AgentWallet:
    """The agent's secp256k1 wallet key as the KMS derived it for `app_id` (the key never appears in repr)."""

    app_id: bytes
    secret: bytes = field(repr=False)
    public_key: bytes  # 33-byte compressed
    signature_chain: tuple[bytes, ...]

    def __repr__(self) -> str:
        return f"AgentWallet(app_id={self.app_id.hex()}, address={self.address})"

    @classmethod
    def from_guest_api(cls, client: Any, *, path: str = WALLET_KEY_PATH) -> AgentWallet:
        """GetKey through the guest API (a dstack_sdk.DstackClient) and Info for the app_id."""
        info = client.info()
        key = client.get_key(path, WALLET_KEY_PURPOSE)
        secret = bytes.fromhex(key.key.removeprefix("0x"))
        if len(secret) != 32:
            raise MalformedInput("the guest API returned a wallet key that is not 32 bytes")
        return cls(
            app_id=bytes.fromhex(info.app_id.removeprefix("0x")),
            secret=secret,
            public_key=k256_public_key(secret),
            signature_chain=chain_from_hex(key.signature_chain),
        )

    @property
    def address(self) -> str:
        return to_checksum_address(eth_address(self.public_key))

    def signer_key(self) -> str:
        """The key in the form a chain connection takes (keep it inside the CVM)."""
        return "0x" + self.secret.hex()

    def verify_chain(self, kms_root_public_key: bytes) -> None:
        """The KMS (root k256 key) issued this wallet to this app; raises teecloud.keys errors otherwise."""
        verify_key_signature_chain(
            app_id=self.app_id,
            public_key=self.public_key,
            purpose=WALLET_KEY_PURPOSE,
            signature_chain=list(self.signature_chain),
            kms_root_public_key=kms_root_public_key,
        )


class DecisionLog(Protocol):
    """Where decisions go on chain (teecloud.chain.agentlog.AgentLog with the wallet as signer)."""

    def record(self, decision_hash: bytes, memo: str = "") -> tuple[int, dict[str, Any]]: ...


class InferenceClient:
    """An OpenAI-compatible chat endpoint (the inference app, or the verifying proxy in front of it)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.model = model
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def chat(self, messages: Sequence[dict[str, str]], *, max_tokens: int = 48) -> tuple[str, str]:
        """(the answer's text, the inference app's receipt id or "" when the upstream gives none)."""
        try:
            r = self._http.post(
                "/v1/chat/completions",
                json={"model": self.model, "messages": list(messages), "max_tokens": max_tokens},
            )
        except httpx.HTTPError as exc:
            raise InferenceFailed(f"inference app unreachable: {type(exc).__name__}") from exc
        if r.status_code != 200:
            raise InferenceFailed(f"inference app answered {r.status_code}")
        if len(r.content) > MAX_ANSWER_BYTES:
            raise InferenceFailed("inference answer too large")
        try:
            text = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise InferenceFailed("inference answer is not an OpenAI chat completion") from exc
        if not isinstance(text, str):
            raise InferenceFailed("inference answer content is not text")
        rid = r.headers.get("x-receipt-id", "")
        return text, rid if _RECEIPT_ID.fullmatch(rid) else ""  # anything else is not a receipt id

    def embed(self, text: str) -> list[float]:
        """The engine's own embedding of `text` (llama.cpp's `/v1/embeddings`, through the inference app and
        its receipts): one unit vector. A model without a pooling type answers a vector per token: they are
        mean-pooled here. Raises EmbeddingsUnavailable (the engine serves none) or InferenceFailed."""
        try:
            r = self._http.post("/v1/embeddings", json={"model": self.model, "input": text})
        except httpx.HTTPError as exc:
            raise InferenceFailed(f"inference app unreachable: {type(exc).__name__}") from exc
        if r.status_code == 404:
            raise EmbeddingsUnavailable("the inference app serves no embeddings")
        if r.status_code != 200:
            raise InferenceFailed(f"inference app answered {r.status_code} to an embedding")
        if len(r.content) > MAX_EMBEDDING_ANSWER_BYTES:
            raise InferenceFailed("embedding answer too large")
        try:
            vec = r.json()["data"][0]["embedding"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise InferenceFailed("the answer is not an OpenAI embedding") from exc
        return _unit_vector(vec)


def _unit_vector(vec: Any) -> list[float]:
    rows = vec if isinstance(vec, list) and vec and isinstance(vec[0], list) else [vec]
    dim = len(rows[0]) if isinstance(rows[0], list) else 0
    if not 1 <= dim <= MAX_DIM or not all(isinstance(row, list) and len(row) == dim for row in rows):
        raise InferenceFailed(f"an embedding is a vector (or one per token) of 1..{MAX_DIM} numbers")
    pooled = [0.0] * dim
    for row in rows:
        for i, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise InferenceFailed("an embedding holds a value that is not a finite number")
            pooled[i] += x
    norm = math.sqrt(sum(x * x for x in pooled))
    if not norm or not math.isfinite(norm):
        raise InferenceFailed("the embedding is the zero vector")
    return [x / norm for x in pooled]


def select_embedder(
    inference: InferenceClient,
    mode: str,
    *,
    hashing_dim: int,
    retry_s: float = 5.0,
    attempts: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, Callable[[str], list[float]], int]:
    """(name, embed, dimension) for the agent's memory. `mode`: "engine" (the inference app's own
    embeddings; required), "hashing" (the local HashingEmbedder), "auto" (the engine's when it serves
    them, else hashing). Engine or auto ask the engine until it answers (an unreachable or failing engine
    is waited for, every `retry_s`, at most `attempts` times when given), so a passing outage at start never
    picks another embedder than the deployment's: the memory's dimension is fixed by the first choice."""
    if mode not in ("auto", "engine", "hashing"):
        raise ValueError("the embedder is one of auto, engine, hashing")
    if mode != "hashing":
        tried = 0
        while True:
            try:
                dim = len(inference.embed("dimension probe"))
                return "engine", inference.embed, dim
            except EmbeddingsUnavailable:
                if mode == "engine":
                    raise
                break
            except InferenceFailed as exc:
                tried += 1
                if attempts is not None and tried >= attempts:
                    raise
                log.warning("embeddings: asking the engine again in %.0f s: %s", retry_s, exc)
                sleep(retry_s)
    return "hashing", HashingEmbedder(hashing_dim).embed, hashing_dim


def decision_hash(*, observation: str, decision: str, model: str, receipt_id: str) -> bytes:
    """What goes on chain: sha256(JCS({...})) of the decision and what it answered (the observation only by
    its hash, so the chain reveals neither it nor the memories behind the decision)."""
    return jcs_sha256(
        {
            "observation_sha256": hashlib.sha256(observation.encode()).hexdigest(),
            "decision": decision,
            "model": model,
            "receipt_id": receipt_id,
        }
    )


@dataclass(frozen=True)
class AgentStep:
    observation: str
    decision: str
    receipt_id: str
    recalled: list[Recall]
    decision_hash: bytes
    seq: int
    tx: str


class Agent:
    def __init__(
        self,
        *,
        inference: InferenceClient,
        memory: VectorMemory,
        embed: Callable[[str], list[float]],
        log: DecisionLog,
        recall_k: int = 4,
        max_tokens: int = 48,
    ) -> None:
        self.inference = inference
        self.memory = memory
        self.embed = embed
        self.log = log
        self.recall_k = recall_k
        self.max_tokens = max_tokens

    def step(self, observation: str) -> AgentStep:
        """(1) recall, (2) decide (the inference app), (3) remember, (4) record on chain."""
        if not observation.strip() or len(observation.encode()) > MAX_OBSERVATION_BYTES:
            raise MalformedInput(f"an observation is 1..{MAX_OBSERVATION_BYTES} bytes of text")
        # (1): the nearest memories, if any
        vec = self.embed(observation)
        recalled = self.memory.search(vec, self.recall_k) if len(self.memory) else []
        context = "\n".join(f"- ({m.kind}) {m.text}" for m in recalled) or "- (nothing yet)"
        # (2): the model decides
        messages = [
            {"role": "system", "content": "You are an agent. Answer with one short action."},
            {"role": "user", "content": f"Memories:\n{context}\n\nObservation: {observation}\nAction:"},
        ]
        text, receipt_id = self.inference.chat(messages, max_tokens=self.max_tokens)
        decision = " ".join(text.split())[:MAX_DECISION_CHARS] or "(no action)"
        # (3): remembered before it is recorded: a decision on chain is always in the agent's memory
        self.memory.add(observation, vec, kind="observation")
        self.memory.add(decision, self.embed(decision), kind="decision")
        # (4): on chain, by the agent's own key; the memo names the inference receipt behind it
        dh = decision_hash(
            observation=observation, decision=decision, model=self.inference.model, receipt_id=receipt_id
        )
        seq, receipt = self.log.record(dh, f"receipt:{receipt_id}"[:256] if receipt_id else "")
        return AgentStep(
            observation, decision, receipt_id, recalled, dh, seq, str(receipt["transactionHash"])
        )


class ObservationSource(Protocol):
    """Where observations come from: `peek` the next one (None: nothing new), `commit` it once acted on."""

    def peek(self) -> str | None: ...

    def commit(self) -> None: ...


def run_loop(agent: Agent, source: ObservationSource, *, interval: float, steps: int | None = None) -> int:
    """Step on each new observation, polling every `interval` seconds; returns the number of steps taken
    (bounded by `steps` when given). An observation is committed only after its step succeeded: a step
    that failed (the inference app down, the chain unreachable) is retried at the next poll."""
    done = 0
    while steps is None or done < steps:
        obs = source.peek()
        if obs is not None:
            try:
                agent.step(obs)
            except MalformedInput as exc:
                log.warning("observation skipped: %s", exc)  # it will never succeed: do not retry it
                source.commit()
                continue
            except Exception as exc:
                log.warning("step failed, retrying in %.0f s: %s: %s", interval, type(exc).__name__, exc)
            else:
                source.commit()
                done += 1
                continue
        time.sleep(interval)
    return done
