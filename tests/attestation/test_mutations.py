"""Property-based mutation tests: mutated real evidence never escapes as anything but our error types."""

from __future__ import annotations

import calendar
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teecloud.attestation import dcap, eventlog
from teecloud.attestation.errors import MalformedEvidence, UsageError, VerificationError
from teecloud.attestation.policy import Policy
from teecloud.attestation.verifier import TrustAnchors, verify

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"
TDX_PIN = calendar.timegm((2025, 7, 4, 0, 0, 0))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def _read(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


TDX = _read("tdx/tdx_quote")
TDX_COL = _read("tdx/tdx_quote_collateral.json")
SGX = _read("sgx/sgx_quote")
DSTACK = _read("tdx/dstack_quote_report.json")
LOG = json.loads(DSTACK)["event_log"]
SNP = _read("snp/go-sev-guest_attestation.bin")
NITRO = _read("nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor")
NVIDIA = _read("nvidia/nvtrust_lgv_hopperAttestationReport.txt")
ANCHORS = TrustAnchors.from_certificates(
    [
        _read("snp/go-sev-guest_ask_ark_milan.pem"),
        _read("nitro/AWS_NitroEnclaves_Root-G1.pem"),
        _read("nvidia/nvtrust_lgv_verifier_device_root.pem"),
    ]
)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


@SETTINGS
@given(mutated(TDX))
def test_parse_quote_only_raises_malformed(data: bytes) -> None:
    try:
        dcap.parse_quote(data)
    except MalformedEvidence:
        pass


@SETTINGS
@given(st.one_of(mutated(TDX), mutated(SGX)))
def test_verify_dcap_quote_only_raises_verification_errors(data: bytes) -> None:
    try:
        dcap.verify_dcap_quote(data, TDX_COL, now=TDX_PIN)
    except VerificationError as exc:
        assert exc.reason and exc.step


@SETTINGS
@given(mutated(TDX_COL))
def test_mutated_collateral(data: bytes) -> None:
    try:
        dcap.verify_dcap_quote(TDX, data, now=TDX_PIN)
    except VerificationError:
        pass


@SETTINGS
@given(mutated(LOG.encode()))
def test_event_log_parser(data: bytes) -> None:
    try:
        entries = eventlog.parse_event_log(data)
        eventlog.verify_event_log(entries, [bytes(48)] * 4)
    except VerificationError:
        pass


@SETTINGS
@given(
    st.one_of(
        mutated(DSTACK), mutated(TDX), mutated(SNP), mutated(NITRO), mutated(NVIDIA), st.binary(max_size=2048)
    )
)
def test_verify_never_raises_on_hostile_evidence(data: bytes) -> None:
    result = verify(
        data,
        collateral=TDX_COL,
        cert_chain=[_read("snp/go-sev-guest_vcek.testcer")],
        anchors=ANCHORS,
        now=TDX_PIN,
    )
    assert result.reason
    if not result.is_valid:
        assert not all(s.ok for s in result.steps)


@SETTINGS
@given(st.text(max_size=300))
def test_policy_parser_only_raises_usage_error(text: str) -> None:
    for fmt in ("toml", "json"):
        try:
            Policy.from_text(text, fmt=fmt)
        except UsageError:
            pass


@pytest.mark.parametrize("base", [TDX, SGX])
def test_every_single_byte_flip_in_the_signed_region_is_rejected(base: bytes) -> None:
    # exhaustive over header+body (the bytes the attestation key signs)
    body_end = 48 + (584 if base is TDX else 384)
    collateral = TDX_COL if base is TDX else _read("sgx/sgx_quote_collateral.json")
    for pos in range(0, body_end, 7):
        data = bytearray(base)
        data[pos] ^= 0x80
        with pytest.raises(VerificationError):
            dcap.verify_dcap_quote(bytes(data), collateral, now=TDX_PIN)
