"""SEV-SNP: the go-sev-guest vector verifies; every rule has a negative test, mostly by re-signing modified
reports under an AMD-shaped PKI generated here (ARK/ASK RSA-PSS, VCEK P-384 with AMD's TCB extensions)."""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teecloud.attestation import _x509, snp
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    CollateralMismatch,
    Expired,
    MalformedEvidence,
    SignatureInvalid,
    UntrustedRoot,
    VerificationError,
)
from teecloud.attestation.models import VerifiedEvidence
from tests.attestation.test_x509 import der, make_cert, pem

PIN = int(dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp())
MEASUREMENT = (
    "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
)


@dataclass(frozen=True, repr=False)
class SnpVector:
    report: bytes
    vcek: bytes
    chain: bytes
    ark_der: bytes


@pytest.fixture(scope="module")
def vec(vectors: Path) -> SnpVector:
    d = vectors / "snp"
    chain = (d / "go-sev-guest_ask_ark_milan.pem").read_bytes()
    ark = x509.load_pem_x509_certificates(chain)[1]
    return SnpVector(
        report=(d / "go-sev-guest_attestation.bin").read_bytes(),
        vcek=(d / "go-sev-guest_vcek.testcer").read_bytes(),
        chain=chain,
        ark_der=der(ark),
    )


def verify(v: SnpVector, report: bytes | None = None, *, now: int = PIN, **kw: object) -> VerifiedEvidence:
    args: dict[str, object] = {
        "vcek_der": v.vcek,
        "cert_chain_pem": v.chain,
        "trust_anchors": [v.ark_der],
        "now": now,
    }
    args.update(kw)
    return snp.verify_snp_report(report if report is not None else v.report, **args)


# --- an AMD-shaped PKI we control ---------------------------------------------------------------------------


def _int_ext(oid: str, value: int) -> x509.UnrecognizedExtension:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), bytes([0x02, len(body)]) + body)


