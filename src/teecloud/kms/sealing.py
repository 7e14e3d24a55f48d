"""Sealing: the KMS's state (root keys) encrypted under a key only this TEE, running this KMS, can derive.

    sealing_key = HKDF-SHA256(platform_sealing_secret, ["teecloud-kms-seal-v1:", mr_aggregated])
    sealed file = JSON {"format", "nonce", "ciphertext"}: AES-256-GCM (NIST SP 800-38D), 96-bit random nonce,
                  associated data = format ‖ mr_aggregated, so a file sealed by another KMS build
                  (another measurement) or moved to another platform does not open.

`mr_aggregated` is the KMS's measurement (MRTD, RTMR0-2 and RTMR3 after its boot events), so an upgraded
KMS build seals to a new key and must onboard from a running KMS instead of reading the old file.

Where the platform secret comes from:
- a real TEE would use a hardware sealing key (SGX EGETKEY, SEV-SNP MSG_KEY_REQ, a TDX-bound KMS key);
- a backend object that exposes `sealing_secret() -> bytes` (32+ bytes) is used as is;
- otherwise (the simulator) a random 32-byte per-platform secret in the simulated platform's state
  directory (data_home()/simulated-tee/kms-sealing-secret), created once. Sealing in simulation is
  therefore only as strong as the host's file permissions: anyone who can read that directory can unseal.
  This is stated in docs/kms.md.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teecloud._fs import atomic_write, data_home
from teecloud.keys.kdf import derive_key
from teecloud.kms.errors import SealingError

__all__ = [
    "SEAL_CONTEXT",
    "SEAL_FORMAT",
    "platform_sealing_secret",
    "seal",
    "sealing_key",
    "simulated_platform_secret",
    "unseal",
]

SEAL_FORMAT = "teecloud-kms-sealed-v1"
SEAL_CONTEXT = b"teecloud-kms-seal-v1:"
SIMULATED_SECRET_NAME = "kms-sealing-secret"  # noqa: S105 (a file name)
MAX_SEALED_BYTES = 1 << 20


def simulated_platform_secret(home: Path | None = None) -> bytes:
    """The simulator's per-platform sealing secret, created on first use, never overwritten."""
    path = (home or data_home()) / "simulated-tee" / SIMULATED_SECRET_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        atomic_write(tmp, secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # fails if another process created it first: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    data = path.read_bytes()
    if len(data) != 32:
        raise SealingError(f"{path} is corrupt ({len(data)} bytes, expected 32); refusing to re-create it")
    return data


def platform_sealing_secret(tee: object, home: Path | None = None) -> bytes:
    """The secret of the platform `tee` runs on (see module docstring)."""
    fn = getattr(tee, "sealing_secret", None)
    if callable(fn):
        secret = fn()
        if not isinstance(secret, bytes) or len(secret) < 32:
            raise SealingError("the TEE backend returned an unusable sealing secret")
        return secret
    kind = str(getattr(tee, "kind", ""))
    if not kind.endswith("-simulated"):
        raise SealingError(
            f"TEE backend {kind or type(tee).__name__!r} offers no sealing key; "
            "the KMS cannot seal its root keys"
        )
    state_dir = getattr(tee, "state_dir", None)
    if isinstance(state_dir, Path):
        return simulated_platform_secret(state_dir.parent)
    return simulated_platform_secret(home)


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
