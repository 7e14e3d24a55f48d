"""AWS Nitro Enclaves attestation documents: COSE_Sign1 (RFC 9052) with ES384, chained to the AWS Nitro root.

Document format: AWS "Nitro Enclaves attestation process" (aws-nitro-enclaves-nsm-api, attestation.md):
a COSE_Sign1 whose payload is a CBOR map {module_id, digest, timestamp, pcrs, certificate, cabundle,
public_key?, user_data?, nonce?}; `cabundle` lists the root first, then intermediates; `certificate` is the
leaf that signs.

Verification steps (`verify_nitro_document`):
  (1) decode the COSE_Sign1 array (tag 18 optional); the protected header must say alg = ES384 (-35);
  (2) decode and type-check the payload map, with the size limits AWS documents;
  (3) chain leaf -> cabundle -> a caller-trusted root (ECDSA SHA-384), every certificate valid at `now`;
  (4) ES384 signature (r || s, 96 bytes) over Sig_structure ["Signature1", protected, b"", payload]
      (RFC 9052 section 4.4) with the leaf key;
  (5) collect PCRs as measurements (pcr0..), debug = PCR0, PCR1 and PCR2 all zero (AWS: debug-mode
      enclaves report zeroed PCRs).
"""

from __future__ import annotations

import hmac
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

# cbor2 5.x (pinned in pyproject.toml) ships its pure-Python decoder beside the C one; see _loads.
from cbor2._decoder import CBORDecoder as _PureCborDecoder
from cbor2._types import CBORTag as _PureCborTag
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from teecloud.attestation import _x509
from teecloud.attestation._revocation import Revocation, check_revocation
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    MalformedEvidence,
    PolicyViolation,
    SignatureInvalid,
)
from teecloud.attestation.models import Step, TeeKind, VerifiedEvidence

__all__ = [
    "COSE_ALG_ES384",
    "MAX_DOCUMENT_SIZE",
    "TCB_STATUS",
    "NitroDocument",
    "looks_like",
    "parse_nitro_document",
    "verify_nitro_document",
]

MAX_DOCUMENT_SIZE = 32 * 1024  # real documents are ~4.5 KiB
MAX_USER_DATA = 1024  # AWS limits (attestation.md): user_data, nonce <= 512 B; public_key <= 1024 B
MAX_NONCE = 1024
MAX_PUBLIC_KEY = 1024
MAX_CABUNDLE = _x509.MAX_CHAIN_DEPTH
MAX_PCRS = 32
PCR_SIZE = 48  # digest is SHA384
COSE_TAG_SIGN1 = 18
COSE_HEADER_ALG = 1
COSE_ALG_ES384 = -35
ES384_SIGNATURE_SIZE = 96

# Nitro documents carry no TCB level; the platform is attested by AWS's chain alone.
TCB_STATUS = "NotApplicable"


@dataclass(frozen=True)
class NitroDocument:
    """A parsed (not yet verified) attestation document."""

    protected: bytes  # serialized protected header, as signed
    payload: bytes  # serialized payload, as signed
    signature: bytes
    module_id: str
    digest: str
    timestamp: int  # milliseconds since the Unix epoch
    pcrs: dict[int, bytes]
    certificate: bytes  # leaf, DER
    cabundle: tuple[bytes, ...]  # root first
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    def sig_structure(self) -> bytes:
        """RFC 9052 section 4.4: Sig_structure for COSE_Sign1 with empty external_aad."""
        return cbor2.dumps(["Signature1", self.protected, b"", self.payload])

    @property
    def debug(self) -> bool:
        return all(not any(self.pcrs.get(i, b"")) for i in (0, 1, 2))


def looks_like(data: bytes) -> bool:
    """A CBOR array of 4 (0x84), optionally behind tag 18 (0xD2), whose first item is a byte string."""
    body = data[1:] if data[:1] == b"\xd2" else data
    return len(body) > 2 and body[0] == 0x84 and (body[1] >> 5) == 2


def _bytes(value: object, what: str, *, limit: int, optional: bool = False) -> bytes | None:
    if value is None and optional:
        return None
    if not isinstance(value, bytes):
        raise MalformedEvidence(f"Nitro document: {what} must be a byte string")
    if len(value) > limit:
        raise MalformedEvidence(f"Nitro document: {what} is {len(value)} bytes, limit is {limit}")
    return value


