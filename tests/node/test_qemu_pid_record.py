"""Review 11, R11-3: which process a VM's `qemu.pid` (and `teecloud up`'s endpoints.json) names. The record
holds the pid, its start time (/proc/PID/stat field 22), executable and uid, written atomically at launch
and parsed strictly; a process is adopted or powered off only while all of them match and it runs as the
node's user (and its command line names the VM's directory); `down` signals an `up` only while its start
time matches. An old record (a bare pid) is refused with a warning: the VM boots anew."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from teecloud._procid import ProcessIdentity, RecordError, process_identity, process_start_time
from teecloud.node.errors import RuntimeFailed
from teecloud.node.runtime import qemu
from tests.node.test_qemu_reattach_ports import _app, _fake_up


def _stand_in(workdir: Path, *, user: int | None = None) -> subprocess.Popen[bytes]:
    """A process whose command line names `workdir` (as a VM's QEMU's does), as `user` if given."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = ["/bin/sh", "-c", "sleep 60; :", "sh", str(workdir / "qmp.sock")]
    proc = subprocess.Popen(argv, user=user, group=user, cwd="/")
    deadline = time.monotonic() + 10
    while str(workdir).encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _write(workdir: Path, doc: Any) -> None:
    (workdir / "qemu.pid").write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())


def test_the_record_names_the_process_launch_wrote_it_for(tmp_path: Path) -> None:
    work = tmp_path / "vm"
    proc = _stand_in(work)
    try:
        assert qemu.record_vm(work, proc.pid)
        rec = qemu.read_vm_record(work)
        assert rec == process_identity(proc.pid) and rec is not None
        assert rec.start_time == process_start_time(proc.pid) and rec.uid == os.geteuid()
        assert rec.exe == os.readlink(f"/proc/{proc.pid}/exe")
        assert qemu.vm_pid(work) == proc.pid
        assert [p.name for p in work.iterdir()] == ["qemu.pid"]  # one atomic write, no temporary left
        assert qemu.power_off(work, "the stand-in") is True  # SIGKILL after the grace (no QMP socket)
        assert proc.poll() is not None and not (work / "qemu.pid").exists()
    finally:
        _stop(proc)
    gone = tmp_path / "gone"
    gone.mkdir()
    assert not qemu.record_vm(gone, proc.pid) and not (gone / "qemu.pid").exists()  # exited: no record


@pytest.fixture(autouse=True)
def _short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "STOP_GRACE_S", 0.2)


@pytest.mark.parametrize("field", ["start_time", "exe", "uid", "pid"])
def test_a_record_that_differs_in_one_field_names_no_vm(tmp_path: Path, field: str) -> None:
    """A record naming a live process whose start time (a reused pid), executable, or uid differs (or
    another pid: a record rewritten to name another process) is never adopted nor signalled."""
    work = tmp_path / "vm"
    proc = _stand_in(work)
    other = _stand_in(tmp_path / "other")
    try:
        rec = process_identity(proc.pid)
        assert rec is not None
        changed = {
            "start_time": replace(rec, start_time=rec.start_time + 1),
            "exe": replace(rec, exe="/usr/bin/qemu-system-x86_64"),
            "uid": replace(rec, uid=rec.uid + 1),
            "pid": replace(rec, pid=other.pid),
        }[field]
        (work / "qemu.pid").write_bytes(changed.to_json(qemu.PID_FORMAT))
        assert qemu.vm_pid(work) is None
        assert qemu.power_off(work, "a stand-in") is False
        assert proc.poll() is None and other.poll() is None
    finally:
        _stop(proc)
        _stop(other)


