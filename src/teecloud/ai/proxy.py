"""The client's verifying proxy: an OpenAI-compatible endpoint on localhost that forwards to an attested
inference app only after checking it, and checks every answer's receipt.

Attestation of the upstream (`UpstreamVerifier.attest`), each step an UpstreamRejected(step=...) on failure:
    (1) GET /v1/attestation/report?nonce=<32 fresh random bytes>; the answer echoes our nonce
    (2) the key set parses and its digest is the one reported
    (3) report_data == sha256(JCS({keyset_digest, nonce, purpose})) and is what the quote signs
    (4) the quote and event log verify under the shared peer verifier (teecloud.peer: TCB, simulated only
        where a dev root is trusted, RTMR replay, boot_info)
    (5) the key set names the quoted app; the app id and compose hash are the expected ones, if given
    (6) the key set's signing key chain leads to the KMS root (the k256 key KmsAuth publishes)
    (7) the served model and weights digest are the expected ones, if given
    (8) over HTTPS: the TLS key the upstream presented on this connection is the key set's (SPKI sha256);
        over plain HTTP only when the policy allows it (local development)
    (9) GPU evidence, when required or present: each GPU's SPDM evidence chains to a trusted device root
        and answers nonce = report_data (fresh, and bound to this quote and key set)
Then the key set is pinned, and every later answer must come over a connection with that TLS key.
Per request: the prompt is sealed to the pinned E2EE key (streamed answers come back sealed event by event),
the answer's receipt is checked against the pinned key set, the bytes sent and received, its inclusion proof
under the signed tree head, and that head's consistency with the last one seen; a receipt id already
accepted is refused (a replayed answer); only then is the answer returned. How the receipt arrives
(`ProxyPolicy.receipts`): "inline" (the default) asks the front for it with the answer (`x-teecloud-receipt:
inline`, teecloud.ai.server's INLINE): the durable receipt and its inclusion data come as the stream's last
event before the closing piece, or in the `x-teecloud-receipt` header of a non-streamed answer, and an
answer without it is refused; "fetch" (for fronts that predate inline receipts) GETs /v1/receipts/{id} once
the answer's closing piece arrives: a round trip more per answer. A streamed answer is passed on as it
comes and checked at its end, before its closing `data: [DONE]`; a failure there ends the stream with an
error event instead (the OpenAI client raises). On any failure nothing unverified is returned as a normal
answer: 502 with the step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from teecloud.ai._http import (
    BodyTooLarge,
    CompletionRoutes,
    fast_event_loop,
    openai_error,
    peer_spki_sha256,
    read_body,
)
from teecloud.ai._upstream import UpstreamClient, UpstreamError, UpstreamLimits, UpstreamResponse
from teecloud.ai.e2ee import ALG_K256, ALG_X25519, ClientSession, EphemeralSpare
from teecloud.ai.errors import AiError, EnvelopeRejected, KeySetInvalid, UpstreamRejected
from teecloud.ai.gpu import verify_gpu_evidence
from teecloud.ai.keyset import ATTESTATION_PURPOSE, KeySet, report_data_for
from teecloud.ai.receiptlog import TreeHead, leaf_hash, verify_consistency, verify_inclusion
from teecloud.ai.receipts import SignedReceipt, verify_receipt
from teecloud.ai.server import INLINE_HEADER, RECEIPT_EVENT, SINCE_HEADER
from teecloud.peer import PeerRejected, PeerVerifier

__all__ = ["ProxyPolicy", "Upstream", "UpstreamVerifier", "make_proxy_app", "proxy_event_loop"]

_MAX_REPORT_BYTES = 1024 * 1024
_SSE_EVENT_END = re.compile(rb"\r?\n\r?\n")
_MAX_ANSWER_BYTES = 16 * 1024 * 1024
_MAX_INLINE_RECEIPT_BYTES = 64 * 1024  # a receipt with its key set, proofs and head: ~5 KB
_RECEIPT_MARK = RECEIPT_EVENT.split(b"\n")[0]  # b"event: teecloud-receipt"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_ACCEPTED_IDS = 65536  # receipt ids remembered to refuse a replayed answer
_COMPLETION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


@dataclass(frozen=True)
class ProxyPolicy:
    kms_root_public_key: bytes
    expected_app_id: bytes | None = None
    allowed_compose_hashes: frozenset[bytes] | None = None
    expected_model: str | None = None
    expected_weights_sha256: bytes | None = None
    e2ee: bool = True
    e2ee_alg: str = ALG_X25519  # or ALG_K256: prompts sealed to the key set's secp256k1 E2EE key
    reattest_s: float = 600.0
    max_request_bytes: int = 256 * 1024
    allow_plain_http: bool = False  # no TLS key to pin: development only
    gpu_trust_anchors: tuple[bytes, ...] = ()  # NVIDIA device identity roots (DER or PEM)
    require_gpu: bool = False
    receipts: str = "inline"  # or "fetch": GET /v1/receipts/{id} per answer (fronts without inline receipts)

    def __post_init__(self) -> None:
        if self.e2ee_alg not in (ALG_X25519, ALG_K256):
            raise ValueError(f"e2ee_alg is {ALG_X25519!r} or {ALG_K256!r}")
        if self.receipts not in ("inline", "fetch"):
            raise ValueError("receipts is 'inline' or 'fetch'")


@dataclass(frozen=True)
class Upstream:
    """What attestation established and the proxy pins."""

    keyset: KeySet
    keyset_digest: bytes
    app_id: bytes
    compose_hash: bytes
    model: str
    weights_sha256: bytes
    simulated: bool
    attested_at: float
    tls_pinned: bool
    gpus_verified: int


def _json(resp: httpx.Response, step: str, limit: int) -> Any:
    if len(resp.content) > limit:
        raise UpstreamRejected("the upstream's answer is oversized", step=step)
    try:
        return json.loads(resp.content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UpstreamRejected("the upstream's answer is not JSON", step=step) from None


class UpstreamVerifier:
    def __init__(
        self,
        client: httpx.AsyncClient,
        verifier: PeerVerifier,
        policy: ProxyPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.verifier = verifier
        self.policy = policy
        self.clock = clock
        self.pinned: Upstream | None = None
        self._lock = asyncio.Lock()
        self.heads: OrderedDict[int, bytes] = OrderedDict()  # tree size -> root, of heads already checked
        self.last_size = 0
        self.accepted: OrderedDict[str, None] = OrderedDict()  # receipt ids accepted (the last 65536)

    async def current(self) -> Upstream:
        up = self.pinned  # the common case: attested and fresh, no lock to take on the request's path
        if up is not None and self.clock() - up.attested_at <= self.policy.reattest_s:
            return up
        async with self._lock:
            if self.pinned is None or self.clock() - self.pinned.attested_at > self.policy.reattest_s:
                # A rotated key set is accepted only because it passed every check of attest() again.
                self.pinned = await self.attest()
            return self.pinned

    async def attest(self) -> Upstream:
        pol = self.policy
        # (1)
        nonce = os.urandom(32)
        try:
            resp = await self.client.get("/v1/attestation/report", params={"nonce": nonce.hex()})
        except httpx.HTTPError as exc:
            raise UpstreamRejected(f"cannot reach the upstream: {type(exc).__name__}", step="report") from exc
        if resp.status_code != 200:
            raise UpstreamRejected(f"the attestation route answered {resp.status_code}", step="report")
        report = _json(resp, "report", _MAX_REPORT_BYTES)
        if not isinstance(report, dict) or report.get("nonce") != nonce.hex():
            raise UpstreamRejected("the report does not echo our nonce", step="report")
        # (2)
        try:
            keyset = KeySet.from_json(report.get("keyset"))
        except AiError as exc:
            raise UpstreamRejected(str(exc), step="keyset") from exc
        digest = keyset.digest()
        if report.get("keyset_digest") != digest.hex():
            raise UpstreamRejected("the reported keyset_digest is not the key set's", step="keyset")
        if pol.e2ee and pol.e2ee_alg == ALG_K256 and keyset.e2ee_k256_public_key is None:
            raise UpstreamRejected("the key set has no secp256k1 E2EE key to seal prompts to", step="keyset")
        # (3)
        expected_rd = report_data_for(digest, nonce, ATTESTATION_PURPOSE)
        quote_hex, event_log = report.get("quote"), report.get("event_log")
        if not isinstance(quote_hex, str) or not isinstance(event_log, str):
            raise UpstreamRejected("the report has no quote or event log", step="report")
        try:
            quote = bytes.fromhex(quote_hex)
        except ValueError:
            raise UpstreamRejected("the quote is not hex", step="report") from None
        # (4)
        try:
            peer = await asyncio.to_thread(self.verifier.verify_quote, quote, event_log)
        except PeerRejected as exc:
            raise UpstreamRejected(f"{exc.step}: {exc.reason}", step="quote") from exc
        if peer.evidence.report_data != expected_rd.ljust(64, b"\x00"):
            raise UpstreamRejected(
                "the quote's report_data does not bind this key set and our nonce", step="report_data"
            )
        # (5)
        if peer.app_id != keyset.app_id:
            raise UpstreamRejected("the key set names another app than the quote", step="app_id")
        if pol.expected_app_id is not None and peer.app_id != pol.expected_app_id:
            raise UpstreamRejected(
                f"the upstream is app {peer.app_id.hex()}, expected {pol.expected_app_id.hex()}",
                step="app_id",
            )
        if pol.allowed_compose_hashes is not None and peer.compose_hash not in pol.allowed_compose_hashes:
            raise UpstreamRejected(
                f"compose hash {peer.compose_hash.hex()} is not allowed", step="compose_hash"
            )
        # (6)
        try:
            keyset.verify_chain(pol.kms_root_public_key)
        except KeySetInvalid as exc:
            raise UpstreamRejected(exc.reason, step="keyset_chain") from exc
        # (7)
        model, weights = report.get("model"), report.get("weights_sha256")
        if not isinstance(model, str) or not isinstance(weights, str):
            raise UpstreamRejected("the report names no model", step="model")
        if pol.expected_model is not None and model != pol.expected_model:
            raise UpstreamRejected(
                f"the upstream serves {model!r}, expected {pol.expected_model!r}", step="model"
            )
        if pol.expected_weights_sha256 is not None and weights != pol.expected_weights_sha256.hex():
            raise UpstreamRejected("the upstream's weights digest is not the expected one", step="model")
        # (8)
        seen = peer_spki_sha256(resp)
        if seen is None and not pol.allow_plain_http:
            raise UpstreamRejected("the upstream is not HTTPS: no TLS key to pin", step="tls_pin")
        if seen is not None and seen != keyset.tls_spki_sha256:
            raise UpstreamRejected("the upstream's TLS key is not the attested key set's", step="tls_pin")
        # (9)
        gpus = report.get("gpu_evidence") or []
        if pol.require_gpu and not gpus:
            raise UpstreamRejected(
                "GPU attestation is required and the report has no GPU evidence", step="gpu"
            )
        if gpus:
            if not pol.gpu_trust_anchors:
                if pol.require_gpu:
                    raise UpstreamRejected("no GPU device root is trusted", step="gpu")
            else:
                await asyncio.to_thread(
                    verify_gpu_evidence,
                    gpus,
                    trust_anchors=pol.gpu_trust_anchors,
                    expected_nonce=expected_rd,
                    now=int(self.clock()),
                )
        return Upstream(
            keyset=keyset,
            keyset_digest=digest,
            app_id=peer.app_id,
            compose_hash=peer.compose_hash,
            model=model,
            weights_sha256=bytes.fromhex(weights) if len(weights) == 64 else b"",
            simulated=peer.simulated,
            attested_at=self.clock(),
            tls_pinned=seen is not None,
            gpus_verified=len(gpus) if pol.gpu_trust_anchors else 0,
        )

    @staticmethod
    def check_pin(up: Upstream, resp: httpx.Response | UpstreamResponse) -> None:
        # The answer path's client reads a connection's key once, when it is made (renegotiation refused).
        seen = resp.spki_sha256 if isinstance(resp, UpstreamResponse) else peer_spki_sha256(resp)
        if up.tls_pinned and seen != up.keyset.tls_spki_sha256:
            raise UpstreamRejected("the answer came over a TLS key other than the pinned one", step="tls_pin")
        if not up.tls_pinned and seen is not None:
            raise UpstreamRejected("the upstream switched to TLS after attestation over HTTP", step="tls_pin")

    async def check_receipt(
        self, up: Upstream, rid: str | None, sent: bytes, received: bytes
    ) -> SignedReceipt:
        return self.verify_fetched_receipt(up, rid, await self.fetch_receipt(up, rid), sent, received)

    async def fetch_receipt(self, up: Upstream, rid: str | None) -> tuple[httpx.Response, int]:
        """GET the receipt (and the consistency proof from the largest head seen so far); the answer is
        not trusted until verify_fetched_receipt. Started before an answer's last bytes are in, so that the
        round trip overlaps them: the front waits until the receipt is durable before it answers."""
        if not rid:
            raise UpstreamRejected("the answer carries no x-receipt-id", step="receipt")
        resp = None
        since = self.last_size
        params = {"since": str(since)} if since else {}
        for _ in range(50):  # the front waits for a receipt being logged; an older front may still 404
            try:
                resp = await self.client.get(f"/v1/receipts/{rid}", params=params)
            except httpx.HTTPError as exc:
                raise UpstreamRejected(
                    f"cannot fetch the receipt: {type(exc).__name__}", step="receipt"
                ) from exc
            if resp.status_code != 404:
                break
            await asyncio.sleep(0.02)
        if resp is None or resp.status_code != 200:
            raise UpstreamRejected(f"the receipt is not served ({resp and resp.status_code})", step="receipt")
        return resp, since

    def verify_fetched_receipt(
        self,
        up: Upstream,
        rid: str | None,
        fetched: tuple[httpx.Response, int],
        sent: bytes,
        received: bytes,
    ) -> SignedReceipt:
        """The receipt against the pinned key set and the exact bytes sent and received, its inclusion
        under the signed tree head, and that head's consistency with the last one seen."""
        resp, since = fetched
        self.check_pin(up, resp)
        doc = _json(resp, "receipt", _MAX_REPORT_BYTES)
        return self.verify_receipt_doc(up, rid, doc, since, sent, received)

    def verify_receipt_doc(
        self, up: Upstream, rid: str | None, doc: Any, since: int, sent: bytes, received: bytes
    ) -> SignedReceipt:
        """A receipt document (GET /v1/receipts/{id}?since=`since`'s answer, fetched or inline) against the
        pinned key set, the answer's id and the exact bytes sent and received; its inclusion under the
        signed tree head; that head's consistency with the one of size `since` seen before; and an id not
        accepted before."""
        if not rid:
            raise UpstreamRejected("the answer carries no x-receipt-id", step="receipt")
        try:
            receipt = SignedReceipt.from_json(doc.get("receipt") if isinstance(doc, dict) else None)
            body = verify_receipt(
                receipt,
                kms_root_public_key=self.policy.kms_root_public_key,
                expected_app_id=up.app_id,
                pinned_keyset_digest=up.keyset_digest,
                request_body=sent,
                response_body=received,
                verified_keyset=up.keyset,  # its chain to the KMS root was checked by attest() (6)
            )
            if body.id != rid or body.model != up.model:
                raise UpstreamRejected("the receipt is for another request or model", step="receipt")
            if rid in self.accepted:
                raise UpstreamRejected(
                    f"receipt {rid} was accepted before: a replayed answer", step="receipt"
                )
            head = TreeHead.from_json(doc.get("tree_head"))
            head.verify(up.keyset.signing_public_key)
            proof = [bytes.fromhex(p) for p in doc.get("inclusion_proof", [])][:64]
            index = doc.get("leaf_index")
            if not isinstance(index, int) or not verify_inclusion(
                leaf_hash(body.body_sha256()), index, head.tree_size, proof, head.root_hash
            ):
                raise UpstreamRejected("the receipt is not in the published log", step="receipt_log")
            # The log only grows: the head extends the last one this proxy saw (a rewritten or forked log
            # fails here).
            if since:
                cons = doc.get("consistency")
                cproof = cons.get("proof") if isinstance(cons, dict) else None
                if (
                    not isinstance(cons, dict)
                    or cons.get("first") != since
                    or not isinstance(cproof, list)
                    or len(cproof) > 64
                    or not verify_consistency(
                        since,
                        head.tree_size,
                        self.heads.get(since, b""),
                        head.root_hash,
                        [bytes.fromhex(c) for c in cproof],
                    )
                ):
                    raise UpstreamRejected("the log does not extend the one seen before", step="receipt_log")
            self.heads[head.tree_size] = head.root_hash
            self.last_size = max(self.last_size, head.tree_size)
            self.accepted[rid] = None
            while len(self.accepted) > _ACCEPTED_IDS:
                self.accepted.popitem(last=False)
            while len(self.heads) > 256:  # forget old heads, never the largest (the next `since`)
                oldest = next(iter(self.heads))
                if oldest == self.last_size:
                    self.heads.move_to_end(oldest)
                else:
                    del self.heads[oldest]
        except UpstreamRejected:
            raise
        except (AiError, ValueError, TypeError, AttributeError) as exc:
            step = getattr(exc, "step", "receipt")
            raise UpstreamRejected(str(getattr(exc, "reason", exc)), step=step) from exc
        return receipt


