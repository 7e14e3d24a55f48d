"""Encrypted environment variables in dstack's format (dstack docs/encrypted-env-spec.md; reference §5).

    blob = ephemeral X25519 public key (32) ‖ IV (12) ‖ AES-256-GCM ciphertext+tag
    key  = the raw X25519 shared secret (no KDF — dstack's choice, kept for compatibility)
    plaintext = UTF-8 JSON {"env": [{"key": name, "value": value}, ...]}

Interoperates both ways with dstack_sdk.encrypt_env_vars. Pure apart from drawing randomness.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teecloud import _json
from teecloud.keys.errors import EnvDecryptionFailed, KeyUsageError, MalformedKeyMaterial

__all__ = ["ENV_NAME_RE", "MAX_ENV_BLOB", "decrypt_env", "decrypt_env_with_shared_secret", "encrypt_env"]

MAX_ENV_BLOB = 1 << 20
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER = 32 + 12
_TAG = 16


def encrypt_env(pubkey: bytes, env: Mapping[str, str]) -> bytes:
    """Encrypt `env` to the app's X25519 env public key."""
    if len(pubkey) != 32:
        raise KeyUsageError(f"an X25519 public key is 32 bytes, got {len(pubkey)}")
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_NAME_RE.match(k):
            raise KeyUsageError(f"invalid environment variable name {k!r}")
        if not isinstance(v, str):
            raise KeyUsageError(f"value of {k} must be a string")
    plaintext = json.dumps({"env": [{"key": k, "value": v} for k, v in env.items()]}).encode()
    eph = X25519PrivateKey.generate()
    try:
        shared = eph.exchange(X25519PublicKey.from_public_bytes(bytes(pubkey)))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise KeyUsageError(f"unusable X25519 public key: {exc}") from exc
    iv = os.urandom(12)
    return eph.public_key().public_bytes_raw() + iv + AESGCM(shared).encrypt(iv, plaintext, None)


def decrypt_env(secret: bytes, blob: bytes) -> dict[str, str]:
    """Decrypt an untrusted blob with the app's X25519 env secret; names must be valid identifiers."""
    if len(secret) != 32:
        raise KeyUsageError(f"an X25519 secret is 32 bytes, got {len(secret)}")
    if len(blob) > MAX_ENV_BLOB:
        raise MalformedKeyMaterial(f"encrypted env is {len(blob)} bytes, above the {MAX_ENV_BLOB}-byte limit")
    if len(blob) < _HEADER + _TAG:
        raise MalformedKeyMaterial(f"encrypted env is {len(blob)} bytes, shorter than header + tag (60)")
    try:
        shared = X25519PrivateKey.from_private_bytes(bytes(secret)).exchange(
            X25519PublicKey.from_public_bytes(blob[:32])
        )
    except ValueError as exc:
        raise EnvDecryptionFailed(
            "encrypted env does not decrypt with this app's key (wrong key or tampered)"
        ) from exc
    return decrypt_env_with_shared_secret(shared, blob)


def decrypt_env_with_shared_secret(shared: bytes, blob: bytes) -> dict[str, str]:
    """The same, given the X25519 shared secret of the blob's ephemeral key (threshold mode computes it
    from t nodes' partials, keys.threshold_ecdh, without any party holding the env secret)."""
    if len(shared) != 32:
        raise KeyUsageError(f"an X25519 shared secret is 32 bytes, got {len(shared)}")
    if len(blob) > MAX_ENV_BLOB:
        raise MalformedKeyMaterial(f"encrypted env is {len(blob)} bytes, above the {MAX_ENV_BLOB}-byte limit")
    if len(blob) < _HEADER + _TAG:
        raise MalformedKeyMaterial(f"encrypted env is {len(blob)} bytes, shorter than header + tag (60)")
    iv, ct = blob[32:_HEADER], blob[_HEADER:]
    try:
        plaintext = AESGCM(bytes(shared)).decrypt(iv, ct, None)
    except (InvalidTag, ValueError) as exc:
        raise EnvDecryptionFailed(
            "encrypted env does not decrypt with this app's key (wrong key or tampered)"
        ) from exc
    try:
        doc = _json.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnvDecryptionFailed("decrypted env is not UTF-8 JSON") from exc
    items = doc.get("env") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise EnvDecryptionFailed('decrypted env is not {"env": [...]}')
    out: dict[str, str] = {}
    for item in items:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or not isinstance(item.get("value"), str)
        ):
            raise EnvDecryptionFailed('each env entry must be {"key": str, "value": str}')
        name = item["key"]
        if not ENV_NAME_RE.match(name):
            raise EnvDecryptionFailed(f"invalid environment variable name {name!r}")
        out[name] = item["value"]
    return out
