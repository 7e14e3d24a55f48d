"""Round trip through teecloud's own verifier: simulated platform -> quote + event log -> verified."""

from __future__ import annotations

import hashlib
import time

import pytest

from teecloud.attestation import dcap, eventlog
from teecloud.attestation.errors import PolicyViolation, UntrustedRoot, VerificationError
from teecloud.attestation.policy import Policy
from teecloud.tee import simulated
from teecloud.tee.simulated import SimulatedTdx


def test_dev_root_prefix_matches_the_verifier() -> None:
    assert simulated.DEV_ROOT_CN_PREFIX == dcap.DEV_ROOT_CN_PREFIX


def test_runtime_event_digest_matches_the_verifier() -> None:
    for name, payload in (("app-id", b"\x01" * 20), ("system-ready", b""), ("x", bytes(range(256)))):
        assert simulated.runtime_event_digest(name, payload) == eventlog.runtime_event_digest(name, payload)


def test_emit_events_quote_verify_with_event_log_replay() -> None:
    tee = SimulatedTdx()
    app_id, compose_hash = b"\xaa" * 20, hashlib.sha256(b"compose").digest()
    for name, payload in (
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", compose_hash),
        ("instance-id", b"\xbb" * 20),
        ("boot-mr-done", b""),
        ("system-ready", b""),
    ):
        tee.emit_event(name, payload)
    report_data = hashlib.sha512(b"nonce").digest()
    quote = tee.quote(report_data)
    log_json = eventlog.event_log_to_json(tee.event_log())
    now = int(time.time())

    evidence = dcap.verify_dcap_quote(quote, tee.collateral(), now=now, dev_root_der=tee.dev_root_der())
    assert evidence.tee == "tdx-simulated" and evidence.simulated
    assert evidence.tcb_status == "UpToDate"
    assert evidence.report_data == report_data
    assert evidence.debug is False
    assert evidence.device_id == tee.device_id
    entries = eventlog.parse_event_log(log_json)
    rtmrs = [evidence.measurements[f"rtmr{i}"] for i in range(4)]
    app = eventlog.verify_event_log(entries, rtmrs)
    assert app.app_id == app_id and app.compose_hash == compose_hash
    assert evidence.measurements["mrtd"] == tee.measurements()["mrtd"]

    # an event emitted after the quote is not covered by it
    tee.emit_event("late", b"1")
    late = eventlog.parse_event_log(eventlog.event_log_to_json(tee.event_log()))
    with pytest.raises(VerificationError, match="RTMR3"):
        eventlog.verify_event_log(late, rtmrs)


def test_production_settings_reject_simulated_quotes() -> None:
    tee = SimulatedTdx()
    with pytest.raises(UntrustedRoot, match="signed by a development root, not by Intel"):
        dcap.verify_dcap_quote(tee.quote(b"x"), tee.collateral(), now=int(time.time()))


def test_other_installations_dev_root_rejects(tmp_path) -> None:
    tee, other = SimulatedTdx(), SimulatedTdx(tmp_path / "other")
    with pytest.raises(UntrustedRoot, match="development root"):
        dcap.verify_dcap_quote(
            tee.quote(b"x"), tee.collateral(), now=int(time.time()), dev_root_der=other.dev_root_der()
        )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"debug": True}, r"(?i)debug"), ({"revoked_pck": True}, r"(?i)revoked")],
)
def test_negative_knobs_are_rejected_by_the_verifier(kwargs: dict, pattern: str) -> None:
    tee = SimulatedTdx(**kwargs)
    with pytest.raises(VerificationError, match=pattern):
        dcap.verify_dcap_quote(
            tee.quote(b"x"), tee.collateral(), now=int(time.time()), dev_root_der=tee.dev_root_der()
        )


def test_out_of_date_knob_reaches_the_verifier() -> None:
    tee = SimulatedTdx(tcb="OutOfDate")
    evidence = dcap.verify_dcap_quote(
        tee.quote(b"x"), tee.collateral(), now=int(time.time()), dev_root_der=tee.dev_root_der()
    )
    assert evidence.tcb_status == "OutOfDate"
    assert evidence.advisory_ids == ("TEECLOUD-SIM-SA-0001",)


def _dstack_json(tee: SimulatedTdx, report_data: bytes) -> bytes:
    import json

    doc = {
        "quote": tee.quote(report_data).hex(),
        "event_log": eventlog.event_log_to_json(tee.event_log()),
        "report_data": report_data.ljust(64, b"\0").hex(),
        "vm_config": json.dumps(tee.vm_config()),
    }
    return json.dumps(doc).encode()


def test_verifier_accepts_dstack_json_only_with_the_dev_root() -> None:
    from teecloud.attestation.verifier import TrustAnchors, verify

    tee = SimulatedTdx()
    tee.emit_event("app-id", b"\x01" * 20)
    evidence = _dstack_json(tee, b"nonce")
    now = int(time.time())
    anchors = TrustAnchors(dev_root_der=tee.dev_root_der())
    dev = Policy(allow_simulated=True)
    ok = verify(evidence, collateral=tee.collateral(), anchors=anchors, policy=dev, now=now)
    assert ok.is_valid, ok.reason
    assert ok.tee == "tdx-simulated"
    assert ok.evidence is not None and ok.evidence.app_info is not None
    assert ok.evidence.app_info.app_id == b"\x01" * 20
    # production settings: no dev root
    prod = verify(evidence, collateral=tee.collateral(), policy=dev, now=now)
    assert not prod.is_valid
    assert "signed by a development root, not by Intel" in prod.reason
    # even with the dev root as an anchor, the default policy refuses simulated evidence
    default = verify(evidence, collateral=tee.collateral(), anchors=anchors, now=now)
    assert not default.is_valid and "simulated" in default.reason


def test_verify_tdx_with_event_log_policies() -> None:
    from dataclasses import replace

    from teecloud.attestation.errors import TcbNotAcceptable
    from teecloud.attestation.verifier import verify_tdx_with_event_log

    now = int(time.time())
    dev = Policy(allow_simulated=True)

    def check(t: SimulatedTdx, log=None, policy: Policy | None = dev):
        return verify_tdx_with_event_log(
            t.quote(b"k"),
            t.collateral(),
            t.event_log() if log is None else log,
            now=now,
            dev_root_der=t.dev_root_der(),
            policy=policy,
        )

    tee = SimulatedTdx()
    tee.emit_event("compose-hash", b"\x22" * 32)
    ev = check(tee)
    assert ev.simulated and ev.app_info is not None and ev.app_info.compose_hash == b"\x22" * 32
    with pytest.raises(TcbNotAcceptable):
        check(SimulatedTdx(tcb="OutOfDate"))
    log = tee.event_log()
    log[-1] = replace(log[-1], event_payload=b"\x33" * 32)
    with pytest.raises(VerificationError):
        check(tee, log)
    with pytest.raises(PolicyViolation, match="simulated"):
        check(tee, policy=None)