def vcek_extensions(tcb: dict[str, int], hwid: bytes, product: str = "Milan-B0") -> list[x509.ExtensionType]:
    oids = {"boot_loader": "1", "tee": "2", "snp": "3", "microcode": "8", "fmc": "9"}
    name = product.encode()
    exts: list[x509.ExtensionType] = [
        x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.2"), bytes([0x16, len(name)]) + name
        )
    ]
    exts += [_int_ext(f"1.3.6.1.4.1.3704.1.3.{oids[k]}", v) for k, v in tcb.items()]
    exts.append(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4"), hwid))
    return exts


AMD_ORG = "Advanced Micro Devices"


@dataclass
class FakeAmd:
    ark_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    ask: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    vcek: x509.Certificate

    def sign(self, report: bytes) -> bytes:
        sig = self.vcek_key.sign(report[: snp.SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(sig)
        return (
            report[: snp.SIGNED_SIZE] + r.to_bytes(72, "little") + s.to_bytes(72, "little") + report[0x330:]
        )

    def vector(self, report: bytes) -> SnpVector:
        return SnpVector(self.sign(report), der(self.vcek), pem(self.ask, self.ark), der(self.ark))

    def with_vcek(self, tcb: dict[str, int], hwid: bytes) -> FakeAmd:
        vcek = make_cert(
            "SEV-VCEK",
            self.vcek_key,
            issuer_cn="SEV-Milan",
            issuer_key=self.ask_key,
            org=AMD_ORG,
            extensions=vcek_extensions(tcb, hwid),
        )
        return FakeAmd(self.ark_key, self.ark, self.ask_key, self.ask, self.vcek_key, vcek)


VECTOR_TCB = {"boot_loader": 2, "tee": 0, "snp": 5, "microcode": 0x44}


@pytest.fixture(scope="module")
def fake_amd(vec: SnpVector) -> FakeAmd:
    ark_key = rsa.generate_private_key(65537, 2048)
    ask_key = rsa.generate_private_key(65537, 2048)
    ark = make_cert("ARK-Milan", ark_key, ca=True, org=AMD_ORG)
    ask = make_cert("SEV-Milan", ask_key, issuer_cn="ARK-Milan", issuer_key=ark_key, ca=True, org=AMD_ORG)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    base = FakeAmd(ark_key, ark, ask_key, ask, vcek_key, ark)
    return base.with_vcek(VECTOR_TCB, vec.report[0x1A0:0x1E0])


def patch(report: bytes, offset: int, data: bytes) -> bytes:
    return report[:offset] + data + report[offset + len(data) :]


# --- the real vector ---


def test_vector_verifies_with_expected_values(vec: SnpVector) -> None:
    ev = verify(vec)
    assert ev.tee == "snp"
    assert ev.measurements["measurement"].hex() == MEASUREMENT
    assert ev.report_data == bytes.fromhex("0102030405") + bytes(59)
    assert ev.measurements["report_data"] == ev.report_data
    assert ev.fields["version"] == 2
    assert ev.fields["product_line"] == "Milan"
    assert ev.fields["policy"] == "0xb0000"
    assert ev.fields["reported_tcb"] == "0200000000000544"
    assert ev.fields["reported_tcb_fields"]["microcode"] == 0x44
    assert ev.debug is True  # policy 0xb0000 has bit 19 (DEBUG) set
    assert ev.device_id == vec.report[0x1A0:0x1E0] and len(ev.device_id) == 64
    assert ev.tcb_status == snp.TCB_STATUS
    assert [s.name for s in ev.steps] == [
        "parsed",
        "cert_chain_verified",
        "revocation",
        "quote_verified",
        "tcb_ok",
    ]
    assert all(s.ok for s in ev.steps)
    # no CRL given: said so, never passed silently
    assert ev.steps[2].reason == "revocation not checked: no CRL or OCSP response was supplied"
    assert ev.fields["revocation"]["complete"] is False


def test_parse_every_field_of_the_vector(vec: SnpVector) -> None:
    r = snp.parse_snp_report(vec.report)
    assert (r.version, r.guest_svn, r.vmpl, r.signature_algo) == (2, 0, 0, 1)
    assert (
        r.current_tcb.raw.hex() == "0200000000000544" == r.launch_tcb.raw.hex() == r.committed_tcb.raw.hex()
    )
    assert r.cpuid_fam_id is None and len(r.reserved1) == 24
    assert (r.current_major, r.current_minor, r.current_build) == (1, 0x31, 3)
    assert r.signing_key == 0 and not r.mask_chip_key
    assert r.signed_bytes == vec.report[:0x2A0]
    assert r.policy_fields()["debug"] and r.policy_fields()["smt"]


def test_looks_like(vec: SnpVector) -> None:
    assert snp.looks_like(vec.report)
    assert not snp.looks_like(vec.report[:-1])
    assert not snp.looks_like(b"\x04" + vec.report[1:])
    assert not snp.looks_like(b"")


def test_expired_vcek_is_named(vec: SnpVector) -> None:
    late = int(dt.datetime(2029, 9, 24, tzinfo=dt.UTC).timestamp()) + 40 * 86400
    with pytest.raises(Expired, match=r"SEV-VCEK.*expired at 2029-09-24"):
        verify(vec, now=late)


def test_before_vcek_validity_is_rejected(vec: SnpVector) -> None:
    with pytest.raises(Expired, match=r"SEV-VCEK.*not valid before"):
        verify(vec, now=int(dt.datetime(2021, 1, 1, tzinfo=dt.UTC).timestamp()))


@pytest.mark.parametrize(("offset", "name"), [(0x2A0 + 3, "signature r"), (0x2E8 + 10, "signature s")])
def test_signature_bit_flip_is_rejected(vec: SnpVector, offset: int, name: str) -> None:
    bad = patch(vec.report, offset, bytes([vec.report[offset] ^ 0x01]))
    with pytest.raises(SignatureInvalid, match="does not verify"):
        verify(vec, bad)


@pytest.mark.parametrize("offset", [0x04, 0x50, 0x90 + 7, 0xC0, 0x180 + 6, 0x1A0, 0x29F])
def test_body_bit_flip_is_rejected(vec: SnpVector, offset: int) -> None:
    bad = patch(vec.report, offset, bytes([vec.report[offset] ^ 0x80]))
    with pytest.raises(SignatureInvalid):
        verify(vec, bad)


@pytest.mark.parametrize("size", [0, 0x2A0, snp.REPORT_SIZE - 1, snp.REPORT_SIZE + 1, 10 * snp.REPORT_SIZE])
def test_truncated_or_oversized_is_malformed(vec: SnpVector, size: int) -> None:
    data = (vec.report * 10)[:size]
    with pytest.raises(MalformedEvidence, match=f"{size} bytes"):
        verify(vec, data)


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version_is_malformed(vec: SnpVector, version: int) -> None:
    with pytest.raises(MalformedEvidence, match="version"):
        snp.parse_snp_report(patch(vec.report, 0, struct.pack("<I", version)))


def test_vcek_bit_flip_is_rejected(vec: SnpVector) -> None:
    bad = vec.vcek[:-5] + bytes([vec.vcek[-5] ^ 0x01]) + vec.vcek[-4:]  # inside the ASK's signature
    with pytest.raises(CertificateChainInvalid, match=r"SEV-VCEK.*does not verify"):
        verify(vec, vcek_der=bad)


def test_vcek_garbage_is_malformed(vec: SnpVector) -> None:
    with pytest.raises(MalformedEvidence, match="VCEK"):
        verify(vec, vcek_der=vec.vcek[:100])


def test_ask_bit_flip_is_rejected(vec: SnpVector) -> None:
    ask, ark = x509.load_pem_x509_certificates(vec.chain)
    raw = bytearray(der(ask))
    raw[-7] ^= 0x01
    bad_ask = x509.load_der_x509_certificate(bytes(raw))
    with pytest.raises(CertificateChainInvalid, match=r"SEV-Milan.*does not verify"):
        verify(vec, cert_chain_pem=pem(bad_ask, ark))


def test_missing_ask_names_the_missing_issuer(vec: SnpVector) -> None:
    _ask, ark = x509.load_pem_x509_certificates(vec.chain)
    with pytest.raises(UntrustedRoot, match="SEV-Milan"):
        verify(vec, cert_chain_pem=pem(ark))


def test_chain_to_another_root_is_untrusted_and_named(vec: SnpVector, fake_amd: FakeAmd) -> None:
    # AMD's genuine chain, but the caller trusts only our ARK: the found root is named
    with pytest.raises(
        UntrustedRoot, match=r"ARK-Milan.*Advanced Micro Devices|Advanced Micro Devices.*ARK-Milan"
    ):
        verify(vec, trust_anchors=[der(fake_amd.ark)])
    # our re-signed report under our chain, checked against AMD's ARK: rejected, our root named
    fake = fake_amd.vector(vec.report)
    with pytest.raises(UntrustedRoot, match="CN=ARK-Milan"):
        verify(fake, trust_anchors=[vec.ark_der])


def test_resigned_report_verifies_under_its_own_trusted_root(vec: SnpVector, fake_amd: FakeAmd) -> None:
    ev = verify(fake_amd.vector(vec.report))
    assert ev.measurements["measurement"].hex() == MEASUREMENT


def test_reported_tcb_mismatch_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    bumped = patch(vec.report, 0x180 + 6, b"\x06")  # SNP SPL 5 -> 6, re-signed by the VCEK for SPL 5
    with pytest.raises(CollateralMismatch, match="snp: report 6, VCEK 5") as exc:
        verify(fake_amd.vector(bumped))
    assert exc.value.step == "tcb_ok"
    lower = patch(vec.report, 0x180 + 7, b"\x40")  # microcode 0x44 -> 0x40
    with pytest.raises(CollateralMismatch, match="microcode: report 64, VCEK 68"):
        verify(fake_amd.vector(lower))


def test_vcek_without_tcb_extensions_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    stripped = fake_amd.with_vcek({"boot_loader": 2, "tee": 0}, vec.report[0x1A0:0x1E0])
    with pytest.raises(CertificateChainInvalid, match="lacks TCB"):
        verify(stripped.vector(vec.report))


def test_chip_id_of_another_chip_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    other_chip = patch(vec.report, 0x1A0, b"\xaa" * 64)
    with pytest.raises(CollateralMismatch, match="hwID"):
        verify(fake_amd.vector(other_chip))


def test_masked_chip_id_is_accepted_and_device_id_comes_from_vcek(vec: SnpVector, fake_amd: FakeAmd) -> None:
    masked = patch(vec.report, 0x1A0, bytes(64))
    ev = verify(fake_amd.vector(masked))
    assert ev.fields["chip_id_masked"] is True
    assert ev.device_id == vec.report[0x1A0:0x1E0]


@pytest.mark.parametrize(("policy", "debug"), [(0x30000, False), (0xB0000, True), (0x80000, True)])
def test_debug_is_policy_bit_19(vec: SnpVector, fake_amd: FakeAmd, policy: int, debug: bool) -> None:
    ev = verify(fake_amd.vector(patch(vec.report, 0x08, struct.pack("<Q", policy))))
    assert ev.debug is debug
    assert ev.fields["policy_fields"]["debug"] is debug


def test_vlek_flag_with_a_vcek_certificate_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    # The report says a VLEK signed it; a VCEK certificate must not be accepted for it (key confusion).
    vlek = patch(vec.report, 0x48, struct.pack("<I", 1 << 2))
    with pytest.raises(CertificateChainInvalid, match=r"signed by its VLEK.*SEV-VCEK"):
        verify(fake_amd.vector(vlek))


# --- VLEK-signed reports (SIGNING_KEY = 1): VLEK <- ASVK 'SEV-VLEK-Milan' <- the same ARK -----------------


def _csp_ext(name: str) -> x509.UnrecognizedExtension:
    raw = name.encode()
    return x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.5"), bytes([0x0C, len(raw)]) + raw
    )


@pytest.fixture(scope="module")
def fake_vlek(fake_amd: FakeAmd) -> tuple[FakeAmd, x509.Certificate]:
    asvk_key = rsa.generate_private_key(65537, 2048)
    asvk = make_cert(
        "SEV-VLEK-Milan", asvk_key, issuer_cn="ARK-Milan", issuer_key=fake_amd.ark_key, ca=True, org=AMD_ORG
    )
    vlek_key = ec.generate_private_key(ec.SECP384R1())
    exts = [
        e for e in vcek_extensions(VECTOR_TCB, bytes(64)) if e.oid.dotted_string != "1.3.6.1.4.1.3704.1.4"
    ]
    vlek = make_cert(
        "SEV-VLEK",
        vlek_key,
        issuer_cn="SEV-VLEK-Milan",
        issuer_key=asvk_key,
        org=AMD_ORG,
        extensions=[*exts, _csp_ext("teecloud-test-csp")],
    )
    return FakeAmd(fake_amd.ark_key, fake_amd.ark, asvk_key, asvk, vlek_key, vlek), asvk


def test_vlek_signed_report_verifies_to_the_same_ark(
    vec: SnpVector, fake_amd: FakeAmd, fake_vlek: tuple[FakeAmd, x509.Certificate]
) -> None:
    amd, _ = fake_vlek
    report = patch(vec.report, 0x48, struct.pack("<I", 1 << 2))
    ev = verify(amd.vector(report))
    assert ev.fields["signing_key_name"] == "VLEK" and ev.fields["csp_id"] == "teecloud-test-csp"
    assert "SEV-VLEK' <- 'SEV-VLEK-Milan' <- 'ARK-Milan'" in ev.steps[1].reason
    assert ev.fields["product_line"] == "Milan"


def test_vlek_report_with_vcek_chain_or_flag_missing_is_rejected(
    vec: SnpVector, fake_amd: FakeAmd, fake_vlek: tuple[FakeAmd, x509.Certificate]
) -> None:
    amd, _ = fake_vlek
    # a VLEK certificate for a report that says VCEK
    with pytest.raises(CertificateChainInvalid, match=r"signed by its VCEK.*SEV-VLEK"):
        verify(amd.vector(vec.report))
    # a VLEK chained through an ASK (VCEK signer) instead of the ASVK
    report = patch(vec.report, 0x48, struct.pack("<I", 1 << 2))
    bogus = make_cert(
        "SEV-VLEK",
        amd.vcek_key,
        issuer_cn="SEV-Milan",
        issuer_key=fake_amd.ask_key,
        org=AMD_ORG,
        extensions=vcek_extensions(VECTOR_TCB, bytes(64)),
    )
    v = SnpVector(amd.sign(report), der(bogus), pem(fake_amd.ask, fake_amd.ark), der(fake_amd.ark))
    with pytest.raises(CertificateChainInvalid, match="not those of a VLEK"):
        verify(v)


# --- revocation: AMD KDS-style CRLs (signed RSA-PSS by the issuer) -----------------------------------------


def _crl(
    issuer: x509.Certificate,
    key: rsa.RSAPrivateKey,
    revoked: list[int],
    *,
    days: int = 7,
    start: dt.datetime | None = None,
) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.serialization import Encoding

    start = start or dt.datetime(2026, 6, 28, tzinfo=dt.UTC)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(start)
        .next_update(start + dt.timedelta(days=days))
    )
    for serial in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build()
        )
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), padding.PSS.DIGEST_LENGTH)
    return b.sign(key, hashes.SHA384(), rsa_padding=pss).public_bytes(Encoding.DER)


