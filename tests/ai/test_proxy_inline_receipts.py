"""Inline receipts: the front sends each answer's durable receipt with its inclusion data as the stream's last
event before the closing piece (a header for a non-streamed answer), and the verifying proxy checks it there
instead of fetching it: no receipt round trip, and every check of the fetched receipt still made.

Fast: a synthetic engine (not a model: OpenAI-shaped chunks), the real front (keys from tests/ai/_keys.py) and
the real proxy, whose upstream is pinned by hand (attestation is not what is tested here: see
test_inference_e2e.py and test_tls_pin.py); between them a relay that plays the operator."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from teecloud.ai._http import Listener
from teecloud.ai.errors import UpstreamRejected
from teecloud.ai.proxy import ProxyPolicy, Upstream, UpstreamVerifier, make_proxy_app, proxy_event_loop
from teecloud.ai.receipts import ReceiptBody, SignedReceipt, sign_receipt
from teecloud.ai.server import GuestKeyMaterial, InferenceConfig, make_inference_app
from tests.ai._keys import AppKeys, app_keys
from tests.ai.conftest import MODEL_ID, relayed_headers

_CHUNK = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "t"}}]}
_EVENT = b"event: teecloud-receipt\n"
Rewrite = Callable[[str, bytes, dict[str, str]], tuple[bytes, dict[str, str]]]


def synthetic_engine() -> FastAPI:
    """A stand-in for the engine (not a model): three chunks, then [DONE]; a non-streamed answer."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        if not body.get("stream"):
            return {
                "id": "x",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"content": "t"}}],
            }

        async def gen() -> Any:
            for _ in range(3):
                yield b"data: " + json.dumps(_CHUNK).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        from fastapi.responses import StreamingResponse

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


class NotAttesting:
    """The proxy's peer verifier in these tests: never consulted, the upstream is pinned by hand."""

    def verify_quote(self, *_: object) -> None:
        raise AssertionError("attestation is not part of these tests")


def no_quote(_: bytes) -> dict[str, str]:
    raise AssertionError("no quote in these tests")


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.keys: AppKeys = app_keys()
        material = GuestKeyMaterial(self.keys.signing_secret, self.keys.e2ee_secret, self.keys.keyset)
        self.engine = Listener(synthetic_engine(), name="test-synthetic-engine").start()
        config = InferenceConfig(MODEL_ID, bytes(32), self.engine.url, tmp / "receipts")
        self.front_app = make_inference_app(config, material, no_quote)
        self.front = Listener(self.front_app, name="test-ai-front").start()
        self.gets: list[str] = []  # the receipt routes the relay saw asked
        self.verifier: UpstreamVerifier | None = None  # the last proxy's

    def upstream(self) -> Upstream:
        ks = self.keys.keyset
        return Upstream(
            ks, ks.digest(), ks.app_id, bytes(32), MODEL_ID, bytes(32), True, time.time(), False, 0
        )

    def policy(self, **kw: Any) -> ProxyPolicy:
        return ProxyPolicy(kms_root_public_key=self.keys.root_public, allow_plain_http=True, **kw)

    def proxy(self, upstream: str, **kw: Any) -> Listener:
        app = make_proxy_app(upstream, NotAttesting(), self.policy(**kw))  # type: ignore[arg-type]
        app.state.upstream.pinned = self.upstream()
        self.verifier = app.state.upstream
        return Listener(app, name="test-ai-proxy", loop=proxy_event_loop())

    def relay(self, rewrite: Rewrite | None = None, *, drop_inline_request: bool = False) -> Listener:
        """The operator between the proxy and the front: passes requests on (the inline request too, unless
        told not to), and answers with `rewrite`(path, the front's whole answer, its headers)."""
        app = FastAPI()
        http = httpx.AsyncClient(base_url=self.front.url, timeout=30)

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, request: Request) -> Response:
            if request.method == "GET" and path.startswith("v1/receipts/"):
                self.gets.append(path)
            headers = relayed_headers(request.headers)
            if drop_inline_request:
                headers = {"content-type": "application/json"}
            r = await http.request(
                request.method,
                "/" + path,
                params=request.query_params,
                content=await request.body(),
                headers=headers,
            )
            kept = {
                k: v
                for k, v in r.headers.items()
                if k in ("x-receipt-id", "content-type", "x-teecloud-receipt")
            }
            content = r.content
            if rewrite is not None and path.endswith("completions"):
                content, kept = rewrite(path, content, kept)
            return Response(content, status_code=r.status_code, headers=kept)

        return Listener(app, name="test-operator-relay")

    def close(self) -> None:
        self.front.stop()
        self.engine.stop()


