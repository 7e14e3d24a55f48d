"""Certificate-chain checks shared by the SNP, Nitro and NVIDIA verifiers, against chains built here.

The builders below (`make_cert`, `TestPki`) are reused by test_snp/test_nitro/test_nvidia to re-sign evidence
under roots we control, since we cannot sign with AMD's, AWS's or NVIDIA's keys.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from teecloud.attestation import _x509
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    Expired,
    MalformedEvidence,
    UntrustedRoot,
    UsageError,
)

NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
NOW = int(dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp())

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def make_cert(
    subject_cn: str,
    key: PrivateKey,
    *,
    issuer_cn: str | None = None,
    issuer_key: PrivateKey | None = None,
    ca: bool = False,
    not_before: dt.datetime = NOT_BEFORE,
    not_after: dt.datetime = NOT_AFTER,
    extensions: Sequence[x509.ExtensionType] = (),
    hash_alg: hashes.SHA256 | hashes.SHA384 | None = None,
    org: str = "teecloud tests",
) -> x509.Certificate:
    """A certificate for `key` signed by `issuer_key` (self-signed when omitted). RSA issuers sign RSA-PSS."""
    issuer_key = issuer_key or key
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    issuer = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn or subject_cn),
        ]
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    h = hash_alg or hashes.SHA384()
    if isinstance(issuer_key, rsa.RSAPrivateKey):
        return b.sign(issuer_key, h, rsa_padding=pss())
    return b.sign(issuer_key, h)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass
class TestPki:
    """root -> intermediate -> leaf, all ECDSA P-384 / SHA-384."""

    __test__ = False

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    inter_key: ec.EllipticCurvePrivateKey
    inter: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate

    @classmethod
    def create(cls, prefix: str = "Test") -> TestPki:
        rk, ik, lk = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
        root = make_cert(f"{prefix} Root", rk, ca=True)
        inter = make_cert(f"{prefix} Intermediate", ik, issuer_cn=f"{prefix} Root", issuer_key=rk, ca=True)
        leaf = make_cert(f"{prefix} Leaf", lk, issuer_cn=f"{prefix} Intermediate", issuer_key=ik)
        return cls(rk, root, ik, inter, lk, leaf)


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.create()


def verify(
    leaf: x509.Certificate, pool: list[x509.Certificate], anchors: list[bytes], now: int = NOW
) -> _x509.VerifiedChain:
    return _x509.build_and_verify_chain(leaf, pool, anchors, now=now, algorithms=_x509.ECDSA_SHA384)


def test_chain_verifies_to_anchor_in_any_pool_order(pki: TestPki) -> None:
    chain = verify(pki.leaf, [pki.root, pki.inter], [der(pki.root)])
    assert [c.subject for c in chain.path] == [pki.leaf.subject, pki.inter.subject, pki.root.subject]
    assert "trust anchor" in chain.summary()
    # the root may be left out of the evidence: it is taken from the anchors
    assert verify(pki.leaf, [pki.inter], [pem(pki.root)]).root == pki.root


def test_other_root_is_untrusted_and_named(pki: TestPki) -> None:
    other = TestPki.create("Other")
    with pytest.raises(UntrustedRoot, match="Test Root"):
        verify(pki.leaf, [pki.inter, pki.root], [der(other.root)])


def test_same_name_different_key_root_is_untrusted(pki: TestPki) -> None:
    impostor_key = ec.generate_private_key(ec.SECP384R1())
    impostor = make_cert("Test Root", impostor_key, ca=True)
    with pytest.raises(UntrustedRoot, match="Test Root"):
        verify(pki.leaf, [pki.inter, impostor], [der(pki.root)])


def test_missing_intermediate_names_the_missing_issuer(pki: TestPki) -> None:
    with pytest.raises(UntrustedRoot, match="Test Intermediate"):
        verify(pki.leaf, [], [der(pki.root)])


def test_forged_link_is_rejected(pki: TestPki) -> None:
    # an intermediate with the right name, signed by an attacker's own key
    rogue_key = ec.generate_private_key(ec.SECP384R1())
    rogue_inter = make_cert(
        "Test Intermediate", pki.inter_key, issuer_cn="Test Root", issuer_key=rogue_key, ca=True
    )
    with pytest.raises(CertificateChainInvalid, match="does not verify"):
        verify(pki.leaf, [rogue_inter], [der(pki.root)])


def test_issuer_must_be_a_ca(pki: TestPki) -> None:
    inter = make_cert(
        "Test Intermediate", pki.inter_key, issuer_cn="Test Root", issuer_key=pki.root_key, ca=False
    )
    with pytest.raises(CertificateChainInvalid, match="basicConstraints"):
        verify(pki.leaf, [inter], [der(pki.root)])


def test_disallowed_hash_is_rejected(pki: TestPki) -> None:
    leaf = make_cert(
        "Test Leaf",
        pki.leaf_key,
        issuer_cn="Test Intermediate",
        issuer_key=pki.inter_key,
        hash_alg=hashes.SHA256(),
    )
    with pytest.raises(CertificateChainInvalid, match=r"ecdsa-with-SHA256|SHA-384"):
        verify(leaf, [pki.inter], [der(pki.root)])


def test_disallowed_algorithm_is_rejected(pki: TestPki) -> None:
    with pytest.raises(CertificateChainInvalid, match="does not allow"):
        _x509.build_and_verify_chain(
            pki.leaf, [pki.inter], [der(pki.root)], now=NOW, algorithms=_x509.RSA_PSS
        )


@pytest.mark.parametrize(
    ("when", "needle"),
    [
        (NOT_AFTER + dt.timedelta(days=40), "expired at 2030"),
        (NOT_BEFORE - dt.timedelta(days=1), "not valid before"),
    ],
)
def test_validity_is_checked_and_names_the_certificate(pki: TestPki, when: dt.datetime, needle: str) -> None:
    with pytest.raises(Expired, match=needle) as exc:
        verify(pki.leaf, [pki.inter], [der(pki.root)], now=int(when.timestamp()))
    assert "Test Leaf" in exc.value.reason


def test_expired_intermediate_is_named(pki: TestPki) -> None:
    inter = make_cert(
        "Test Intermediate",
        pki.inter_key,
        issuer_cn="Test Root",
        issuer_key=pki.root_key,
        ca=True,
        not_after=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    )
    with pytest.raises(Expired, match="Test Intermediate"):
        verify(pki.leaf, [inter], [der(pki.root)])


def test_out_of_range_time_is_a_usage_error(pki: TestPki) -> None:
    with pytest.raises(UsageError):
        verify(pki.leaf, [pki.inter], [der(pki.root)], now=10**15)


def test_bad_anchors_are_usage_errors(pki: TestPki) -> None:
    with pytest.raises(UsageError, match="no trust anchors"):
        verify(pki.leaf, [pki.inter], [])
    with pytest.raises(UsageError):
        verify(pki.leaf, [pki.inter], [b"not a certificate"])


def test_garbage_certificates_are_malformed() -> None:
    with pytest.raises(MalformedEvidence):
        _x509.load_certificate(b"\x30\x03\x02\x01\x00", what="x")
    with pytest.raises(MalformedEvidence):
        _x509.load_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", what="x")
    with pytest.raises(MalformedEvidence, match="limit"):
        _x509.load_certificate(b"\x30" * (_x509.MAX_CERT_BYTES + 1), what="x")


def test_non_positive_serial_loads_without_warning(vectors, recwarn: pytest.WarningsRecorder) -> None:  # type: ignore[no-untyped-def]
    cert = _x509.load_certificate((vectors / "snp" / "go-sev-guest_vcek.testcer").read_bytes(), what="VCEK")
    assert not [w for w in recwarn if "serial" in str(w.message)]
    assert _x509.common_name(cert) == "SEV-VCEK"
