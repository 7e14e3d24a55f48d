"""A KMS root and app keys built with teecloud.keys the way the KMS issues them (test helper)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from teecloud.ai import RECEIPT_KEY_PATH, RECEIPT_KEY_PURPOSE, KeySet
from teecloud.keys.sigchain import (
    build_key_signature_chain,
    derive_get_key,
    k256_public_key,
    kms_issued_digest,
    sign_k256_recoverable,
)


@dataclass
class AppKeys:
    root_public: bytes
    signing_secret: bytes
    e2ee_secret: bytes
    keyset: KeySet


def app_keys(root_secret: bytes | None = None, app_id: bytes | None = None) -> AppKeys:
    root = root_secret or hashlib.sha256(b"test kms root").digest()
    aid = app_id or os.urandom(20)
    app_k256 = os.urandom(32)
    issued = sign_k256_recoverable(root, kms_issued_digest(aid, k256_public_key(app_k256)))
    signing = derive_get_key(app_k256, RECEIPT_KEY_PATH)
    chain = build_key_signature_chain(app_k256, issued, RECEIPT_KEY_PURPOSE, signing.public_key)
    e2ee = os.urandom(32)
    ks = KeySet(
        app_id=aid,
        signing_public_key=signing.public_key,
        signing_key_chain=tuple(chain),
        e2ee_public_key=X25519PrivateKey.from_private_bytes(e2ee).public_key().public_bytes_raw(),
        tls_spki_sha256=hashlib.sha256(b"spki").digest(),
    )
    return AppKeys(k256_public_key(root), signing.secret, e2ee, ks)
