"""configfs-tsm backends (TDX, SEV-SNP) against a fake configfs tree; no hardware needed."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
from pathlib import Path

import pytest

from teecloud.tee import QuoteGenerationError, TeeUnavailable, TeeUsageError
from teecloud.tee._ccel import parse_ccel
from teecloud.tee.configfs import TsmReport, tsm_provider
from teecloud.tee.sev_snp import SevSnpPlatform
from teecloud.tee.simulated import SimulatedTdx, runtime_event_digest
from teecloud.tee.tdx import TdxPlatform, qgs_get_quote, td_report_fields_from_quote

from .fake_configfs import FakeTsmKernel


def _sim_quote_maker() -> callable:
    sim = SimulatedTdx()
    return lambda inblob: sim.quote(inblob)


def _snp_report(inblob: bytes) -> bytes:
    report = bytearray(0x4A0)
    report[0] = 2
    report[0x50 : 0x50 + 64] = inblob.ljust(64, b"\0")
    report[0x90 : 0x90 + 48] = hashlib.sha384(b"launch").digest()
    return bytes(report)


def test_tdx_quote_via_configfs(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(tmp_path / "report", "tdx_guest", _sim_quote_maker())
    tdx = TdxPlatform(tsm_root=kernel.root, fs=kernel, measurements_dir=tmp_path / "none")
    quote = tdx.quote(b"nonce")
    assert td_report_fields_from_quote(quote)["report_data"] == b"nonce".ljust(64, b"\0")
    assert tdx.kind == "tdx"
    # the entry we created was removed
    assert kernel.entries_created and not any(kernel.root.iterdir())


def test_generation_mismatch_is_retried(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(tmp_path / "report", "tdx_guest", _sim_quote_maker(), interfere=2)
    tdx = TdxPlatform(tsm_root=kernel.root, fs=kernel)
    quote = tdx.quote(b"mine")
    assert kernel.outblob_reads == 3  # two interfered attempts, then a clean one
    assert td_report_fields_from_quote(quote)["report_data"] == b"mine".ljust(64, b"\0")


def test_generation_mismatch_gives_up_after_bounded_attempts(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(tmp_path / "report", "tdx_guest", _sim_quote_maker(), interfere=100)
    tsm = TsmReport(kernel.root, expected_provider="tdx_guest", fs=kernel, max_attempts=3)
    with pytest.raises(QuoteGenerationError, match="another process"):
        tsm.get(b"x")
    assert kernel.outblob_reads == 3
    assert not any(kernel.root.iterdir())


def test_wrong_provider_is_refused(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(tmp_path / "report", "sev_guest", _snp_report)
    with pytest.raises(TeeUnavailable, match=r"provider is 'sev_guest', expected 'tdx_guest'"):
        TdxPlatform(tsm_root=kernel.root, fs=kernel).quote(b"x")
    assert kernel.outblob_reads == 0


def test_report_data_mismatch_is_refused(tmp_path: Path) -> None:
    sim = SimulatedTdx()
    kernel = FakeTsmKernel(tmp_path / "report", "tdx_guest", lambda _inblob: sim.quote(b"something else"))
    with pytest.raises(QuoteGenerationError, match="report_data"):
        TdxPlatform(tsm_root=kernel.root, fs=kernel).quote(b"x")


def test_inblob_limit(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(tmp_path / "report", "tdx_guest", _sim_quote_maker())
    with pytest.raises(TeeUsageError):
        TdxPlatform(tsm_root=kernel.root, fs=kernel).quote(b"x" * 65)
    with pytest.raises(TeeUsageError):
        TsmReport(kernel.root, expected_provider=None, fs=kernel).get(b"x" * 65)


def test_missing_configfs_and_device(tmp_path: Path) -> None:
    tdx = TdxPlatform(tsm_root=tmp_path / "nope", device=tmp_path / "tdx_guest")
    with pytest.raises(TeeUnavailable, match="no TDX quote interface"):
        tdx.quote(b"x")
    assert tsm_provider(tmp_path / "nope") is None


def test_tsm_provider_probe(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(tmp_path / "report", "tdx_guest", _sim_quote_maker())
    assert tsm_provider(kernel.root, kernel) == "tdx_guest"
    assert not any(kernel.root.iterdir())


def test_snp_report_via_configfs(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(tmp_path / "report", "sev_guest", _snp_report, auxblob=b"certtable")
    snp = SevSnpPlatform(tsm_root=kernel.root, fs=kernel)
    report = snp.quote(b"rd")
    assert len(report) == 0x4A0 and report[0x50:0x52] == b"rd"
    assert snp.certificates(b"rd")[1] == b"certtable"
    assert snp.measurements()["measurement"] == hashlib.sha384(b"launch").digest()
    assert snp.kind == "sev_snp" and snp.event_log() == []
    with pytest.raises(TeeUnavailable):
        snp.emit_event("x", b"")
    with pytest.raises(TeeUnavailable):
        snp.extend_rtmr(3, b"")


def test_snp_refuses_tdx_provider_and_short_report(tmp_path: Path) -> None:
    kernel = FakeTsmKernel(tmp_path / "r1", "tdx_guest", _sim_quote_maker())
    with pytest.raises(TeeUnavailable, match="expected 'sev_guest'"):
        SevSnpPlatform(tsm_root=kernel.root, fs=kernel).quote(b"x")
    short = FakeTsmKernel(tmp_path / "r2", "sev_guest", lambda b: b"\x02" * 100)
    with pytest.raises(QuoteGenerationError, match="1184"):
        SevSnpPlatform(tsm_root=short.root, fs=short).quote(b"x")


def _fake_measurements(tmp_path: Path) -> Path:
    d = tmp_path / "measurements"
    d.mkdir()
    for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"):
        (d / f"{name}:sha384").write_bytes(bytes(48))
    return d


def test_emit_event_extends_rtmr3_via_sysfs_and_appends_log(tmp_path: Path) -> None:
    mdir = _fake_measurements(tmp_path)
    log = tmp_path / "log" / "runtime_events.log"
    tdx = TdxPlatform(tsm_root=tmp_path / "none", measurements_dir=mdir, event_log_path=log)
    tdx.emit_event("app-id", b"\x01" * 20)
    digest = runtime_event_digest("app-id", b"\x01" * 20)
    # the fake sysfs file just records what was written: exactly the 48-byte digest
    assert (mdir / "rtmr3:sha384").read_bytes() == digest
    line = json.loads(log.read_text().splitlines()[0])
    assert line == {
        "imr": 3,
        "event_type": 0x08000001,
        "digest": digest.hex(),
        "event": "app-id",
        "event_payload": "01" * 20,
    }
    assert [e.event for e in tdx.event_log()] == ["app-id"]
    tdx.extend_rtmr(2, b"\xab" * 32)
    assert (mdir / "rtmr2:sha384").read_bytes() == b"\xab" * 32 + bytes(16)
    assert tdx.measurements()["mrtd"] == bytes(48)


def test_extend_rtmr_without_sysfs_is_a_clear_error(tmp_path: Path) -> None:
    tdx = TdxPlatform(measurements_dir=tmp_path / "missing", event_log_path=tmp_path / "log")
    with pytest.raises(TeeUnavailable, match=r"6\.16"):
        tdx.extend_rtmr(3, bytes(48))
    with pytest.raises(TeeUnavailable):
        tdx.emit_event("x", b"")
    with pytest.raises(TeeUsageError):
        tdx.extend_rtmr(7, bytes(48))


def _ccel(events: list[tuple[int, int, bytes]]) -> bytes:
    spec = b"Spec ID Event03\0" + struct.pack("<IBBBB", 0, 0, 2, 0, 2) + struct.pack("<I", 2)
    spec += struct.pack("<HH", 0x4, 20) + struct.pack("<HH", 0xC, 48) + b"\0"
    out = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec
    for index, etype, d384 in events:
        out += struct.pack("<III", index, etype, 2)
        out += struct.pack("<H", 0x4) + hashlib.sha1(d384).digest() + struct.pack("<H", 0xC) + d384
        out += struct.pack("<I", 3) + b"abc"
    return out + b"\xff" * 64


def test_ccel_event_log_parses_to_rtmr_entries(tmp_path: Path) -> None:
    d = [hashlib.sha384(bytes([i])).digest() for i in range(4)]
    data = _ccel([(1, 0x80000001, d[0]), (2, 0x80000003, d[1]), (0, 3, d[2]), (3, 6, d[3])])
    entries = parse_ccel(data)
    assert [(e.imr, e.digest) for e in entries] == [(0, d[0]), (1, d[1]), (2, d[3])]
    (tmp_path / "CCEL").write_bytes(data)
    tdx = TdxPlatform(ccel_path=tmp_path / "CCEL", event_log_path=tmp_path / "none.log")
    assert len(tdx.event_log()) == 3
    with pytest.raises(QuoteGenerationError):
        parse_ccel(data[:100])


def test_qgs_protocol_over_a_socket() -> None:
    quote = b"Q" * 100
    a, b = socket.socketpair()

    def server() -> None:
        (size,) = struct.unpack(">I", b.recv(4))
        req = b""
        while len(req) < size:
            req += b.recv(size - len(req))
        major, _minor, mtype, total, _err = struct.unpack_from("<HHIII", req)
        assert (major, mtype, total) == (1, 0, size)
        report_size, _ = struct.unpack_from("<II", req, 16)
        assert req[24 : 24 + report_size] == b"R" * 1024
        body = struct.pack("<II", 0, len(quote)) + quote
        resp = struct.pack("<HHIII", 1, 0, 1, 16 + len(body), 0) + body
        b.sendall(struct.pack(">I", len(resp)) + resp)

    t = threading.Thread(target=server)
    t.start()
    assert qgs_get_quote(b"R" * 1024, lambda: a) == quote
    t.join()
    b.close()


def test_qgs_error_reply_is_reported() -> None:
    a, b = socket.socketpair()
    resp = struct.pack("<HHIII", 1, 0, 1, 24, 0x12) + struct.pack("<II", 0, 0)
    b.sendall(struct.pack(">I", len(resp)) + resp)
    with pytest.raises(QuoteGenerationError, match="0x12"):
        qgs_get_quote(b"R" * 1024, lambda: a)
    b.close()
