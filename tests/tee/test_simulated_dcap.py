"""SimulatedTdx quotes cross-checked with dcap-qvl (an independent DCAP implementation)."""

from __future__ import annotations

import hashlib
import json
import struct
import time

import dcap_qvl
import pytest

from teecloud.tee.simulated import SimulatedTdx

# Offsets in a TDX quote v4 (Intel TDX DCAP Quoting Library API, "Quote Format").
HEADER = (0, 48)
TD_REPORT = (48, 632)
TD_ATTRIBUTES = 48 + 16 + 48 + 48 + 8
REPORT_DATA = (568, 632)
SIGNATURE = (636, 700)
ATT_KEY = (700, 764)
QE_REPORT = (770, 1154)
QE_REPORT_SIG = (1154, 1218)
QE_AUTH_DATA = (1220, 1252)
PEM_CHAIN_START = 1258


def _col(tee: SimulatedTdx, now: int | None = None) -> dcap_qvl.QuoteCollateralV3:
    return dcap_qvl.QuoteCollateralV3.from_json(tee.collateral(now=now).decode())


def _verify(tee: SimulatedTdx, quote: bytes, now: int | None = None) -> dcap_qvl.VerifiedReport:
    now = int(time.time()) if now is None else now
    return dcap_qvl.verify_with_root_ca(quote, _col(tee), tee.dev_root_der(), now)


def _td10(report: dcap_qvl.VerifiedReport) -> dict[str, str]:
    return json.loads(report.to_json())["report"]["TD10"]


def test_simulated_quote_verifies_uptodate_under_dev_root() -> None:
    tee = SimulatedTdx()
    report = _verify(tee, tee.quote(b"hello"))
    assert report.status == "UpToDate"
    assert report.advisory_ids == []
    # dcap-qvl reads the PPID from our PCK certificate; device_id is dstack's sha256(PPID).
    assert bytes.fromhex(report.ppid.hex() if isinstance(report.ppid, bytes) else report.ppid) == tee.ppid
    assert tee.device_id == hashlib.sha256(tee.ppid).digest()


def test_strict_policy_accepts_uptodate_and_refuses_out_of_date() -> None:
    now = int(time.time())
    tee = SimulatedTdx()
    verifier = dcap_qvl.QuoteVerifier(tee.dev_root_der())
    claims = verifier.verify_with_policy(tee.quote(b""), _col(tee), now, dcap_qvl.QuotePolicy.strict(now))
    assert json.loads(claims.to_json())["tcb"]["status"] == "UpToDate"
    stale = SimulatedTdx(tcb="OutOfDate")
    with pytest.raises(ValueError, match="OutOfDate"):
        verifier.verify_with_policy(stale.quote(b""), _col(stale), now, dcap_qvl.QuotePolicy.strict(now))


def test_intel_root_rejects_simulated_quote() -> None:
    tee = SimulatedTdx()
    with pytest.raises(ValueError, match=r"(?i)crl|root|issuer|signature"):
        dcap_qvl.verify(tee.quote(b"x"), _col(tee), int(time.time()))


def test_another_installations_root_rejects(tmp_path) -> None:
    ours = SimulatedTdx()
    theirs = SimulatedTdx(tmp_path / "other-home")
    assert ours.dev_root_der() != theirs.dev_root_der()
    with pytest.raises(ValueError):
        dcap_qvl.verify_with_root_ca(ours.quote(b"x"), _col(ours), theirs.dev_root_der(), int(time.time()))


def test_report_data_round_trips_zero_padded() -> None:
    tee = SimulatedTdx()
    rd = bytes(range(40))
    quote = tee.quote(rd)
    assert quote[REPORT_DATA[0] : REPORT_DATA[1]] == rd + bytes(24)
    td = _td10(_verify(tee, quote))
    assert td["report_data"] == (rd + bytes(24)).hex()
    m = tee.measurements()
    assert td["mr_td"] == m["mrtd"].hex()
    assert [td[f"rt_mr{i}"] for i in range(4)] == [m[f"rtmr{i}"].hex() for i in range(4)]


def test_full_64_byte_report_data_and_rejects_65() -> None:
    from teecloud.tee import TeeUsageError

    tee = SimulatedTdx()
    rd = hashlib.sha512(b"x").digest()
    assert _td10(_verify(tee, tee.quote(rd)))["report_data"] == rd.hex()
    with pytest.raises(TeeUsageError, match="64"):
        tee.quote(rd + b"\x00")
    with pytest.raises(TeeUsageError):
        tee.quote("not bytes")  # type: ignore[arg-type]


def test_out_of_date_knob_evaluates_out_of_date() -> None:
    tee = SimulatedTdx(tcb="OutOfDate")
    report = _verify(tee, tee.quote(b"x"))
    assert report.status == "OutOfDate"
    assert report.advisory_ids == ["TEECLOUD-SIM-SA-0001"]


def test_unknown_tcb_knob_is_a_usage_error() -> None:
    from teecloud.tee import TeeUsageError

    with pytest.raises(TeeUsageError):
        SimulatedTdx(tcb="Revoked")


