import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dstack_sdk import verify_env_encrypt_public_key

from teecloud.keys.appkeys import (
    RootKeys,
    derive_app_keys,
    env_encrypt_pubkey,
    sign_env_encrypt_pubkey,
)
from teecloud.keys.certs import make_root_ca_cert, verify_cert_chain
from teecloud.keys.errors import CertChainInvalid, KeyUsageError, MalformedKeyMaterial
from teecloud.keys.kdf import derive_key
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest, recover_k256

NOW = 1_750_000_000
APP = bytes.fromhex("11" * 20)
INST = bytes.fromhex("22" * 20)


@pytest.fixture(scope="module")
def root() -> RootKeys:
    return RootKeys(ec.derive_private_key(0xC0FFEE, ec.SECP256R1()), b"\x07" * 32)


def test_root_keys_pem_round_trip(root):
    again = RootKeys.from_pem(root.to_pem())
    assert again.k256_key == root.k256_key
    assert again.ca_public_key_der == root.ca_public_key_der


def test_root_keys_from_bad_pem_is_malformed():
    with pytest.raises(MalformedKeyMaterial):
        RootKeys.from_pem(b"garbage")
    with pytest.raises(MalformedKeyMaterial):
        RootKeys.from_pem(
            b"-----BEGIN TEECLOUD K256 PRIVATE KEY-----\n"
            + b"00" * 32
            + b"\n-----END TEECLOUD K256 PRIVATE KEY-----\n"
        )


def test_root_keys_reject_wrong_curve_and_length():
    with pytest.raises(KeyUsageError):
        RootKeys(ec.generate_private_key(ec.SECP384R1()), b"\x07" * 32)
    with pytest.raises(KeyUsageError):
        RootKeys(ec.generate_private_key(ec.SECP256R1()), b"\x07" * 31)
    with pytest.raises(KeyUsageError):
        RootKeys(ec.generate_private_key(ec.SECP256R1()), b"\x00" * 32)


def test_generate_gives_distinct_roots():
    a, b = RootKeys.generate(), RootKeys.generate()
    assert a.k256_key != b.k256_key and a.ca_public_key_der != b.ca_public_key_der


def test_app_keys_deterministic_and_separated(root):
    k1 = derive_app_keys(root, APP, INST, now=NOW)
    k2 = derive_app_keys(root, APP, INST, now=NOW + 100)
    assert (k1.k256_key, k1.disk_crypt_key, k1.env_crypt_key, k1.ca_key_pem) == (
        k2.k256_key,
        k2.disk_crypt_key,
        k2.env_crypt_key,
        k2.ca_key_pem,
    )
    other_inst = derive_app_keys(root, APP, b"\x33" * 20, now=NOW)
    assert other_inst.disk_crypt_key != k1.disk_crypt_key  # disk key is per instance
    assert other_inst.env_crypt_key == k1.env_crypt_key  # env key is per app
    assert other_inst.k256_key == k1.k256_key
    other_app = derive_app_keys(root, b"\x12" * 20, INST, now=NOW)
    for f in ("k256_key", "disk_crypt_key", "env_crypt_key", "ca_key_pem"):
        assert getattr(other_app, f) != getattr(k1, f)
    other_root = derive_app_keys(RootKeys(root.ca_key, b"\x08" * 32), APP, INST, now=NOW)
    assert other_root.k256_key != k1.k256_key
    assert other_root.disk_crypt_key == k1.disk_crypt_key  # depends only on the CA root


def test_app_k256_is_hkdf_of_root_and_signed_by_root(root):
    k = derive_app_keys(root, APP, INST, now=NOW)
    assert k.k256_key == derive_key(root.k256_key, [APP, b"app-key"])
    assert len(k.k256_signature) == 65
    signer = recover_k256(kms_issued_digest(APP, k256_public_key(k.k256_key)), k.k256_signature)
    assert signer == root.k256_public_key == k.kms_k256_pubkey
    assert k.key_provider_info == {"name": "kms", "id": root.ca_public_key_der.hex()}


def test_app_ca_chains_to_root(root):
    k = derive_app_keys(root, APP, INST, now=NOW)
    ca = x509.load_pem_x509_certificate(k.ca_cert_pem.encode())
    assert ca.public_key().public_numbers() == k.ca_key().public_key().public_numbers()
    verify_cert_chain([ca], trusted_public_key=root.ca_key.public_key(), now=NOW + 10)
    root_cert = make_root_ca_cert(root.ca_key, now=NOW)
    verify_cert_chain([ca, root_cert], trusted_public_key=root.ca_key.public_key(), now=NOW + 10)
    with pytest.raises(CertChainInvalid):
        verify_cert_chain(
            [ca], trusted_public_key=ec.generate_private_key(ec.SECP256R1()).public_key(), now=NOW
        )
    with pytest.raises(CertChainInvalid, match="not valid at"):
        verify_cert_chain([ca], trusted_public_key=root.ca_key.public_key(), now=NOW - 10)


def test_env_pubkey_matches_env_secret(root):
    k = derive_app_keys(root, APP, INST, now=NOW)
    assert (
        env_encrypt_pubkey(root, APP)
        == X25519PrivateKey.from_private_bytes(k.env_crypt_key).public_key().public_bytes_raw()
    )


def test_env_pubkey_signature_accepted_by_dstack_sdk(root):
    pub = env_encrypt_pubkey(root, APP)
    ts = int(time.time())  # the SDK checks freshness against the real clock
    sig = sign_env_encrypt_pubkey(root, APP, pub, ts)
    signer = verify_env_encrypt_public_key(pub, sig, "0x" + APP.hex(), ts)
    assert signer == "0x" + root.k256_public_key.hex()
    # negative: another app id, another timestamp, another key -> different signer or rejected
    assert verify_env_encrypt_public_key(pub, sig, "0x" + ("12" * 20), ts) != signer
    assert verify_env_encrypt_public_key(pub, sig, APP.hex(), ts + 1) != signer
    assert verify_env_encrypt_public_key(b"\x00" * 32, sig, APP.hex(), ts) != signer


def test_bad_app_id_is_usage_error(root):
    with pytest.raises(KeyUsageError):
        derive_app_keys(root, b"", INST, now=NOW)
    with pytest.raises(KeyUsageError):
        sign_env_encrypt_pubkey(root, APP, b"\x00" * 31, NOW)
