"""secp256k1 / ed25519 primitives and dstack's key signature chains (reference/dstack.md §2, §5).

GetKey chain (2 signatures, 65-byte recoverable secp256k1 r‖s‖v, v in {0, 1}):
    [0] app key over  keccak256("{purpose}:{hex(derived public key)}")
    [1] KMS root k256 over keccak256("dstack-kms-issued:" ‖ app_id ‖ compressed app public key)
Sign chain (3): [signature over the data, then the GetKey chain of the signing key (path "vms",
purpose "signing")]. Anyone holding the KMS root k256 public key can check a chain: recover the app key
from [0], check [1] recovers to the KMS root.

Public keys are SEC1 compressed (33 bytes) for secp256k1 and raw (32 bytes) for ed25519.
Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import coincurve
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from eth_utils.crypto import keccak

from teecloud.keys.errors import KeyUsageError, MalformedKeyMaterial, SignatureChainInvalid
from teecloud.keys.kdf import derive_key

__all__ = [
    "GET_KEY_ALGORITHMS",
    "SIGN_ALGORITHMS",
    "SIGN_KEY_PATH",
    "SIGN_KEY_PURPOSE",
    "DerivedKey",
    "build_key_signature_chain",
    "derive_get_key",
    "k256_public_key",
    "kms_issued_digest",
    "normalize_get_key_algorithm",
    "purpose_digest",
    "recover_k256",
    "sign_data",
    "sign_k256_recoverable",
    "verify_data_signature",
    "verify_key_signature_chain",
    "verify_sign_signature_chain",
]

GET_KEY_ALGORITHMS = ("secp256k1", "ed25519")  # plus the alias "k256"
SIGN_ALGORITHMS = ("ed25519", "secp256k1", "secp256k1_prehashed")
SIGN_KEY_PATH = "vms"
SIGN_KEY_PURPOSE = "signing"
# ed25519 keys come from a separate intermediate key, so they never share material with a secp256k1 key of
# any path. The label starts with 0xff, which cannot occur in a UTF-8 path, so no GetKey path reaches it.
_ED25519_BRANCH = b"\xffteecloud-ed25519-branch"


def _check_secret(secret: bytes) -> None:
    if len(secret) != 32:
        raise KeyUsageError(f"a secp256k1/ed25519 secret is 32 bytes, got {len(secret)}")


def k256_public_key(secret: bytes) -> bytes:
    """Compressed (33-byte) secp256k1 public key of a 32-byte secret."""
    _check_secret(secret)
    try:
        return coincurve.PrivateKey(secret).public_key.format(compressed=True)
    except ValueError as exc:  # zero or >= group order: probability ~2^-128 for derived keys
        raise KeyUsageError("not a valid secp256k1 secret") from exc


def sign_k256_recoverable(secret: bytes, digest: bytes) -> bytes:
    """65-byte recoverable signature r‖s‖v (v in {0,1}) over a 32-byte digest (RFC 6979 nonces)."""
    _check_secret(secret)
    if len(digest) != 32:
        raise KeyUsageError(f"digest must be 32 bytes, got {len(digest)}")
    return coincurve.PrivateKey(secret).sign_recoverable(digest, hasher=None)


def recover_k256(digest: bytes, signature: bytes) -> bytes:
    """Compressed public key that produced `signature` over `digest`; raises on a malformed signature."""
    if len(signature) != 65:
        raise MalformedKeyMaterial(f"a recoverable secp256k1 signature is 65 bytes, got {len(signature)}")
    sig = signature if signature[64] < 27 else signature[:64] + bytes([signature[64] - 27])
    if sig[64] > 3:
        raise MalformedKeyMaterial(f"bad recovery id {signature[64]}")
    try:
        return coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None).format(
            compressed=True
        )
    except Exception as exc:  # coincurve raises bare Exception on unrecoverable signatures
        raise SignatureChainInvalid("signature does not recover to any public key") from exc


def purpose_digest(purpose: str, public_key: bytes) -> bytes:
    """keccak256("{purpose}:{hex(public key)}") — what the app key signs for a derived key."""
    return keccak(f"{purpose}:{public_key.hex()}".encode())


def kms_issued_digest(app_id: bytes, app_public_key: bytes) -> bytes:
    """keccak256("dstack-kms-issued:" ‖ app_id ‖ compressed app public key) — what the KMS root signs."""
    return keccak(b"dstack-kms-issued:" + app_id + app_public_key)


def normalize_get_key_algorithm(algorithm: str) -> str:
    algo = (algorithm or "secp256k1").lower()
    if algo == "k256":
        algo = "secp256k1"
    if algo not in GET_KEY_ALGORITHMS:
        raise KeyUsageError(f"unknown algorithm {algorithm!r}; expected one of secp256k1, k256, ed25519")
    return algo


@dataclass(frozen=True)
class DerivedKey:
    algorithm: str  # "secp256k1" or "ed25519"
    secret: bytes  # 32 bytes
    public_key: bytes  # 33 (compressed secp256k1) or 32 (ed25519)


def derive_get_key(app_k256_key: bytes, path: str, algorithm: str = "secp256k1") -> DerivedKey:
    """GetKey's key: HKDF-SHA256(salt "RATLS", IKM = app key, info = path) for secp256k1 (as dstack);
    for ed25519 the same derivation from a separate branch key (see _ED25519_BRANCH)."""
    algo = normalize_get_key_algorithm(algorithm)
    _check_secret(app_k256_key)
    info = path.encode("utf-8")
    if algo == "secp256k1":
        secret = derive_key(app_k256_key, [info])
        return DerivedKey(algo, secret, k256_public_key(secret))
    branch = derive_key(app_k256_key, [_ED25519_BRANCH])
    secret = derive_key(branch, [info])
    pub = Ed25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()
    return DerivedKey(algo, secret, pub)


def build_key_signature_chain(
    app_k256_key: bytes, k256_signature: bytes, purpose: str, derived_public_key: bytes
) -> list[bytes]:
    """[app key over purpose_digest, KMS root over kms_issued_digest (passed in from the key provider)]."""
    if len(k256_signature) != 65:
        raise KeyUsageError(f"k256_signature must be 65 bytes, got {len(k256_signature)}")
    return [sign_k256_recoverable(app_k256_key, purpose_digest(purpose, derived_public_key)), k256_signature]


def verify_key_signature_chain(
    *,
    app_id: bytes,
    public_key: bytes,
    purpose: str,
    signature_chain: Sequence[bytes],
    kms_root_public_key: bytes,
) -> bytes:
    """Check a GetKey chain for the derived `public_key`; return the app's compressed k256 public key.

    Steps: (1) chain has 2 entries; (2) recover the app key from [0] over purpose_digest;
    (3) [1] over kms_issued_digest(app_id, app key) must recover to `kms_root_public_key`.
    Raises SignatureChainInvalid / MalformedKeyMaterial with the failing step.
    """
    # (1)
    if len(signature_chain) != 2:
        raise SignatureChainInvalid(f"a GetKey signature chain has 2 signatures, got {len(signature_chain)}")
    root = _normalize_k256_public_key(kms_root_public_key)
    # (2)
    app_public_key = recover_k256(purpose_digest(purpose, public_key), bytes(signature_chain[0]))
    # (3)
    signer = recover_k256(kms_issued_digest(app_id, app_public_key), bytes(signature_chain[1]))
    if signer != root:
        raise SignatureChainInvalid(
            f"app key was not issued by the expected KMS root for app {app_id.hex()} "
            f"(signed by {signer.hex()}, expected {root.hex()})"
        )
    return app_public_key


def verify_sign_signature_chain(
    *,
    app_id: bytes,
    algorithm: str,
    data: bytes,
    signature: bytes,
    public_key: bytes,
    signature_chain: Sequence[bytes],
    kms_root_public_key: bytes,
) -> bytes:
    """Check a Sign response: [0] is `signature` and verifies over `data`; [1:] is the GetKey chain of
    `public_key` with purpose "signing". Returns the app's compressed k256 public key."""
    if len(signature_chain) != 3:
        raise SignatureChainInvalid(f"a Sign signature chain has 3 signatures, got {len(signature_chain)}")
    if bytes(signature_chain[0]) != signature:
        raise SignatureChainInvalid("signature_chain[0] is not the returned signature")
    if not verify_data_signature(algorithm, data, signature, public_key):
        raise SignatureChainInvalid("the signature does not verify over the data")
    return verify_key_signature_chain(
        app_id=app_id,
        public_key=public_key,
        purpose=SIGN_KEY_PURPOSE,
        signature_chain=signature_chain[1:],
        kms_root_public_key=kms_root_public_key,
    )


