"""verify(): every vector kind through one entry point; results, steps and reasons; never a traceback."""

from __future__ import annotations

import base64
import calendar
import json
from pathlib import Path

import pytest

from teecloud.attestation import verifier
from teecloud.attestation.errors import (
    EventLogMismatch,
    MalformedEvidence,
    PolicyViolation,
    TcbNotAcceptable,
    UsageError,
)
from teecloud.attestation.models import TeeKind
from teecloud.attestation.policy import Policy
from teecloud.attestation.verifier import TrustAnchors, verify, verify_tdx_with_event_log

DAY = 86400
TDX_PIN = calendar.timegm((2025, 7, 4, 0, 0, 0))
DSTACK_PIN = calendar.timegm((2026, 3, 5, 0, 0, 0))
SNP_PIN = calendar.timegm((2026, 7, 1, 0, 0, 0))
NITRO_PIN = 1766668537


def read(vectors: Path, name: str) -> bytes:
    return (vectors / name).read_bytes()


@pytest.fixture(scope="module")
def anchors(vectors: Path) -> TrustAnchors:
    return TrustAnchors.from_certificates(
        [
            read(vectors, "snp/go-sev-guest_ask_ark_milan.pem"),
            read(vectors, "nitro/AWS_NitroEnclaves_Root-G1.pem"),
            read(vectors, "nvidia/nvtrust_lgv_verifier_device_root.pem"),
            read(vectors, "tdx/Intel_SGX_RootCA.der"),
        ]
    )


def test_anchor_classification(anchors: TrustAnchors) -> None:
    assert anchors.intel_root_der is not None
    assert len(anchors.amd_ark) == 2 and len(anchors.nitro_roots) == 1 and len(anchors.nvidia_roots) == 1
    assert anchors.other == () and anchors.dev_root_der is None


def test_anchor_must_be_a_certificate() -> None:
    with pytest.raises(UsageError):
        TrustAnchors.from_certificates([b"not a cert"])


def test_dstack_json_autodetected_with_event_log(vectors: Path) -> None:
    res = verify(
        read(vectors, "tdx/dstack_quote_report.json"),
        collateral=read(vectors, "tdx/tdx_quote_outdated_collateral.json"),
        now=DSTACK_PIN,
    )
    assert res.is_valid, res.reason
    names = [s.name for s in res.steps]
    assert names[:6] == [
        "parsed",
        "quote_verified",
        "cert_chain_verified",
        "collateral_ok",
        "tcb_ok",
        "event_log_verified",
    ]
    assert res.evidence is not None and res.evidence.app_info is not None
    assert res.evidence.app_info.app_id.hex() == "3763bc34552cf3a27ff71ad5f7a90471562a1a2d"
    out = res.to_json()
    assert out["is_valid"] is True and out["tee"] == "tdx" and out["tcb_status"] == "UpToDate"
    assert out["measurements"]["rtmr3"].startswith("0f787c3877f3e950")
    assert out["report_data"].startswith("1234")


def test_tdx_vector_and_its_expiry(vectors: Path) -> None:
    q, c = read(vectors, "tdx/tdx_quote"), read(vectors, "tdx/tdx_quote_collateral.json")
    assert verify(q, collateral=c, now=TDX_PIN).is_valid
    res = verify(q, collateral=c, now=TDX_PIN + 40 * DAY)
    assert not res.is_valid and "expired" in res.reason
    assert res.steps[-1].name == "collateral_ok" and not res.steps[-1].ok


def test_outdated_vector_reports_tcb_not_acceptable(vectors: Path) -> None:
    res = verify(
        read(vectors, "tdx/tdx_quote_outdated"),
        collateral=read(vectors, "tdx/tdx_quote_outdated_collateral.json"),
        now=DSTACK_PIN,
    )
    assert not res.is_valid and "No matching TCB level found" in res.reason
    assert res.steps[-1].name == "tcb_ok"


