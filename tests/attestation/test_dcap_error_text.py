"""Every rejection of a real DCAP vector reads as a sentence: no Rust debug structs from dcap-qvl
(`CrlExpired { time: .. }`), no bare quoted key (`'tcb_info'`), never empty; webpki's kind kept in
parentheses. Real vectors from ../shared/vectors with expired, missing and malformed collateral."""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from teecloud.attestation import dcap
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    Expired,
    MalformedEvidence,
    SignatureInvalid,
    VerificationError,
)
from teecloud.cli import app

DAY = 86400
TDX_PIN = calendar.timegm(time.strptime("2025-07-04", "%Y-%m-%d"))
DSTACK_PIN = calendar.timegm(time.strptime("2026-03-05", "%Y-%m-%d"))
# A Rust debug struct (`Name { field: value }`) or a bare quoted identifier as the whole reason or its tail.
RUST_DEBUG = re.compile(r"[{}]")
BARE_KEY = re.compile(r"(^|: )'\w+'$")


def assert_readable(reason: str) -> None:
    assert reason.strip(), "empty reason"
    assert not RUST_DEBUG.search(reason), f"Rust debug syntax in {reason!r}"
    assert not BARE_KEY.search(reason.strip()), f"bare quoted key in {reason!r}"
    assert "Traceback" not in reason
    assert len(reason.split()) >= 5, f"not a sentence: {reason!r}"


def _col(vectors: Path, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((vectors / "tdx" / name).read_text())
    return loaded


def _without(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: {k: v for k, v in d.items() if k != key}


def _set(key: str, value: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: {**d, key: value}


# (name, collateral edit, verification time, expected error class)
CASES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], int, type[VerificationError]]] = [
    ("tcb-info-expired", lambda d: d, TDX_PIN + 40 * DAY, Expired),
    ("crl-expired", lambda d: d, TDX_PIN + 4 * 365 * DAY, Expired),
    ("not-yet-valid", lambda d: d, TDX_PIN - 60 * DAY, Expired),
    ("no-tcb-info", _without("tcb_info"), TDX_PIN, MalformedEvidence),
    ("no-qe-identity", _without("qe_identity"), TDX_PIN, MalformedEvidence),
    ("no-pck-crl", _without("pck_crl"), TDX_PIN, MalformedEvidence),
    ("no-root-ca-crl", _without("root_ca_crl"), TDX_PIN, MalformedEvidence),
    ("tcb-info-not-string", _set("tcb_info", 7), TDX_PIN, MalformedEvidence),  # type: ignore[arg-type]
    ("bad-pck-crl-hex", _set("pck_crl", "zz"), TDX_PIN, MalformedEvidence),
    ("bad-tcb-signature", _set("tcb_info_signature", "00" * 64), TDX_PIN, SignatureInvalid),
    ("bad-qe-signature", _set("qe_identity_signature", "11" * 64), TDX_PIN, SignatureInvalid),
]


@pytest.mark.parametrize("name,edit,now,expected", CASES, ids=[c[0] for c in CASES])
def test_dcap_rejections_are_sentences(
    vectors: Path,
    name: str,
    edit: Callable[[dict[str, Any]], dict[str, Any]],
    now: int,
    expected: type[VerificationError],
) -> None:
    quote = (vectors / "tdx/tdx_quote").read_bytes()
    collateral = json.dumps(edit(_col(vectors, "tdx_quote_collateral.json"))).encode()
    with pytest.raises(expected) as info:
        dcap.verify_dcap_quote(quote, collateral, now=now)
    assert_readable(info.value.reason)


def test_crl_expired_names_dates_and_kind(vectors: Path) -> None:
    """The dstack vector at a pin past its CRL's nextUpdate: dcap-qvl says `CrlExpired { .. }`."""
    report = json.loads((vectors / "tdx/dstack_quote_report.json").read_text())
    collateral = (vectors / "tdx/tdx_quote_outdated_collateral.json").read_bytes()
    with pytest.raises(Expired) as info:
        dcap.verify_dcap_quote(bytes.fromhex(report["quote"]), collateral, now=DSTACK_PIN + 40 * DAY)
    reason = info.value.reason
    assert_readable(reason)
    assert "revocation list" in reason and reason.endswith("(CrlExpired)")
    assert "2026-04-03T11:21:57Z" in reason and "2026-04-14T00:00:00Z" in reason  # nextUpdate, the pin


