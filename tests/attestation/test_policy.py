"""Appraisal policy: parsing (TOML/JSON, versioned, strict) and every rule, with negative cases."""

from __future__ import annotations

import calendar
import json
from pathlib import Path

import pytest

from teecloud.attestation import dcap
from teecloud.attestation.errors import UsageError
from teecloud.attestation.models import AppInfo
from teecloud.attestation.policy import Policy, _Claims
from teecloud.attestation.verifier import verify_tdx_with_event_log

PIN = calendar.timegm((2026, 3, 5, 0, 0, 0))


@pytest.fixture(scope="module")
def dstack(vectors: Path):  # type: ignore[no-untyped-def]
    report = json.loads((vectors / "tdx/dstack_quote_report.json").read_text())
    collateral = (vectors / "tdx/tdx_quote_outdated_collateral.json").read_bytes()
    ev = verify_tdx_with_event_log(bytes.fromhex(report["quote"]), collateral, report["event_log"], now=PIN)
    return ev


def claims(**kw: object) -> _Claims:
    base: dict[str, object] = dict(
        tee="tdx",
        simulated=False,
        debug=False,
        tcb_status="UpToDate",
        advisory_ids=(),
        measurements={"mrtd": b"\x01" * 48},
        report_data=b"\x12\x34" + bytes(62),
        app_info=AppInfo(compose_hash=b"\xaa" * 32, app_id=b"\xbb" * 20),
    )
    base.update(kw)
    return _Claims(**base)  # type: ignore[arg-type]


def failing(steps: list) -> list[str]:  # type: ignore[type-arg]
    return [s.name for s in steps if not s.ok]


def test_default_policy_accepts_real_dstack_evidence(dstack) -> None:  # type: ignore[no-untyped-def]
    steps = Policy.default().check(dstack)
    assert steps and all(s.ok for s in steps)
    assert {s.name for s in steps} == {"policy:debug", "policy:tcb_status"}


def test_reference_values_from_real_evidence(dstack) -> None:  # type: ignore[no-untyped-def]
    m = dstack.measurements
    text = f"""
version = 1
allowed_tee = ["tdx"]
report_data = "1234"
allowed_compose_hashes = ["{dstack.app_info.compose_hash.hex()}"]
allowed_app_ids = ["{dstack.app_info.app_id.hex()}"]
[measurements]
mrtd = ["{m["mrtd"].hex()}", "{"00" * 48}"]
rtmr3 = "{m["rtmr3"].hex()}"
"""
    policy = Policy.from_text(text)
    assert all(s.ok for s in policy.check(dstack))
    wrong = Policy.from_mapping({"version": 1, "measurements": {"rtmr0": "00" * 48}})
    steps = wrong.check(dstack)
    assert failing(steps) == ["policy:measurement:rtmr0"]
    assert "matches none" in next(s.reason for s in steps if not s.ok)


