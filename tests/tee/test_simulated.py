"""SimulatedTdx: persistent dev root, measurements, event log, thread safety."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path

import pytest
from cryptography import x509

from teecloud.tee import SimulatedTeeStateError, TeePlatform, TeeUsageError
from teecloud.tee import simulated as sim
from teecloud.tee.simulated import SimulatedTdx, runtime_event_digest


def _replay(entries) -> list[bytes]:
    rtmrs = [bytes(48)] * 4
    for e in entries:
        rtmrs[e.imr] = hashlib.sha384(rtmrs[e.imr] + e.digest.ljust(48, b"\0")).digest()
    return rtmrs


def test_implements_tee_platform_protocol() -> None:
    tee = SimulatedTdx()
    assert isinstance(tee, TeePlatform)
    assert tee.kind == "tdx-simulated"


def test_dev_root_created_under_data_home_with_dev_cn(teecloud_home: Path) -> None:
    tee = SimulatedTdx()
    state = teecloud_home / "simulated-tee"
    assert tee.state_dir == state
    assert (state / "root_ca.der").read_bytes() == tee.dev_root_der()
    root = x509.load_der_x509_certificate(tee.dev_root_der())
    cn = root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert str(cn).startswith("teecloud Development Root CA")
    assert sim.DEV_ROOT_CN_PREFIX == "teecloud Development Root CA"
    assert (state / "root_ca.key.pem").stat().st_mode & 0o077 == 0  # private keys are owner-only
    assert not [p for p in teecloud_home.iterdir() if p.name.endswith(".tmp")]


def test_dev_root_is_reused_across_instances(teecloud_home: Path) -> None:
    a = SimulatedTdx()
    before = {p.name: p.read_bytes() for p in (teecloud_home / "simulated-tee").iterdir() if p.is_file()}
    b = SimulatedTdx(teecloud_home, os_image="other-image")
    assert a.dev_root_der() == b.dev_root_der()
    assert a.device_id == b.device_id and a.fmspc == b.fmspc
    after = {p.name: p.read_bytes() for p in (teecloud_home / "simulated-tee").iterdir() if p.is_file()}
    assert before == after


def test_concurrent_first_use_creates_one_root(teecloud_home: Path) -> None:
    roots: list[bytes] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            roots.append(SimulatedTdx().dev_root_der())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(roots)) == 1
    assert (teecloud_home / "simulated-tee" / "root_ca.der").read_bytes() == roots[0]


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("root_ca.der", b"\x30\x03garbage"),
        ("pck.key.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
        ("platform.json", b"{not json"),
    ],
)
def test_corrupt_state_is_reported_not_overwritten(teecloud_home: Path, name: str, damage: bytes) -> None:
    SimulatedTdx()
    target = teecloud_home / "simulated-tee" / name
    target.write_bytes(damage)
    with pytest.raises(SimulatedTeeStateError, match="corrupt") as info:
        SimulatedTdx()
    assert (
        name.split(".")[0] in str(info.value) or "platform" in str(info.value) or "Error" in str(info.value)
    )
    assert target.read_bytes() == damage  # untouched


def test_mismatched_key_is_reported(teecloud_home: Path) -> None:
    SimulatedTdx()
    state = teecloud_home / "simulated-tee"
    (state / "pck.key.pem").write_bytes((state / "tcb_signing.key.pem").read_bytes())
    with pytest.raises(SimulatedTeeStateError, match="does not match"):
        SimulatedTdx()


def test_partial_state_is_reported_not_regenerated(teecloud_home: Path) -> None:
    tee = SimulatedTdx()
    state = teecloud_home / "simulated-tee"
    (state / "pck.key.pem").unlink()
    with pytest.raises(SimulatedTeeStateError, match=r"missing pck\.key\.pem"):
        SimulatedTdx()
    assert not (state / "pck.key.pem").exists()
    assert (state / "root_ca.der").read_bytes() == tee.dev_root_der()


def test_foreign_root_is_reported(teecloud_home: Path, tmp_path: Path) -> None:
    SimulatedTdx()
    other = SimulatedTdx(tmp_path / "h2")
    state = teecloud_home / "simulated-tee"
    (state / "root_ca.der").write_bytes(other.dev_root_der())
    with pytest.raises(SimulatedTeeStateError):
        SimulatedTdx()


def test_unrelated_content_in_state_dir_is_reported(teecloud_home: Path) -> None:
    state = teecloud_home / "simulated-tee"
    state.mkdir()
    (state / "notes.txt").write_text("mine")
    with pytest.raises(SimulatedTeeStateError, match="no dev root"):
        SimulatedTdx()
    assert (state / "notes.txt").read_text() == "mine"


def test_empty_state_dir_is_filled(teecloud_home: Path) -> None:
    (teecloud_home / "simulated-tee").mkdir()
    SimulatedTdx()
    assert (teecloud_home / "simulated-tee" / "root_ca.der").is_file()


def test_measurements_are_derived_from_os_image() -> None:
    a, b, c = SimulatedTdx(), SimulatedTdx(), SimulatedTdx(os_image="teecloud-sim-os-0.2")
    assert a.measurements() == b.measurements()
    assert a.os_image_hash == sim.os_image_hash_for("teecloud-sim-os-0.1")
    assert len(a.os_image_hash) == 32
    for reg in ("mrtd", "rtmr0", "rtmr1", "rtmr2"):
        assert a.measurements()[reg] != c.measurements()[reg]
        assert len(a.measurements()[reg]) == 48
    assert a.measurements()["rtmr3"] == bytes(48)
    assert SimulatedTdx(cpu_count=8).measurements()["rtmr0"] != a.measurements()["rtmr0"]
    assert SimulatedTdx(cpu_count=8).measurements()["rtmr1"] == a.measurements()["rtmr1"]


def test_event_log_replays_to_all_four_rtmrs() -> None:
    tee = SimulatedTdx()
    tee.emit_event("app-id", bytes(20))
    tee.emit_event("compose-hash", b"\x11" * 32)
    tee.emit_event("boot-mr-done", b"")
    log = tee.event_log()
    assert {e.imr for e in log} == {0, 1, 2, 3}
    m = tee.measurements()
    assert _replay(log) == [m[f"rtmr{i}"] for i in range(4)]
    boot = [e for e in log if e.imr < 3]
    assert all(e.event_payload == b"" and len(e.digest) == 48 for e in boot)
    runtime = [e for e in log if e.imr == 3]
    assert [(e.event, e.event_payload) for e in runtime] == [
        ("app-id", bytes(20)),
        ("compose-hash", b"\x11" * 32),
        ("boot-mr-done", b""),
    ]
    assert all(e.event_type == 0x08000001 for e in runtime)


def test_runtime_event_digest_formula_and_known_vector(vectors: Path) -> None:
    expected = hashlib.sha384(struct.pack("<I", 0x08000001) + b":app-id:" + b"\x01\x02").digest()
    assert runtime_event_digest("app-id", b"\x01\x02") == expected
    # dstack's real event log: every RTMR3 entry's digest matches the formula.
    report = json.loads((vectors / "tdx" / "dstack_quote_report.json").read_text())
    for entry in json.loads(report["event_log"]):
        if entry["imr"] == 3:
            digest = runtime_event_digest(entry["event"], bytes.fromhex(entry["event_payload"]))
            assert digest.hex() == entry["digest"]


def test_event_log_entries_are_dstack_json() -> None:
    tee = SimulatedTdx()
    tee.emit_event("custom", b"\xff")
    doc = [e.to_json() for e in tee.event_log()]
    assert set(doc[-1]) == {"imr", "event_type", "digest", "event", "event_payload"}
    assert doc[-1]["event_payload"] == "ff" and len(doc[-1]["digest"]) == 96


def test_instances_have_independent_rtmr_state() -> None:
    a, b = SimulatedTdx(), SimulatedTdx()
    a.emit_event("x", b"1")
    assert b.measurements()["rtmr3"] == bytes(48)
    assert a.measurements()["rtmr3"] != bytes(48)


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("", b""),
        ("a:b", b""),
        ("bad\nname", b""),
        ("x" * 300, b""),
        ("ok", "str"),
        ("ok", b"\0" * (1 << 20 + 1)),
    ],
)
def test_emit_event_rejects_bad_input(name: str, payload: bytes) -> None:
    tee = SimulatedTdx()
    before = tee.measurements()
    with pytest.raises(TeeUsageError):
        tee.emit_event(name, payload)
    assert tee.measurements() == before


def test_extend_rtmr() -> None:
    tee = SimulatedTdx()
    before = tee.measurements()["rtmr2"]
    tee.extend_rtmr(2, b"\x01" * 32)
    assert tee.measurements()["rtmr2"] == hashlib.sha384(before + b"\x01" * 32 + bytes(16)).digest()
    for index, digest in ((4, b""), (-1, b""), (3, b"\0" * 49)):
        with pytest.raises(TeeUsageError):
            tee.extend_rtmr(index, digest)


def test_concurrent_events_and_quotes_stay_consistent() -> None:
    tee = SimulatedTdx()
    quotes: list[bytes] = []

    def work(n: int) -> None:
        for i in range(25):
            tee.emit_event(f"ev-{n}-{i}", bytes([i]))
            quotes.append(tee.quote(bytes([n])))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = tee.event_log()
    assert len([e for e in log if e.imr == 3]) == 100
    assert _replay(log)[3] == tee.measurements()["rtmr3"]
    # every quote carries an RTMR3 that is a prefix-replay of the final log
    prefixes = set()
    r = bytes(48)
    prefixes.add(r)
    for e in (e for e in log if e.imr == 3):
        r = hashlib.sha384(r + e.digest).digest()
        prefixes.add(r)
    assert all(q[48 + 520 - 48 : 48 + 520] in prefixes for q in quotes)


def test_vm_config_is_dstack_shaped() -> None:
    tee = SimulatedTdx(cpu_count=4, memory_size=4 << 30)
    cfg = tee.vm_config()
    assert cfg["os_image_hash"] == tee.os_image_hash.hex()
    assert (cfg["cpu_count"], cfg["memory_size"]) == (4, 4 << 30)
    json.dumps(cfg)


def test_collateral_is_persisted_by_fmspc_and_refreshed_when_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datetime as dt

    tee = SimulatedTdx()
    path = tee.collateral_path()
    first = tee.collateral()
    assert path.name == f"{tee.fmspc}.json" and path.read_bytes() == first
    assert tee.collateral() == first  # fresh: reused
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=25)
    monkeypatch.setattr(sim, "_now", lambda: later)
    second = tee.collateral()
    assert second != first and path.read_bytes() == second
    info = json.loads(json.loads(second)["tcb_info"])
    assert info["issueDate"] <= later.strftime("%Y-%m-%dT%H:%M:%SZ") < info["nextUpdate"]


def test_corrupt_collateral_file_is_rebuilt() -> None:
    tee = SimulatedTdx()
    tee.collateral()
    tee.collateral_path().write_text("{}")
    fresh = SimulatedTdx()  # a new instance (no in-memory copy) reads the file, finds it bad, rebuilds it
    assert json.loads(fresh.collateral())["tcb_info"]
    assert json.loads(tee.collateral_path().read_text())["tcb_info"]
