"""The attested inference front: an OpenAI-compatible API in front of a real engine (llama.cpp's server on
CPU, vLLM's on a GPU — both speak the same OpenAI routes), adding what a client needs to trust an answer.

    GET  /v1/models                       the served model, with the sha256 of its weights
    POST /v1/chat/completions, /v1/completions
                                          forwarded to the engine (SSE streams pass through as they come);
                                          the body may be an E2EE envelope (teecloud.ai.e2ee), then the
                                          answer is sealed to the client; every answered request gets a
                                          signed receipt (`x-receipt-id` header) appended to the Merkle log
                                          while the answer's last bytes go out; asked with
                                          `x-teecloud-receipt: inline` (the verifying proxy does), the
                                          durable receipt and its inclusion data come with the answer
                                          instead (see INLINE below)
    GET  /v1/receipts/{id}                the receipt, leaf index, inclusion proof, signed tree head (a
                                          receipt still being appended is waited for: served once durable)
    GET  /v1/receipts/root                the signed tree head (the published root)
    GET  /v1/receipts/consistency?first=&second=   RFC 9162 consistency proof between two tree sizes
    GET  /v1/attestation/report?nonce=    a fresh quote whose report_data is
                                          sha256(JCS({keyset_digest, nonce, purpose})), the key set, the event
                                          log, the GPUs' SPDM evidence for nonce = report_data; plus the
                                          legacy vllm-proxy fields (signing_address, ...)
    GET  /v1/signature/{id}               vllm-proxy's legacy per-request signature (EIP-191 over
                                          "request_sha256:response_sha256")

INLINE receipts (a request header `x-teecloud-receipt: inline`, optionally `x-teecloud-receipt-since: N`,
a tree size the client saw before): the receipt is appended to the log and the answer waits until it is
durable; then the document GET /v1/receipts/{id}?since=N would serve (receipt, leaf index, inclusion proof,
a fresh signed tree head, the consistency proof from N) comes with the answer, so the client needs no second
round trip. A streamed answer carries it as one SSE event just before its closing piece (`data: [DONE]`,
or the final sealed E2EE event), in exactly this form:
    b"event: teecloud-receipt\ndata: " + compact JSON + b"\n\n"
and the receipt's response hash covers every byte of the stream except that event (the same bytes a
client without the header gets). A non-streamed answer carries it in the `x-teecloud-receipt` response
header (base64url of the compact JSON, no padding). The receipt routes serve the same receipt either way.

Keys and quotes come only through the guest API (`keys_from_guest_api`, a `quote` callable over dstack-sdk),
as for any app. A quote taken here is taken after boot: the KMS never releases keys to it (boot-time rule).
Client mistakes are 4xx with an OpenAI-shaped error; an engine that is down or crashing is 503; request and
response bodies are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_utils.crypto import keccak
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from teecloud.ai._http import BodyTooLarge, CompletionRoutes, openai_error, read_body
from teecloud.ai._upstream import UpstreamClient, UpstreamError, UpstreamLimits
from teecloud.ai.e2ee import OpenedRequest, ServerKey, is_envelope, k256_e2ee_public_key
from teecloud.ai.errors import EnvelopeRejected, MalformedInput
from teecloud.ai.gpu import GpuEvidenceSource
from teecloud.ai.keyset import (
    ATTESTATION_PURPOSE,
    E2EE_KEY_PATH,
    MAX_NONCE_BYTES,
    MIN_NONCE_BYTES,
    RECEIPT_KEY_PATH,
    RECEIPT_KEY_PURPOSE,
    KeySet,
    chain_from_hex,
    key_path,
    report_data_for,
)
from teecloud.ai.receiptlog import ReceiptLog
from teecloud.ai.receipts import ReceiptBody, SignedReceipt, sign_receipt
from teecloud.keys.sigchain import k256_public_key, sign_k256_recoverable

__all__ = [
    "GuestKeyMaterial",
    "InferenceConfig",
    "QuoteFn",
    "keys_from_guest_api",
    "make_inference_app",
    "tls_key_from_guest_api",
    "weights_sha256",
]

log = logging.getLogger("teecloud.ai.server")

QuoteFn = Callable[[bytes], dict[str, str]]  # report_data -> {"quote", "event_log", "vm_config"} (hex/JSON)
E2EE_KEY_PURPOSE = "teecloud-ai-e2ee"
_COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/completions")
_SSE_EVENT_END = re.compile(rb"\r?\n\r?\n")  # an SSE event ends with a blank line (LF or CRLF)
INLINE_HEADER = "x-teecloud-receipt"  # request: "inline"; non-streamed answer: the receipt document
SINCE_HEADER = "x-teecloud-receipt-since"
RECEIPT_EVENT = b"event: teecloud-receipt\ndata: "  # a streamed answer's inline receipt event starts so


@dataclass(frozen=True)
class InferenceConfig:
    model_id: str
    weights_sha256: bytes
    engine_url: str
    receipts_dir: Path
    max_request_bytes: int = 256 * 1024
    max_response_bytes: int = 8 * 1024 * 1024
    max_tokens: int = 4096
    engine_timeout_s: float = 300.0
    e2ee_window_s: int = 120
    max_concurrent_quotes: int = 4
    receipt_wait_s: float = 10.0  # how long a receipt route waits for a receipt still being appended
    extra_report: dict[str, Any] = field(default_factory=dict)  # e.g. GPU evidence, when there is any
    embeddings: bool = False  # the engine serves /v1/embeddings (llama_cpp_argv(embedding=True))
    max_embedding_inputs: int = 64


@dataclass(frozen=True)
class GuestKeyMaterial:
    signing_secret: bytes
    e2ee_secret: bytes
    keyset: KeySet


def keys_from_guest_api(
    client: Any, *, epoch: int = 0, tls_spki_sha256: bytes = bytes(32)
) -> GuestKeyMaterial:
    """The key set from the guest API (a dstack_sdk.DstackClient): GetKey for the receipt-signing key (its
    signature chain is the KMS's proof) and for the X25519 E2EE secret; Info for the app_id."""
    info = client.info()
    app_id = bytes.fromhex(info.app_id.removeprefix("0x"))
    signing = client.get_key(key_path(RECEIPT_KEY_PATH, epoch), RECEIPT_KEY_PURPOSE)
    e2ee = client.get_key(key_path(E2EE_KEY_PATH, epoch), E2EE_KEY_PURPOSE)
    signing_secret = bytes.fromhex(signing.key)
    e2ee_secret = bytes.fromhex(e2ee.key)
    keyset = KeySet(
        app_id=app_id,
        signing_public_key=k256_public_key(signing_secret),
        signing_key_chain=chain_from_hex(signing.signature_chain),
        e2ee_public_key=X25519PrivateKey.from_private_bytes(e2ee_secret).public_key().public_bytes_raw(),
        tls_spki_sha256=tls_spki_sha256,
        epoch=epoch,
        e2ee_k256_public_key=k256_e2ee_public_key(e2ee_secret),
    )
    return GuestKeyMaterial(signing_secret, e2ee_secret, keyset)


def tls_key_from_guest_api(client: Any, directory: Path, *, names: list[str]) -> tuple[Path, Path, bytes]:
    """The app's TLS key and certificate chain from GetTlsKey (under the app's KMS-derived CA), written mode
    0600 to `directory` (a tmpfs or the encrypted volume) for the listener; returns (chain file, key file,
    sha256 of the certificate's SPKI): the SPKI hash goes into the key set so clients can pin the key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from teecloud._fs import atomic_write

    resp = client.get_tls_key(subject=names[0], alt_names=names, usage_server_auth=True)
    chain_pem = "".join(resp.certificate_chain).encode()
    leaf = x509.load_pem_x509_certificate(resp.certificate_chain[0].encode())
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(directory / "tls-chain.pem", chain_pem)
    atomic_write(directory / "tls-key.pem", resp.key.encode())
    return directory / "tls-chain.pem", directory / "tls-key.pem", hashlib.sha256(spki).digest()


def weights_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _personal_sign(secret: bytes, text: str) -> bytes:
    """EIP-191 personal_sign (what vllm-proxy returns), v in {27, 28}."""
    data = text.encode()
    sig = sign_k256_recoverable(
        secret, keccak(b"\x19Ethereum Signed Message:\n" + str(len(data)).encode() + data)
    )
    return sig[:64] + bytes([sig[64] + 27])


class _Front:
    def __init__(
        self, config: InferenceConfig, keys: GuestKeyMaterial, quote: QuoteFn, clock: Callable[[], float]
    ):
        self.config = config
        self.keys = keys
        self.quote = quote
        self.clock = clock
        self.keyset_digest = keys.keyset.digest()
        self.e2ee = ServerKey(keys.e2ee_secret, window_s=config.e2ee_window_s)
        self.log = ReceiptLog(config.receipts_dir)
        self.quotes = asyncio.Semaphore(config.max_concurrent_quotes)
        # Receipts signed and being appended (one per answer in flight: bounded by the listener's
        # connections), and the ids whose append failed (never served; the last 1024 kept).
        self.pending: dict[str, asyncio.Task[int]] = {}
        self.failed: OrderedDict[str, None] = OrderedDict()
        # The engine's client on the answer path: h11 over kept connections (teecloud.ai._upstream).
        self.engine = UpstreamClient(
            config.engine_url,
            limits=UpstreamLimits(connect_timeout_s=5.0, read_timeout_s=config.engine_timeout_s),
        )

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def receipt(
        self, rid: str, req: bytes, resp_sha256: bytes, stream: bool, e2ee: bool, started: int
    ) -> SignedReceipt:
        body = ReceiptBody(
            id=rid,
            app_id=self.keys.keyset.app_id,
            keyset_digest=self.keyset_digest,
            model=self.config.model_id,
            weights_sha256=self.config.weights_sha256,
            request_sha256=hashlib.sha256(req).digest(),
            response_sha256=resp_sha256,
            stream=stream,
            e2ee=e2ee,
            started_ms=started,
            finished_ms=max(started, self.now_ms()),
        )
        return sign_receipt(body, self.keys.signing_secret, self.keys.keyset)

    def log_later(self, receipt: SignedReceipt) -> asyncio.Task[int]:
        """Append a signed receipt to the log (its fsyncs) off the answer's path: the answer's last bytes go
        out while the disk works. The receipt routes wait for this (`logged`), so a receipt is served only
        once it is durable."""
        rid = receipt.body.id
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.log.append, receipt))
        self.pending[rid] = task

        def done(t: asyncio.Task[int]) -> None:
            self.pending.pop(rid, None)
            if t.cancelled() or t.exception() is not None:
                self.failed[rid] = None
                while len(self.failed) > 1024:
                    self.failed.popitem(last=False)
                log.error("receipt %s could not be logged", rid)

        task.add_done_callback(done)
        return task

    async def durable(self, receipt: SignedReceipt, since: int) -> dict[str, Any] | None:
        """Append the receipt, wait until it is durable, and return what the receipt route would serve for
        it (INLINE in the module docstring); None when the append failed or timed out."""
        task = self.log_later(receipt)
        try:
            index = await asyncio.wait_for(asyncio.shield(task), self.config.receipt_wait_s)
        except Exception:  # the append failed or the disk is stuck (logged by log_later): no receipt
            return None
        try:
            return self.inclusion(receipt.to_json(), index, since)
        except ValueError:  # `since` is beyond the log: no consistency proof (the client refuses)
            return self.inclusion(receipt.to_json(), index, 0)

    def inclusion(self, doc: dict[str, Any], index: int, since: int) -> dict[str, Any]:
        """A logged receipt with its leaf index, inclusion proof under a fresh signed tree head, and (since
        > 0) the consistency proof from the tree of size `since`; ValueError when the log is smaller."""
        head = self.log.tree_head(self.keys.keyset.app_id, self.keys.signing_secret, self.now_ms())
        size, proof, _root = self.log.proof(index, head.tree_size)
        out: dict[str, Any] = {
            "receipt": doc,
            "leaf_index": index,
            "tree_size": size,
            "inclusion_proof": [p.hex() for p in proof],
            "tree_head": head.to_json(),
        }
        if since:
            if not 0 < since <= head.tree_size:
                raise ValueError(f"the log has {head.tree_size} receipts, fewer than since={since}")
            out["consistency"] = {
                "first": since,
                "proof": [p.hex() for p in self.log.consistency(since, size)],
            }
        return out

    async def logged(self, rid: str) -> bool:
        """Wait until a receipt being appended is durable; False when its append failed."""
        task = self.pending.get(rid)
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.config.receipt_wait_s)
            except Exception:  # the append failed or the disk is stuck: refused below, not served
                return False
        return rid not in self.failed

    def check_request(self, plaintext: bytes, route: str) -> dict[str, Any]:
        try:
            req = json.loads(plaintext)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MalformedInput("the request body is not JSON") from None
        if not isinstance(req, dict):
            raise MalformedInput("the request body must be a JSON object")
        model = req.get("model", self.config.model_id)
        if model != self.config.model_id:
            raise LookupError(f"model {str(model)[:80]!r} is not served here (only {self.config.model_id!r})")
        for key in ("max_tokens", "max_completion_tokens", "n"):
            value = req.get(key)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 < value <= self.config.max_tokens
            ):
                raise MalformedInput(f"{key!r} must be an integer in 1..{self.config.max_tokens}")
        if "stream" in req and not isinstance(req["stream"], bool):
            raise MalformedInput("'stream' must be true or false")
        if route == "/v1/embeddings":
            _check_embedding_input(req, self.config.max_embedding_inputs)
            return req
        _check_openai_fields(req, chat=route == "/v1/chat/completions")
        return req


def _check_embedding_input(req: dict[str, Any], max_inputs: int) -> None:
    inp = req.get("input")
    items = inp if isinstance(inp, list) else [inp]
    if not items or len(items) > max_inputs or not all(isinstance(x, str) and x for x in items):
        raise MalformedInput(f"'input' must be a non-empty string or a list of 1..{max_inputs} of them")
    if req.get("stream"):
        raise MalformedInput("'stream' is not supported for embeddings")
    if req.get("encoding_format", "float") != "float":
        raise MalformedInput("'encoding_format' must be 'float'")


# The request fields the engine parses, checked here so that a client's mistake is a 400 naming the field:
# llama-cpp-python's server answers a malformed field with a 500 quoting the input and a traceback.
_NUMBERS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty")
_INTS = ("seed", "top_k", "logprobs", "top_logprobs")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_openai_fields(req: dict[str, Any], *, chat: bool) -> None:
    if chat:
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MalformedInput("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise MalformedInput(f"messages[{i}] must be an object with a string 'role'")
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise MalformedInput(f"messages[{i}].content must be a string or a list of parts")
    else:
        prompt = req.get("prompt")
        if not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(x, str) for x in prompt))
        ):
            raise MalformedInput("'prompt' must be a string or a list of strings")
    for key in _NUMBERS:
        if key in req and req[key] is not None and not _is_number(req[key]):
            raise MalformedInput(f"{key!r} must be a number")
    for key in _INTS:
        if (
            key in req
            and req[key] is not None
            and (isinstance(req[key], bool) or not isinstance(req[key], int))
        ):
            raise MalformedInput(f"{key!r} must be an integer")
    stop = req.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise MalformedInput("'stop' must be a string or a list of strings")
    bias = req.get("logit_bias")
    if bias is not None and not (isinstance(bias, dict) and all(_is_number(v) for v in bias.values())):
        raise MalformedInput("'logit_bias' must map token ids to numbers")


def make_inference_app(
    config: InferenceConfig,
    keys: GuestKeyMaterial,
    quote: QuoteFn,
    *,
    clock: Callable[[], float] = time.time,
    gpu: GpuEvidenceSource | None = None,
) -> FastAPI:
    """`gpu`: the GPUs' evidence source; each report then carries their evidence for nonce = report_data."""
    app = FastAPI(title="teecloud attested inference", docs_url=None, redoc_url=None)
    front = _Front(config, keys, quote, clock)
    app.state.front = front

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return openai_error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        where = ".".join(str(x) for x in exc.errors()[0].get("loc", ())) if exc.errors() else "request"
        return openai_error(400, f"invalid {where}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return openai_error(500, "internal error", "server_error")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "teecloud",
                    "weights_sha256": config.weights_sha256.hex(),
                }
            ],
        }

    async def completion(request: Request, route: str) -> Response:
        started = front.now_ms()
        inline = request.headers.get(INLINE_HEADER) == "inline"
        since_text = request.headers.get(SINCE_HEADER, "0")
        if not (since_text.isascii() and since_text.isdigit() and len(since_text) <= 18):
            return openai_error(400, f"{SINCE_HEADER} must be a tree size (decimal)")
        since = int(since_text)
        try:
            raw = await read_body(request, config.max_request_bytes)
        except BodyTooLarge as exc:
            return openai_error(413, str(exc))
        opened: OpenedRequest | None = None
        plaintext = raw
        try:
            try:
                outer = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise MalformedInput("the request body is not JSON") from None
            if is_envelope(outer):
                opened = front.e2ee.open_request(outer, model=config.model_id, now=int(clock()))
                plaintext = opened.plaintext
            req = front.check_request(plaintext, route)
        except EnvelopeRejected as exc:
            return openai_error(exc.status, str(exc))
        except MalformedInput as exc:
            return openai_error(400, str(exc))
        except LookupError as exc:
            return openai_error(404, str(exc), "model_not_found")
        stream = bool(req.get("stream", False))
        rid = "rcpt-" + secrets.token_hex(12)
        headers = {"content-type": "application/json"}
        try:
            upstream = await front.engine.post(route, plaintext, headers)
        except UpstreamError:
            return openai_error(503, "the model engine is unavailable; retry shortly", "engine_unavailable")
        if upstream.status_code >= 500:
            await upstream.aclose()
            return openai_error(503, "the model engine failed; retry shortly", "engine_unavailable")
        if upstream.status_code != 200 or not stream:
            try:
                body = await upstream.aread(config.max_response_bytes)
            except UpstreamError:
                return openai_error(
                    503, "the engine's answer broke off or is oversized", "engine_unavailable"
                )
        if upstream.status_code != 200:
            if opened is not None:  # the engine's error may quote the prompt: sealed like an answer
                body = json.dumps(front.e2ee.seal_response(opened, body)).encode()
            return Response(body, status_code=upstream.status_code, media_type="application/json")
        if not stream:
            answer = body
            out = answer if opened is None else json.dumps(front.e2ee.seal_response(opened, answer)).encode()
            signed = front.receipt(rid, raw, hashlib.sha256(out).digest(), False, opened is not None, started)
            headers = {"x-receipt-id": rid}
            if not inline:
                front.log_later(signed)
            else:
                doc = await front.durable(signed, since)
                if doc is None:
                    return openai_error(503, "the receipt could not be logged", "receipt_unavailable")
                text = json.dumps(doc, separators=(",", ":")).encode()
                headers[INLINE_HEADER] = base64.urlsafe_b64encode(text).rstrip(b"=").decode()
            return Response(out, media_type="application/json", headers=headers)

        async def events() -> AsyncIterator[bytes]:
            h, size, complete = hashlib.sha256(), 0, False
            pending, seq = b"", 0

            def sealed(plain: bytes, final: bool) -> bytes:
                nonlocal seq
                assert opened is not None
                event = front.e2ee.seal_stream_event(opened, seq, plain, final=final)
                seq += 1
                return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"

            # Events pass on as they come; only the closing piece ("data: [DONE]", or the final sealed event)
            # waits until the receipt is signed. Its append to the log (fsyncs) runs while the closing piece
            # goes out; the receipt routes wait for it, so a client that has the whole answer finds its
            # receipt, served only once durable.
            closing = b""
            try:
                async for chunk in upstream.aiter_raw():
                    size += len(chunk)
                    if size > config.max_response_bytes:
                        break
                    parts = _SSE_EVENT_END.split(pending + chunk)
                    pending = parts.pop()
                    out = []
                    for part in parts:
                        if not part.strip():
                            continue
                        if opened is not None:
                            out.append(sealed(part + b"\n\n", False))
                        elif part.strip() == b"data: [DONE]":
                            closing = part + b"\n\n"
                        else:
                            out.append(part + b"\n\n")
                    if out:
                        data = b"".join(out)
                        h.update(data)
                        yield data
                else:
                    if pending.strip():  # an engine that ends without a blank line
                        last = pending + b"\n\n"
                        if opened is not None:
                            last = sealed(last, False)
                        elif pending.strip() == b"data: [DONE]":
                            closing, last = last, b""
                        h.update(last)
                        yield last
                    if opened is not None:
                        closing = sealed(b"", True)
                    h.update(closing)
                    complete = True
            except UpstreamError:
                log.warning("the engine's stream broke off (receipt %s not issued)", rid)
            finally:
                await upstream.aclose()
            if complete:
                signed = front.receipt(rid, raw, h.digest(), True, opened is not None, started)
                if inline:
                    # The durable receipt just before the closing piece, in one write with it. An append
                    # that failed sends none: the client refuses the answer as it would a missing receipt.
                    doc = await front.durable(signed, since)
                    if doc is not None:
                        data = json.dumps(doc, separators=(",", ":")).encode()
                        closing = RECEIPT_EVENT + data + b"\n\n" + closing
                else:
                    front.log_later(signed)
                if closing:
                    yield closing

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"x-receipt-id": rid, "cache-control": "no-cache"},
        )

    async def completion_route(request: Request, route: str) -> Response:
        if route == "/v1/embeddings" and not config.embeddings:
            return openai_error(404, "this model's engine serves no embeddings", "embeddings_unavailable")
        return await completion(request, route)

    # Served past FastAPI's routing and per-message layers (as the verifying proxy's): the first token
    # reaches the client sooner (docs/benchmarks.md, AI round 6). Their 500 handler still applies.
    app.add_middleware(
        CompletionRoutes,
        handler=completion_route,
        routes=("/v1/chat/completions", "/v1/completions", "/v1/embeddings"),
    )

    @app.get("/v1/receipts/root")
    async def root() -> dict[str, Any]:
        head = front.log.tree_head(keys.keyset.app_id, keys.signing_secret, front.now_ms())
        return {"tree_head": head.to_json(), "keyset": keys.keyset.to_json()}

    @app.get("/v1/receipts/consistency")
    async def consistency(first: int = 0, second: int = 0) -> Response:
        try:
            proof = front.log.consistency(first, second)
        except ValueError as exc:
            return openai_error(400, str(exc))
        return JSONResponse({"first": first, "second": second, "proof": [p.hex() for p in proof]})

    @app.get("/v1/receipts/{rid}")
    async def receipt(rid: str, since: int = 0) -> Response:
        """`since`: a tree size the client saw before; the answer then proves the current head extends it."""
        if not await front.logged(rid):
            return openai_error(503, "the receipt could not be logged", "receipt_unavailable")
        found = front.log.get(rid)
        if found is None:
            return openai_error(404, "no such receipt (a streamed answer gets its receipt when it ends)")
        doc, index = found
        try:
            return JSONResponse(front.inclusion(doc, index, since))
        except ValueError as exc:
            return openai_error(409, str(exc))

    @app.get("/v1/signature/{rid}")
    async def legacy_signature(rid: str) -> Response:
        if not await front.logged(rid):
            return openai_error(503, "the receipt could not be logged", "receipt_unavailable")
        found = front.log.get(rid)
        if found is None:
            return openai_error(404, "no such request id")
        body = found[0]["body"]
        text = f"{body['request_sha256']}:{body['response_sha256']}"
        return JSONResponse(
            {
                "text": text,
                "signature": "0x" + _personal_sign(keys.signing_secret, text).hex(),
                "signing_address": keys.keyset.signing_address,
                "signing_algo": "ecdsa",
            }
        )

    @app.get("/v1/attestation/report")
    async def report(nonce: str = "") -> Response:
        try:
            raw_nonce = bytes.fromhex(nonce.removeprefix("0x"))
        except ValueError:
            return openai_error(400, "nonce must be hex")
        if not MIN_NONCE_BYTES <= len(raw_nonce) <= MAX_NONCE_BYTES:
            return openai_error(400, f"nonce must be {MIN_NONCE_BYTES}..{MAX_NONCE_BYTES} bytes of hex")
        report_data = report_data_for(front.keyset_digest, raw_nonce, ATTESTATION_PURPOSE)
        if front.quotes.locked():
            return openai_error(503, "too many attestation requests at once; retry", "busy")
        async with front.quotes:
            try:
                q = await asyncio.to_thread(quote, report_data)
            except Exception as exc:  # the guest API is down: the caller learns it, the app keeps serving
                log.error("GetQuote failed: %s", type(exc).__name__)
                return openai_error(503, "the guest agent did not answer GetQuote", "attestation_unavailable")
            try:
                gpu_evidence = await asyncio.to_thread(gpu.collect, report_data) if gpu is not None else []
            except Exception as exc:  # the GPU did not answer: no report rather than one without its GPU
                log.error("GPU evidence collection failed: %s", type(exc).__name__)
                return openai_error(
                    503, "the GPU did not answer its attestation request", "attestation_unavailable"
                )
        return JSONResponse(
            {
                "purpose": ATTESTATION_PURPOSE,
                "nonce": raw_nonce.hex(),
                "keyset": keys.keyset.to_json(),
                "keyset_digest": front.keyset_digest.hex(),
                "report_data": report_data.hex(),
                "quote": q["quote"],
                "event_log": q["event_log"],
                "vm_config": q.get("vm_config", ""),
                "model": config.model_id,
                "weights_sha256": config.weights_sha256.hex(),
                # vllm-proxy's shape
                "signing_address": keys.keyset.signing_address,
                "signing_algo": "ecdsa",
                "intel_quote": q["quote"],
                "nvidia_payload": None,
                "gpu_evidence": gpu_evidence,
                **config.extra_report,
            }
        )

    return app