def test_an_old_bare_pid_record_is_refused_with_one_clear_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Written before R11-3: even naming a process whose command line names the directory, it is not
    adopted nor powered off (the VM boots anew), and the operator is told once what to do."""
    work = tmp_path / "vm"
    proc = _stand_in(work)
    try:
        (work / "qemu.pid").write_text(str(proc.pid))
        with caplog.at_level(logging.WARNING, logger="teecloud.node.runtime.qemu"):
            for _ in range(3):  # status calls: one warning
                assert qemu.vm_pid(work) is None
            assert qemu.power_off(work, "an old VM") is False
        warned = [r.getMessage() for r in caplog.records if "old record" in r.getMessage()]
        assert len(warned) == 1 and f"pid {proc.pid}" in warned[0] and "kill" in warned[0]
        assert proc.poll() is None
    finally:
        _stop(proc)


def _mutations(rng: random.Random, good: dict[str, Any]) -> list[tuple[str, Any]]:
    odd: list[Any] = [True, False, None, 1.0, -1, 2**63, 2**70, "1", [1], {"p": 1}, "", "rel/path", "/a\0b"]
    out: list[tuple[str, Any]] = []
    for _ in range(300):
        doc = dict(good)
        kind = rng.randrange(8)
        name = rng.choice(list(good))
        if kind == 0:
            doc[name] = rng.choice(odd)
        elif kind == 1:
            del doc[name]
        elif kind == 2:
            doc[rng.choice(["pid2", "PID", "start", "uid ", "version"])] = 1
        elif kind == 3:
            doc["format"] = rng.choice(["teecloud-qemu-pid-v2", "", None, 1, "teecloud-qemu-pid"])
        elif kind == 4:
            out.append(("not an object", json.dumps(rng.choice([[doc], "x", 1, None])).encode()))
            continue
        elif kind == 5:
            raw = json.dumps(doc).encode()
            out.append(("truncated", raw[: rng.randrange(len(raw))]))
            continue
        elif kind == 6:
            out.append(("oversized", json.dumps({**doc, "pad": "x" * rng.randint(4096, 9000)}).encode()))
            continue
        else:
            out.append(("nested", b"[" * rng.randint(1000, 4000)))
            continue
        out.append((f"mutation {kind}", doc))
    return out


def test_generated_malformed_records_name_no_vm(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """300 mutations of a valid record of a running stand-in (wrong types, a bool for an int, out of range,
    missing, extra or renamed names, another format, truncated, oversized, deeply nested): each parses to
    RecordError (never another exception), names no VM, and signals nothing."""
    work = tmp_path / "vm"
    proc = _stand_in(work)
    try:
        assert qemu.record_vm(work, proc.pid)
        good = json.loads((work / "qemu.pid").read_bytes())
        assert qemu.vm_pid(work) == proc.pid
        refused = 0
        for label, doc in _mutations(random.Random(3113), good):
            raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            try:
                rec = ProcessIdentity.from_json(raw, qemu.PID_FORMAT)
            except RecordError:
                refused += 1
                _write(work, raw)
                assert qemu.vm_pid(work) is None, label
                continue
            assert rec == ProcessIdentity.from_json(json.dumps(good).encode(), qemu.PID_FORMAT), (label, doc)
        assert refused >= 290
        assert qemu.power_off(work, "a stand-in") is False and proc.poll() is None
    finally:
        _stop(proc)


def test_another_users_process_is_never_adopted_even_under_its_own_true_record(tmp_path: Path) -> None:
    """The attacker's steps (a writer of the data directory, or a stale record and a reused pid): a process
    of another local user (uid 65534) whose command line names the VM's directory; its record holds its own
    true start time and executable, with its uid or with the node's. Never adopted, never signalled."""
    if os.geteuid() != 0:
        pytest.fail("this test starts a process as another user: run as root (CI does)")
    work = tmp_path / "vm"
    proc = _stand_in(work, user=65534)
    try:
        rec = process_identity(proc.pid)  # root reads another user's /proc/PID/exe
        assert rec is not None and rec.uid == 65534
        for forged in (rec, replace(rec, uid=os.geteuid())):
            (work / "qemu.pid").write_bytes(forged.to_json(qemu.PID_FORMAT))
            assert qemu.vm_pid(work) is None
            assert qemu.power_off(work, "another user's process") is False
        assert proc.poll() is None
    finally:
        _stop(proc)


def test_down_signals_an_up_only_while_its_start_time_matches(teecloud_home: Path) -> None:
    """endpoints.json naming a live `teecloud up`-looking process with another start time (a reused pid),
    or with none (an older record): not signalled, exit 1, named; with its own start time: signalled
    (tests/node/test_qemu_reattach_ports.py::test_down_signals_the_running_up)."""
    for start, why in (("1", "another start time"), ("none", "no start time")):
        proc = _fake_up(teecloud_home, "up", start)
        try:
            result = CliRunner().invoke(_app(), ["down"])
            output = " ".join(result.output.split())
            assert result.exit_code == 1 and why in output and "not signalled" in output, output
            time.sleep(0.2)
            assert proc.poll() is None and not (teecloud_home / "signal").exists()
        finally:
            _stop(proc)
        (teecloud_home / "cloud" / "endpoints.json").unlink()


def test_process_start_time_is_field_22_past_a_command_name_with_parentheses(tmp_path: Path) -> None:
    """proc(5): field 2 is `(comm)` and may hold spaces and `) (`, so the fields are counted after the last
    `)`; field 22 is the start in clock ticks after boot: with /proc/stat's btime it is the wall-clock start
    (checked against the clock, an independent source)."""
    script = tmp_path / "a) b (c"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(0o755)
    before = time.time()
    proc = subprocess.Popen([str(script)])
    try:
        deadline = time.monotonic() + 10
        while b"(a) b (c)" not in Path(f"/proc/{proc.pid}/stat").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = process_start_time(proc.pid)
        assert start is not None
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        started = btime + start / os.sysconf("SC_CLK_TCK")
        assert before - 2 <= started <= time.time() + 2, (before, started)
    finally:
        _stop(proc)
    assert process_start_time(proc.pid) is None and process_identity(proc.pid) is None


def test_without_pidfd_open_nothing_is_signalled_by_a_bare_pid(
    tmp_path: Path, teecloud_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without pidfd_open (ENOSYS): power_off and `down` fail with a named error and signal
    nothing (never a bare-pid kill, never a traceback)."""
    work = tmp_path / "vm"
    proc = _stand_in(work)
    up = _fake_up(teecloud_home, "up")
    try:
        assert qemu.record_vm(work, proc.pid)

        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
        with pytest.raises(RuntimeFailed, match="cannot hold QEMU pid"):
            qemu.power_off(work, "the stand-in")
        result = CliRunner().invoke(_app(), ["down"])
        assert result.exit_code == 1 and "cannot hold" in " ".join(result.output.split()), result.output
        time.sleep(0.2)
        assert proc.poll() is None and up.poll() is None
    finally:
        _stop(proc)
        _stop(up)
