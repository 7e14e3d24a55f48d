"""Round trip through teecloud's own verifier: simulated platform -> quote + event log -> verified."""

from __future__ import annotations

import hashlib
import time

import pytest

from teecloud.attestation import dcap, eventlog
from teecloud.attestation.errors import UntrustedRoot, VerificationError
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