def test_crl_revoking_the_vcek_rejects(vec: SnpVector, fake_amd: FakeAmd) -> None:
    crl = _crl(fake_amd.ask, fake_amd.ask_key, [fake_amd.vcek.serial_number])
    with pytest.raises(
        CertificateChainInvalid, match=r"'SEV-VCEK' .*revoked by its issuer 'SEV-Milan'"
    ) as info:
        verify(fake_amd.vector(vec.report), revocation=snp.Revocation(crls=(crl,)))
    assert info.value.step == "revocation"


def test_ark_crl_revoking_the_ask_rejects(vec: SnpVector, fake_amd: FakeAmd) -> None:
    crl = _crl(fake_amd.ark, fake_amd.ark_key, [fake_amd.ask.serial_number])
    with pytest.raises(CertificateChainInvalid, match=r"'SEV-Milan'.*revoked by its issuer 'ARK-Milan'"):
        verify(fake_amd.vector(vec.report), revocation=snp.Revocation(crls=(crl,)))


def test_crls_without_the_chain_pass_and_say_what_was_checked(vec: SnpVector, fake_amd: FakeAmd) -> None:
    ark_crl = _crl(fake_amd.ark, fake_amd.ark_key, [12345])
    ev = verify(fake_amd.vector(vec.report), revocation=snp.Revocation(crls=(ark_crl,)))
    step = next(s for s in ev.steps if s.name == "revocation")
    assert "SEV-Milan: not in the CRL of 'ARK-Milan'" in step.reason
    assert "not checked (no CRL or OCSP response for it): SEV-VCEK" in step.reason
    assert ev.fields["revocation"]["complete"] is False
    ask_crl = _crl(fake_amd.ask, fake_amd.ask_key, [])
    ev = verify(fake_amd.vector(vec.report), revocation=snp.Revocation(crls=(ark_crl, ask_crl)))
    assert ev.fields["revocation"]["complete"] is True


