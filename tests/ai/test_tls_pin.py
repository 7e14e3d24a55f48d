"""The front over HTTPS with the TLS key from the guest API (GetTlsKey), whose SPKI hash is in the attested
key set: the proxy pins it, and refuses a relay that terminates TLS with any other key, or plain HTTP."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request
from fastapi.responses import Response

from teecloud.ai._http import Listener
from teecloud.ai.server import (
    InferenceConfig,
    keys_from_guest_api,
    make_inference_app,
    tls_key_from_guest_api,
)
from tests.ai.conftest import MODEL_ID, Stack, relayed_headers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls_front(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    d = tmp_path_factory.mktemp("tls")
    chain, key, spki = tls_key_from_guest_api(stack.guest, d / "tls", names=["localhost"])
    keys = keys_from_guest_api(stack.guest, tls_spki_sha256=spki)
    config = InferenceConfig(MODEL_ID, stack.config.weights_sha256, stack.engine.url, d / "receipts")
    with Listener(make_inference_app(config, keys, stack.quote), name="tls-front", tls=(chain, key)) as f:
        yield f


def ask(url: str) -> openai.types.chat.ChatCompletion:
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return oa.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )


def test_proxy_pins_the_attested_tls_key(stack: Stack, tls_front: Listener) -> None:
    assert tls_front.url.startswith("https://")
    with stack.proxy(tls_front.url, allow_plain_http=False) as p:
        assert ask(p.url).choices[0].message.content is not None
        info = httpx.get(p.url + "/v1/teecloud/upstream").json()
        assert info["tls_pinned"] is True and info["keyset"]["tls_spki_sha256"] != "00" * 32


def test_proxy_refuses_plain_http_unless_allowed(stack: Stack) -> None:
    with stack.proxy(allow_plain_http=False) as p:
        with pytest.raises(openai.APIStatusError) as err:
            ask(p.url)
        assert err.value.status_code == 502 and "tls_pin:" in err.value.message


def self_signed(d: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (d / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return d / "c.pem", d / "k.pem"


def test_proxy_refuses_a_relay_that_terminates_tls_with_another_key(
    stack: Stack, tls_front: Listener, tmp_path: Path
) -> None:
    """The operator's TLS terminator in front of the genuine app: every byte it relays is genuine, but it
    could read them; the TLS key is not the attested one, so the proxy never sends it a prompt."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    upstream = httpx.AsyncClient(base_url=tls_front.url, verify=ctx, timeout=60)
    relay = FastAPI()

    @relay.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        r = await upstream.request(
            request.method,
            "/" + path,
            params=request.query_params,
            content=await request.body(),
            headers=relayed_headers(request.headers),
        )
        headers = {k: v for k, v in r.headers.items() if k not in ("content-length", "transfer-encoding")}
        return Response(r.content, status_code=r.status_code, headers=headers)

    with Listener(relay, name="tls-relay", tls=self_signed(tmp_path)) as m, stack.proxy(m.url) as p:
        with pytest.raises(openai.APIStatusError) as err:
            ask(p.url)
        assert err.value.status_code == 502 and "tls_pin:" in err.value.message
