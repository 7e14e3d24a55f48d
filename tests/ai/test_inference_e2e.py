"""The inference slice end to end with the real engine (llama-cpp-python's server on a tiny GGUF model) and
the official `openai` client through the verifying proxy; the front's answers to bad input; engine crashes."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from typer.testing import CliRunner

from teecloud.ai import ClientSession, EnvelopeRejected, SignedReceipt, verify_receipt
from teecloud.ai._http import Listener
from teecloud.cli import app as teecloud_app
from tests.ai.conftest import MODEL_ID, Stack, relayed_headers

pytestmark = pytest.mark.slow

PROMPT = "the secret prompt 7c1e"


@pytest.fixture(scope="module")
def proxy(stack: Stack) -> Iterator[Listener]:
    with stack.proxy() as p:
        yield p


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


# --------------------------------------------------------------------------------- through the proxy


def test_openai_client_through_the_verifying_proxy(stack: Stack, proxy: Listener, tmp_path: Path) -> None:
    oa = client(proxy.url)
    assert [m.id for m in oa.models.list().data] == [MODEL_ID]
    raw = oa.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=8
    )
    chat = raw.parse()
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0
    assert raw.headers["x-teecloud-verified"] == "receipt"
    rid = raw.headers["x-receipt-id"]
    # The receipt, as anyone fetches it from the app, names the app, the model and its weights, and says the
    # prompt went end-to-end encrypted (the proxy seals non-streamed prompts to the attested key).
    doc = httpx.get(f"{stack.front.url}/v1/receipts/{rid}").json()
    body = verify_receipt(
        SignedReceipt.from_json(doc["receipt"]),
        kms_root_public_key=stack.provider.root.k256_public_key,
        expected_app_id=stack.app_id,
    )
    assert body.model == MODEL_ID and body.weights_sha256 == stack.config.weights_sha256 and body.e2ee
    # `teecloud ai verify` checks it offline, log inclusion included, and refuses a tampered copy.
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(doc))
    root = stack.provider.root.k256_public_key.hex()
    ok = cli("ai", "verify", str(path), "--kms-root", root, "--app-id", stack.app_id.hex(), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["steps"][-2:] == ["tree_head", "inclusion"]
    doc["receipt"]["body"]["model"] = "another-model"
    path.write_text(json.dumps(doc))
    bad = cli("ai", "verify", str(path), "--kms-root", root)
    assert bad.returncode == 1 and "refused: signature" in bad.stderr
    other_app = cli("ai", "verify", str(path), "--kms-root", root, "--app-id", "11" * 20)
    assert other_app.returncode == 1


def test_streamed_completion_through_the_proxy_is_checked_at_its_end(stack: Stack, proxy: Listener) -> None:
    oa = client(proxy.url)
    stream = oa.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert chunks and any(c.choices and c.choices[0].delta.content for c in chunks)
    legacy = oa.completions.create(model=MODEL_ID, prompt="hello", max_tokens=4)
    assert legacy.choices[0].text is not None


def test_proxy_refuses_an_upstream_with_another_kms_root_or_app(stack: Stack) -> None:
    for kw, step in [
        ({"kms_root_public_key": bytes.fromhex("02" + "11" * 32)}, "keyset_chain"),
        ({"expected_app_id": b"\x22" * 20}, "app_id"),
        ({"allowed_compose_hashes": frozenset({b"\x33" * 32})}, "compose_hash"),
        ({"expected_weights_sha256": b"\x44" * 32}, "model"),
    ]:
        with stack.proxy(**kw) as p:
            with pytest.raises(openai.APIStatusError) as err:
                client(p.url).chat.completions.create(
                    model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=4
                )
            assert err.value.status_code == 502
            assert f"{step}:" in str(err.value.message), err.value.message


def mitm(stack: Stack, rewrite: Any, upstream: str | None = None) -> Listener:
    """An upstream in the middle (the operator, the gateway) that rewrites what the front answers."""
    app = FastAPI()
    http = httpx.AsyncClient(base_url=upstream or stack.front.url, timeout=60)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def relay(path: str, request: Request) -> Response:
        r = await http.request(
            request.method,
            "/" + path,
            params=request.query_params,
            content=await request.body(),
            headers=relayed_headers(request.headers),
        )
        content, headers = rewrite(path, r.content, dict(r.headers))
        headers.pop("content-length", None)
        return Response(content, status_code=r.status_code, headers=headers)

    return Listener(app, name="test-mitm")


def test_proxy_refuses_answers_that_do_not_match_their_receipt(stack: Stack) -> None:
    def swap_answer(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if path == "v1/completions":
            doc = json.loads(content)
            doc["choices"][0]["text"] = "an answer the model never gave"
            content = json.dumps(doc).encode()
        return content, headers

    with mitm(stack, swap_answer) as m, stack.proxy(m.url, e2ee=False) as p:
        with pytest.raises(openai.APIStatusError) as err:
            client(p.url).completions.create(model=MODEL_ID, prompt="hello", max_tokens=4)
        assert err.value.status_code == 502 and "response:" in err.value.message

    def another_key(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if path == "v1/attestation/report":
            doc = json.loads(content)
            doc["keyset"]["e2ee_public_key"] = "55" * 32  # the operator's own key, to read prompts
            content = json.dumps(doc).encode()
        return content, headers

    with mitm(stack, another_key) as m, stack.proxy(m.url) as p:
        with pytest.raises(openai.APIStatusError) as err:
            client(p.url).chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=4
            )
        assert err.value.status_code == 502 and "keyset:" in err.value.message

    def drop_receipt(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        headers.pop("x-receipt-id", None)
        return content, headers

    with mitm(stack, drop_receipt) as m, stack.proxy(m.url, e2ee=False) as p:
        with pytest.raises(openai.APIStatusError) as err:
            client(p.url).completions.create(model=MODEL_ID, prompt="hello", max_tokens=4)
        assert err.value.status_code == 502 and "receipt:" in err.value.message


# ------------------------------------------------------------------------------------- the front itself


def test_front_answers_e2ee_and_refuses_replay(stack: Stack) -> None:
    report = httpx.get(f"{stack.front.url}/v1/attestation/report", params={"nonce": "ab" * 32}).json()
    e2ee_key = bytes.fromhex(report["keyset"]["e2ee_public_key"])
    session = ClientSession(e2ee_key, MODEL_ID, now=int(time.time()))
    plain = json.dumps({"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4}).encode()
    envelope = session.seal_request(plain)
    r = httpx.post(f"{stack.front.url}/v1/completions", json=envelope, timeout=60)
    assert r.status_code == 200, r.text
    assert PROMPT.encode() not in r.content
    answer = json.loads(session.open_response(r.json()))
    assert answer["choices"][0]["text"] is not None
    replay = httpx.post(f"{stack.front.url}/v1/completions", json=envelope, timeout=60)
    assert replay.status_code == 400 and "replayed" in replay.json()["error"]["message"]
    legacy = httpx.get(f"{stack.front.url}/v1/signature/{r.headers['x-receipt-id']}").json()
    assert legacy["signing_address"] == report["signing_address"] and legacy["signature"].startswith("0x")


@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b"not json", 400, "not JSON"),
        (b"[1]", 400, "JSON object"),
        (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "not served"),
        (json.dumps({"prompt": "x", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
        (json.dumps({"teecloud_e2ee": 1, "model": MODEL_ID}).encode(), 400, "envelope"),
        (json.dumps({"prompt": PROMPT * 20000}).encode(), 413, "above"),
    ],
)
def test_front_bad_input_is_4xx_and_nothing_is_logged_in_the_clear(
    stack: Stack, caplog: pytest.LogCaptureFixture, body: bytes, status: int, needle: str
) -> None:
    caplog.set_level(logging.DEBUG)
    r = httpx.post(f"{stack.front.url}/v1/completions", content=body, timeout=30)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert PROMPT not in caplog.text and "x-receipt-id" not in r.headers


@pytest.mark.parametrize("nonce", ["", "zz", "ab" * 8 + "a", "ab" * 15, "ab" * 65])
def test_attestation_route_refuses_bad_nonces(stack: Stack, nonce: str) -> None:
    r = httpx.get(f"{stack.front.url}/v1/attestation/report", params={"nonce": nonce})
    assert r.status_code == 400 and "nonce" in r.json()["error"]["message"]
    assert httpx.get(f"{stack.front.url}/v1/receipts/..%2f..%2fetc").status_code == 404


def test_engine_crash_is_503_and_the_app_recovers(stack: Stack) -> None:
    proc = stack.engine.proc
    assert proc is not None
    os.killpg(proc.pid, signal.SIGKILL)  # the engine the fixture started, in its own session
    proc.wait()
    r = httpx.post(f"{stack.front.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    stack.engine.wait_ready(timeout=60)
    assert stack.engine.restarts >= 1
    r = httpx.post(f"{stack.front.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.headers["x-receipt-id"]


def cli(*args: str) -> Any:
    """`teecloud ARGS` in process (typer's runner): .returncode, .stdout, .stderr."""
    r = CliRunner().invoke(teecloud_app, list(args))
    r.returncode = r.exit_code
    return r


def test_streamed_e2ee_answer_is_sealed_event_by_event(stack: Stack) -> None:
    report = httpx.get(f"{stack.front.url}/v1/attestation/report", params={"nonce": "cd" * 32}).json()
    session = ClientSession(
        bytes.fromhex(report["keyset"]["e2ee_public_key"]), MODEL_ID, now=int(time.time())
    )
    plain = json.dumps({"prompt": PROMPT, "max_tokens": 6, "stream": True}).encode()
    with httpx.stream(
        "POST", f"{stack.front.url}/v1/completions", json=session.seal_request(plain), timeout=60
    ) as r:
        assert r.status_code == 200
        raw = r.read()
        rid = r.headers["x-receipt-id"]
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    opened = [session.open_stream_event(json.loads(e[6:]), i) for i, e in enumerate(events)]
    assert [final for _, final in opened] == [False] * (len(opened) - 1) + [True]
    texts = b"".join(p for p, _ in opened)
    assert b'"choices"' in texts and b"[DONE]" in texts and b'"choices"' not in raw
    # Dropped, reordered or replayed events do not open.
    with pytest.raises(EnvelopeRejected):
        session.open_stream_event(json.loads(events[1][6:]), 0)
    receipt = httpx.get(f"{stack.front.url}/v1/receipts/{rid}").json()["receipt"]["body"]
    assert receipt["stream"] and receipt["e2ee"]


def test_proxy_refuses_a_truncated_encrypted_stream(stack: Stack) -> None:
    def drop_final(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if path == "v1/chat/completions":
            content = b"\n\n".join([e for e in content.split(b"\n\n") if e.strip()][:-1]) + b"\n\n"
        return content, headers

    with mitm(stack, drop_final) as m, stack.proxy(m.url) as p:
        oa = client(p.url)
        with pytest.raises(openai.APIError) as err:
            list(
                oa.chat.completions.create(
                    model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, stream=True
                )
            )
        assert "e2ee:" in str(err.value), err.value


def test_proxy_refuses_a_rewritten_plain_stream_before_its_end(stack: Stack) -> None:
    def rewrite(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if path == "v1/chat/completions":
            assert b'"choices"' in content
            content = content.replace(b'"choices"', b'"choices" ', 1)  # still valid JSON, other bytes
        return content, headers

    with mitm(stack, rewrite) as m, stack.proxy(m.url, e2ee=False) as p:
        stream = client(p.url).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        with pytest.raises(openai.APIError) as err:
            list(stream)
        assert "response:" in str(err.value), err.value


def test_malformed_fields_are_400_naming_the_field_and_never_quote_the_prompt(
    stack: Stack, proxy: Listener
) -> None:
    """llama-cpp-python's server answers a malformed field with a 500 quoting the input and a traceback; the
    front checks the fields first: a 400 naming the field, for plain and encrypted requests alike."""
    report = httpx.get(f"{stack.front.url}/v1/attestation/report", params={"nonce": "ef" * 32}).json()
    session = ClientSession(
        bytes.fromhex(report["keyset"]["e2ee_public_key"]), MODEL_ID, now=int(time.time())
    )
    for bad, field in [
        ({"messages": [{"role": "user", "content": PROMPT}], "temperature": "hot"}, "temperature"),
        ({"messages": PROMPT}, "messages"),
        ({"messages": [{"content": PROMPT}]}, "role"),
        ({"messages": [{"role": "user", "content": PROMPT}], "stop": [1]}, "stop"),
        ({"messages": [{"role": "user", "content": PROMPT}], "seed": 1.5}, "seed"),
        ({"messages": [{"role": "user", "content": PROMPT}], "logit_bias": {"2": "x"}}, "logit_bias"),
    ]:
        body = json.dumps(bad).encode()
        sealed = session.seal_request(body)
        session.nonce = os.urandom(12)  # a fresh nonce per envelope (the replay cache would refuse a reuse)
        for r in (
            httpx.post(f"{stack.front.url}/v1/chat/completions", json=sealed, timeout=60),
            httpx.post(f"{proxy.url}/v1/chat/completions", content=body, timeout=60),
        ):
            assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
            assert PROMPT.encode() not in r.content
    r = httpx.post(f"{stack.front.url}/v1/completions", json={"prompt": 7}, timeout=60)
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