def test_crl_forged_or_stale_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    other = rsa.generate_private_key(65537, 2048)
    forged = _crl(fake_amd.ask, other, [])  # names the ASK as issuer, signed by another key
    with pytest.raises(CertificateChainInvalid, match="not signed by 'SEV-Milan'"):
        verify(fake_amd.vector(vec.report), revocation=snp.Revocation(crls=(forged,)))
    stale = _crl(fake_amd.ask, fake_amd.ask_key, [], start=dt.datetime(2026, 5, 1, tzinfo=dt.UTC))
    with pytest.raises(Expired, match="not current"):
        verify(fake_amd.vector(vec.report), revocation=snp.Revocation(crls=(stale,)))
    with pytest.raises(MalformedEvidence, match=r"not a valid X\.509 CRL"):
        verify(fake_amd.vector(vec.report), revocation=snp.Revocation(crls=(b"junk",)))


def test_other_signature_algorithm_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    with pytest.raises(MalformedEvidence, match="signature algorithm 2"):
        verify(fake_amd.vector(patch(vec.report, 0x34, struct.pack("<I", 2))))


def test_ask_of_another_product_line_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    ask = make_cert(
        "SEV-Genoa",
        fake_amd.ask_key,
        issuer_cn="ARK-Milan",
        issuer_key=fake_amd.ark_key,
        ca=True,
        org=AMD_ORG,
    )
    vcek = make_cert(
        "SEV-VCEK",
        fake_amd.vcek_key,
        issuer_cn="SEV-Genoa",
        issuer_key=fake_amd.ask_key,
        org=AMD_ORG,
        extensions=vcek_extensions(VECTOR_TCB, vec.report[0x1A0:0x1E0]),
    )
    fake = FakeAmd(fake_amd.ark_key, fake_amd.ark, fake_amd.ask_key, ask, fake_amd.vcek_key, vcek)
    with pytest.raises(CertificateChainInvalid, match="different product lines"):
        verify(fake.vector(vec.report))