def proxy_event_loop() -> str:
    """The event loop to serve the proxy on: teecloud.ai._http.fast_event_loop's (uvloop where installed)."""
    return fast_event_loop()


def make_proxy_app(upstream_url: str, verifier: PeerVerifier, policy: ProxyPolicy) -> FastAPI:
    app = FastAPI(title="teecloud verifying AI proxy", docs_url=None, redoc_url=None)
    # The upstream's certificate chain ends at its app CA, which no public root vouches for: the connection's
    # key is checked against the attested key set instead (pinning), on every answer.
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    tls.options |= ssl.OP_NO_RENEGOTIATION  # a connection's key, once checked, stays its key
    client = httpx.AsyncClient(base_url=upstream_url, timeout=httpx.Timeout(300.0, connect=10.0), verify=tls)
    # The completion routes' own client (the first token's path): h11 over kept connections.
    answers = UpstreamClient(
        upstream_url,
        ssl_context=tls if upstream_url.startswith("https:") else None,
        limits=UpstreamLimits(connect_timeout_s=10.0, read_timeout_s=300.0),
    )
    up_verifier = UpstreamVerifier(client, verifier, policy)
    app.state.upstream = up_verifier
    spare = EphemeralSpare()  # E2EE: the next request's ephemeral key, made ahead
    app.state.ephemeral_spare = spare

    def refused(exc: UpstreamRejected) -> Response:
        return openai_error(
            502, f"teecloud proxy refused the upstream: {exc}", "upstream_verification_failed"
        )

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            up = await up_verifier.current()
        except UpstreamRejected as exc:
            return refused(exc)
        data = [{"id": up.model, "object": "model", "created": 0, "owned_by": "teecloud"}]
        return Response(json.dumps({"object": "list", "data": data}), media_type="application/json")

    @app.get("/v1/teecloud/upstream")
    async def upstream_info() -> Response:
        try:
            up = await up_verifier.current()
        except UpstreamRejected as exc:
            return refused(exc)
        info = {
            "app_id": up.app_id.hex(),
            "compose_hash": up.compose_hash.hex(),
            "model": up.model,
            "weights_sha256": up.weights_sha256.hex(),
            "keyset": up.keyset.to_json(),
            "simulated": up.simulated,
            "tls_pinned": up.tls_pinned,
            "gpus_verified": up.gpus_verified,
        }
        return Response(json.dumps(info), media_type="application/json")

    async def completion(request: Request, route: str) -> Response:
        try:
            raw = await read_body(request, policy.max_request_bytes)
        except BodyTooLarge as exc:
            return openai_error(413, str(exc))
        try:
            req = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return openai_error(400, "the request body is not JSON")
        if not isinstance(req, dict):
            return openai_error(400, "the request body must be a JSON object")
        try:
            up = await up_verifier.current()
        except UpstreamRejected as exc:
            return refused(exc)
        stream = req.get("stream") is True
        session: ClientSession | None = None
        refill: Callable[[], None] | None = None
        sent = raw
        if policy.e2ee:
            model_pk = up.keyset.e2ee_public_key
            if policy.e2ee_alg == ALG_K256:
                assert up.keyset.e2ee_k256_public_key is not None  # attest() refuses a key set without it
                model_pk = up.keyset.e2ee_k256_public_key
            session = ClientSession(
                model_pk,
                str(req.get("model", up.model)),
                now=int(time.time()),
                alg=policy.e2ee_alg,
                ephemeral=spare.take(model_pk, policy.e2ee_alg),
            )
            sent = json.dumps(session.seal_request(raw)).encode()
            # The next request's ephemeral key is made once this answer's first token has gone on (or, not
            # streamed, once it is read): off every first token's path.
            refill = functools.partial(_refill, spare, model_pk, policy.e2ee_alg)
        headers = {"content-type": "application/json"}
        inline = policy.receipts == "inline"
        since = up_verifier.last_size  # the receipt's head must extend the largest one seen so far
        if inline:
            headers[INLINE_HEADER] = "inline"
            if since:
                headers[SINCE_HEADER] = str(since)
        try:
            resp = await answers.post(route, sent, headers)
        except UpstreamError as exc:
            return refused(UpstreamRejected(f"cannot reach the upstream: {exc}", step="forward"))
        try:
            up_verifier.check_pin(up, resp)
            rid = resp.header("x-receipt-id")
            inline_doc = resp.header(INLINE_HEADER)
        except UpstreamRejected as exc:
            await resp.aclose()
            return refused(exc)
        except UpstreamError as exc:
            await resp.aclose()
            return refused(UpstreamRejected(str(exc), step="forward"))
        if resp.status_code != 200:
            try:
                body = await _read_limited(resp, 65536)
            except UpstreamRejected as exc:
                return refused(exc)
            if session is not None and resp.status_code < 500:
                try:  # the engine's own 4xx comes back sealed; the front's refusals are plain
                    body = session.open_response(json.loads(body))
                except (EnvelopeRejected, json.JSONDecodeError, UnicodeDecodeError):
                    pass
            return Response(body, status_code=resp.status_code, media_type="application/json")
        if not stream:
            # Inline: the durable receipt is in the answer's header. Else the front signs it before it
            # answers: fetched while the answer is read.
            fetching = None if inline else asyncio.create_task(up_verifier.fetch_receipt(up, rid))
            try:
                received = await _read_limited(resp, _MAX_ANSWER_BYTES)
                if fetching is not None:
                    up_verifier.verify_fetched_receipt(up, rid, await fetching, sent, received)
                else:
                    doc = _inline_header(inline_doc)
                    up_verifier.verify_receipt_doc(up, rid, doc, since, sent, received)
                answer = received if session is None else session.open_response(json.loads(received))
            except UpstreamRejected as exc:
                return refused(exc)
            except (EnvelopeRejected, json.JSONDecodeError, UnicodeDecodeError) as exc:
                return refused(UpstreamRejected(str(exc), step="e2ee"))
            finally:
                await _cancel(fetching)
                if refill is not None:
                    refill()
            return Response(
                answer,
                media_type="application/json",
                headers={"x-receipt-id": rid or "", "x-teecloud-verified": "receipt"},
            )

        async def events() -> AsyncIterator[bytes]:
            nonlocal refill
            parts: list[bytes] = []
            size, pending, seq, ended = 0, b"", 0, False
            done: bytes | None = None  # "data: [DONE]" is held back until the receipt verifies
            # The front signs the receipt before it sends its closing piece ([DONE], or the final sealed
            # event): the fetch starts there and overlaps the rest of the stream. It is verified only
            # against every byte received, once the stream has ended.
            fetching: asyncio.Task[tuple[httpx.Response, int]] | None = None
            receipt_event: bytes | None = None  # inline: the receipt event's exact bytes, as received
            # Each piece is every chunk one read of the upstream brought, joined (UpstreamResponse.aiter_raw):
            # a proxy that fell behind (a loaded CPU) catches up with one write to the client.
            pieces = resp.aiter_raw()
            try:
                async for chunk in pieces:
                    size += len(chunk)
                    if size > _MAX_ANSWER_BYTES:
                        raise UpstreamRejected("the streamed answer is oversized", step="forward")
                    parts.append(chunk)
                    buf = pending + chunk if pending else chunk
                    if session is None and done is None and b"[DONE]" not in buf and _RECEIPT_MARK not in buf:
                        # Plain and not the closing piece: every complete event goes on in one piece, as
                        # the bytes came (the receipt covers exactly these bytes); the rest waits.
                        end = _last_event_end(buf)
                        pending = buf[end:]
                        if end:
                            yield buf[:end]
                        continue
                    events = _SSE_EVENT_END.split(buf)
                    pending = events.pop()
                    out: list[bytes] = []
                    for event in events:
                        if not event.strip():
                            continue
                        if event.startswith(_RECEIPT_MARK):
                            # Inline: the receipt, just before the closing piece; never passed on.
                            # Before the closing piece: [DONE] (plain), the final sealed event (E2EE).
                            closed = (
                                ended
                                if session is not None
                                else done is not None or any(e.strip() == b"data: [DONE]" for e in out)
                            )
                            if not inline or receipt_event is not None or closed:
                                raise UpstreamRejected(
                                    "an unexpected receipt event in the stream", step="receipt"
                                )
                            receipt_event = event + b"\n\n"
                            continue
                        if session is None:
                            out.append(event + b"\n\n")
                            continue
                        if ended or not event.startswith(b"data: "):
                            raise UpstreamRejected("an unexpected event in the encrypted stream", step="e2ee")
                        try:
                            plain, ended = session.open_stream_event(json.loads(event[6:]), seq)
                        except (EnvelopeRejected, json.JSONDecodeError, UnicodeDecodeError) as exc:
                            raise UpstreamRejected(str(exc), step="e2ee") from exc
                        seq += 1
                        out += [e + b"\n\n" for e in _SSE_EVENT_END.split(plain) if e.strip()]
                    for event in out:
                        if event.strip() == b"data: [DONE]":
                            done = event
                        else:
                            yield event
                    if refill is not None and seq:  # the first (sealed) event has gone on
                        refill()
                        refill = None
                    if not inline and fetching is None and (ended or done is not None):
                        fetching = asyncio.create_task(up_verifier.fetch_receipt(up, rid))
                if pending.strip():
                    raise UpstreamRejected("the stream ended inside an event", step="forward")
                if session is not None and not ended:
                    raise UpstreamRejected("the encrypted stream was cut short", step="e2ee")
                if inline:
                    if receipt_event is None:
                        raise UpstreamRejected("the answer ended without its inline receipt", step="receipt")
                    up_verifier.verify_receipt_doc(
                        up,
                        rid,
                        _inline_event(receipt_event),
                        since,
                        sent,
                        _without(b"".join(parts), receipt_event),
                    )
                else:
                    if fetching is None:  # a stream without a closing piece: its receipt is checked anyway
                        fetching = asyncio.create_task(up_verifier.fetch_receipt(up, rid))
                    up_verifier.verify_fetched_receipt(up, rid, await fetching, sent, b"".join(parts))
                if done is not None:
                    yield done
            except UpstreamRejected as exc:
                err = {
                    "error": {
                        "message": f"teecloud proxy refused the upstream: {exc}",
                        "type": "server_error",
                    }
                }
                yield b"data: " + json.dumps(err).encode() + b"\n\n"
            except (UpstreamError, httpx.HTTPError) as exc:
                err = {
                    "error": {
                        "message": f"the upstream stream broke: {type(exc).__name__}",
                        "type": "server_error",
                    }
                }
                yield b"data: " + json.dumps(err).encode() + b"\n\n"
            finally:
                await pieces.aclose()
                await resp.aclose()
                await _cancel(fetching)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"x-receipt-id": rid or ""}
        )

    app.add_middleware(CompletionRoutes, handler=completion, routes=_COMPLETION_ROUTES)
    return app


