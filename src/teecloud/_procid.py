"""Which process a recorded pid names (review 11, R11-3).

A pid alone names whatever process the kernel gave it to last, and a process's command line is chosen by
whoever started it (and world-readable), so neither tells a process that outlives its parent (a QEMU VM,
a `teecloud up`) from a later one holding its pid. A record of such a process therefore also keeps what a
later process cannot share with it: its start time (proc(5), /proc/PID/stat field 22, clock ticks after
boot: fixed for the life of a pid, never equal for a reused one), its executable (/proc/PID/exe) and its
owner (the real and effective uid of /proc/PID/status). Linux only, as the rest of the node runtime.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_RECORD", "ProcessIdentity", "RecordError", "process_identity", "process_start_time"]

MAX_RECORD = 4096  # bytes of a record file read at most
_PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT
_DELETED = " (deleted)"  # proc(5): /proc/PID/exe of a binary replaced on disk since (a package upgrade)


class RecordError(ValueError):
    """A process record that is not one `ProcessIdentity.to_json` writes."""


def process_start_time(pid: int) -> int | None:
    """Field 22 (starttime) of /proc/PID/stat; None when the process is gone or the file is unreadable.
    The fields are counted after the last `)`: the command name (field 2) may hold spaces and parentheses."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        fields = stat.rpartition(b")")[2].split()
        return int(fields[19])  # fields[0] is field 3 (state)
    except (OSError, ValueError, IndexError):
        return None


def _uids(pid: int) -> tuple[int, int] | None:
    """The real and effective uid of process `pid` (/proc/PID/status `Uid:`)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_bytes().splitlines():
            if line.startswith(b"Uid:"):
                real, effective = (int(v) for v in line.split()[1:3])
                return real, effective
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time: int
    exe: str
    uid: int

    def to_json(self, kind: str) -> bytes:
        doc = {
            "format": kind,
            "pid": self.pid,
            "start_time": self.start_time,
            "exe": self.exe,
            "uid": self.uid,
        }
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, kind: str) -> ProcessIdentity:
        """Strict: exactly the fields `to_json` writes, of their types and ranges (a bool is no int)."""
        if len(data) > MAX_RECORD:
            raise RecordError(f"larger than {MAX_RECORD} bytes")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than json parses
            raise RecordError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) != {"format", "pid", "start_time", "exe", "uid"}:
            raise RecordError("not an object of format, pid, start_time, exe and uid")
        if doc["format"] != kind:
            raise RecordError(f"format {str(doc['format'])[:40]!r}, not {kind!r}")
        ints = [doc["pid"], doc["start_time"], doc["uid"]]
        if any(type(v) is not int for v in ints):
            raise RecordError("pid, start_time and uid are integers")
        if (
            not 1 <= doc["pid"] < _PID_MAX
            or not 0 <= doc["start_time"] < 1 << 63
            or not 0 <= doc["uid"] < 1 << 32
        ):
            raise RecordError("pid, start_time or uid out of range")
        exe = doc["exe"]
        if type(exe) is not str or not exe.startswith("/") or "\0" in exe or len(exe) > 1024:
            raise RecordError("exe is an absolute path")
        return cls(doc["pid"], doc["start_time"], exe, doc["uid"])

    def matches(self, uid: int) -> bool:
        """The process this record names still runs (same pid, start time and executable), owned by `uid`
        (the caller's: real and effective uid), as recorded. An executable replaced on disk since the
        launch (/proc/PID/exe then ends in " (deleted)") is still the recorded one: the start time pins the
        process, and exec (which alone changes /proc/PID/exe) into another path would show that path."""
        now = process_identity(self.pid)
        return (
            now is not None
            and now.start_time == self.start_time
            and now.exe in (self.exe, self.exe + _DELETED)
            and now.uid == self.uid == uid
        )


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of the running process `pid`; None when it is gone, unreadable (another user's
    /proc/PID/exe is readable only with ptrace rights), or its real and effective uid differ."""
    start = process_start_time(pid)
    uids = _uids(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    if start is None or uids is None or uids[0] != uids[1]:
        return None
    # read again: the pid could have been reused between the reads above
    if process_start_time(pid) != start:
        return None
    return ProcessIdentity(pid, start, exe, uids[0])