def _loads(data: bytes, what: str) -> object:
    # The pure-Python decoder of cbor2, not its C extension: the C decoder leaks the exception (and the
    # frames it references) on every failed decode of an invalid UTF-8 string (agronholm/cbor2 #257), which
    # let a fuzzing run grow to 4 GB; a few hundred hostile documents per second would do the same to a
    # service. The pure decoder costs ~30 us per document here, next to ~5 ms for the chain.
    try:
        return _PureCborDecoder(io.BytesIO(data)).decode()
    except RecursionError as exc:
        raise MalformedEvidence(f"Nitro document: {what} is nested too deeply") from exc
    except Exception as exc:  # the decoder's errors have no common base (CBORDecodeError, ValueError, ...)
        raise MalformedEvidence(f"Nitro document: {what} is not valid CBOR ({exc})") from exc


def parse_nitro_document(doc: bytes) -> NitroDocument:
    """Decode the COSE_Sign1 envelope and the payload map; structure only, no signature check."""
    if not isinstance(doc, bytes | bytearray | memoryview):
        raise MalformedEvidence(f"Nitro document must be bytes, got {type(doc).__name__}")
    doc = bytes(doc)
    if len(doc) > MAX_DOCUMENT_SIZE:
        raise MalformedEvidence(f"Nitro document is {len(doc)} bytes, limit is {MAX_DOCUMENT_SIZE}")
    # (1): envelope
    outer = _loads(doc, "COSE_Sign1")
    if isinstance(outer, cbor2.CBORTag | _PureCborTag):
        if outer.tag != COSE_TAG_SIGN1:
            raise MalformedEvidence(f"Nitro document: CBOR tag {outer.tag} is not COSE_Sign1 (18)")
        outer = outer.value
    if not isinstance(outer, list) or len(outer) != 4:
        raise MalformedEvidence("Nitro document: not a COSE_Sign1 array of 4 items")
    protected_raw, unprotected, payload_raw, signature = outer
    protected_raw = _bytes(protected_raw, "protected header", limit=256)
    payload_raw = _bytes(payload_raw, "payload", limit=MAX_DOCUMENT_SIZE)
    signature = _bytes(signature, "signature", limit=ES384_SIGNATURE_SIZE)
    assert protected_raw is not None and payload_raw is not None and signature is not None
    if not isinstance(unprotected, dict):
        raise MalformedEvidence("Nitro document: unprotected header is not a map")
    protected = _loads(protected_raw, "protected header") if protected_raw else {}
    if not isinstance(protected, dict) or protected.get(COSE_HEADER_ALG) != COSE_ALG_ES384:
        raise MalformedEvidence("Nitro document: protected header does not declare alg ES384 (-35)")
    if len(signature) != ES384_SIGNATURE_SIZE:
        raise MalformedEvidence(f"Nitro document: ES384 signature is {len(signature)} bytes, expected 96")

    # (2): payload
    p = _loads(payload_raw, "payload")
    if not isinstance(p, dict):
        raise MalformedEvidence("Nitro document: payload is not a map")
    module_id = p.get("module_id")
    if not isinstance(module_id, str) or not module_id or len(module_id) > 256:
        raise MalformedEvidence("Nitro document: module_id missing or not a short text string")
    digest = p.get("digest")
    if digest != "SHA384":
        raise MalformedEvidence(f"Nitro document: digest {digest!r} is not 'SHA384'")
    timestamp = p.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or not 0 < timestamp < 2**64:
        raise MalformedEvidence("Nitro document: timestamp missing or not a positive integer")
    pcrs_raw = p.get("pcrs")
    if not isinstance(pcrs_raw, dict) or not 1 <= len(pcrs_raw) <= MAX_PCRS:
        raise MalformedEvidence(f"Nitro document: pcrs must be a map of 1..{MAX_PCRS} entries")
    pcrs: dict[int, bytes] = {}
    for index, value in pcrs_raw.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_PCRS:
            raise MalformedEvidence("Nitro document: PCR index out of range")
        if not isinstance(value, bytes) or len(value) != PCR_SIZE:
            raise MalformedEvidence(f"Nitro document: PCR{index} must be {PCR_SIZE} bytes (SHA384)")
        pcrs[index] = value
    certificate = _bytes(p.get("certificate"), "certificate", limit=_x509.MAX_CERT_BYTES)
    assert certificate is not None
    cabundle_raw = p.get("cabundle")
    if not isinstance(cabundle_raw, list) or not 1 <= len(cabundle_raw) <= MAX_CABUNDLE:
        raise MalformedEvidence(f"Nitro document: cabundle must list 1..{MAX_CABUNDLE} certificates")
    cabundle: list[bytes] = []
    for i, c in enumerate(cabundle_raw):
        cert = _bytes(c, f"cabundle[{i}]", limit=_x509.MAX_CERT_BYTES)
        assert cert is not None
        cabundle.append(cert)
    return NitroDocument(
        protected=protected_raw,
        payload=payload_raw,
        signature=signature,
        module_id=module_id,
        digest=digest,
        timestamp=timestamp,
        pcrs=dict(sorted(pcrs.items())),
        certificate=certificate,
        cabundle=tuple(cabundle),
        public_key=_bytes(p.get("public_key"), "public_key", limit=MAX_PUBLIC_KEY, optional=True),
        user_data=_bytes(p.get("user_data"), "user_data", limit=MAX_USER_DATA, optional=True),
        nonce=_bytes(p.get("nonce"), "nonce", limit=MAX_NONCE, optional=True),
    )