def test_sgx_vector_under_a_permissive_policy(vectors: Path) -> None:
    q, c = read(vectors, "sgx/sgx_quote"), read(vectors, "sgx/sgx_quote_collateral.json")
    strict = verify(q, collateral=c, now=TDX_PIN)
    assert not strict.is_valid and "below the policy floor" in strict.reason
    policy = Policy(
        min_tcb_status="ConfigurationAndSWHardeningNeeded",
        allowed_advisory_ids=("INTEL-SA-00289", "INTEL-SA-00615"),
    )
    res = verify(q, collateral=c, now=TDX_PIN, policy=policy)
    assert res.is_valid and res.tee == "sgx"
    assert res.tcb_status == "ConfigurationAndSWHardeningNeeded"
    narrower = Policy(
        min_tcb_status="ConfigurationAndSWHardeningNeeded", allowed_advisory_ids=("INTEL-SA-00289",)
    )
    res = verify(q, collateral=c, now=TDX_PIN, policy=narrower)
    assert not res.is_valid and "INTEL-SA-00615" in res.reason


def test_snp_vector(vectors: Path, anchors: TrustAnchors) -> None:
    report = read(vectors, "snp/go-sev-guest_attestation.bin")
    vcek = read(vectors, "snp/go-sev-guest_vcek.testcer")
    res = verify(report, cert_chain=[vcek], anchors=anchors, now=SNP_PIN, policy=Policy(reject_debug=False))
    assert res.is_valid, res.reason
    assert res.tee == "snp"
    ev = res.evidence
    assert ev is not None
    assert ev.measurements["measurement"].hex() == (
        "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
    )
    assert ev.report_data[:5] == bytes.fromhex("0102030405") and not any(ev.report_data[5:])
    # the vector's guest policy has DEBUG set, so the default policy refuses it
    default = verify(report, cert_chain=[vcek], anchors=anchors, now=SNP_PIN)
    assert not default.is_valid and "debug" in default.reason


def test_snp_without_vcek_is_a_usage_error(vectors: Path, anchors: TrustAnchors) -> None:
    with pytest.raises(UsageError, match="VCEK"):
        verify(read(vectors, "snp/go-sev-guest_attestation.bin"), anchors=anchors, now=SNP_PIN)


def test_snp_against_another_root_is_rejected_naming_the_root_found(vectors: Path) -> None:
    wrong = TrustAnchors(other=(read(vectors, "nvidia/nvtrust_lgv_verifier_device_root.pem"),))
    report = read(vectors, "snp/go-sev-guest_attestation.bin")
    chain = [
        read(vectors, "snp/go-sev-guest_vcek.testcer"),
        read(vectors, "snp/go-sev-guest_ask_ark_milan.pem"),
    ]
    res = verify(report, cert_chain=chain, anchors=wrong, now=SNP_PIN, policy=Policy(reject_debug=False))
    assert not res.is_valid and "ARK-Milan" in res.reason, res.reason


def test_snp_without_amd_anchor_is_usage_error(vectors: Path) -> None:
    nitro_only = TrustAnchors.from_certificates([read(vectors, "nitro/AWS_NitroEnclaves_Root-G1.pem")])
    report = read(vectors, "snp/go-sev-guest_attestation.bin")
    chain = [
        read(vectors, "snp/go-sev-guest_vcek.testcer"),
        read(vectors, "snp/go-sev-guest_ask_ark_milan.pem"),
    ]
    with pytest.raises(UsageError):  # no AMD anchor at all: a configuration mistake
        verify(report, cert_chain=chain, anchors=nitro_only, now=SNP_PIN)


def test_nitro_vector(vectors: Path, anchors: TrustAnchors) -> None:
    doc = read(vectors, "nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor")
    res = verify(doc, anchors=anchors, now=NITRO_PIN)
    assert res.is_valid, res.reason
    assert res.tee == "nitro"
    assert res.evidence is not None
    assert res.evidence.measurements["pcr0"].hex().startswith("5cb70295")
    late = verify(doc, anchors=anchors, now=NITRO_PIN + 40 * DAY)
    assert not late.is_valid and ("expired" in late.reason.lower() or "valid" in late.reason.lower())


