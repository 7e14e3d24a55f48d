"""Offline revocation for Nitro and NVIDIA chains (CRLs and OCSP responses the caller supplies), positive
and negative, under test PKIs made here; SEV-SNP's AMD CRLs are tested in test_snp.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from teecloud.attestation import nitro, nvidia
from teecloud.attestation._revocation import NOT_SUPPLIED, Revocation
from teecloud.attestation.errors import CertificateChainInvalid, Expired, MalformedEvidence
from teecloud.attestation.models import VerifiedEvidence
from tests.attestation.test_nitro import DOC_TS_MS, payload, sign_document
from tests.attestation.test_nvidia import resign
from tests.attestation.test_x509 import TestPki, der, make_cert, pem

NITRO_NOW = DOC_TS_MS // 1000
NV_NOW = int(dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp())


def crl(
    issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: list[int], at: int, days: int = 7
) -> bytes:
    start = dt.datetime.fromtimestamp(at, dt.UTC) - dt.timedelta(days=1)
    b = x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).last_update(start)
    b = b.next_update(start + dt.timedelta(days=days))
    for serial in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build()
        )
    return b.sign(key, hashes.SHA384()).public_bytes(Encoding.DER)


def ocsp_response(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    signer_key: ec.EllipticCurvePrivateKey,
    status: ocsp.OCSPCertStatus,
    at: int,
    *,
    signer: x509.Certificate | None = None,
    responder_id: x509.Certificate | None = None,
    hours: int = 12,
) -> bytes:
    this = dt.datetime.fromtimestamp(at, dt.UTC) - dt.timedelta(hours=1)
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=cert,
        issuer=issuer,
        algorithm=hashes.SHA1(),
        cert_status=status,
        this_update=this,
        next_update=this + dt.timedelta(hours=hours),
        revocation_time=this if status == ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None,
    )
    b = b.responder_id(ocsp.OCSPResponderEncoding.HASH, responder_id or signer or issuer)
    if signer is not None:
        b = b.certificates([signer])
    return b.sign(signer_key, hashes.SHA384()).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.create("Revocation Test")


# --- Nitro: CRLs ---------------------------------------------------------------------------------------


def nitro_verify(pki: TestPki, revocation: Revocation | None = None) -> VerifiedEvidence:
    doc = sign_document(pki, payload(pki))
    return nitro.verify_nitro_document(
        doc, trust_anchors=[der(pki.root)], now=NITRO_NOW, revocation=revocation
    )


def test_nitro_without_revocation_data_says_not_checked(pki: TestPki) -> None:
    ev = nitro_verify(pki)
    step = next(s for s in ev.steps if s.name == "revocation")
    assert step.reason == NOT_SUPPLIED
    assert ev.fields["revocation"] == {
        "checked": [],
        "not_checked": ["Revocation Test Leaf", "Revocation Test Intermediate"],
        "complete": False,
    }


def test_nitro_crls_checked_for_the_whole_chain(pki: TestPki) -> None:
    crls = (crl(pki.inter, pki.inter_key, [1, 2, 3], NITRO_NOW), crl(pki.root, pki.root_key, [], NITRO_NOW))
    ev = nitro_verify(pki, Revocation(crls=crls))
    assert ev.fields["revocation"]["complete"] is True
    assert "Revocation Test Leaf: not in the CRL of 'Revocation Test Intermediate'" in ev.steps[2].reason


def test_nitro_leaf_revoked_by_crl_is_rejected(pki: TestPki) -> None:
    revoked = crl(pki.inter, pki.inter_key, [pki.leaf.serial_number], NITRO_NOW)
    with pytest.raises(CertificateChainInvalid, match=r"'Revocation Test Leaf'.*revoked") as info:
        nitro_verify(pki, Revocation(crls=(revoked,)))
    assert info.value.step == "revocation"


def test_nitro_intermediate_revoked_by_root_crl_is_rejected(pki: TestPki) -> None:
    revoked = crl(pki.root, pki.root_key, [pki.inter.serial_number], NITRO_NOW)
    with pytest.raises(CertificateChainInvalid, match=r"'Revocation Test Intermediate'.*revoked"):
        nitro_verify(pki, Revocation(crls=(revoked,)))


def test_nitro_forged_expired_or_junk_crl_is_rejected(pki: TestPki) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CertificateChainInvalid, match="not signed by"):
        nitro_verify(pki, Revocation(crls=(crl(pki.inter, other, [], NITRO_NOW),)))
    stale = crl(pki.inter, pki.inter_key, [], NITRO_NOW - 30 * 86400)
    with pytest.raises(Expired, match="not current"):
        nitro_verify(pki, Revocation(crls=(stale,)))
    with pytest.raises(MalformedEvidence):
        nitro_verify(pki, Revocation(crls=(b"\x30\x03\x02\x01\x00",)))
    # a PEM CRL is read as well
    good = x509.load_der_x509_crl(crl(pki.inter, pki.inter_key, [], NITRO_NOW)).public_bytes(Encoding.PEM)
    assert nitro_verify(pki, Revocation(crls=(good,))).fields["revocation"]["checked"]


# --- NVIDIA: OCSP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu(vectors: Path, pki: TestPki) -> tuple[bytes, bytes]:
    raw = bytes.fromhex((vectors / "nvidia" / "nvtrust_lgv_hopperAttestationReport.txt").read_text())
    return resign(raw, pki.leaf_key), pem(pki.leaf, pki.inter, pki.root)


def nv_verify(
    gpu: tuple[bytes, bytes], pki: TestPki, revocation: Revocation | None = None
) -> VerifiedEvidence:
    evidence, chain = gpu
    return nvidia.verify_nvidia_evidence(
        evidence, cert_chain_pem=chain, trust_anchors=[der(pki.root)], now=NV_NOW, revocation=revocation
    )


def test_nvidia_without_ocsp_says_not_checked(gpu: tuple[bytes, bytes], pki: TestPki) -> None:
    ev = nv_verify(gpu, pki)
    assert next(s for s in ev.steps if s.name == "revocation").reason == NOT_SUPPLIED


def test_nvidia_ocsp_good_for_each_certificate(gpu: tuple[bytes, bytes], pki: TestPki) -> None:
    responses = (
        ocsp_response(pki.leaf, pki.inter, pki.inter_key, ocsp.OCSPCertStatus.GOOD, NV_NOW),
        ocsp_response(pki.inter, pki.root, pki.root_key, ocsp.OCSPCertStatus.GOOD, NV_NOW),
    )
    ev = nv_verify(gpu, pki, Revocation(ocsp_responses=responses))
    assert ev.fields["revocation"]["complete"] is True
    assert "OCSP good" in ev.steps[2].reason


def test_nvidia_ocsp_by_a_delegated_responder(gpu: tuple[bytes, bytes], pki: TestPki) -> None:
    rk = ec.generate_private_key(ec.SECP384R1())
    responder = make_cert(
        "Revocation Test OCSP",
        rk,
        issuer_cn="Revocation Test Intermediate",
        issuer_key=pki.inter_key,
        extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING])],
    )
    good = ocsp_response(pki.leaf, pki.inter, rk, ocsp.OCSPCertStatus.GOOD, NV_NOW, signer=responder)
    ev = nv_verify(gpu, pki, Revocation(ocsp_responses=(good,)))
    assert ev.fields["revocation"]["checked"] == [
        "Revocation Test Leaf: OCSP good from 'Revocation Test Intermediate'"
    ]
    # the same responder without the OCSP-signing EKU is no responder
    plain = make_cert(
        "Revocation Test Other", rk, issuer_cn="Revocation Test Intermediate", issuer_key=pki.inter_key
    )
    bad = ocsp_response(pki.leaf, pki.inter, rk, ocsp.OCSPCertStatus.GOOD, NV_NOW, signer=plain)
    with pytest.raises(CertificateChainInvalid, match="not signed by"):
        nv_verify(gpu, pki, Revocation(ocsp_responses=(bad,)))


def test_nvidia_ocsp_revoked_is_rejected(gpu: tuple[bytes, bytes], pki: TestPki) -> None:
    revoked = ocsp_response(pki.leaf, pki.inter, pki.inter_key, ocsp.OCSPCertStatus.REVOKED, NV_NOW)
    with pytest.raises(CertificateChainInvalid, match="'Revocation Test Leaf' is revoked") as info:
        nv_verify(gpu, pki, Revocation(ocsp_responses=(revoked,)))
    assert info.value.step == "revocation"


def test_nvidia_ocsp_forged_stale_or_unknown(gpu: tuple[bytes, bytes], pki: TestPki) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    impostor = make_cert("Revocation Test Intermediate", other)  # the issuer's name, another key
    forged = ocsp_response(
        pki.leaf, pki.inter, other, ocsp.OCSPCertStatus.GOOD, NV_NOW, responder_id=impostor
    )
    with pytest.raises(CertificateChainInvalid, match="not signed by"):
        nv_verify(gpu, pki, Revocation(ocsp_responses=(forged,)))
    stale = ocsp_response(pki.leaf, pki.inter, pki.inter_key, ocsp.OCSPCertStatus.GOOD, NV_NOW - 86400)
    with pytest.raises(Expired, match="not current"):
        nv_verify(gpu, pki, Revocation(ocsp_responses=(stale,)))
    unknown = ocsp_response(pki.leaf, pki.inter, pki.inter_key, ocsp.OCSPCertStatus.UNKNOWN, NV_NOW)
    ev = nv_verify(gpu, pki, Revocation(ocsp_responses=(unknown,)))
    assert "Revocation Test Leaf" in ev.fields["revocation"]["not_checked"]
    with pytest.raises(MalformedEvidence, match="OCSP"):
        nv_verify(gpu, pki, Revocation(ocsp_responses=(b"junk",)))


def test_nvidia_ocsp_with_an_unknown_signature_algorithm_is_refused(
    gpu: tuple[bytes, bytes], pki: TestPki
) -> None:
    """cryptography raises UnsupportedAlgorithm when asked for the hash of an unknown signature algorithm;
    the verifier must refuse such a response as unsigned, not crash (found by the collateral client's
    mutation test)."""
    good = ocsp_response(pki.leaf, pki.inter, pki.inter_key, ocsp.OCSPCertStatus.GOOD, NV_NOW)
    ecdsa_sha384 = bytes.fromhex("06082a8648ce3d040303")  # OID 1.2.840.10045.4.3.3, DER
    at = good.rindex(ecdsa_sha384)  # the BasicOCSPResponse's signatureAlgorithm (after tbsResponseData)
    mutated = good[: at + len(ecdsa_sha384) - 1] + b"\x7f" + good[at + len(ecdsa_sha384) :]
    with pytest.raises(CertificateChainInvalid, match="not signed by"):
        nv_verify(gpu, pki, Revocation(ocsp_responses=(mutated,)))
