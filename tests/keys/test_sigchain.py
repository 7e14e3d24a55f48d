import hashlib

import coincurve
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_keys import keys as eth_keys
from eth_utils.crypto import keccak

from teecloud.keys.appkeys import RootKeys, derive_app_keys
from teecloud.keys.errors import KeyUsageError, MalformedKeyMaterial, SignatureChainInvalid
from teecloud.keys.kdf import derive_key
from teecloud.keys.sigchain import (
    build_key_signature_chain,
    derive_get_key,
    sign_data,
    verify_data_signature,
    verify_key_signature_chain,
    verify_sign_signature_chain,
)

APP = b"\x11" * 20


@pytest.fixture(scope="module")
def root():
    return RootKeys(ec.derive_private_key(99, ec.SECP256R1()), b"\x05" * 32)


@pytest.fixture(scope="module")
def app(root):
    return derive_app_keys(root, APP, b"\x22" * 20, now=1_750_000_000)


def test_secp256k1_get_key_is_hkdf_of_app_key_with_path(app):
    k = derive_get_key(app.k256_key, "wallet/eth")
    assert k.secret == derive_key(app.k256_key, [b"wallet/eth"])
    assert k.public_key == coincurve.PrivateKey(k.secret).public_key.format(compressed=True)
    assert derive_get_key(app.k256_key, "wallet/eth", "k256") == k
    assert derive_get_key(app.k256_key, "wallet/eth", "") == k


def test_ed25519_key_never_equals_a_secp_key(app):
    ed = derive_get_key(app.k256_key, "p", "ed25519")
    assert ed.secret != derive_get_key(app.k256_key, "p").secret
    assert ed.public_key == Ed25519PrivateKey.from_private_bytes(ed.secret).public_key().public_bytes_raw()


def test_unknown_algorithm(app):
    with pytest.raises(KeyUsageError, match="unknown algorithm"):
        derive_get_key(app.k256_key, "p", "rsa")


def test_chain_round_trip_and_matches_dstack_message_format(root, app):
    k = derive_get_key(app.k256_key, "x")
    chain = build_key_signature_chain(app.k256_key, app.k256_signature, "eth", k.public_key)
    got = verify_key_signature_chain(
        app_id=APP,
        public_key=k.public_key,
        purpose="eth",
        signature_chain=chain,
        kms_root_public_key=root.k256_public_key,
    )
    assert got == app.k256_public_key
    # independent check with eth_keys: chain[0] recovers the app key over keccak("eth:<hex pubkey>")
    rec = eth_keys.Signature(chain[0]).recover_public_key_from_msg_hash(
        keccak(f"eth:{k.public_key.hex()}".encode())
    )
    assert rec.to_compressed_bytes() == app.k256_public_key
    rec1 = eth_keys.Signature(chain[1]).recover_public_key_from_msg_hash(
        keccak(b"dstack-kms-issued:" + APP + app.k256_public_key)
    )
    assert rec1.to_compressed_bytes() == root.k256_public_key


@pytest.mark.parametrize("mutation", ["purpose", "app_id", "root", "swap", "flip", "short", "length"])
def test_chain_negative(root, app, mutation):
    k = derive_get_key(app.k256_key, "x")
    chain = build_key_signature_chain(app.k256_key, app.k256_signature, "eth", k.public_key)
    kw = dict(
        app_id=APP,
        public_key=k.public_key,
        purpose="eth",
        signature_chain=chain,
        kms_root_public_key=root.k256_public_key,
    )
    if mutation == "purpose":
        kw["purpose"] = "other"
    elif mutation == "app_id":
        kw["app_id"] = b"\x12" * 20
    elif mutation == "root":
        kw["kms_root_public_key"] = coincurve.PrivateKey(b"\x06" * 32).public_key.format()
    elif mutation == "swap":
        kw["signature_chain"] = [chain[1], chain[0]]
    elif mutation == "flip":
        kw["signature_chain"] = [chain[0][:10] + bytes([chain[0][10] ^ 1]) + chain[0][11:], chain[1]]
    elif mutation == "short":
        kw["signature_chain"] = [chain[0][:64], chain[1]]
    elif mutation == "length":
        kw["signature_chain"] = [chain[0]]
    with pytest.raises((SignatureChainInvalid, MalformedKeyMaterial)):
        verify_key_signature_chain(**kw)


@pytest.mark.parametrize("algorithm", ["ed25519", "secp256k1", "secp256k1_prehashed"])
def test_sign_verify_round_trip(root, app, algorithm):
    k = derive_get_key(app.k256_key, "vms", "ed25519" if algorithm == "ed25519" else "secp256k1")
    data = hashlib.sha256(b"msg").digest() if algorithm == "secp256k1_prehashed" else b"hello"
    sig = sign_data(algorithm, k.secret, data)
    assert verify_data_signature(algorithm, data, sig, k.public_key)
    assert verify_data_signature(algorithm, data, sig[:64], k.public_key)  # r‖s without v is accepted too
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_data_signature(algorithm, data, bad, k.public_key)
    other = hashlib.sha256(b"other").digest() if algorithm == "secp256k1_prehashed" else b"hellO"
    assert not verify_data_signature(algorithm, other, sig, k.public_key)
    assert not verify_data_signature(algorithm, data, sig, b"\x02" + b"\x00" * 32)
    assert not verify_data_signature(algorithm, data, b"", k.public_key)
    chain = [sig, *build_key_signature_chain(app.k256_key, app.k256_signature, "signing", k.public_key)]
    verify_sign_signature_chain(
        app_id=APP,
        algorithm=algorithm,
        data=data,
        signature=sig,
        public_key=k.public_key,
        signature_chain=chain,
        kms_root_public_key=root.k256_public_key,
    )
    with pytest.raises(SignatureChainInvalid):
        verify_sign_signature_chain(
            app_id=APP,
            algorithm=algorithm,
            data=other,
            signature=sig,
            public_key=k.public_key,
            signature_chain=chain,
            kms_root_public_key=root.k256_public_key,
        )


def test_secp256k1_signature_is_over_sha256_and_recoverable(app):
    k = derive_get_key(app.k256_key, "vms")
    sig = sign_data("secp256k1", k.secret, b"abc")
    rec = coincurve.PublicKey.from_signature_and_message(sig, hashlib.sha256(b"abc").digest(), hasher=None)
    assert rec.format() == k.public_key


def test_prehashed_needs_32_bytes(app):
    with pytest.raises(KeyUsageError, match="32-byte"):
        sign_data("secp256k1_prehashed", app.k256_key, b"abc")
    with pytest.raises(KeyUsageError):
        verify_data_signature("secp256k1_prehashed", b"abc", b"\x00" * 65, app.k256_public_key)
    with pytest.raises(KeyUsageError, match="unknown algorithm"):
        sign_data("rsa", app.k256_key, b"abc")