def test_ecdsa_signed_amd_chain_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    ark_key = ec.generate_private_key(ec.SECP384R1())
    ark = make_cert("ARK-Milan", ark_key, ca=True, org=AMD_ORG)
    ask = make_cert(
        "SEV-Milan", fake_amd.ask_key, issuer_cn="ARK-Milan", issuer_key=ark_key, ca=True, org=AMD_ORG
    )
    fake = FakeAmd(fake_amd.ark_key, ark, fake_amd.ask_key, ask, fake_amd.vcek_key, fake_amd.vcek)
    with pytest.raises(CertificateChainInvalid, match="does not allow"):
        verify(fake.vector(vec.report))


# --- version 3 ----------------------------------------------------------------------------------------------


def make_v3(report: bytes, family: int, model: int, stepping: int) -> bytes:
    return patch(patch(report, 0, struct.pack("<I", 3)), 0x188, bytes([family, model, stepping]))


def test_v3_report_parses_cpuid_fields_and_verifies(vec: SnpVector, fake_amd: FakeAmd) -> None:
    v3 = make_v3(vec.report, 0x19, 0x11, 0x01)  # Genoa-like CPUID, Milan TCB layout (family 19h)
    r = snp.parse_snp_report(v3)
    assert (r.version, r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == (3, 0x19, 0x11, 0x01)
    assert len(r.reserved1) == 21
    assert r.reported_tcb.components() == VECTOR_TCB
    ev = verify(fake_amd.vector(v3))
    assert ev.fields["version"] == 3 and ev.fields["cpuid_mod_id"] == 0x11


def test_v3_turin_uses_the_fmc_tcb_layout(vec: SnpVector, fake_amd: FakeAmd) -> None:
    turin_tcb = bytes([1, 2, 3, 4, 0, 0, 0, 0x55])  # fmc, bl, tee, snp, reserved x3, microcode
    v3 = patch(make_v3(vec.report, 0x1A, 0x02, 0x00), 0x180, turin_tcb)
    r = snp.parse_snp_report(v3)
    assert r.reported_tcb.components() == {"fmc": 1, "boot_loader": 2, "tee": 3, "snp": 4, "microcode": 0x55}
    good = fake_amd.with_vcek(
        {"fmc": 1, "boot_loader": 2, "tee": 3, "snp": 4, "microcode": 0x55}, v3[0x1A0:0x1E0]
    )
    assert verify(good.vector(v3)).fields["reported_tcb_fields"]["fmc"] == 1
    no_fmc = fake_amd.with_vcek({"boot_loader": 2, "tee": 3, "snp": 4, "microcode": 0x55}, v3[0x1A0:0x1E0])
    with pytest.raises(CertificateChainInvalid, match="fmc"):
        verify(no_fmc.vector(v3))


# --- mutation properties ------------------------------------------------------------------------------------

_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(data=st.data())
def test_mutated_reports_never_raise_anything_else(vec: SnpVector, data: st.DataObject) -> None:
    report = bytearray(vec.report)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(report) - 1))
        report[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(report) + 16)))
    blob = bytes(report) if cut is None else (bytes(report) + bytes(16))[:cut]
    try:
        snp.parse_snp_report(blob)
    except VerificationError:
        pass
    try:
        ev = verify(vec, blob)
    except VerificationError:
        return
    # only the unsigned tail may differ from the genuine report and still verify
    assert blob[: snp.SIGNED_SIZE] == vec.report[: snp.SIGNED_SIZE]
    assert ev.measurements["measurement"].hex() == MEASUREMENT


