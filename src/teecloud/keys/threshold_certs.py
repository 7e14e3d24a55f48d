"""X.509 certificates signed by a threshold group's P-256 key (teecloud.keys.threshold_ecdsa over P256):
the group's root CA (self-signed by t nodes jointly) and each app CA under it.

A certificate is built in two halves (RFC 5280 §4.1):
  (1) its TBSCertificate, built by every signer *itself* from facts it holds (the group key and the root's
      validity; for an app CA the app_id from the caller's verified evidence and the app CA's public key):
      every field is a function of those, so the t nodes sign one identical digest, sha256(TBS);
  (2) the t-of-n signature over that digest (keys.threshold_ecdsa, ecdsa-with-SHA256, RFC 5758 §3.2) put
      after the TBS: Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }, the
      signature value a BIT STRING holding the DER Ecdsa-Sig-Value (RFC 3279 §2.2.3).

The TBS is produced by `cryptography`'s CertificateBuilder (signed with a throwaway key whose signature is
discarded: the TBS does not depend on the signing key, whose only trace, the AuthorityKeyIdentifier, is set
here from the group's key). Only the outer SEQUENCE and BIT STRING framing is written here (DER, X.690
§8.6 and §10.1), and the result is parsed back by `cryptography` and its signature checked under the
group's key before it is returned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from teecloud.keys.certs import APP_CA_VALIDITY_S, spki_der
from teecloud.keys.errors import CertChainInvalid, KeyUsageError, MalformedKeyMaterial

__all__ = [
    "GROUP_ROOT_CA_CN",
    "CertToSign",
    "app_ca_to_sign",
    "assemble_certificate",
    "canonical_certificate",
    "check_group_root",
    "group_ca_public_key",
    "root_ca_to_sign",
]

GROUP_ROOT_CA_CN = "teecloud KMS Root CA"  # the same subject as a single KMS's root (keys.certs.ROOT_CA_CN)
# AlgorithmIdentifier { ecdsa-with-SHA256 (1.2.840.10045.4.3.2) }, parameters absent (RFC 5758 §3.2)
_ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


@dataclass(frozen=True)
class CertToSign:
    """A TBSCertificate and the digest the group signs (sha256 of its DER)."""

    tbs: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.tbs).digest()


def group_ca_public_key(group_public_key: bytes) -> ec.EllipticCurvePublicKey:
    """The group's P-256 key (33 bytes SEC1 compressed: C_0 of its commitments), for `cryptography`."""
    if len(group_public_key) != 33:
        raise KeyUsageError("the group's CA key is 33 bytes SEC1 compressed")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), group_public_key)
    except ValueError as exc:
        raise MalformedKeyMaterial("the group's CA key is not a P-256 point") from exc


def _utc(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teecloud"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _serial(*parts: bytes) -> int:
    # deterministic, positive, < 2^159 (RFC 5280 §4.1.2.2: at most 20 octets)
    return int.from_bytes(hashlib.sha256(b"".join(parts)).digest()[:19], "big") | 1


def _ca_tbs(
    subject_key: ec.EllipticCurvePublicKey,
    *,
    subject_cn: str,
    issuer_key: ec.EllipticCurvePublicKey,
    not_before: int,
    not_after: int,
    serial: int,
) -> CertToSign:
    if not 0 <= not_before < not_after < 2**35:
        raise KeyUsageError(f"validity {not_before}..{not_after} is not an interval of unix seconds")
    if not isinstance(subject_key.curve, ec.SECP256R1):
        raise KeyUsageError("a group-signed CA certificate is for a P-256 key")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(_name(GROUP_ROOT_CA_CN))
        .public_key(subject_key)
        .serial_number(serial)
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    )
    throwaway = ec.generate_private_key(ec.SECP256R1())
    return CertToSign(builder.sign(throwaway, hashes.SHA256()).tbs_certificate_bytes)


def root_ca_to_sign(
    group_public_key: bytes, *, not_before: int, validity_s: int = APP_CA_VALIDITY_S
) -> CertToSign:
    """(1) The group's self-signed root CA: subject = issuer = GROUP_ROOT_CA_CN, key = the group's P-256
    key, valid from `not_before` for `validity_s`."""
    key = group_ca_public_key(group_public_key)
    return _ca_tbs(
        key,
        subject_cn=GROUP_ROOT_CA_CN,
        issuer_key=key,
        not_before=not_before,
        not_after=not_before + validity_s,
        serial=_serial(b"group-root", group_public_key, not_before.to_bytes(8, "big")),
    )