def test_unknown_rust_debug_struct_is_rewritten() -> None:
    """A kind no rule names still loses its braces (the words are kept for experts)."""
    assert dcap._no_rust_debug("x: SomeNewKind { a: 1, b: two }") == "x: SomeNewKind (a 1, b two)"
    known = dcap._webpki_reason("CertExpired { time: 2030-01-01T00:00:00Z, not_after: 2029-01-01T00:00:00Z }")
    assert known is not None and known[0] is Expired and "2029-01-01T00:00:00Z" in known[1]
    revoked = dcap._webpki_reason("CertRevoked")
    assert revoked is not None and revoked[0] is CertificateChainInvalid


runner = CliRunner()


@pytest.mark.parametrize("name,edit,now,expected", CASES, ids=[c[0] for c in CASES])
def test_cli_verify_failures_are_sentences(
    vectors: Path,
    tmp_path: Path,
    name: str,
    edit: Callable[[dict[str, Any]], dict[str, Any]],
    now: int,
    expected: type[VerificationError],
) -> None:
    col = tmp_path / "collateral.json"
    col.write_text(json.dumps(edit(_col(vectors, "tdx_quote_collateral.json"))))
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    args = ["verify", str(vectors / "tdx/tdx_quote"), "--collateral", str(col), "--at", at]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    out = json.loads(result.stdout)
    assert out["is_valid"] is False
    assert_readable(out.get("reason") or out.get("error") or "")
    for step in out.get("steps", []):
        if not step["ok"]:
            assert_readable(step["reason"])
    text = runner.invoke(app, args)
    assert text.exit_code == result.exit_code
    assert "Traceback" not in text.output and text.output.strip()
    assert not BARE_KEY.search(text.output.strip())


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: {
            **d,
            "tcb_info": json.dumps({k: v for k, v in json.loads(d["tcb_info"]).items() if k != "fmspc"}),
        },
        lambda d: {**d, "tcb_info": "[1, 2]"},
        lambda d: {**d, "pck_crl": "zz"},
        lambda d: {k: v for k, v in d.items() if k != "qe_identity"},
    ],
    ids=["no-fmspc", "tcb-info-a-list", "crl-not-hex", "no-qe-identity"],
)
def test_collateral_store_names_what_is_wrong(
    vectors: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """The collateral package (PCCS cache, `--collateral` store) reads the same documents: same rule."""
    from teecloud.collateral import InvalidCollateral
    from teecloud.collateral.store import describe_collateral

    raw = json.dumps(edit(_col(vectors, "tdx_quote_collateral.json"))).encode()
    with pytest.raises(InvalidCollateral) as info:
        describe_collateral(raw)
    assert_readable(str(info.value))


SGX_PIN = TDX_PIN


def _vector(vectors: Path, which: str) -> tuple[bytes, bytes, int]:
    if which == "sgx":
        s = vectors / "sgx"
        return (s / "sgx_quote").read_bytes(), (s / "sgx_quote_collateral.json").read_bytes(), SGX_PIN
    t = vectors / "tdx"
    if which == "tdx":
        return (t / "tdx_quote").read_bytes(), (t / "tdx_quote_collateral.json").read_bytes(), TDX_PIN
    if which == "tdx-v5-outdated":
        return (
            (t / "tdx_quote_outdated").read_bytes(),
            (t / "tdx_quote_outdated_collateral.json").read_bytes(),
            DSTACK_PIN,
        )
    report = json.loads((t / "dstack_quote_report.json").read_text())
    return bytes.fromhex(report["quote"]), (t / "tdx_quote_outdated_collateral.json").read_bytes(), DSTACK_PIN


@pytest.mark.parametrize("which", ["sgx", "tdx", "tdx-v5-outdated", "dstack"])
@pytest.mark.parametrize("shift_days", [-400, -60, 20, 40, 400, 4 * 365])
def test_every_vector_fails_in_words_away_from_its_pin(vectors: Path, which: str, shift_days: int) -> None:
    """Each real DCAP vector, at times before and after its collateral's window (TCB info, QE identity,
    CRLs and certificates expire in turn): whatever fails, the reason is a sentence."""
    quote, collateral, pin = _vector(vectors, which)
    try:
        dcap.verify_dcap_quote(quote, collateral, now=pin + shift_days * DAY)
    except VerificationError as exc:
        assert_readable(exc.reason)
    else:
        assert which != "tdx-v5-outdated" and 0 < shift_days <= 20  # only inside the window does it pass
