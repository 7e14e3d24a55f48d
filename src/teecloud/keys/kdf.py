"""Key derivation, compatible in construction with dstack's `ra-tls` KDF (reference/dstack.md §5).

    derive_key(ikm, context)       HKDF-SHA256 (RFC 5869), salt b"RATLS", info = b"".join(context)
    derive_p256_key(key, context)  a P-256 private key deterministically derived from a parent P-256 key
    derive_dh_secret(key, context) sha256(PKCS#8 DER of derive_p256_key(key, context)), 32 bytes

Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teecloud.keys.errors import KeyUsageError

__all__ = ["KDF_SALT", "P256_ORDER", "derive_dh_secret", "derive_key", "derive_p256_key", "p256_scalar"]

KDF_SALT = b"RATLS"
# Order n of the NIST P-256 base point (FIPS 186-5 / SEC 2 §2.4.2).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def derive_key(ikm: bytes, context: Sequence[bytes], length: int = 32) -> bytes:
    """HKDF-SHA256 with salt "RATLS" and info = the concatenation of `context`."""
    if not 1 <= length <= 255 * 32:
        raise KeyUsageError(f"derive_key: length must be 1..8160 bytes, got {length}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=KDF_SALT, info=b"".join(context))
    return hkdf.derive(bytes(ikm))


def p256_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 32-byte big-endian private scalar of a P-256 key."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise KeyUsageError(f"expected a P-256 key, got {key.curve.name}")
    return key.private_numbers().private_value.to_bytes(32, "big")


def derive_p256_key(
    parent: ec.EllipticCurvePrivateKey, context: Sequence[bytes]
) -> ec.EllipticCurvePrivateKey:
    """Derive a child P-256 key from `parent`'s private scalar and `context`.

    Method (teecloud's own, documented here because the result must be reproducible): take 48 bytes of
    derive_key(parent_scalar, context) — 64 bits more than the order so the bias is below 2^-64 — read them
    as a big-endian integer c and use d = (c mod (n - 1)) + 1, which is always a valid scalar in [1, n-1]
    (the "extra random bits" construction of FIPS 186-5 A.2.1).
    """
    okm = derive_key(p256_scalar(parent), context, 48)
    d = int.from_bytes(okm, "big") % (P256_ORDER - 1) + 1
    return ec.derive_private_key(d, ec.SECP256R1())


def derive_dh_secret(parent: ec.EllipticCurvePrivateKey, context: Sequence[bytes]) -> bytes:
    """sha256 of the PKCS#8 DER encoding of derive_p256_key(parent, context): dstack's `derive_dh_secret`
    construction, used for the disk key and the X25519 env-decryption secret."""
    child = derive_p256_key(parent, context)
    der = child.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return hashlib.sha256(der).digest()