@pytest.fixture()
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.close()


def ask(
    url: str, *, stream: bool = True, prompt: str = "hello", headers: dict[str, str] | None = None
) -> Any:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=30)


def lines_of(r: httpx.Response) -> list[str]:
    return [line for line in r.text.split("\n") if line]


def refusal(r: httpx.Response) -> str:
    """The proxy's refusal of a streamed answer: its last event, an error; never [DONE]."""
    lines = lines_of(r)
    assert r.status_code == 200 and "data: [DONE]" not in lines, lines
    err = json.loads(lines[-1].removeprefix("data: "))
    assert "teecloud proxy refused the upstream" in err["error"]["message"], err
    return str(err["error"]["message"])


def split_event(answer: bytes) -> tuple[bytes, bytes, bytes]:
    """(the stream before the receipt event, the event, the rest) of a front's streamed answer."""
    start = answer.index(_EVENT)
    end = answer.index(b"\n\n", start) + 2
    return answer[:start], answer[start:end], answer[end:]


# ---------------------------------------------------------------------------------------------- it works


@pytest.mark.parametrize("e2ee", [False, True])
@pytest.mark.parametrize("stream", [True, False])
def test_the_proxy_checks_the_inline_receipt_without_fetching_it(
    setup: Setup, e2ee: bool, stream: bool
) -> None:
    with setup.relay() as m, setup.proxy(m.url, e2ee=e2ee) as p:
        for i in range(3):
            r = ask(p.url, stream=stream, prompt=f"question {i}")
            assert r.status_code == 200, r.text
            if stream:
                lines = lines_of(r)
                assert lines[-1] == "data: [DONE]" and sum('"content"' in x for x in lines) == 3, lines
                assert not any("teecloud-receipt" in x for x in lines)  # the receipt is not passed on
            else:
                assert r.json()["choices"][0]["message"]["content"] == "t"
                assert r.headers["x-teecloud-verified"] == "receipt" and "x-teecloud-receipt" not in r.headers
            # What the proxy accepted is the front's durable, logged receipt.
            assert setup.front_app.state.front.log.get(r.headers["x-receipt-id"]) is not None
        verifier = setup.verifier
        assert (
            verifier is not None and len(verifier.accepted) == 3 and verifier.last_size == 3
        )  # each head extended the one before
    assert setup.gets == []  # no receipt round trip


def test_the_fetch_mode_and_the_receipt_routes_still_work(setup: Setup) -> None:
    with setup.relay() as m, setup.proxy(m.url, e2ee=False, receipts="fetch") as p:
        r = ask(p.url)
        assert lines_of(r)[-1] == "data: [DONE]"
    assert len(setup.gets) == 1  # the old route, once per answer
    # A client that does not ask for it gets no receipt event and finds the receipt at the route.
    r = ask(setup.front.url)
    assert b"teecloud-receipt" not in r.content and lines_of(r)[-1] == "data: [DONE]"
    doc = httpx.get(f"{setup.front.url}/v1/receipts/{r.headers['x-receipt-id']}", timeout=10).json()
    assert doc["receipt"]["body"]["response_sha256"] == hashlib.sha256(r.content).hexdigest()


def test_the_inline_receipt_is_what_the_route_serves_and_covers_the_rest_of_the_stream(setup: Setup) -> None:
    first = ask(setup.front.url, headers={"x-teecloud-receipt": "inline"})
    before, event, closing = split_event(first.content)
    assert closing == b"data: [DONE]\n\n"
    doc = json.loads(event.removeprefix(_EVENT).removeprefix(b"data: "))
    rid = first.headers["x-receipt-id"]
    served = httpx.get(f"{setup.front.url}/v1/receipts/{rid}", timeout=10).json()
    assert doc["receipt"] == served["receipt"] and doc["leaf_index"] == served["leaf_index"] == 0
    assert doc["receipt"]["body"]["response_sha256"] == hashlib.sha256(before + closing).hexdigest()
    # With `since`, the consistency proof from that size; a size beyond the log gets none.
    second = ask(setup.front.url, headers={"x-teecloud-receipt": "inline", "x-teecloud-receipt-since": "1"})
    doc2 = json.loads(split_event(second.content)[1].removeprefix(_EVENT).removeprefix(b"data: "))
    assert doc2["consistency"]["first"] == 1 and doc2["tree_head"]["tree_size"] == 2
    third = ask(setup.front.url, headers={"x-teecloud-receipt": "inline", "x-teecloud-receipt-since": "99"})
    assert "consistency" not in json.loads(split_event(third.content)[1].split(b"data: ", 1)[1])
    for bad in ("-1", "x", "1" * 19):
        r = ask(setup.front.url, headers={"x-teecloud-receipt": "inline", "x-teecloud-receipt-since": bad})
        assert r.status_code == 400 and "x-teecloud-receipt-since" in r.json()["error"]["message"]