def _refill(spare: EphemeralSpare, model_public_key: bytes, alg: str) -> None:
    with contextlib.suppress(ValueError):  # a key ECDH refuses: the request makes (and fails) its own
        spare.refill(model_public_key, alg)


def _inline_header(value: str | None) -> Any:
    """The receipt document of a non-streamed answer's `x-teecloud-receipt` header (base64url JSON)."""
    if not value:
        raise UpstreamRejected("the answer carries no inline receipt", step="receipt")
    if len(value) > _MAX_INLINE_RECEIPT_BYTES:
        raise UpstreamRejected("the inline receipt is oversized", step="receipt")
    if not _BASE64URL.fullmatch(value):  # strict: b64decode would skip characters outside the alphabet
        raise UpstreamRejected("the inline receipt is not base64url JSON", step="receipt")
    try:
        return json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, UnicodeDecodeError):  # binascii.Error and JSONDecodeError are ValueErrors
        raise UpstreamRejected("the inline receipt is not base64url JSON", step="receipt") from None


def _inline_event(event: bytes) -> Any:
    """The receipt document of a streamed answer's receipt event, which has exactly the front's form."""
    if len(event) > _MAX_INLINE_RECEIPT_BYTES or not event.startswith(RECEIPT_EVENT):
        raise UpstreamRejected("the inline receipt event is malformed or oversized", step="receipt")
    data = event[len(RECEIPT_EVENT) :].removesuffix(b"\n\n")
    if b"\n" in data or b"\r" in data:
        raise UpstreamRejected("the inline receipt event is malformed", step="receipt")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UpstreamRejected("the inline receipt is not JSON", step="receipt") from None


