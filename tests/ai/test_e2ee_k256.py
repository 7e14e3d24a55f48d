"""E2EE with a secp256k1 key (teecloud.ai.e2ee, "alg": "secp256k1"): ECDH + HKDF-SHA256 + AES-256-GCM under
the same envelope rules as X25519. The key derivation is checked against an independent implementation
written here from the specifications (secp256k1 point arithmetic from SEC 2 / SEC 1 v2 §3.3.1, HKDF from
RFC 5869 on the standard library's hmac), not against the module's own helpers."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import Any

import coincurve
import httpx
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import FastAPI, Request
from fastapi.responses import Response

from teecloud.ai._http import Listener
from teecloud.ai._jcs import jcs
from teecloud.ai.e2ee import (
    ALG_K256,
    ClientSession,
    ServerKey,
    k256_e2ee_public_key,
    k256_e2ee_secret,
)
from teecloud.ai.errors import EnvelopeRejected, MalformedInput
from teecloud.ai.keyset import KeySet
from tests.ai.conftest import MODEL_ID, Stack, relayed_headers

# ---------------------------------------------------------------- an independent reference (the test oracle)
P = 2**256 - 2**32 - 977
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
G = (
    0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
    0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8,
)


def _add(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % P == 0:
        return None
    if a == b:
        lam = 3 * a[0] * a[0] * pow(2 * a[1], -1, P) % P
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], -1, P) % P
    x = (lam * lam - a[0] - b[0]) % P
    return x, (lam * (a[0] - x) - a[1]) % P


def _mul(k: int, pt: tuple[int, int]) -> tuple[int, int]:
    out: tuple[int, int] | None = None
    while k:
        if k & 1:
            out = _add(out, pt)
        pt = _add(pt, pt)  # type: ignore[assignment]
        k >>= 1
    assert out is not None
    return out


def _decompress(b: bytes) -> tuple[int, int]:
    x = int.from_bytes(b[1:], "big")
    y = pow((x**3 + 7) % P, (P + 1) // 4, P)
    if y % 2 != b[0] - 2:
        y = P - y
    return x, y


def _compress(pt: tuple[int, int]) -> bytes:
    return bytes([2 + pt[1] % 2]) + pt[0].to_bytes(32, "big")


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:  # RFC 5869
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:length]


# ------------------------------------------------------------------------------------------------- the tests


def test_the_model_key_derivation_matches_the_reference() -> None:
    secret = os.urandom(32)
    d = int.from_bytes(_hkdf(secret, b"", b"teecloud-ai-e2ee-v1 secp256k1 key"), "big")
    assert k256_e2ee_secret(secret) == d.to_bytes(32, "big")
    assert k256_e2ee_public_key(secret) == _compress(_mul(d, G)) == ServerKey(secret).k256_public_key
    # and libsecp256k1 (coincurve) agrees on the public key
    assert coincurve.PrivateKey(k256_e2ee_secret(secret)).public_key.format() == k256_e2ee_public_key(secret)


def test_a_sealed_request_opens_with_the_reference_ecdh_and_hkdf() -> None:
    secret = os.urandom(32)
    server = ServerKey(secret)
    session = ClientSession(server.k256_public_key, "tiny", now=1000, alg=ALG_K256)
    env = session.seal_request(b'{"prompt": "hi"}')
    assert env["alg"] == "secp256k1" and len(bytes.fromhex(env["epk"])) == 33
    # the model's side, recomputed: shared = x(d * epk); key = HKDF(shared, epk || model key, info)
    d = int.from_bytes(k256_e2ee_secret(secret), "big")
    epk = bytes.fromhex(env["epk"])
    shared = _mul(d, _decompress(epk))[0].to_bytes(32, "big")
    key = _hkdf(shared, epk + server.k256_public_key, b"teecloud-ai-e2ee-v1 request")
    ad = jcs(
        {
            "v": 1,
            "model": "tiny",
            "direction": "request",
            "ts": 1000,
            "epk": env["epk"],
            "request_nonce": env["nonce"],
            "alg": "secp256k1",
        }
    )
    plain = AESGCM(key).decrypt(bytes.fromhex(env["nonce"]), bytes.fromhex(env["ciphertext"]), ad)
    assert plain == b'{"prompt": "hi"}'


def test_round_trip_answer_and_stream_bound_to_the_request() -> None:
    server = ServerKey(os.urandom(32))
    client = ClientSession(server.k256_public_key, "tiny", now=1000, alg=ALG_K256)
    opened = server.open_request(client.seal_request(b"question"), model="tiny", now=1001)
    assert opened.plaintext == b"question" and opened.alg == ALG_K256
    assert client.open_response(server.seal_response(opened, b"answer")) == b"answer"
    events = [server.seal_stream_event(opened, i, p, final=i == 2) for i, p in enumerate([b"a", b"b", b""])]
    assert [client.open_stream_event(e, i) for i, e in enumerate(events)] == [
        (b"a", False),
        (b"b", False),
        (b"", True),
    ]
    # an answer opens only for the request it answers, and an X25519 session cannot open it
    other = ClientSession(server.k256_public_key, "tiny", now=1000, alg=ALG_K256)
    with pytest.raises(EnvelopeRejected):
        other.open_response(server.seal_response(opened, b"answer"))
    x = ClientSession(server.public_key, "tiny", now=1000)
    with pytest.raises(EnvelopeRejected):
        x.open_response(server.seal_response(opened, b"answer"))


def _mutations(env: dict[str, Any], server: ServerKey) -> list[tuple[str, dict[str, Any]]]:
    ct = bytes.fromhex(env["ciphertext"])
    flipped = (ct[:-1] + bytes([ct[-1] ^ 1])).hex()
    not_on_curve = "02" + "00" * 31 + "05"  # x = 5: x^3 + 7 = 132 is not a square mod p
    return [
        ("tampered", {**env, "ciphertext": flipped}),
        ("other model", {**env, "model": "other"}),
        ("alg dropped", {k: v for k, v in env.items() if k != "alg"}),
        ("alg x25519 named", {**env, "alg": "x25519"}),
        ("alg unknown", {**env, "alg": "p256"}),
        ("epk uncompressed", {**env, "epk": "04" + env["epk"][2:] + "00" * 32}),
        ("epk not on the curve", {**env, "epk": not_on_curve}),
        ("epk of the model itself", {**env, "epk": server.k256_public_key.hex()}),
        ("extra field", {**env, "x": 1}),
        ("stale", {**env, "ts": 1000 - 500}),
    ]


def test_the_envelope_rules_are_the_x25519_ones() -> None:
    server = ServerKey(os.urandom(32), window_s=120)
    client = ClientSession(server.k256_public_key, "tiny", now=1000, alg=ALG_K256)
    env = client.seal_request(b"question")
    for what, bad in _mutations(env, server):
        with pytest.raises(EnvelopeRejected):
            server.open_request(bad, model="tiny", now=1000)
        assert what
    assert server.open_request(env, model="tiny", now=1000).plaintext == b"question"
    with pytest.raises(EnvelopeRejected, match="replayed"):
        server.open_request(env, model="tiny", now=1001)
    with pytest.raises(ValueError):
        ClientSession(server.k256_public_key, "tiny", now=1000, alg="p256")


def test_the_key_set_carries_the_k256_key_and_keeps_old_digests() -> None:
    base = dict(
        app_id=os.urandom(20),
        signing_public_key=coincurve.PrivateKey().public_key.format(),
        signing_key_chain=(os.urandom(65), os.urandom(65)),
        e2ee_public_key=os.urandom(32),
        tls_spki_sha256=os.urandom(32),
    )
    old = KeySet(**base)  # type: ignore[arg-type]
    assert "e2ee_k256_public_key" not in old.to_json() and KeySet.from_json(old.to_json()) == old
    k = k256_e2ee_public_key(os.urandom(32))
    new = KeySet(**base, e2ee_k256_public_key=k)  # type: ignore[arg-type]
    assert KeySet.from_json(new.to_json()) == new and new.digest() != old.digest()
    for bad in ("04" + k.hex()[2:], k.hex()[:-2], "zz"):
        with pytest.raises(MalformedInput):
            KeySet.from_json({**new.to_json(), "e2ee_k256_public_key": bad})


@pytest.mark.slow
def test_the_front_answers_a_k256_sealed_prompt(stack: Stack) -> None:
    report = httpx.get(f"{stack.front.url}/v1/attestation/report", params={"nonce": "cd" * 32}).json()
    keyset = KeySet.from_json(report["keyset"])
    assert keyset.e2ee_k256_public_key is not None
    session = ClientSession(keyset.e2ee_k256_public_key, MODEL_ID, now=int(time.time()), alg=ALG_K256)
    prompt = "a prompt sealed to the secp256k1 key"
    plain = json.dumps({"model": MODEL_ID, "prompt": prompt, "max_tokens": 4}).encode()
    envelope = session.seal_request(plain)
    r = httpx.post(f"{stack.front.url}/v1/completions", json=envelope, timeout=60)
    assert r.status_code == 200, r.text
    assert prompt.encode() not in r.content
    assert json.loads(session.open_response(r.json()))["choices"][0]["text"] is not None
    replay = httpx.post(f"{stack.front.url}/v1/completions", json=envelope, timeout=60)
    assert replay.status_code == 400 and "replayed" in replay.json()["error"]["message"]
    bad = {**session.seal_request(plain), "epk": "02" + "00" * 31 + "05"}
    r = httpx.post(f"{stack.front.url}/v1/completions", json=bad, timeout=60)
    assert r.status_code == 400 and "epk" in r.json()["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_the_proxy_seals_prompts_with_secp256k1_when_asked(stack: Stack, stream: bool) -> None:
    """`teecloud ai proxy --secp256k1`: every prompt leaves the proxy sealed to the key set's secp256k1
    key (what crossed the wire is recorded in the middle); the answer comes back opened, receipt checked."""
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

    prompt = f"a secret prompt for the k256 proxy ({stream})"
    with Listener(app, name="test-recording-relay") as m, stack.proxy(m.url, e2ee_alg=ALG_K256) as p:
        body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": stream}
        r = httpx.post(f"{p.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if stream:
            assert "data: [DONE]" in r.text and "error" not in r.text
        else:
            assert r.headers["x-teecloud-verified"] == "receipt"
            assert r.json()["choices"][0]["text"] is not None
    [envelope] = [json.loads(b) for b in sent]
    assert envelope["alg"] == ALG_K256 and len(bytes.fromhex(envelope["epk"])) == 33
    assert prompt.encode() not in sent[0]


def test_the_proxy_policy_refuses_an_unknown_e2ee_alg() -> None:
    from teecloud.ai.proxy import ProxyPolicy

    with pytest.raises(ValueError, match="e2ee_alg"):
        ProxyPolicy(kms_root_public_key=b"\x02" * 33, e2ee_alg="rsa")


@pytest.mark.slow
def test_the_proxy_refuses_a_key_set_without_the_k256_key_when_asked_for_it(stack: Stack) -> None:
    """An upstream whose key set lacks the secp256k1 key (an older front, or an operator who strips it and
    states the stripped set's digest) is refused at `keyset` before any prompt leaves: the proxy never falls
    back to X25519 on its own, and the stripped set does not match the quote anyway."""
    from tests.ai.test_inference_e2e import mitm

    def strip_k256(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if path == "v1/attestation/report":
            doc = json.loads(content)
            doc["keyset"].pop("e2ee_k256_public_key", None)
            doc["keyset_digest"] = hashlib.sha256(jcs(doc["keyset"])).hexdigest()
            content = json.dumps(doc).encode()
        return content, headers

    body = {"model": MODEL_ID, "prompt": "never sent", "max_tokens": 4}
    with mitm(stack, strip_k256) as m, stack.proxy(m.url, e2ee_alg=ALG_K256) as p:
        r = httpx.post(f"{p.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 502 and "keyset:" in r.json()["error"]["message"]
        assert "secp256k1" in r.json()["error"]["message"]