@_SETTINGS
@given(blob=st.binary(max_size=2 * snp.REPORT_SIZE))
def test_random_bytes_never_raise_anything_else(vec: SnpVector, blob: bytes) -> None:
    with pytest.raises(VerificationError):
        verify(vec, blob)


@_SETTINGS
@given(data=st.data())
def test_mutated_vcek_never_raises_anything_else(vec: SnpVector, data: st.DataObject) -> None:
    vcek = bytearray(vec.vcek)
    i = data.draw(st.integers(0, len(vcek) - 1))
    vcek[i] = data.draw(st.integers(0, 255).filter(lambda b: b != vec.vcek[i]))
    try:
        verify(vec, vcek_der=bytes(vcek))
    except VerificationError:
        return
    # a change that leaves the certificate's meaning intact (e.g. a BER/DER-equivalent byte) may pass;
    # the signed TBS must then be unchanged
    assert (
        x509.load_der_x509_certificate(bytes(vcek)).tbs_certificate_bytes
        == x509.load_der_x509_certificate(vec.vcek).tbs_certificate_bytes
    )


def test_split_vcek_from_one_bundle(vec: SnpVector) -> None:
    vcek = _x509.load_certificate(vec.vcek, what="VCEK")
    vcek_der, rest = snp.split_vcek(vec.chain + pem(vcek))
    assert vcek_der == vec.vcek
    assert verify(vec, vcek_der=vcek_der, cert_chain_pem=rest).fields["product_line"] == "Milan"
    with pytest.raises(MalformedEvidence, match="exactly one VCEK"):
        snp.split_vcek(vec.chain)


def test_vcek_of_another_product_is_rejected(vec: SnpVector, fake_amd: FakeAmd) -> None:
    vcek = make_cert(
        "SEV-VCEK",
        fake_amd.vcek_key,
        issuer_cn="SEV-Milan",
        issuer_key=fake_amd.ask_key,
        org=AMD_ORG,
        extensions=vcek_extensions(VECTOR_TCB, vec.report[0x1A0:0x1E0], product="Genoa-B1"),
    )
    fake = FakeAmd(fake_amd.ark_key, fake_amd.ark, fake_amd.ask_key, fake_amd.ask, fake_amd.vcek_key, vcek)
    with pytest.raises(CertificateChainInvalid, match="Genoa-B1"):
        verify(fake.vector(vec.report))
