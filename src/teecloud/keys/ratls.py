"""RA-TLS certificates: X.509 certificates that carry TEE evidence binding their own public key.

Format (dstack-compatible, reference/dstack.md §6): non-critical extensions under OID arc
1.3.6.1.4.1.62397.1 — .1 the TDX quote, .2 the event log (JSON text), .3 the app_id, .4 the certificate
usage (e.g. "app:tls", "kms:rpc"). Each extnValue holds a DER OCTET STRING wrapping the content (the parser
also accepts the bare content). The quote's report_data is sha512(b"ratls-cert:" ‖ SubjectPublicKeyInfo DER).

    make_ratls_cert / generate_ratls_identity   build (the quote comes from a TEE passed in)
    parse_ratls_cert                             untrusted bytes -> RaTlsClaims (no crypto checks)
    check_key_binding                            claims + verified report_data: the quote binds the key

Only the key binding is checked here. Verifying the evidence (any TEE kind), the certificate's validity
window and its app_id claim is the peer verifier's job (teecloud.peer.PeerVerifier.verify_cert), in one place.
The quote extension carries a TDX quote (dstack) or a SEV-SNP attestation report (raw, 1184 bytes; teecloud).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation.models import EventLogEntry
from teecloud.keys.certs import cert_from_pem_or_der, cert_to_pem, issue_cert, key_to_pem, spki_der
from teecloud.keys.errors import MalformedKeyMaterial, RaTlsCertInvalid

__all__ = [
    "OID_APP_ID",
    "OID_CERT_USAGE",
    "OID_EVENT_LOG",
    "OID_QUOTE",
    "QuoteSource",
    "RaTlsClaims",
    "check_key_binding",
    "event_log_json",
    "generate_ratls_identity",
    "make_ratls_cert",
    "parse_ratls_cert",
    "ratls_report_data",
]

OID_QUOTE = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.1")
OID_EVENT_LOG = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.2")
OID_APP_ID = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.3")
OID_CERT_USAGE = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.4")
MAX_QUOTE_BYTES = 64 * 1024
MAX_EVENT_LOG_BYTES = 512 * 1024
RATLS_VALIDITY_S = 365 * 24 * 3600


class QuoteSource(Protocol):
    """The part of teecloud.tee.base.TeePlatform RA-TLS needs (any TeePlatform satisfies it)."""

    def quote(self, report_data: bytes) -> bytes: ...

    def event_log(self) -> list[EventLogEntry]: ...


@dataclass(frozen=True)
class RaTlsClaims:
    """What an RA-TLS certificate claims, parsed but NOT verified."""

    quote: bytes
    event_log: str
    app_id: bytes
    usage: str
    public_key_der: bytes
    certificate: x509.Certificate


def ratls_report_data(public_key_der: bytes) -> bytes:
    """sha512(b"ratls-cert:" ‖ SubjectPublicKeyInfo DER) — 64 bytes, the quote's report_data."""
    return hashlib.sha512(b"ratls-cert:" + public_key_der).digest()


def event_log_json(entries: Sequence[EventLogEntry]) -> str:
    """dstack's event-log JSON: an array of {imr, event_type, digest, event, event_payload}."""
    return json.dumps([e.to_json() for e in entries], separators=(",", ":"))


def _der_octet_string(content: bytes) -> bytes:
    # X.690 §8.7 primitive OCTET STRING with a definite length.
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(nb)]) + nb
    return b"\x04" + length + content


def _unwrap_octet_string(value: bytes) -> bytes:
    """The content of a DER OCTET STRING if `value` is exactly one, else `value` unchanged."""
    if len(value) < 2 or value[0] != 0x04:
        return value
    first = value[1]
    if first < 0x80:
        start, n = 2, first
    else:
        nl = first & 0x7F
        if nl == 0 or nl > 4 or len(value) < 2 + nl:
            return value
        start, n = 2 + nl, int.from_bytes(value[2 : 2 + nl], "big")
    return value[start:] if start + n == len(value) else value