def _normalize_k256_public_key(public_key: bytes) -> bytes:
    try:
        return coincurve.PublicKey(bytes(public_key)).format(compressed=True)
    except Exception as exc:  # coincurve raises ValueError / bare Exception for bad points
        raise MalformedKeyMaterial("not a secp256k1 public key (SEC1 33 or 65 bytes)") from exc


def _normalize_sign_algorithm(algorithm: str) -> str:
    algo = algorithm.lower()
    if algo == "k256":
        algo = "secp256k1"
    if algo not in SIGN_ALGORITHMS:
        raise KeyUsageError(
            f"unknown algorithm {algorithm!r}; expected one of ed25519, secp256k1, secp256k1_prehashed"
        )
    return algo


def _k256_digest(algo: str, data: bytes) -> bytes:
    if algo == "secp256k1_prehashed":
        if len(data) != 32:
            raise KeyUsageError(f"secp256k1_prehashed needs a 32-byte digest, got {len(data)} bytes")
        return data
    return hashlib.sha256(data).digest()


def sign_data(algorithm: str, secret: bytes, data: bytes) -> bytes:
    """Sign: ed25519 -> 64 bytes; secp256k1 -> 65-byte recoverable over sha256(data);
    secp256k1_prehashed -> 65-byte recoverable over the 32-byte `data` itself."""
    algo = _normalize_sign_algorithm(algorithm)
    _check_secret(secret)
    if algo == "ed25519":
        return Ed25519PrivateKey.from_private_bytes(secret).sign(data)
    return sign_k256_recoverable(secret, _k256_digest(algo, data))


def verify_data_signature(algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
    """True iff `signature` is valid over `data` for `public_key`. Malformed keys or signatures are simply
    invalid (False); an unknown algorithm or a wrong-size prehashed digest is a KeyUsageError."""
    algo = _normalize_sign_algorithm(algorithm)
    if algo == "ed25519":
        if len(public_key) != 32 or len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True
    digest = _k256_digest(algo, data)
    if len(signature) not in (64, 65):
        return False
    try:
        key = coincurve.PublicKey(bytes(public_key))
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")
        )
        return bool(key.verify(der, digest, hasher=None))
    except Exception:  # coincurve raises ValueError / bare Exception on malformed input
        return False
