"""keys.threshold_certs: a root is the recorded one only by its exact DER, key and self-signature
(check_group_root); a certificate is taken only as the canonical encoding of one TBS and its signature
(canonical_certificate)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from teecloud.keys import threshold_certs as tc
from teecloud.keys.errors import KeysError


def _compressed(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def _root(key: ec.EllipticCurvePrivateKey, not_before: int = 1_700_000_000) -> x509.Certificate:
    to_sign = tc.root_ca_to_sign(_compressed(key.public_key()), not_before=not_before)
    r, s = decode_dss_signature(key.sign(to_sign.tbs, ec.ECDSA(hashes.SHA256())))
    return tc.assemble_certificate(to_sign, r.to_bytes(32, "big") + s.to_bytes(32, "big"), key.public_key())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_check_group_root() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = _root(key)
    ca_key, digest = _compressed(key.public_key()), hashlib.sha256(_der(root)).digest()
    tc.check_group_root(root, ca_key, digest)
    other_validity = _root(key, not_before=1_700_000_001)  # the group's key, another root
    with pytest.raises(KeysError, match="not the recorded one"):
        tc.check_group_root(other_validity, ca_key, digest)
    other_key = _root(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(KeysError, match="key is not the recorded group CA key"):
        tc.check_group_root(other_key, ca_key, hashlib.sha256(_der(other_key)).digest())
    with pytest.raises(KeysError):
        tc.check_group_root(root, b"\x02" + bytes(32), digest)


def test_canonical_certificate_keeps_only_the_tbs_and_the_signature() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = _root(key)
    app_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    to_sign = tc.app_ca_to_sign(root, b"\x11" * 20, app_key)
    r, s = decode_dss_signature(key.sign(to_sign.tbs, ec.ECDSA(hashes.SHA256())))
    cert = tc.assemble_certificate(to_sign, r.to_bytes(32, "big") + s.to_bytes(32, "big"), key.public_key())
    assert _der(tc.canonical_certificate(to_sign, cert, key.public_key())) == _der(cert)
    # another outer signatureAlgorithm around the same TBS and signature: re-assembled to the genuine bytes
    outer = bytes.fromhex("300a06082a8648ce3d040302")
    der = _der(cert)
    at = der.rindex(outer)
    odd = x509.load_der_x509_certificate(
        der[:at] + bytes.fromhex("300a06082a8648ce3d040303") + der[at + 12 :]
    )
    assert _der(odd) != der
    assert _der(tc.canonical_certificate(to_sign, odd, key.public_key())) == der
    # another TBS (another app), or a signature by another key: refused
    other = tc.app_ca_to_sign(root, b"\x22" * 20, app_key)
    with pytest.raises(KeysError, match="other TBS"):
        tc.canonical_certificate(other, cert, key.public_key())
    with pytest.raises(KeysError, match="does not verify"):
        tc.canonical_certificate(to_sign, cert, ec.generate_private_key(ec.SECP256R1()).public_key())