def verify_nitro_document(
    doc: bytes,
    *,
    trust_anchors: Sequence[bytes],
    now: int,
    expected_nonce: bytes | None = None,
    revocation: Revocation | None = None,
) -> VerifiedEvidence:
    """Verify an attestation document against `trust_anchors` (AWS Nitro root, PEM or DER) at `now`.
    With `expected_nonce`, the document's nonce must equal it (freshness), else PolicyViolation.
    `revocation`: CRLs / OCSP responses for the cabundle (AWS names CRL distribution points in its
    certificates); checked offline, and the result says "revocation not checked" without them."""
    steps: list[Step] = []
    # (1), (2): structure
    d = parse_nitro_document(doc)
    steps.append(Step("parsed", True, f"COSE_Sign1 attestation document of module {d.module_id}"))

    # (3): chain, root first in cabundle
    leaf = _x509.load_certificate(d.certificate, what="Nitro leaf certificate")
    pool = [_x509.load_certificate(c, what=f"Nitro cabundle[{i}]") for i, c in enumerate(d.cabundle)]
    chain = _x509.build_and_verify_chain(leaf, pool, trust_anchors, now=now, algorithms=_x509.ECDSA_SHA384)
    steps.append(Step("cert_chain_verified", True, chain.summary()))
    revoked = check_revocation(chain.path, revocation or Revocation(), now=now)
    steps.append(Step("revocation", True, revoked.summary()))

    # (4): COSE signature
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise CertificateChainInvalid("Nitro leaf certificate key is not ECDSA P-384 (ES384)")
    r = int.from_bytes(d.signature[:48], "big")
    s = int.from_bytes(d.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), d.sig_structure(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise SignatureInvalid("Nitro document COSE_Sign1 ES384 signature does not verify") from exc
    steps.append(Step("quote_verified", True, "COSE_Sign1 ES384 signature by the enclave's leaf certificate"))

    # (4b): freshness
    if expected_nonce is not None:
        if d.nonce is None or not hmac.compare_digest(d.nonce, bytes(expected_nonce)):
            got = d.nonce.hex() if d.nonce is not None else "none"
            raise PolicyViolation(
                f"nonce mismatch: the document carries nonce {got}, expected {bytes(expected_nonce).hex()} "
                "(stale or replayed evidence)",
                step="nonce",
            )
        steps.append(Step("nonce", True, "document nonce matches the expected nonce"))

    # (5): result
    fields: dict[str, Any] = {
        "module_id": d.module_id,
        "digest": d.digest,
        "timestamp": d.timestamp,
        "public_key": d.public_key.hex() if d.public_key is not None else None,
        "user_data": d.user_data.hex() if d.user_data is not None else None,
        "nonce": d.nonce.hex() if d.nonce is not None else None,
        "leaf_subject": _x509.describe(leaf.subject),
        "revocation": revoked.to_json(),
    }
    return VerifiedEvidence(
        tee=TeeKind.NITRO.value,
        tcb_status=TCB_STATUS,
        advisory_ids=(),
        measurements={f"pcr{i}": v for i, v in d.pcrs.items()},
        report_data=d.user_data or b"",
        debug=d.debug,
        fields=fields,
        steps=tuple(steps),
    )