# --------------------------------------------------------------------- the operator's moves, each refused


def on_event(change: Callable[[bytes, bytes, bytes], bytes]) -> Rewrite:
    """A rewrite of a streamed answer's (before, receipt event, closing)."""

    def rewrite(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        return change(*split_event(content)), headers

    return rewrite


def doc_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[bytes, bytes, bytes], bytes]:
    def change(before: bytes, event: bytes, closing: bytes) -> bytes:
        doc = json.loads(event.removeprefix(_EVENT).removeprefix(b"data: "))
        edit(doc)
        return (
            before + _EVENT + b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n" + closing
        )

    return change


def _flip(hexstr: str) -> str:
    return hexstr[:-1] + ("0" if hexstr[-1] != "0" else "1")


def _set(doc: dict[str, Any], path: tuple[str, ...], fn: Callable[[Any], Any]) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = fn(doc[path[-1]])


def foreign(doc: dict[str, Any]) -> None:
    """The same answer's receipt, signed by another app's key the same KMS issued (a valid chain)."""
    other = app_keys()
    body = ReceiptBody.from_json(doc["receipt"]["body"])
    forged = ReceiptBody(
        **{**body.__dict__, "app_id": other.keyset.app_id, "keyset_digest": other.keyset.digest()}
    )
    doc["receipt"] = sign_receipt(forged, other.signing_secret, other.keyset).to_json()


@pytest.mark.parametrize("e2ee", [False, True])
@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda b, e, c: b + c, "receipt: the answer ended without its inline receipt"),
        (doc_edit(lambda d: _set(d, ("receipt", "signature"), _flip)), "signature:"),
        (doc_edit(lambda d: _set(d, ("receipt", "body", "response_sha256"), _flip)), "signature:"),
        (doc_edit(lambda d: _set(d, ("tree_head", "root_hash"), _flip)), "tree_head:"),
        (doc_edit(lambda d: _set(d, ("leaf_index",), lambda i: i + 1)), "receipt_log:"),
        (doc_edit(foreign), "the receipt is from app"),
        (lambda b, e, c: b + e[:-3] + b"x\n\n" + c, "receipt: the inline receipt is not JSON"),
        (lambda b, e, c: b + e[:-2] + b" " * 70000 + b"\n\n" + c, "malformed or oversized"),
        (lambda b, e, c: b + e + e + c, "receipt: an unexpected receipt event"),
        (lambda b, e, c: b + c + e, "receipt: an unexpected receipt event"),
    ],
    ids=[
        "missing",
        "signature",
        "body",
        "tree-head",
        "leaf-index",
        "foreign",
        "malformed",
        "oversized",
        "twice",
        "after-closing",
    ],
)
def test_a_tampered_missing_or_foreign_inline_receipt_is_refused(
    setup: Setup, e2ee: bool, change: Callable[[bytes, bytes, bytes], bytes], why: str
) -> None:
    with setup.relay(on_event(change)) as m, setup.proxy(m.url, e2ee=e2ee) as p:
        r = ask(p.url)
    message = refusal(r)
    assert why in message, message
    # At most the events before the fault passed on (a fault inside one read: none of it), never [DONE].
    assert sum('"content"' in x for x in lines_of(r)) <= 3


@pytest.mark.parametrize("e2ee", [False, True])
def test_a_front_that_sends_done_without_a_receipt_is_refused(setup: Setup, e2ee: bool) -> None:
    """A front that does not send inline receipts (an older one, or the request's header dropped on the way):
    the proxy refuses the answer instead of passing on an unchecked [DONE]."""
    with setup.relay(drop_inline_request=True) as m, setup.proxy(m.url, e2ee=e2ee) as p:
        assert "receipt: the answer ended without its inline receipt" in refusal(ask(p.url))
        r = ask(p.url, stream=False)
        assert (
            r.status_code == 502
            and "receipt: the answer carries no inline receipt" in r.json()["error"]["message"]
        )
    assert setup.gets == []