def _ext(oid: x509.ObjectIdentifier, content: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(oid, _der_octet_string(content))


def make_ratls_cert(
    tee: QuoteSource,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    issuer_cert: x509.Certificate | None,
    subject: str,
    usage: str,
    not_before: int,
    not_after: int,
    app_id: bytes | None = None,
    alt_names: Sequence[str] = (),
    server_auth: bool = True,
    client_auth: bool = False,
    with_evidence: bool = True,
) -> x509.Certificate:
    """A certificate for `key`, signed by `issuer_key` (self-signed when None), carrying a fresh quote over
    ratls_report_data(SPKI DER) and the current event log (unless with_evidence=False)."""
    extensions: list[x509.UnrecognizedExtension] = []
    if with_evidence:
        quote = tee.quote(ratls_report_data(spki_der(key.public_key())))
        extensions.append(_ext(OID_QUOTE, quote))
        extensions.append(_ext(OID_EVENT_LOG, event_log_json(tee.event_log()).encode()))
    if app_id is not None:
        extensions.append(_ext(OID_APP_ID, app_id))
    if usage:
        extensions.append(_ext(OID_CERT_USAGE, usage.encode()))
    signer = issuer_key if issuer_key is not None else key
    return issue_cert(
        key.public_key(),
        issuer_key=signer,
        issuer_name=issuer_cert.subject if issuer_cert is not None else None,
        subject_cn=subject,
        not_before=not_before,
        not_after=not_after,
        alt_names=alt_names,
        server_auth=server_auth,
        client_auth=client_auth,
        extra_extensions=extensions,
    )


def generate_ratls_identity(
    tee: QuoteSource,
    *,
    usage: str,
    app_id: bytes | None,
    now: int,
    subject: str | None = None,
    alt_names: Sequence[str] = (),
    validity_s: int = RATLS_VALIDITY_S,
) -> tuple[str, str]:
    """A fresh P-256 key and a self-signed RA-TLS certificate for it: (PKCS#8 key PEM, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject=subject or f"teecloud {usage}",
        usage=usage,
        not_before=now,
        not_after=now + validity_s,
        app_id=app_id,
        alt_names=alt_names,
        server_auth=True,
        client_auth=True,
    )
    key_pem = key_to_pem(key)
    return key_pem, cert_to_pem(cert)


def _ext_content(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise MalformedKeyMaterial(f"extension {oid.dotted_string} has an unexpected type")
    return _unwrap_octet_string(value.value)


def parse_ratls_cert(cert: bytes | str | x509.Certificate) -> RaTlsClaims:
    """Parse an untrusted RA-TLS certificate (PEM or DER). Checks structure only — call
    teecloud.peer.PeerVerifier.verify_cert to trust anything in it."""
    try:
        c = cert_from_pem_or_der(cert)
        extensions = c.extensions  # parsing is lazy; malformed extensions raise here
        del extensions
    except (ValueError, x509.DuplicateExtension) as exc:  # two quote or log extensions: which one to read?
        raise MalformedKeyMaterial(f"certificate extensions do not parse: {exc}") from exc
    quote = _ext_content(c, OID_QUOTE)
    if quote is None:
        raise RaTlsCertInvalid("certificate has no quote extension (1.3.6.1.4.1.62397.1.1)", step="parsed")
    if len(quote) > MAX_QUOTE_BYTES:
        raise MalformedKeyMaterial(f"quote extension is {len(quote)} bytes, above {MAX_QUOTE_BYTES}")
    raw_log = _ext_content(c, OID_EVENT_LOG) or b""
    if len(raw_log) > MAX_EVENT_LOG_BYTES:
        raise MalformedKeyMaterial(
            f"event log extension is {len(raw_log)} bytes, above {MAX_EVENT_LOG_BYTES}"
        )
    try:
        event_log = raw_log.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedKeyMaterial("event log extension is not UTF-8 JSON") from exc
    usage_raw = _ext_content(c, OID_CERT_USAGE) or b""
    try:
        usage = usage_raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedKeyMaterial("usage extension is not UTF-8") from exc
    public_key_der = c.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return RaTlsClaims(
        quote=quote,
        event_log=event_log,
        app_id=_ext_content(c, OID_APP_ID) or b"",
        usage=usage,
        public_key_der=public_key_der,
        certificate=c,
    )


def check_key_binding(claims: RaTlsClaims, report_data: bytes) -> None:
    """The key binding, and nothing else: the verified evidence's report_data (`report_data`, from a quote
    or report whose signature the caller has checked) is sha512("ratls-cert:" ‖ SPKI DER) of this
    certificate's key. The certificate's window, its app_id and usage claims, and the evidence itself are
    judged by the peer verifier (teecloud.peer). Raises RaTlsCertInvalid."""
    if len(report_data) < 64 or report_data[:64] != ratls_report_data(claims.public_key_der):
        raise RaTlsCertInvalid(
            "the quote's report_data does not bind this certificate's public key "
            "(expected sha512('ratls-cert:' + SPKI DER))"
        )
