"""Signed inference receipts: one per request, checkable offline and by a contract (ecrecover).

A receipt is {"body", "signature", "keyset"}:
    body      {"version", "id", "app_id", "keyset_digest", "model", "weights_sha256", "request_sha256",
               "response_sha256", "stream", "e2ee", "started_ms", "finished_ms"}; the hashes are sha256 of
               the exact bytes of the request body and of the response body (for SSE: every byte of the
               event stream as sent)
    signature 65-byte recoverable secp256k1 r‖s‖v (v in {0,1}) over
              receipt_digest = keccak256("teecloud-ai-receipt:" ‖ sha256(JCS(body))) by the key set's
              signing key; a contract given sha256(JCS(body)) recovers the signing address with ecrecover
    keyset    the key set (teecloud.ai.keyset) whose signing key's chain leads to the KMS root

verify_receipt steps: (1) parse, (2) the key set's chain verifies to the KMS root, (3) the body names that
key set and its app, (4) the signature recovers to the signing key, (5) optional expectations (app_id,
pinned key set, request and response bytes). Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from eth_utils.crypto import keccak

from teecloud.ai._fields import get_bool, get_hex, get_int, get_obj, get_str
from teecloud.ai._jcs import jcs_sha256
from teecloud.ai.errors import KeySetInvalid, MalformedInput, ReceiptInvalid
from teecloud.ai.keyset import KeySet
from teecloud.keys.errors import KeysError
from teecloud.keys.sigchain import recover_k256, sign_k256_recoverable

__all__ = [
    "MAX_RECEIPT_BYTES",
    "RECEIPT_VERSION",
    "ReceiptBody",
    "SignedReceipt",
    "receipt_digest",
    "sign_receipt",
    "verify_receipt",
]

RECEIPT_VERSION = 1
MAX_RECEIPT_BYTES = 16 * 1024
_DOMAIN = b"teecloud-ai-receipt:"


@dataclass(frozen=True)
class ReceiptBody:
    id: str
    app_id: bytes
    keyset_digest: bytes
    model: str
    weights_sha256: bytes
    request_sha256: bytes
    response_sha256: bytes
    stream: bool
    e2ee: bool
    started_ms: int
    finished_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECEIPT_VERSION,
            "id": self.id,
            "app_id": self.app_id.hex(),
            "keyset_digest": self.keyset_digest.hex(),
            "model": self.model,
            "weights_sha256": self.weights_sha256.hex(),
            "request_sha256": self.request_sha256.hex(),
            "response_sha256": self.response_sha256.hex(),
            "stream": self.stream,
            "e2ee": self.e2ee,
            "started_ms": self.started_ms,
            "finished_ms": self.finished_ms,
        }

    @classmethod
    def from_json(cls, value: Any) -> ReceiptBody:
        obj = get_obj(value, "receipt body")
        if obj.get("version") != RECEIPT_VERSION:
            raise MalformedInput(f"receipt version must be {RECEIPT_VERSION}")
        body = cls(
            id=get_str(obj, "id", max_len=64),
            app_id=get_hex(obj, "app_id", size=20),
            keyset_digest=get_hex(obj, "keyset_digest", size=32),
            model=get_str(obj, "model"),
            weights_sha256=get_hex(obj, "weights_sha256", size=32),
            request_sha256=get_hex(obj, "request_sha256", size=32),
            response_sha256=get_hex(obj, "response_sha256", size=32),
            stream=get_bool(obj, "stream"),
            e2ee=get_bool(obj, "e2ee"),
            started_ms=get_int(obj, "started_ms"),
            finished_ms=get_int(obj, "finished_ms"),
        )
        if set(obj) != set(body.to_json()):
            raise MalformedInput("receipt body has unknown or missing fields")
        if body.finished_ms < body.started_ms:
            raise MalformedInput("receipt finished before it started")
        return body

    def body_sha256(self) -> bytes:
        return jcs_sha256(self.to_json())


def receipt_digest(body: ReceiptBody) -> bytes:
    return keccak(_DOMAIN + body.body_sha256())


@dataclass(frozen=True)
class SignedReceipt:
    body: ReceiptBody
    signature: bytes
    keyset: KeySet

    def to_json(self) -> dict[str, Any]:
        return {
            "body": self.body.to_json(),
            "signature": self.signature.hex(),
            "keyset": self.keyset.to_json(),
        }

    @classmethod
    def from_json(cls, value: Any) -> SignedReceipt:
        obj = get_obj(value, "receipt")
        if set(obj) != {"body", "signature", "keyset"}:
            raise MalformedInput("a receipt has exactly 'body', 'signature' and 'keyset'")
        return cls(
            body=ReceiptBody.from_json(obj["body"]),
            signature=get_hex(obj, "signature", size=65),
            keyset=KeySet.from_json(obj["keyset"]),
        )


def sign_receipt(body: ReceiptBody, signing_key: bytes, keyset: KeySet) -> SignedReceipt:
    if body.keyset_digest != keyset.digest() or body.app_id != keyset.app_id:
        raise ValueError("the receipt body must name the signing key set and its app")
    return SignedReceipt(body, sign_k256_recoverable(signing_key, receipt_digest(body)), keyset)


def verify_receipt(
    receipt: SignedReceipt,
    *,
    kms_root_public_key: bytes,
    expected_app_id: bytes | None = None,
    pinned_keyset_digest: bytes | None = None,
    request_body: bytes | None = None,
    response_body: bytes | None = None,
    verified_keyset: KeySet | None = None,
) -> ReceiptBody:
    """Steps (2)-(5) of the module docstring on a parsed receipt; raises ReceiptInvalid(step=...).
    `verified_keyset`: a key set whose chain the caller has verified under this `kms_root_public_key` (the
    verifying proxy's attested one); a receipt that carries that key set (every field equal) does not have
    its chain checked again. Any other key set is checked in full."""
    body, keyset = receipt.body, receipt.keyset
    # (2) the key set's signing key was issued by the KMS to keyset.app_id
    if verified_keyset is None or keyset != verified_keyset:
        try:
            keyset.verify_chain(kms_root_public_key)
        except KeySetInvalid as exc:
            raise ReceiptInvalid(exc.reason, step="keyset_chain") from exc
    # (3) the body names that key set and its app
    if body.keyset_digest != keyset.digest():
        raise ReceiptInvalid("the receipt names another key set", step="keyset_binding")
    if body.app_id != keyset.app_id:
        raise ReceiptInvalid("the receipt names another app than its key set", step="keyset_binding")
    # (4) the signature
    try:
        signer = recover_k256(receipt_digest(body), receipt.signature)
    except KeysError as exc:
        raise ReceiptInvalid(str(exc), step="signature") from exc
    if signer != keyset.signing_public_key:
        raise ReceiptInvalid("the signature is not by the key set's signing key", step="signature")
    # (5) expectations
    if expected_app_id is not None and body.app_id != expected_app_id:
        raise ReceiptInvalid(
            f"the receipt is from app {body.app_id.hex()}, expected {expected_app_id.hex()}", step="app_id"
        )
    if pinned_keyset_digest is not None and body.keyset_digest != pinned_keyset_digest:
        raise ReceiptInvalid("the receipt's key set is not the pinned (attested) one", step="pinned_keyset")
    if request_body is not None and hashlib.sha256(request_body).digest() != body.request_sha256:
        raise ReceiptInvalid("the request does not match the receipt's request hash", step="request")
    if response_body is not None and hashlib.sha256(response_body).digest() != body.response_sha256:
        raise ReceiptInvalid("the response does not match the receipt's response hash", step="response")
    return body