def _without(stream: bytes, event: bytes) -> bytes:
    """The stream's bytes without its receipt event: what the receipt's response hash covers."""
    at = stream.find(event)
    if at < 0 or stream.find(event, at + 1) >= 0:
        raise UpstreamRejected("the inline receipt event is not in the stream once", step="receipt")
    return stream[:at] + stream[at + len(event) :]


def _last_event_end(buf: bytes) -> int:
    """The offset just past the last complete SSE event in `buf` (0 if none): the end of its blank line."""
    cut = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\n\r\n")
    if crlf >= 0 and crlf + 3 > cut + 2:
        return crlf + 3
    return cut + 2 if cut >= 0 else 0


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    """Stop a task whose result is no longer wanted (a receipt fetch, the upstream reader: the stream failed
    or the client left)."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    elif task is not None and not task.cancelled():
        task.exception()  # retrieved: a failure already reported through `await` is not logged again


async def _read_limited(resp: UpstreamResponse, limit: int) -> bytes:
    parts, size = [], 0
    try:
        async for chunk in resp.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise UpstreamRejected("the answer is oversized", step="forward")
            parts.append(chunk)
    except UpstreamError as exc:
        raise UpstreamRejected(f"the upstream answer broke off: {exc}", step="forward") from exc
    finally:
        await resp.aclose()
    return b"".join(parts)
