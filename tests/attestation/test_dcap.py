"""Intel DCAP quotes (TDX v4/v5, SGX v3) against the real vectors in ../shared/vectors (see its README)."""

from __future__ import annotations

import calendar
import hashlib
import json
import time
from pathlib import Path

import dcap_qvl
import pytest

from teecloud.attestation import dcap
from teecloud.attestation.errors import (
    CollateralMismatch,
    Expired,
    MalformedEvidence,
    SignatureInvalid,
    TcbNotAcceptable,
    UntrustedRoot,
    VerificationError,
)

DAY = 86400


def ts(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


TDX_PIN = ts("2025-07-04T00:00:00Z")
DSTACK_PIN = ts("2026-03-05T00:00:00Z")


@pytest.fixture(scope="module")
def tdx(vectors: Path) -> tuple[bytes, bytes]:
    return (vectors / "tdx/tdx_quote").read_bytes(), (vectors / "tdx/tdx_quote_collateral.json").read_bytes()


@pytest.fixture(scope="module")
def tdx_outdated(vectors: Path) -> tuple[bytes, bytes]:
    return (
        (vectors / "tdx/tdx_quote_outdated").read_bytes(),
        (vectors / "tdx/tdx_quote_outdated_collateral.json").read_bytes(),
    )


@pytest.fixture(scope="module")
def dstack_quote(vectors: Path) -> bytes:
    return bytes.fromhex(json.loads((vectors / "tdx/dstack_quote_report.json").read_text())["quote"])


@pytest.fixture(scope="module")
def sgx(vectors: Path) -> tuple[bytes, bytes]:
    return (vectors / "sgx/sgx_quote").read_bytes(), (vectors / "sgx/sgx_quote_collateral.json").read_bytes()


# ------------------------------------------------------------------------------------------ valid vectors


def test_tdx_v4_vector_verifies_up_to_date(tdx: tuple[bytes, bytes]) -> None:
    quote, collateral = tdx
    ev = dcap.verify_dcap_quote(quote, collateral, now=TDX_PIN)
    assert ev.tee == "tdx" and not ev.simulated
    assert ev.tcb_status == "UpToDate"
    assert ev.advisory_ids == ()
    assert ev.measurements["mrtd"].hex().startswith("91eb2b44d141d4ec")
    assert ev.measurements["mrtd"].hex().endswith("8873118b7")
    assert ev.measurements["rtmr3"] == bytes(48)
    assert ev.report_data.hex().startswith("9a9d48e7f6799642")
    assert ev.debug is False
    assert ev.fields["sept_ve_disable"] is True
    assert ev.fields["fmspc"] == "B0C06F000000"
    assert [s.name for s in ev.steps] == [
        "parsed",
        "quote_verified",
        "cert_chain_verified",
        "collateral_ok",
        "tcb_ok",
    ]
    assert all(s.ok for s in ev.steps)
    # device_id is sha256(PPID) from the PCK certificate, as dstack computes it.
    ppid = dcap_qvl.parse_quote(quote).pck_extension().ppid
    assert ev.device_id == hashlib.sha256(bytes(ppid)).digest()


def test_tdx_measurements_match_dcap_qvl_parser(
    tdx: tuple[bytes, bytes], tdx_outdated: tuple[bytes, bytes]
) -> None:
    for quote, _ in (tdx, tdx_outdated):
        ours = dcap.parse_quote(quote)
        theirs = dcap_qvl.parse_quote(quote).report
        m = ours["measurements"]
        assert m["mrtd"] == theirs.mr_td
        for i in range(4):
            assert m[f"rtmr{i}"] == getattr(theirs, f"rt_mr{i}")
        assert m["mrseam"] == theirs.mr_seam
        assert m["mrsignerseam"] == theirs.mr_signer_seam
        assert m["mr_config_id"] == theirs.mr_config_id
        assert m["mr_owner"] == theirs.mr_owner
        assert m["mr_owner_config"] == theirs.mr_owner_config
        assert m["xfam"] == theirs.xfam
        assert m["td_attributes"] == theirs.td_attributes
        assert m["tee_tcb_svn"] == theirs.tee_tcb_svn
        assert ours["report_data"] == theirs.report_data


def test_tdx_v5_quote_parses_td15_body(tdx_outdated: tuple[bytes, bytes]) -> None:
    parsed = dcap.parse_quote(tdx_outdated[0])
    assert parsed["version"] == 5 and parsed["body_type"] == "td15" and parsed["tee"] == "tdx"
    assert dcap.pck_fmspc(tdx_outdated[0]) == "90C06F000000"
    assert parsed["report"]["tee_tcb_svn2"] == dcap_qvl.parse_quote(tdx_outdated[0]).report.tee_tcb_svn2


def test_dstack_quote_verifies_up_to_date(dstack_quote: bytes, tdx_outdated: tuple[bytes, bytes]) -> None:
    ev = dcap.verify_dcap_quote(dstack_quote, tdx_outdated[1], now=DSTACK_PIN)
    assert ev.tcb_status == "UpToDate"
    assert ev.measurements["rtmr3"].hex().startswith("0f787c3877f3e950")
    assert ev.measurements["rtmr3"].hex().endswith("147185a8")


def test_sgx_v3_vector(sgx: tuple[bytes, bytes]) -> None:
    quote, collateral = sgx
    ev = dcap.verify_dcap_quote(quote, collateral, now=TDX_PIN)
    assert ev.tee == "sgx"
    assert ev.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert set(ev.advisory_ids) == {"INTEL-SA-00289", "INTEL-SA-00615"}
    assert ev.report_data.startswith(b"Hello, wor")
    assert set(ev.measurements) == {"mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "attributes"}
    theirs = dcap_qvl.parse_quote(quote).report
    assert ev.measurements["mr_enclave"] == theirs.mr_enclave
    assert ev.measurements["mr_signer"] == theirs.mr_signer
    assert ev.debug is False  # attributes 0x05: INIT | MODE64BIT, no DEBUG


def test_outdated_v5_is_tcb_not_acceptable_with_intels_reason(tdx_outdated: tuple[bytes, bytes]) -> None:
    quote, collateral = tdx_outdated
    with pytest.raises(TcbNotAcceptable) as info:
        dcap.verify_dcap_quote(quote, collateral, now=DSTACK_PIN)
    assert "No matching TCB level found" in info.value.reason
    assert info.value.step == "tcb_ok"


# ------------------------------------------------------------------------------------------------ expiry


def test_tdx_fails_40_days_later_naming_expiry(tdx: tuple[bytes, bytes]) -> None:
    with pytest.raises(Expired) as info:
        dcap.verify_dcap_quote(*tdx, now=TDX_PIN + 40 * DAY)
    assert "TCB info expired" in info.value.reason
    assert "2025-07-19T10:16:03Z" in info.value.reason


def test_dstack_fails_40_days_later_naming_expiry(
    dstack_quote: bytes, tdx_outdated: tuple[bytes, bytes]
) -> None:
    with pytest.raises(Expired) as info:
        dcap.verify_dcap_quote(dstack_quote, tdx_outdated[1], now=DSTACK_PIN + 40 * DAY)
    assert "expired" in info.value.reason


def test_sgx_fails_40_days_later(sgx: tuple[bytes, bytes]) -> None:
    with pytest.raises(Expired, match="expired"):
        dcap.verify_dcap_quote(*sgx, now=TDX_PIN + 40 * DAY)


def test_collateral_not_yet_valid(tdx: tuple[bytes, bytes]) -> None:
    with pytest.raises(Expired, match="not yet valid"):
        dcap.verify_dcap_quote(*tdx, now=TDX_PIN - 60 * DAY)


# -------------------------------------------------------------------------------------- wrong collateral


def test_collateral_of_another_fmspc(tdx: tuple[bytes, bytes], tdx_outdated: tuple[bytes, bytes]) -> None:
    with pytest.raises(CollateralMismatch) as info:
        dcap.verify_dcap_quote(tdx[0], tdx_outdated[1], now=TDX_PIN)
    assert "90C06F000000" in info.value.reason and "B0C06F000000" in info.value.reason


def test_collateral_of_another_kind(sgx: tuple[bytes, bytes], tdx: tuple[bytes, bytes]) -> None:
    with pytest.raises(CollateralMismatch, match="collateral is for TDX"):
        dcap.verify_dcap_quote(sgx[0], tdx[1], now=TDX_PIN)
    with pytest.raises(CollateralMismatch):
        dcap.verify_dcap_quote(tdx[0], sgx[1], now=TDX_PIN)


@pytest.mark.parametrize("bad", [b"", b"{}", b"[]", b"\xff\xfe", b'{"tcb_info": 1}'])
def test_malformed_collateral(tdx: tuple[bytes, bytes], bad: bytes) -> None:
    with pytest.raises(MalformedEvidence) as info:
        dcap.verify_dcap_quote(tdx[0], bad, now=TDX_PIN)
    assert info.value.step == "collateral_ok"


def test_oversized_collateral(tdx: tuple[bytes, bytes]) -> None:
    with pytest.raises(MalformedEvidence, match="limit"):
        dcap.verify_dcap_quote(tdx[0], b" " * (dcap.DEFAULT_LIMITS.max_collateral_size + 1), now=TDX_PIN)


# ------------------------------------------------------------------------------------------- bit flips

# Offsets in a v4 quote: header 0..48, TD report 48..632, signature length, then signature data.
FLIPS = {
    "header.qe_svn": 8,
    "header.user_data": 30,
    "body.mrtd": 48 + 136 + 5,
    "body.rtmr3": 48 + 472,
    "body.report_data": 48 + 520 + 3,
    "body.td_attributes.debug": 48 + 120,
    "quote_signature": 636 + 10,
    "attestation_key": 636 + 64 + 10,
    "qe_report": 636 + 128 + 6 + 50,
    "qe_report_signature": 636 + 128 + 6 + 384 + 10,
}


@pytest.mark.parametrize("area", sorted(FLIPS))
def test_bit_flip_is_rejected(tdx: tuple[bytes, bytes], area: str) -> None:
    quote = bytearray(tdx[0])
    quote[FLIPS[area]] ^= 0x01
    with pytest.raises(SignatureInvalid) as info:
        dcap.verify_dcap_quote(bytes(quote), tdx[1], now=TDX_PIN)
    assert info.value.reason


def test_unknown_qe_vendor_is_malformed(tdx: tuple[bytes, bytes]) -> None:
    quote = bytearray(tdx[0])
    quote[20] ^= 0x01
    with pytest.raises(MalformedEvidence, match="QE vendor"):
        dcap.verify_dcap_quote(bytes(quote), tdx[1], now=TDX_PIN)


def test_debug_td_cannot_be_faked_by_flipping_the_bit(tdx: tuple[bytes, bytes]) -> None:
    quote = bytearray(tdx[0])
    quote[48 + 120] |= 0x01  # TD attributes bit 0 = DEBUG
    assert dcap.parse_quote(bytes(quote))["debug"] is True
    with pytest.raises(SignatureInvalid):
        dcap.verify_dcap_quote(bytes(quote), tdx[1], now=TDX_PIN)


def _pck_leaf_span(quote: bytes) -> tuple[int, int]:
    start = quote.index(b"-----BEGIN CERTIFICATE-----")
    end = quote.index(b"-----END CERTIFICATE-----", start)
    return start, end


@pytest.mark.parametrize("where", [0.3, 0.5, 0.8, 0.95])
def test_bit_flip_in_pck_certificate_is_rejected(tdx: tuple[bytes, bytes], where: float) -> None:
    quote = bytearray(tdx[0])
    start, end = _pck_leaf_span(tdx[0])
    pos = start + 28 + int((end - start - 28) * where)
    # Change one base64 character into another valid one so the PEM still decodes.
    quote[pos] = ord("A") if quote[pos] != ord("A") else ord("B")
    with pytest.raises(VerificationError) as info:
        dcap.verify_dcap_quote(bytes(quote), tdx[1], now=TDX_PIN)
    assert info.value.reason


# ------------------------------------------------------------------------------------- malformed quotes


@pytest.mark.parametrize("length", [0, 1, 47, 48, 100, 631, 632, 700, 1200, 4000])
def test_truncated_quote(tdx: tuple[bytes, bytes], length: int) -> None:
    with pytest.raises(MalformedEvidence) as info:
        dcap.verify_dcap_quote(tdx[0][:length], tdx[1], now=TDX_PIN)
    assert info.value.step in ("parsed", "cert_chain_verified")


def test_oversized_quote(tdx: tuple[bytes, bytes]) -> None:
    big = tdx[0] + bytes(dcap.DEFAULT_LIMITS.max_quote_size)
    with pytest.raises(MalformedEvidence, match="limit"):
        dcap.verify_dcap_quote(big, tdx[1], now=TDX_PIN)


def test_wrong_kind_is_malformed(vectors: Path, tdx: tuple[bytes, bytes]) -> None:
    snp = (vectors / "snp/go-sev-guest_attestation.bin").read_bytes()
    assert not dcap.looks_like_dcap_quote(snp)
    with pytest.raises(MalformedEvidence, match=r"not a DCAP quote|unsupported|unknown"):
        dcap.verify_dcap_quote(snp, tdx[1], now=TDX_PIN)


def test_now_must_be_int(tdx: tuple[bytes, bytes]) -> None:
    with pytest.raises(TypeError):
        dcap.verify_dcap_quote(tdx[0], tdx[1], now=1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- dev root


def test_intel_quote_verifies_with_explicit_intel_root(vectors: Path, tdx: tuple[bytes, bytes]) -> None:
    root = (vectors / "tdx/Intel_SGX_RootCA.der").read_bytes()
    ev = dcap.verify_dcap_quote(*tdx, now=TDX_PIN, intel_root_der=root)
    assert ev.tee == "tdx" and ev.fields["root_ca"] == "Intel SGX Root CA"


def test_intel_quote_is_not_simulated_even_when_a_dev_root_is_trusted(tdx: tuple[bytes, bytes]) -> None:
    ev = dcap.verify_dcap_quote(*tdx, now=TDX_PIN, dev_root_der=b"not a certificate")
    assert ev.tee == "tdx" and ev.simulated is False


def test_intel_quote_rejected_when_another_root_is_the_anchor(
    vectors: Path, tdx: tuple[bytes, bytes]
) -> None:
    # Any other self-signed P-256 root as "Intel root": the PCK chain must not verify.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other Root")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(__import__("datetime").datetime(2020, 1, 1))
        .not_valid_after(__import__("datetime").datetime(2040, 1, 1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(VerificationError) as info:
        dcap.verify_dcap_quote(
            *tdx, now=TDX_PIN, intel_root_der=cert.public_bytes(serialization.Encoding.DER)
        )
    assert info.value.step in ("cert_chain_verified", "quote_verified", "collateral_ok")
    assert not isinstance(info.value, TcbNotAcceptable)


def test_dev_root_claim_does_not_override_intel_chain(
    monkeypatch: pytest.MonkeyPatch, tdx: tuple[bytes, bytes]
) -> None:
    # Which root signed is decided by the signatures (dcap-qvl, against Intel's root unless the caller
    # trusts a development root the chain is under), not by the name of the root copy in the quote: a
    # chain that verifies to Intel's root stays Intel evidence, never "simulated".
    monkeypatch.setattr(dcap, "_root_of_chain", lambda pem: (dcap.DEV_ROOT_CN_PREFIX + " x", "CN=dev", b"R"))
    ev = dcap.verify_dcap_quote(*tdx, now=TDX_PIN)
    assert ev.tee == "tdx" and not ev.simulated
    ev = dcap.verify_dcap_quote(*tdx, now=TDX_PIN, dev_root_der=b"another root")
    assert ev.tee == "tdx" and not ev.simulated


# ------------------------------------------------------------------------- simulated TEE (worker C's)


@pytest.fixture
def simulated(teecloud_home: Path):  # type: ignore[no-untyped-def]
    sim_mod = pytest.importorskip("teecloud.tee.simulated")
    return sim_mod


def test_simulated_quote_needs_its_own_dev_root(simulated, teecloud_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = simulated.SimulatedTdx(teecloud_home)
    now = int(time.time())
    quote, collateral = sim.quote(b"\x07" * 64), sim.collateral(now=now)
    with pytest.raises(UntrustedRoot) as info:
        dcap.verify_dcap_quote(quote, collateral, now=now)
    assert info.value.reason == "signed by a development root, not by Intel"
    ev = dcap.verify_dcap_quote(quote, collateral, now=now, dev_root_der=sim.dev_root_der())
    assert ev.tee == "tdx-simulated" and ev.simulated and ev.report_data == b"\x07" * 64
    assert ev.device_id == sim.device_id
    # another installation's development root does not do
    other = simulated.SimulatedTdx(tmp_path / "other-home")
    with pytest.raises(UntrustedRoot, match=r"^signed by a development root, not by Intel \("):
        dcap.verify_dcap_quote(quote, collateral, now=now, dev_root_der=other.dev_root_der())


def test_simulated_debug_td_is_refused(simulated, teecloud_home: Path) -> None:  # type: ignore[no-untyped-def]
    sim = simulated.SimulatedTdx(teecloud_home, debug=True)
    now = int(time.time())
    quote = sim.quote(b"\x00" * 64)
    assert dcap.parse_quote(quote)["debug"] is True
    with pytest.raises(VerificationError) as info:
        dcap.verify_dcap_quote(quote, sim.collateral(now=now), now=now, dev_root_der=sim.dev_root_der())
    assert info.value.step == "policy:debug" and "debug" in info.value.reason