def test_nvidia_vector(vectors: Path, anchors: TrustAnchors) -> None:
    ev = read(vectors, "nvidia/nvtrust_lgv_hopperAttestationReport.txt")
    chain = read(vectors, "nvidia/nvtrust_lgv_hopperCertChain.txt")
    res = verify(ev, cert_chain=chain, anchors=anchors, now=TDX_PIN)
    assert res.is_valid, res.reason
    assert res.tee == "nvidia"


def test_wrong_kind_is_rejected_not_raised(vectors: Path, anchors: TrustAnchors) -> None:
    res = verify(read(vectors, "tdx/tdx_quote"), kind="snp", anchors=anchors, now=TDX_PIN)
    assert not res.is_valid and "not snp evidence" in res.reason and res.steps[-1].name == "parsed"
    res = verify(read(vectors, "snp/go-sev-guest_attestation.bin"), kind=TeeKind.TDX, now=TDX_PIN)
    assert not res.is_valid and "looks like snp" in res.reason


def test_unknown_kind_name_is_usage_error(vectors: Path) -> None:
    with pytest.raises(UsageError):
        verify(b"x", kind="tpm", now=TDX_PIN)


@pytest.mark.parametrize(
    "evidence", [b"", b"garbage", b"{", b'{"quote": 5}', b'{"quote": "zz"}', b"[]", b"\x04\x00\x02\x00"]
)
def test_garbage_is_rejected_with_a_reason(evidence: bytes) -> None:
    res = verify(evidence, collateral=b"{}", now=TDX_PIN)
    assert not res.is_valid and res.reason and res.steps[-1].name == "parsed"


def test_oversized_evidence(vectors: Path) -> None:
    res = verify(b"\x00" * (verifier.DEFAULT_LIMITS.max_evidence_size + 1), now=TDX_PIN)
    assert not res.is_valid and "limit" in res.reason


def test_tdx_without_collateral_is_a_usage_error(vectors: Path) -> None:
    with pytest.raises(UsageError, match="collateral"):
        verify(read(vectors, "tdx/tdx_quote"), now=TDX_PIN)


def test_tampered_event_log_in_dstack_json(vectors: Path) -> None:
    report = json.loads(read(vectors, "tdx/dstack_quote_report.json"))
    log = json.loads(report["event_log"])
    log[21]["event_payload"] = "00" * 20  # app-id
    report["event_log"] = json.dumps(log)
    res = verify(
        json.dumps(report).encode(),
        collateral=read(vectors, "tdx/tdx_quote_outdated_collateral.json"),
        now=DSTACK_PIN,
    )
    assert not res.is_valid
    assert "event #21 'app-id'" in res.reason
    assert [s.name for s in res.steps][-1] == "event_log_verified"
    assert all(s.ok for s in res.steps[:-1])  # the quote itself was fine


def test_separate_event_log_overrides(vectors: Path) -> None:
    report = json.loads(read(vectors, "tdx/dstack_quote_report.json"))
    res = verify(
        bytes.fromhex(report["quote"]),
        collateral=read(vectors, "tdx/tdx_quote_outdated_collateral.json"),
        event_log=report["event_log"],
        now=DSTACK_PIN,
    )
    assert res.is_valid and res.evidence is not None and res.evidence.app_info is not None


def test_event_log_for_non_tdx_is_usage_error(vectors: Path, anchors: TrustAnchors) -> None:
    with pytest.raises(UsageError):
        verify(
            read(vectors, "nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor"),
            anchors=anchors,
            event_log="[]",
            now=NITRO_PIN,
        )


