"""The attacker's tools: RA-TLS client certificates under a target's public temporary CA from any quote
source, and raw mutual-TLS posts."""

from __future__ import annotations

import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation.models import EventLogEntry
from teecloud.keys.certs import key_to_pem
from teecloud.keys.ratls import make_ratls_cert
from teecloud.kms import api
from teecloud.kms.bootstrap import KMS_APP_ID
from tests.kms.test_threshold_net_peering import Member


@dataclass(frozen=True)
class ReplayedQuote:
    """A quote source that answers every report_data with one captured quote (and its event log)."""

    captured: bytes
    log: tuple[EventLogEntry, ...]

    def quote(self, report_data: bytes) -> bytes:
        return self.captured

    def event_log(self) -> list[EventLogEntry]:
        return list(self.log)


def client_cert_der(
    target: Member,
    key: ec.EllipticCurvePrivateKey,
    quote_source: object,
    *,
    app_id: bytes | None = KMS_APP_ID,
    usage: str = "kms:peer",
) -> bytes:
    now = int(time.time()) - 30
    cert = make_ratls_cert(
        quote_source,  # type: ignore[arg-type]
        key,
        issuer_key=target.service.state.temp_ca_key,
        issuer_cert=target.service.state.temp_ca_cert,
        subject="teecloud KMS peer",
        usage=usage,
        not_before=now,
        not_after=now + 600,
        app_id=app_id,
        server_auth=False,
        client_auth=True,
    )
    return cert.public_bytes(serialization.Encoding.DER)


def post_as(
    target: Member,
    key: ec.EllipticCurvePrivateKey,
    cert_der: bytes,
    body: dict[str, Any] | bytes,
    path: str = api.PATH_PEER_HELLO,
) -> tuple[int, dict[str, Any]]:
    """One mutual-TLS POST; a body that is not JSON (an HTTP 500's text) comes back as {"raw": text}."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.pem"
        pem = x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)
        p.write_bytes(pem + key_to_pem(key).encode())
        ctx.load_cert_chain(str(p))
    with httpx.Client(verify=ctx, timeout=30) as http:
        if isinstance(body, bytes):
            r = http.post(
                target.server.url + path, content=body, headers={"content-type": "application/json"}
            )
        else:
            r = http.post(target.server.url + path, json=body)
    try:
        doc = r.json()
    except ValueError:
        doc = {"raw": r.text}
    return r.status_code, doc if isinstance(doc, dict) else {"json": doc}


def member_doc(member: api.PeerMember | None) -> dict[str, Any] | None:
    return member.model_dump() if member is not None else None


def as_member(src: Member, target: Member) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """`src`'s genuine boot-time key and a client certificate for it under `target`'s temporary CA."""
    return src.identity.key, client_cert_der(target, src.identity.key, src.identity.evidence)
