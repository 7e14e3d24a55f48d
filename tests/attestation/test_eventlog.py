"""dstack event-log replay against the real dstack quote (28 entries, RTMR0..3)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import dcap_qvl
import pytest

from teecloud.attestation import eventlog
from teecloud.attestation.errors import EventLogMismatch, MalformedEvidence
from teecloud.attestation.models import EventLogEntry


@pytest.fixture(scope="module")
def report(vectors: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads((vectors / "tdx/dstack_quote_report.json").read_text())
    return data


@pytest.fixture(scope="module")
def rtmrs(report: dict[str, str]) -> list[bytes]:
    r = dcap_qvl.parse_quote(bytes.fromhex(report["quote"])).report
    return [bytes(getattr(r, f"rt_mr{i}")) for i in range(4)]


def _tamper(report: dict[str, str], index: int, **changes: object) -> str:
    raw = json.loads(report["event_log"])
    raw[index].update(changes)
    return json.dumps(raw)


def test_runtime_event_digest_formula() -> None:
    payload = bytes.fromhex("3763bc34552cf3a27ff71ad5f7a90471562a1a2d")
    expected = hashlib.sha384(struct.pack("<I", 0x08000001) + b":app-id:" + payload).digest()
    assert eventlog.runtime_event_digest("app-id", payload) == expected
    assert len(expected) == 48
    assert eventlog.RUNTIME_EVENT_TYPE == 0x08000001


def test_parse_real_log(report: dict[str, str]) -> None:
    entries = eventlog.parse_event_log(report["event_log"])
    assert len(entries) == 28
    rtmr3 = [e.event for e in entries if e.imr == 3]
    assert rtmr3 == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "key-provider",
        "system-ready",
        "LIUM_MINER_HOTKEY",
    ]
    # bytes input works too, and the JSON round-trips
    assert eventlog.parse_event_log(report["event_log"].encode()) == entries
    assert eventlog.parse_event_log(eventlog.event_log_to_json(entries)) == entries


def test_replay_matches_quote(report: dict[str, str], rtmrs: list[bytes]) -> None:
    entries = eventlog.parse_event_log(report["event_log"])
    replayed = eventlog.replay_rtmrs(entries)
    assert replayed == rtmrs
    assert replayed[3].hex().startswith("0f787c3877f3e950")
    assert replayed[3].hex().endswith("147185a8")


def test_verify_extracts_app_info(report: dict[str, str], rtmrs: list[bytes]) -> None:
    entries = eventlog.parse_event_log(report["event_log"])
    app = eventlog.verify_event_log(entries, rtmrs)
    assert app.app_id.hex() == "3763bc34552cf3a27ff71ad5f7a90471562a1a2d"
    assert app.compose_hash.hex().startswith(
        "3763bc34552cf3a27ff71ad5f7a90471562a1a2df552dfc1998cba2d60da27e7"
    )
    assert len(app.compose_hash) == 32
    assert app.instance_id.hex() == "c3714eb66990eace777b4e664c16e09375dec4c9"
    assert json.loads(app.key_provider_info)["name"] == "local-sgx"
    assert app.os_image_hash == b""  # not measured in this (non-KMS) boot
    assert app.events[-1][0] == "LIUM_MINER_HOTKEY"


def test_derive_app_info_formulas(report: dict[str, str], rtmrs: list[bytes]) -> None:
    quote = bytes.fromhex(report["quote"])
    r = dcap_qvl.parse_quote(quote).report
    m = {"mrtd": r.mr_td, **{f"rtmr{i}": rtmrs[i] for i in range(4)}}
    m |= {"mr_config_id": r.mr_config_id, "mr_owner": r.mr_owner, "mr_owner_config": r.mr_owner_config}
    entries = eventlog.parse_event_log(report["event_log"])
    app = eventlog.derive_app_info(m, entries, device_id=b"\x01" * 32)
    kp = app.key_provider_info
    base = m["mrtd"] + rtmrs[0] + rtmrs[1] + rtmrs[2]
    assert app.mr_system == hashlib.sha256(base + hashlib.sha256(kp).digest()).digest()
    assert app.mr_aggregated == hashlib.sha256(base + rtmrs[3]).digest()  # config ids are all zero here
    assert app.device_id == b"\x01" * 32
    # non-zero config id is appended (all three)
    m2 = dict(m, mr_owner=b"\x02" * 48)
    app2 = eventlog.derive_app_info(m2, entries)
    assert (
        app2.mr_aggregated
        == hashlib.sha256(base + rtmrs[3] + m["mr_config_id"] + b"\x02" * 48 + m["mr_owner_config"]).digest()
    )


def test_tampered_payload_names_the_event(report: dict[str, str], rtmrs: list[bytes]) -> None:
    text = _tamper(report, 22, event_payload="00" * 32)  # compose-hash
    with pytest.raises(EventLogMismatch) as info:
        eventlog.verify_event_log(eventlog.parse_event_log(text), rtmrs)
    assert "event #22 'compose-hash'" in info.value.reason
    assert info.value.step == "event_log_verified"


def test_recomputed_digest_still_breaks_replay(report: dict[str, str], rtmrs: list[bytes]) -> None:
    fake = bytes(32)
    text = _tamper(
        report, 22, event_payload=fake.hex(), digest=eventlog.runtime_event_digest("compose-hash", fake).hex()
    )
    with pytest.raises(EventLogMismatch, match="RTMR3 does not match the quote"):
        eventlog.verify_event_log(eventlog.parse_event_log(text), rtmrs)


def test_tampered_firmware_digest(report: dict[str, str], rtmrs: list[bytes]) -> None:
    text = _tamper(report, 3, digest="11" * 48)
    with pytest.raises(EventLogMismatch, match="RTMR0 does not match"):
        eventlog.verify_event_log(eventlog.parse_event_log(text), rtmrs)


def test_extra_event_after_quote_is_named(report: dict[str, str], rtmrs: list[bytes]) -> None:
    entries = eventlog.parse_event_log(report["event_log"])
    extra = EventLogEntry(
        3, eventlog.RUNTIME_EVENT_TYPE, eventlog.runtime_event_digest("late", b"x"), "late", b"x"
    )
    with pytest.raises(EventLogMismatch) as info:
        eventlog.verify_event_log([*entries, extra], rtmrs)
    assert "event #28 'late'" in info.value.reason and "first 8" in info.value.reason


def test_removed_event(report: dict[str, str], rtmrs: list[bytes]) -> None:
    entries = eventlog.parse_event_log(report["event_log"])
    del entries[21]  # app-id
    with pytest.raises(EventLogMismatch, match="RTMR3"):
        eventlog.verify_event_log(entries, rtmrs)


def test_identity_events_after_system_ready_are_ignored(report: dict[str, str], rtmrs: list[bytes]) -> None:
    entries = eventlog.parse_event_log(report["event_log"])
    late = EventLogEntry(
        3,
        eventlog.RUNTIME_EVENT_TYPE,
        eventlog.runtime_event_digest("compose-hash", b"\xee" * 32),
        "compose-hash",
        b"\xee" * 32,
    )
    app = eventlog.extract_app_info([*entries, late])
    assert app.compose_hash != b"\xee" * 32
    assert app.events[-1] == ("compose-hash", b"\xee" * 32)


def test_duplicate_identity_event_before_ready_is_rejected(report: dict[str, str]) -> None:
    entries = eventlog.parse_event_log(report["event_log"])
    dup = entries[21]  # app-id
    with pytest.raises(EventLogMismatch, match="second 'app-id'"):
        eventlog.extract_app_info([*entries[:22], dup, *entries[22:]])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{}",
        "not json",
        "[1]",
        '[{"imr": 4, "event_type": 1, "digest": "00"}]',
        '[{"imr": true, "event_type": 1, "digest": "00"}]',
        '[{"imr": 0, "event_type": -1, "digest": "00"}]',
        '[{"imr": 0, "event_type": 1, "digest": "zz"}]',
        '[{"imr": 0, "event_type": 1, "digest": ""}]',
        '[{"imr": 0, "event_type": 1, "digest": "' + "00" * 49 + '"}]',
        '[{"imr": 0, "event_type": 1, "digest": "00", "event": 5}]',
        '[{"imr": 0, "event_type": 1, "digest": "00", "event_payload": "0"}]',
        "[" * 100000,
    ],
)
def test_malformed_logs(text: str) -> None:
    with pytest.raises(MalformedEvidence) as info:
        eventlog.parse_event_log(text)
    assert info.value.step == "event_log_verified"


def test_log_limits() -> None:
    from teecloud.attestation._limits import VerifierLimits

    entry = {"imr": 0, "event_type": 1, "digest": "00" * 48}
    with pytest.raises(MalformedEvidence, match="entries"):
        eventlog.parse_event_log(json.dumps([entry] * 11), limits=VerifierLimits(max_event_log_entries=10))
    with pytest.raises(MalformedEvidence, match="limit"):
        eventlog.parse_event_log(" " * 101, limits=VerifierLimits(max_event_log_size=100))


def test_digests_other_than_48_bytes_are_refused() -> None:
    """No padding rule to guess: a digest is exactly 48 bytes, parsed or built in code."""
    rtmrs = [bytes(48)] * 4
    with pytest.raises(MalformedEvidence, match="exactly 48"):
        eventlog.verify_event_log([EventLogEntry(1, 1, b"\xab" * 32)], rtmrs)
    short = {"imr": 1, "event_type": 1, "digest": "ab" * 32, "event": "", "event_payload": ""}
    with pytest.raises(MalformedEvidence, match="exactly 48 bytes"):
        eventlog.parse_event_log(json.dumps([short]))


def test_wrong_rtmr_shape() -> None:
    with pytest.raises(MalformedEvidence):
        eventlog.verify_event_log([], [bytes(48)] * 3)