def test_policy_mismatch_is_reported_per_rule(vectors: Path) -> None:
    policy = Policy(measurements={"mrtd": (b"\x00" * 48,)}, report_data=b"\x99")
    res = verify(
        read(vectors, "tdx/dstack_quote_report.json"),
        collateral=read(vectors, "tdx/tdx_quote_outdated_collateral.json"),
        policy=policy,
        now=DSTACK_PIN,
    )
    assert not res.is_valid
    failed = [s.name for s in res.steps if not s.ok]
    assert failed == ["policy:measurement:mrtd", "policy:report_data"]
    assert res.reason.startswith("mrtd ")


def test_parser_crash_becomes_malformed(monkeypatch: pytest.MonkeyPatch, vectors: Path) -> None:
    def boom(*a: object, **k: object) -> None:
        raise IndexError("bug in a parser")

    monkeypatch.setattr(verifier.dcap, "verify_dcap_quote", boom)
    res = verify(read(vectors, "tdx/tdx_quote"), collateral=b"{}", now=TDX_PIN)
    assert not res.is_valid and "could not be parsed" in res.reason


# --------------------------------------------------------------------------- verify_tdx_with_event_log


def test_verify_tdx_with_event_log(vectors: Path) -> None:
    report = json.loads(read(vectors, "tdx/dstack_quote_report.json"))
    collateral = read(vectors, "tdx/tdx_quote_outdated_collateral.json")
    ev = verify_tdx_with_event_log(
        bytes.fromhex(report["quote"]), collateral, report["event_log"], now=DSTACK_PIN
    )
    assert (
        ev.app_info is not None and len(ev.app_info.mr_aggregated) == 32 and len(ev.app_info.mr_system) == 32
    )
    assert ev.app_info.device_id == ev.device_id and len(ev.device_id) == 32
    assert [s.name for s in ev.steps][-3:] == ["event_log_verified", "policy:debug", "policy:tcb_status"]

    log = json.loads(report["event_log"])
    log[22]["event_payload"] = "11" * 32
    with pytest.raises(EventLogMismatch, match="compose-hash"):
        verify_tdx_with_event_log(bytes.fromhex(report["quote"]), collateral, json.dumps(log), now=DSTACK_PIN)
    with pytest.raises(PolicyViolation) as info:
        verify_tdx_with_event_log(
            bytes.fromhex(report["quote"]),
            collateral,
            report["event_log"],
            now=DSTACK_PIN,
            policy=Policy(allowed_compose_hashes=(b"\x00" * 32,)),
        )
    assert info.value.step == "policy:compose_hash"


def test_verify_tdx_with_event_log_rejects_sgx_and_outdated(vectors: Path) -> None:
    with pytest.raises(MalformedEvidence, match="SGX"):
        verify_tdx_with_event_log(
            read(vectors, "sgx/sgx_quote"), read(vectors, "sgx/sgx_quote_collateral.json"), "[]", now=TDX_PIN
        )
    with pytest.raises(TcbNotAcceptable):
        verify_tdx_with_event_log(
            read(vectors, "tdx/tdx_quote_outdated"),
            read(vectors, "tdx/tdx_quote_outdated_collateral.json"),
            "[]",
            now=DSTACK_PIN,
        )


def test_certificate_with_a_bad_version_field_is_a_clear_error(vectors: Path) -> None:
    # cryptography raises InvalidVersion (not a ValueError) for a version field outside v1..v3; found by
    # fuzzing the collateral: every boundary maps it to teecloud's own errors
    from cryptography import x509

    from teecloud.attestation import dcap
    from teecloud.attestation.verifier import split_certificates
    from teecloud.errors import Error

    vcek = (vectors / "snp/go-sev-guest_vcek.testcer").read_bytes()
    at = vcek.find(bytes.fromhex("a003020102"))
    bad = vcek[: at + 4] + b"\x05" + vcek[at + 5 :]
    with pytest.raises(x509.InvalidVersion):
        x509.load_der_x509_certificate(bad)
    with pytest.raises(Error, match="not a certificate"):
        split_certificates([bad])
    with pytest.raises(Error):
        TrustAnchors.from_certificates([bad])
    assert dcap._anchor_window(bad) is None
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    assert dcap._certs_window(pem) is None
