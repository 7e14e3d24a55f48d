import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dstack_sdk import EnvVar, encrypt_env_vars, encrypt_env_vars_sync

from teecloud.keys.envcrypt import decrypt_env, encrypt_env
from teecloud.keys.errors import EnvDecryptionFailed, KeyUsageError, MalformedKeyMaterial

SECRET = bytes(range(32))
PUB = X25519PrivateKey.from_private_bytes(SECRET).public_key().public_bytes_raw()


def _sdk_decrypt(secret: bytes, blob: bytes) -> dict:
    # an independent decryption following the dstack spec, to check our encryption
    import json

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    shared = X25519PrivateKey.from_private_bytes(secret).exchange(
        X25519PublicKey.from_public_bytes(blob[:32])
    )
    doc = json.loads(AESGCM(shared).decrypt(blob[32:44], blob[44:], None))
    return {e["key"]: e["value"] for e in doc["env"]}


def test_round_trip():
    env = {"API_KEY": "s3cr3t", "EMPTY": "", "UNICODE": "héllo ✓"}
    assert decrypt_env(SECRET, encrypt_env(PUB, env)) == env
    assert _sdk_decrypt(SECRET, encrypt_env(PUB, env)) == env


def test_decrypts_what_the_dstack_sdk_encrypts():
    blob = bytes.fromhex(encrypt_env_vars_sync([EnvVar("A", "1"), EnvVar("B_2", "two")], PUB.hex()))
    assert decrypt_env(SECRET, blob) == {"A": "1", "B_2": "two"}


async def test_decrypts_async_sdk_output():
    blob = bytes.fromhex(await encrypt_env_vars([EnvVar("X", "y")], "0x" + PUB.hex()))
    assert decrypt_env(SECRET, blob) == {"X": "y"}


def test_wrong_key_and_tampering_rejected():
    blob = encrypt_env(PUB, {"A": "1"})
    with pytest.raises(EnvDecryptionFailed):
        decrypt_env(b"\x01" * 32, blob)
    with pytest.raises(EnvDecryptionFailed):
        decrypt_env(SECRET, blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(EnvDecryptionFailed):
        decrypt_env(SECRET, blob[:40] + bytes([blob[40] ^ 1]) + blob[41:])
    with pytest.raises(MalformedKeyMaterial):
        decrypt_env(SECRET, blob[:50])
    with pytest.raises(MalformedKeyMaterial):
        decrypt_env(SECRET, b"\x00" * (2 << 20))


def test_bad_plaintext_shapes_rejected():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def seal(pt: bytes) -> bytes:
        eph = X25519PrivateKey.generate()
        shared = eph.exchange(X25519PrivateKey.from_private_bytes(SECRET).public_key())
        return (
            eph.public_key().public_bytes_raw()
            + b"\x00" * 12
            + AESGCM(shared).encrypt(b"\x00" * 12, pt, None)
        )

    for pt in (
        b"not json",
        b"[]",
        b'{"env": {}}',
        b'{"env": [{"key": 1, "value": "x"}]}',
        b'{"env": [{"key": "A=B", "value": "x"}]}',
        b"\xff",
    ):
        with pytest.raises(EnvDecryptionFailed):
            decrypt_env(SECRET, seal(pt))


def test_encrypt_usage_errors():
    with pytest.raises(KeyUsageError):
        encrypt_env(b"\x00" * 31, {"A": "1"})
    with pytest.raises(KeyUsageError):
        encrypt_env(PUB, {"BAD NAME": "1"})
    with pytest.raises(KeyUsageError):
        encrypt_env(b"\x00" * 32, {"A": "1"})  # low-order point