def test_json_and_toml_are_equivalent(tmp_path: Path) -> None:
    data = {"version": 1, "allowed_tee": ["sgx"], "min_tcb_status": "OutOfDate", "reject_debug": False}
    (tmp_path / "p.json").write_text(json.dumps(data))
    (tmp_path / "p.toml").write_text(
        'version = 1\nallowed_tee = ["sgx"]\nmin_tcb_status = "OutOfDate"\nreject_debug = false\n'
    )
    assert Policy.load(tmp_path / "p.json") == Policy.load(tmp_path / "p.toml")
    assert Policy.from_mapping(Policy.load(tmp_path / "p.json").to_mapping()) == Policy.load(
        tmp_path / "p.json"
    )


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"version": 2},
        {"version": "1"},
        {"version": 1, "allowed_tees": ["tdx"]},  # typo must not silently disable the rule
        {"version": 1, "allowed_tee": ["tdxx"]},
        {"version": 1, "allowed_tee": "tdx"},
        {"version": 1, "min_tcb_status": "Great"},
        {"version": 1, "min_tcb_status": "Revoked"},
        {"version": 1, "reject_debug": "no"},
        {"version": 1, "report_data": "zz"},
        {"version": 1, "report_data": 5},
        {"version": 1, "measurements": {"mrtd": 5}},
        {"version": 1, "measurements": ["mrtd"]},
        {"version": 1, "allowed_compose_hashes": "ab"},
    ],
)
def test_invalid_policies_are_usage_errors(data: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(UsageError):
        Policy.from_mapping(data)


def test_unreadable_policy(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Policy.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("version = = 1")
    with pytest.raises(UsageError, match="TOML"):
        Policy.load(tmp_path / "bad.toml")


def test_debug_is_rejected_by_default() -> None:
    steps = Policy.default()._check_claims(claims(debug=True))
    assert failing(steps) == ["policy:debug"]
    assert "debug" in steps[0].reason
    assert not failing(Policy(reject_debug=False)._check_claims(claims(debug=True)))


def test_simulated_is_rejected_by_default() -> None:
    steps = Policy.default()._check_claims(claims(tee="tdx-simulated", simulated=True))
    assert failing(steps) == ["policy:simulated"]
    assert not failing(
        Policy(allow_simulated=True)._check_claims(claims(tee="tdx-simulated", simulated=True))
    )


def test_allowed_tee_uses_the_kind() -> None:
    assert failing(Policy(allowed_tee=("sgx",))._check_claims(claims())) == ["policy:tee"]
    assert not failing(
        Policy(allowed_tee=("tdx",), allow_simulated=True)._check_claims(
            claims(tee="tdx-simulated", simulated=True)
        )
    )


@pytest.mark.parametrize(
    ("status", "floor", "ok"),
    [
        ("UpToDate", "UpToDate", True),
        ("SWHardeningNeeded", "UpToDate", False),
        ("SWHardeningNeeded", "SWHardeningNeeded", True),
        ("ConfigurationAndSWHardeningNeeded", "ConfigurationNeeded", False),
        ("OutOfDate", "OutOfDateConfigurationNeeded", True),
        ("Revoked", "OutOfDateConfigurationNeeded", False),
        ("", "OutOfDateConfigurationNeeded", False),
        ("Bogus", "OutOfDateConfigurationNeeded", False),
    ],
)
def test_tcb_floor(status: str, floor: str, ok: bool) -> None:
    steps = Policy(min_tcb_status=floor)._check_claims(claims(tcb_status=status))
    assert (failing(steps) == []) is ok


def test_non_intel_kinds_without_tcb_status_are_not_judged_on_it() -> None:
    assert not failing(Policy.default()._check_claims(claims(tee="nitro", tcb_status="")))


def test_advisories_absent_key_means_no_constraint_but_empty_list_means_none() -> None:
    c = claims(advisory_ids=("INTEL-SA-00615",))
    assert not failing(Policy()._check_claims(c))
    assert failing(Policy(allowed_advisory_ids=())._check_claims(c)) == ["policy:advisories"]
    assert not failing(Policy(allowed_advisory_ids=("INTEL-SA-00615",))._check_claims(c))


def test_report_data_is_zero_padded_and_exact() -> None:
    assert not failing(Policy(report_data=bytes.fromhex("1234"))._check_claims(claims()))
    assert failing(Policy(report_data=bytes.fromhex("1235"))._check_claims(claims())) == [
        "policy:report_data"
    ]
    assert failing(
        Policy(report_data=bytes.fromhex("12"))._check_claims(claims(report_data=b"\x12\x01" + bytes(62)))
    )


def test_compose_hash_rules() -> None:
    assert not failing(Policy(allowed_compose_hashes=(b"\xaa" * 32,))._check_claims(claims()))
    steps = Policy(allowed_compose_hashes=(b"\xab" * 32,))._check_claims(claims())
    assert failing(steps) == ["policy:compose_hash"]
    steps = Policy(allowed_compose_hashes=(b"\xaa" * 32,))._check_claims(claims(app_info=None))
    assert "no verified event log" in steps[-1].reason and not steps[-1].ok
    assert failing(Policy(allowed_compose_hashes=())._check_claims(claims())) == ["policy:compose_hash"]
    steps = Policy(allowed_os_image_hashes=(b"\x01" * 32,))._check_claims(claims())
    assert failing(steps) == ["policy:os_image_hash"] and "does not measure" in steps[-1].reason
    assert failing(Policy(allowed_app_ids=(b"\xbc" * 20,))._check_claims(claims())) == ["policy:app_id"]


def test_missing_measurement_fails() -> None:
    steps = Policy(measurements={"rtmr9": (b"",)})._check_claims(claims())
    assert failing(steps) == ["policy:measurement:rtmr9"]


def test_all_rules_are_reported_not_just_the_first() -> None:
    steps = Policy(allowed_tee=("sgx",), report_data=b"\x99")._check_claims(claims(debug=True))
    assert set(failing(steps)) == {"policy:tee", "policy:debug", "policy:report_data"}


def test_tcb_status_order_is_intels() -> None:
    assert dcap.TCB_STATUS_ORDER[0] == "UpToDate" and dcap.TCB_STATUS_ORDER[-1] == "Revoked"


def test_require_revocation_rejects_an_unchecked_chain() -> None:
    from teecloud.attestation.models import VerifiedEvidence

    def ev(revocation: dict[str, object]) -> VerifiedEvidence:
        return VerifiedEvidence(
            tee="nitro",
            tcb_status="NotApplicable",
            advisory_ids=(),
            measurements={},
            report_data=b"",
            debug=False,
            fields={"revocation": revocation},
        )

    strict = Policy.from_mapping({"version": 1, "require_revocation": True})
    unchecked = ev({"checked": [], "not_checked": ["Leaf"], "complete": False})
    step = next(s for s in strict.check(unchecked) if s.name == "policy:revocation")
    assert not step.ok and "revocation not checked for Leaf" in step.reason
    checked = ev({"checked": ["Leaf: OCSP good"], "not_checked": [], "complete": True})
    assert next(s for s in strict.check(checked) if s.name == "policy:revocation").ok
    # evidence without any revocation record fails closed; the default policy has no such rule
    assert not next(s for s in strict.check(ev({})) if s.name == "policy:revocation").ok
    assert all(s.name != "policy:revocation" for s in Policy.default().check(unchecked))
    assert Policy.from_mapping(strict.to_mapping()) == strict
