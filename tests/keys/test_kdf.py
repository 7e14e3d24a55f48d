import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys.errors import KeyUsageError
from teecloud.keys.kdf import P256_ORDER, derive_dh_secret, derive_key, derive_p256_key, p256_scalar


def _rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:length]


def test_derive_key_is_hkdf_sha256_with_ratls_salt_and_concatenated_info():
    ikm = bytes(range(32))
    got = derive_key(ikm, [b"app", b"-", b"key"], 48)
    assert got == _rfc5869(ikm, b"RATLS", b"app-key", 48)
    assert derive_key(ikm, [b"app-key"]) == got[:32]


def test_derive_key_depends_on_ikm_and_context():
    a = derive_key(b"\x01" * 32, [b"x"])
    assert a != derive_key(b"\x02" * 32, [b"x"])
    assert a != derive_key(b"\x01" * 32, [b"y"])


def test_derive_key_rejects_bad_length():
    with pytest.raises(KeyUsageError):
        derive_key(b"k", [b"x"], 0)


def test_p256_derivation_is_deterministic_and_context_separated():
    parent = ec.derive_private_key(123456789, ec.SECP256R1())
    a1 = derive_p256_key(parent, [b"app", b"app-ca"])
    a2 = derive_p256_key(parent, [b"app", b"app-ca"])
    b = derive_p256_key(parent, [b"other", b"app-ca"])
    assert p256_scalar(a1) == p256_scalar(a2)
    assert p256_scalar(a1) != p256_scalar(b)
    d = int.from_bytes(p256_scalar(a1), "big")
    assert 1 <= d < P256_ORDER
    expected = (
        int.from_bytes(derive_key(p256_scalar(parent), [b"app", b"app-ca"], 48), "big") % (P256_ORDER - 1) + 1
    )
    assert d == expected


def test_dh_secret_is_sha256_of_pkcs8_der():
    from cryptography.hazmat.primitives import serialization

    parent = ec.derive_private_key(42, ec.SECP256R1())
    child = derive_p256_key(parent, [b"a", b"env-encrypt-key"])
    der = child.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert derive_dh_secret(parent, [b"a", b"env-encrypt-key"]) == hashlib.sha256(der).digest()


def test_p256_scalar_rejects_other_curves():
    with pytest.raises(KeyUsageError):
        p256_scalar(ec.generate_private_key(ec.SECP384R1()))