def test_revoked_pck_is_rejected() -> None:
    tee = SimulatedTdx(revoked_pck=True)
    with pytest.raises(ValueError, match="CertRevoked"):
        _verify(tee, tee.quote(b"x"))
    # the same platform's quotes verify against non-revoking collateral
    assert _verify(SimulatedTdx(), tee.quote(b"x")).status == "UpToDate"


def test_debug_knob_sets_td_attributes_debug_bit_and_dcap_qvl_rejects() -> None:
    tee = SimulatedTdx(debug=True)
    quote = tee.quote(b"x")
    assert quote[TD_ATTRIBUTES] & 0x01
    # dcap-qvl 0.7.0 refuses debug TDs by default ("Debug mode is enabled").
    with pytest.raises(ValueError, match=r"(?i)debug"):
        _verify(tee, quote)
    assert not SimulatedTdx().quote(b"x")[TD_ATTRIBUTES] & 0x01


def test_quote_layout_is_v4_tdx_with_type6_wrapping_type5() -> None:
    tee = SimulatedTdx()
    q = tee.quote(b"")
    version, key_type, tee_type = struct.unpack_from("<HHI", q, 0)
    assert (version, key_type, tee_type) == (4, 2, 0x81)
    assert q[12:28] == bytes.fromhex("939A7233F79C4CA9940A0DB3957F0607")
    (auth_len,) = struct.unpack_from("<I", q, 632)
    assert len(q) == 636 + auth_len
    cert_type, _ = struct.unpack_from("<HI", q, 764)
    assert cert_type == 6
    (qe_auth_len,) = struct.unpack_from("<H", q, 1218)
    assert qe_auth_len == 32
    inner_type, inner_len = struct.unpack_from("<HI", q, 1252)
    assert inner_type == 5
    chain = q[PEM_CHAIN_START : PEM_CHAIN_START + inner_len]
    assert chain.count(b"-----BEGIN CERTIFICATE-----") == 3
    # QE report data binds the attestation key and QE auth data.
    att_key = q[ATT_KEY[0] : ATT_KEY[1]]
    qe_auth = q[QE_AUTH_DATA[0] : QE_AUTH_DATA[1]]
    assert q[QE_REPORT[0] + 320 : QE_REPORT[0] + 352] == hashlib.sha256(att_key + qe_auth).digest()
    ext = dcap_qvl.parse_pck_extension_from_pem(chain)
    fmspc = ext.fmspc.hex() if isinstance(ext.fmspc, bytes) else ext.fmspc
    assert fmspc.upper() == tee.fmspc


def _mutation_offsets(quote: bytes) -> list[int]:
    (inner_len,) = struct.unpack_from("<I", quote, 1254)
    chain = quote[PEM_CHAIN_START : PEM_CHAIN_START + inner_len]
    # The PCK leaf and platform CA (the root in the quote is replaced by the trusted root by design).
    second_end = chain.index(b"-----END CERTIFICATE-----", chain.index(b"-----END CERTIFICATE-----") + 1)
    regions = [HEADER, TD_REPORT, SIGNATURE, ATT_KEY, QE_REPORT, QE_REPORT_SIG, QE_AUTH_DATA]
    regions.append((PEM_CHAIN_START + 28, PEM_CHAIN_START + second_end))
    offsets: set[int] = set()
    for start, end in regions:
        offsets.update(range(start, end, 5))
        offsets.update((start, end - 1))
    return sorted(o for o in offsets if quote[o] != 0x0A)  # PEM line breaks are whitespace to a parser


def test_mutated_quotes_are_rejected() -> None:
    tee = SimulatedTdx()
    quote = tee.quote(b"mutate me")
    col, root, now = _col(tee), tee.dev_root_der(), int(time.time())
    assert dcap_qvl.verify_with_root_ca(quote, col, root, now).status == "UpToDate"
    accepted = []
    for offset in _mutation_offsets(quote):
        for bit in (0x01, 0x80):
            mutated = bytearray(quote)
            mutated[offset] ^= bit
            try:
                dcap_qvl.verify_with_root_ca(bytes(mutated), col, root, now)
            except ValueError:
                continue
            accepted.append((offset, bit))
    assert accepted == []


def test_truncated_quote_is_rejected() -> None:
    tee = SimulatedTdx()
    quote = tee.quote(b"x")
    for cut in (0, 47, 631, 700, 1254, len(quote) - 200):
        with pytest.raises(ValueError):
            dcap_qvl.verify_with_root_ca(quote[:cut], _col(tee), tee.dev_root_der(), int(time.time()))


def test_collateral_for_a_later_time_and_expiry() -> None:
    tee = SimulatedTdx()
    quote = tee.quote(b"x")
    later = int(time.time()) + 60 * 86400
    col_later = dcap_qvl.QuoteCollateralV3.from_json(tee.collateral(now=later).decode())
    assert dcap_qvl.verify_with_root_ca(quote, col_later, tee.dev_root_der(), later).status == "UpToDate"
    # today's collateral has expired 40 days later (tcbInfo / CRL nextUpdate)
    with pytest.raises(ValueError, match=r"(?i)expired|nextupdate|crl|tcb"):
        dcap_qvl.verify_with_root_ca(quote, _col(tee), tee.dev_root_der(), int(time.time()) + 40 * 86400)
