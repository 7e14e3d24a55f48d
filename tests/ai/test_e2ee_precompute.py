"""The E2EE work taken off the first token's path keeps every binding: the proxy's ephemeral key made ahead
(teecloud.ai.e2ee.EphemeralSpare) is used once and only for the model key it was made for, and the front's
one ECDH per request (OpenedRequest.shared) opens nothing but that request's answer."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from teecloud.ai._http import Listener
from teecloud.ai.e2ee import (
    ALG_K256,
    ALG_X25519,
    ClientSession,
    EphemeralSpare,
    ServerKey,
    new_ephemeral,
)
from teecloud.ai.errors import EnvelopeRejected
from teecloud.ai.proxy import make_proxy_app, proxy_event_loop
from tests.ai.conftest import MODEL_ID, Stack, relayed_headers

ALGS = [ALG_X25519, ALG_K256]


def _model_pk(key: ServerKey, alg: str) -> bytes:
    return key.k256_public_key if alg == ALG_K256 else key.public_key


@pytest.mark.parametrize("alg", ALGS)
def test_a_spare_is_handed_out_once(alg: str) -> None:
    pk = _model_pk(ServerKey(os.urandom(32)), alg)
    spare = EphemeralSpare()
    spare.refill(pk, alg)
    first = spare.take(pk, alg)
    second = spare.take(pk, alg)  # nothing made ahead any more: a fresh one
    assert first.epk != second.epk and first.shared != second.shared
    spare.refill(pk, alg)
    spare.refill(pk, alg)  # a second refill keeps the one made, never hands it out twice
    third = spare.take(pk, alg)
    assert spare.take(pk, alg).epk != third.epk


@pytest.mark.parametrize("alg", ALGS)
def test_a_spare_made_for_another_model_key_is_dropped(alg: str) -> None:
    """A rotated key set: the spare made for the old key is never used for the new one, and is gone."""
    old, new = ServerKey(os.urandom(32)), ServerKey(os.urandom(32))
    spare = EphemeralSpare()
    spare.refill(_model_pk(old, alg), alg)
    stale = spare._next
    assert stale is not None
    got = spare.take(_model_pk(new, alg), alg)
    assert got.model_public_key == _model_pk(new, alg) and got.epk != stale.epk
    assert spare.take(_model_pk(old, alg), alg).epk != stale.epk  # dropped, not kept for later
    # The envelope sealed with the new key's ephemeral opens at the new key only.
    session = ClientSession(_model_pk(new, alg), MODEL_ID, now=int(time.time()), alg=alg, ephemeral=got)
    env = session.seal_request(b'{"prompt": "x"}')
    assert new.open_request(env, model=MODEL_ID, now=int(time.time())).plaintext == b'{"prompt": "x"}'
    with pytest.raises(EnvelopeRejected):
        old.open_request(env, model=MODEL_ID, now=int(time.time()))


def test_a_session_refuses_an_ephemeral_of_another_key_or_algorithm() -> None:
    a, b = ServerKey(os.urandom(32)), ServerKey(os.urandom(32))
    eph = new_ephemeral(a.public_key, ALG_X25519)
    with pytest.raises(ValueError, match="another model key"):
        ClientSession(b.public_key, MODEL_ID, now=0, ephemeral=eph)
    with pytest.raises(ValueError, match="another model key"):
        ClientSession(a.k256_public_key, MODEL_ID, now=0, alg=ALG_K256, ephemeral=eph)
    with pytest.raises(ValueError):
        new_ephemeral(a.public_key, ALG_K256)  # not a secp256k1 point


@pytest.mark.parametrize("alg", ALGS)
def test_the_front_keeps_one_ecdh_per_request_and_answers_only_that_request(alg: str) -> None:
    key = ServerKey(os.urandom(32))
    now = int(time.time())
    s1 = ClientSession(_model_pk(key, alg), MODEL_ID, now=now, alg=alg)
    s2 = ClientSession(_model_pk(key, alg), MODEL_ID, now=now, alg=alg)
    r1 = key.open_request(json.loads(json.dumps(s1.seal_request(b"one"))), model=MODEL_ID, now=now)
    r2 = key.open_request(json.loads(json.dumps(s2.seal_request(b"two"))), model=MODEL_ID, now=now)
    assert r1.shared and r1.shared != r2.shared
    assert s1.open_response(key.seal_response(r1, b"answer one")) == b"answer one"
    assert s1.open_stream_event(key.seal_stream_event(r1, 0, b"ev", final=False), 0) == (b"ev", False)
    with pytest.raises(EnvelopeRejected):
        s2.open_response(key.seal_response(r1, b"answer one"))
    with pytest.raises(EnvelopeRejected):
        s2.open_stream_event(key.seal_stream_event(r1, 1, b"ev", final=False), 0)
    # A request whose shared secret was swapped for another request's seals nothing its client opens.
    r2.shared, r2.stream_cipher = r1.shared, None
    with pytest.raises(EnvelopeRejected):
        s2.open_response(key.seal_response(r2, b"answer two"))


@pytest.mark.parametrize("alg", ALGS)
def test_the_proxy_uses_its_spare_only_for_the_pinned_key(stack: Stack, alg: str) -> None:
    """Through the real front: a spare made for another model key (a key set rotated away) is not used (the
    front opens the prompt); the spare made while an answer streams is the next request's, once; every
    request's ephemeral key differs."""
    sent: list[bytes] = []
    app = FastAPI()
    http = httpx.AsyncClient(base_url=stack.front.url, timeout=60)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        body = await request.body()
        if request.method == "POST":
            sent.append(body)
        r = await http.request(
            request.method,
            "/" + path,
            params=request.query_params,
            content=body,
            headers=relayed_headers(request.headers),
        )
        headers = {
            k: v for k, v in r.headers.items() if k in ("x-receipt-id", "content-type", "x-teecloud-receipt")
        }
        return Response(r.content, status_code=r.status_code, headers=headers)

    foreign = ServerKey(os.urandom(32))
    with Listener(app, name="test-recording-relay") as m:
        proxy_app = make_proxy_app(m.url, stack.verifier(), stack.policy(e2ee_alg=alg))
        spare: EphemeralSpare = proxy_app.state.ephemeral_spare
        stale = new_ephemeral(_model_pk(foreign, alg), alg)
        spare._next = stale
        with Listener(proxy_app, name="test-ai-proxy", loop=proxy_event_loop()) as p:
            made_ahead = []
            for i, stream in enumerate([True, False, True]):
                body = {"model": MODEL_ID, "prompt": f"spare {i}", "max_tokens": 3, "temperature": 0}
                r = httpx.post(f"{p.url}/v1/completions", json=body | {"stream": stream}, timeout=60)
                assert r.status_code == 200, r.text
                assert "error" not in r.text
                nxt = spare._next
                assert nxt is not None and nxt.model_public_key != stale.model_public_key
                made_ahead.append(nxt.epk.hex())
    epks = [json.loads(b)["epk"] for b in sent]
    assert stale.epk.hex() not in epks
    assert len(set(epks)) == len(epks) == 3
    assert epks[1:] == made_ahead[:2]  # each spare went to the next request, once