def app_ca_to_sign(
    root: x509.Certificate, app_id: bytes, app_ca_public_key: ec.EllipticCurvePublicKey
) -> CertToSign:
    """(1) An app CA under the group's root `root`: subject "teecloud App CA <app_id hex>", the app CA key
    (derived inside the CVM), the root's validity. A function of (root, app_id, key) only, so any t nodes
    that hold the same root build the same TBS."""
    if not 1 <= len(app_id) <= 64:
        raise KeyUsageError("an app id is 1..64 bytes")
    root_key = root.public_key()
    if not isinstance(root_key, ec.EllipticCurvePublicKey):
        raise KeyUsageError("the group root CA has no P-256 key")
    nb = int(root.not_valid_before_utc.timestamp())
    na = int(root.not_valid_after_utc.timestamp())
    return _ca_tbs(
        app_ca_public_key,
        subject_cn=f"teecloud App CA {app_id.hex()}"[:64],
        issuer_key=root_key,
        not_before=nb,
        not_after=na,
        serial=_serial(b"group-app-ca", app_id, spki_der(app_ca_public_key), nb.to_bytes(8, "big")),
    )


def canonical_certificate(
    to_sign: CertToSign, cert: x509.Certificate, issuer_public_key: ec.EllipticCurvePublicKey
) -> x509.Certificate:
    """`cert` accepted only as the certificate of `to_sign`: its TBS byte for byte, its ECDSA signature
    verifying under `issuer_public_key`; returned re-assembled (`assemble_certificate`) from that TBS and
    signature, so whatever else the given encoding carried (the outer signatureAlgorithm, a non-minimal
    INTEGER or BIT STRING) is dropped. Raises CertChainInvalid / MalformedKeyMaterial."""
    if cert.tbs_certificate_bytes != to_sign.tbs:
        raise CertChainInvalid("the certificate is not the one built for this key and issuer (other TBS)")
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    try:
        r, s = decode_dss_signature(cert.signature)
    except ValueError as exc:
        raise MalformedKeyMaterial("the certificate's signature is not an ECDSA signature") from exc
    if not (0 < r < 2**256 and 0 < s < 2**256):
        raise MalformedKeyMaterial("the certificate's signature is out of range")
    return assemble_certificate(to_sign, r.to_bytes(32, "big") + s.to_bytes(32, "big"), issuer_public_key)


def check_group_root(root: x509.Certificate, ca_key: bytes, root_cert_hash: bytes) -> None:
    """The root CA certificate a client is handed is the one a record (KmsGroup: the group's CA key and the
    sha256 of the root's DER) names: its DER hashes to `root_cert_hash`, its key is `ca_key` and it is
    self-signed under that key. Raises CertChainInvalid naming what differs."""
    from cryptography.hazmat.primitives import serialization

    got = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).digest()
    if got != root_cert_hash:
        raise CertChainInvalid(
            f"the root CA certificate (sha256 {got.hex()}) is not the recorded one ({root_cert_hash.hex()})"
        )
    key = group_ca_public_key(ca_key)
    if root.public_key() != key:
        raise CertChainInvalid("the root CA certificate's key is not the recorded group CA key")
    try:
        key.verify(root.signature, root.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise CertChainInvalid("the root CA certificate is not self-signed by the group CA key") from exc


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def assemble_certificate(
    to_sign: CertToSign, signature: bytes, issuer_public_key: ec.EllipticCurvePublicKey
) -> x509.Certificate:
    """(2) The certificate from its TBS and the group's 64-byte r‖s signature (keys.threshold_ecdsa over
    P256), parsed back and checked under `issuer_public_key` (CertChainInvalid if it does not verify)."""
    if len(signature) != 64:
        raise KeyUsageError("a P-256 group signature is 64 bytes r‖s")
    sig_der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING (0 unused) }
    der = _tlv(0x30, to_sign.tbs + _ECDSA_WITH_SHA256 + _tlv(0x03, b"\x00" + sig_der))
    try:
        cert = x509.load_der_x509_certificate(der)
        if cert.tbs_certificate_bytes != to_sign.tbs:
            raise MalformedKeyMaterial("the assembled certificate does not carry its TBS unchanged")
        issuer_public_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise CertChainInvalid("the group signature does not verify over the certificate") from exc
    except ValueError as exc:
        raise MalformedKeyMaterial(f"the assembled certificate does not parse: {exc}") from exc
    return cert
