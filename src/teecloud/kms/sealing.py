"""Sealing: the KMS's state (root keys) encrypted under a key only this TEE, running this KMS, can derive.

    sealing_key = HKDF-SHA256(platform_sealing_secret, ["teecloud-kms-seal-v1:", mr_aggregated])
    sealed file = JSON {"format", "nonce", "ciphertext"}: AES-256-GCM (NIST SP 800-38D), 96-bit random nonce,
                  associated data = format ‖ mr_aggregated, so a file sealed by another KMS build
                  (another measurement) or moved to another platform does not open.

`mr_aggregated` is the KMS's measurement (MRTD, RTMR0-2 and RTMR3 after its boot events), so an upgraded
KMS build seals to a new key and must onboard from a running KMS instead of reading the old file.

Where the platform secret comes from: `TeePlatform.sealing_secret()`. A real TEE would use a hardware sealing
key (SEV-SNP MSG_KEY_REQ; TDX has none, so a TDX KMS gets its keys from other KMS nodes); the simulator keeps
a random 32-byte per-platform secret in its state directory (teecloud.tee.simulated), so sealing in
simulation is only as strong as the host's file permissions: anyone who can read that directory can unseal.
This is stated in docs/kms.md.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teecloud.keys.kdf import derive_key
from teecloud.kms.errors import SealingError
from teecloud.tee.base import TeePlatform
from teecloud.tee.errors import TeeError

__all__ = [
    "SEAL_CONTEXT",
    "SEAL_FORMAT",
    "platform_sealing_secret",
    "seal",
    "sealing_key",
    "unseal",
]

SEAL_FORMAT = "teecloud-kms-sealed-v1"
SEAL_CONTEXT = b"teecloud-kms-seal-v1:"
MAX_SEALED_BYTES = 1 << 20


def platform_sealing_secret(tee: TeePlatform) -> bytes:
    """The sealing secret of the platform `tee` runs on; SealingError where it offers none."""
    try:
        secret = tee.sealing_secret()
    except TeeError as exc:
        raise SealingError(f"the KMS cannot seal its keys on this platform: {exc}") from exc
    if not isinstance(secret, bytes) or len(secret) < 32:
        raise SealingError("the TEE backend returned an unusable sealing secret")
    return secret


def sealing_key(platform_secret: bytes, mr_aggregated: bytes) -> bytes:
    if len(mr_aggregated) != 32:
        raise SealingError(f"mr_aggregated must be 32 bytes, got {len(mr_aggregated)}")
    return derive_key(platform_secret, [SEAL_CONTEXT, mr_aggregated])


def seal(key: bytes, mr_aggregated: bytes, plaintext: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    ct = AESGCM(key).encrypt(nonce, plaintext, SEAL_FORMAT.encode() + mr_aggregated)
    doc: dict[str, Any] = {"format": SEAL_FORMAT, "nonce": nonce.hex(), "ciphertext": ct.hex()}
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def unseal(key: bytes, mr_aggregated: bytes, blob: bytes) -> bytes:
    if len(blob) > MAX_SEALED_BYTES:
        raise SealingError(f"sealed file is {len(blob)} bytes, above the {MAX_SEALED_BYTES}-byte limit")
    try:
        doc = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("format") != SEAL_FORMAT:
            raise SealingError(f"not a {SEAL_FORMAT} file")
        nonce = bytes.fromhex(str(doc["nonce"]))
        ct = bytes.fromhex(str(doc["ciphertext"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SealingError(f"sealed file is malformed: {exc}") from exc
    if len(nonce) != 12:
        raise SealingError("sealed file is malformed: nonce must be 12 bytes")
    try:
        return AESGCM(key).decrypt(nonce, ct, SEAL_FORMAT.encode() + mr_aggregated)
    except InvalidTag as exc:
        raise SealingError(
            "cannot unseal the KMS root keys: they were sealed by another platform or another KMS build "
            "(different measurement), or the file was modified"
        ) from exc