def test_a_replayed_answer_and_another_answers_receipt_are_refused(setup: Setup) -> None:
    kept: dict[str, Any] = {}

    def replay(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """The first answer (with its receipt and id) is the answer to every later request."""
        if "first" not in kept:
            kept["first"] = (content, headers)
        return kept["first"]

    with setup.relay(replay) as m, setup.proxy(m.url, e2ee=False) as p:
        assert lines_of(ask(p.url, prompt="same"))[-1] == "data: [DONE]"
        assert "receipt: receipt rcpt-" in refusal(ask(p.url, prompt="same"))  # the same request again
        assert "replayed" in refusal(ask(p.url, prompt="same"))
        assert "request:" in refusal(ask(p.url, prompt="another"))

    def swap(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """Each answer goes on with the previous answer's receipt event."""
        before, event, closing = split_event(content)
        out = before + kept.get("event", event) + closing
        kept["event"] = event
        return out, headers

    with setup.relay(swap) as m, setup.proxy(m.url, e2ee=False) as p:
        assert lines_of(ask(p.url))[-1] == "data: [DONE]"
        assert "receipt: the receipt is for another request or model" in refusal(ask(p.url))


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda h: h.pop("x-teecloud-receipt"), "receipt: the answer carries no inline receipt"),
        (lambda h: h.update({"x-teecloud-receipt": "!!" + h["x-teecloud-receipt"]}), "not base64url JSON"),
        (lambda h: h.update({"x-receipt-id": "rcpt-another"}), "for another request"),
    ],
    ids=["missing", "garbled", "another-id"],
)
def test_a_non_streamed_answer_without_its_receipt_header_is_refused(
    setup: Setup, edit: Callable[[dict[str, str]], Any], why: str
) -> None:
    def rewrite(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        edit(headers)
        return content, headers

    with setup.relay(rewrite) as m, setup.proxy(m.url, e2ee=False) as p:
        r = ask(p.url, stream=False)
    assert r.status_code == 502 and why in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------------------- generated mutations


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list) and value:
        yield (*path, "drop-last")
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    else:
        yield path


def mutated(doc: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    key = path[-1]
    if key == "drop-last":
        target.pop()
        return out
    value = target[key]
    if isinstance(value, bool):
        target[key] = not value
    elif isinstance(value, int):
        target[key] = value + 1
    elif isinstance(value, str) and value and all(c in "0123456789abcdef" for c in value):
        target[key] = _flip(value)
    else:
        target[key] = str(value) + "x"
    return out


def test_every_mutation_of_an_inline_receipt_is_refused(setup: Setup) -> None:
    """A genuine inline receipt (with a consistency proof) verifies; every single-field change of it, and
    random byte flips of the bytes sent and received, are refused."""
    inline = {"x-teecloud-receipt": "inline"}
    ask(setup.front.url, headers=inline)
    ask(setup.front.url, headers=inline)
    root = httpx.get(setup.front.url + "/v1/receipts/root", timeout=10).json()["tree_head"]
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "mutate me"}], "stream": True}
    sent = json.dumps(body).encode()
    r = httpx.post(
        setup.front.url + "/v1/chat/completions",
        content=sent,
        headers={**inline, "x-teecloud-receipt-since": "2", "content-type": "application/json"},
        timeout=30,
    )
    before, event, closing = split_event(r.content)
    doc = json.loads(event.removeprefix(_EVENT).removeprefix(b"data: "))
    received, rid = before + closing, r.headers["x-receipt-id"]
    assert "consistency" in doc

    def check(d: Any, s: bytes = sent, got: bytes = received, receipt_id: str = rid) -> None:
        v = UpstreamVerifier(None, NotAttesting(), setup.policy())  # type: ignore[arg-type]
        v.heads[2], v.last_size = bytes.fromhex(root["root_hash"]), 2
        v.verify_receipt_doc(setup.upstream(), receipt_id, d, 2, s, got)

    check(doc)  # genuine
    paths = [p for p in leaves(doc) if p != ("tree_size",)]  # the top-level size is unused: the head's counts
    assert len(paths) > 25
    for path in paths:
        with pytest.raises(UpstreamRejected):
            check(mutated(doc, path))
    rng = random.Random(21)
    for _ in range(20):
        for which in ("sent", "received"):
            data = bytearray(sent if which == "sent" else received)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            with pytest.raises(UpstreamRejected, match=r"request|response"):
                check(doc, **({"s": bytes(data)} if which == "sent" else {"got": bytes(data)}))
    with pytest.raises(UpstreamRejected, match="another request"):
        check(doc, receipt_id="rcpt-" + "0" * 24)
    with pytest.raises(UpstreamRejected, match="no x-receipt-id"):
        check(doc, receipt_id="")
    assert SignedReceipt.from_json(doc["receipt"]).body.id == rid
