"""The embedded chain's journal and its state never diverge: failed writes, crashes between mining and
journaling, torn and damaged journals (issue 10, F2)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from teecloud.chain import DEV_KEYS, ChainClient, ChainError, ChainStateError, EmbeddedChain
from teecloud.chain import embedded as embedded_mod
from teecloud.chain.client import LocalTransport

from .helpers import rand32

OWNER = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"  # DEV_KEYS[0]


def _open(home: Path, **kw: object) -> ChainClient:
    return ChainClient(LocalTransport(EmbeddedChain(home / "chain", **kw)), DEV_KEYS[0], home=home)  # type: ignore[arg-type]


def _state(c: ChainClient) -> tuple[str, int]:
    """(head block hash, the owner's nonce)"""
    head = c.rpc_call("eth_getBlockByNumber", "latest", False)["hash"]
    return head, int(c.rpc_call("eth_getTransactionCount", OWNER, "latest"), 16)


def _journal(home: Path) -> Path:
    return home / "chain" / "journal.jsonl"


@pytest.mark.parametrize(
    ("failing", "code"),
    [("_write", errno.ENOSPC), ("_write", errno.EMFILE), ("_fsync", errno.EIO), ("short", errno.ENOSPC)],
)
def test_failed_journal_write_rolls_the_block_back(
    teecloud_home: Path, monkeypatch: pytest.MonkeyPatch, failing: str, code: int
) -> None:
    c = _open(teecloud_home)
    c.deploy()
    before = _state(c)
    size = _journal(teecloud_home).stat().st_size

    real_write = embedded_mod._Journal._write

    def fail(self: object, *a: object) -> int:
        raise OSError(code, os.strerror(code))

    def short(self: embedded_mod._Journal, data: memoryview) -> int:
        if len(data) > 10:  # half of the entry reaches the file, then the disk is full
            real_write(self, data[: len(data) // 2])
        raise OSError(code, os.strerror(code))

    name = "_write" if failing == "short" else failing
    with monkeypatch.context() as m:
        m.setattr(embedded_mod._Journal, name, short if failing == "short" else fail)
        with pytest.raises(ChainError, match=r"could not record the block.*nothing was mined"):
            c.register_app(None, rand32())
        with pytest.raises(ChainError, match="could not record"):
            c.rpc_call("evm_mine")
    # nothing happened: same head, same nonce, the journal cut back to its last good length
    assert _state(c) == before
    assert _journal(teecloud_home).stat().st_size == size
    # the freed nonce is used by the next transaction (no gap), and a restart replays to the same chain
    app = c.register_app(None, h := rand32())
    after = _state(c)
    assert after[1] == before[1] + 1
    c.close()
    c2 = _open(teecloud_home)
    assert _state(c2) == after
    assert c2.is_compose_hash_allowed(app, h)
    c2.close()


def test_clock_change_is_written_ahead(teecloud_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = _open(teecloud_home)
    c.deploy()
    t0 = c.timestamp()

    def fail(self: object, *a: object) -> int:
        raise OSError(errno.EIO, "I/O error")

    with monkeypatch.context() as m:
        m.setattr(embedded_mod._Journal, "_write", fail)
        with pytest.raises(ChainError, match="could not record the time change"):
            c.rpc_call("evm_increaseTime", 10_000)
    c.rpc_call("evm_mine")
    assert c.timestamp() < t0 + 10_000  # the clock did not move
    c.close()


def test_damaged_journal_refuses_writes_and_restart_repairs(
    teecloud_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _open(teecloud_home)
    c.deploy()
    before = _state(c)
    real_write = embedded_mod._Journal._write

    def short(self: embedded_mod._Journal, data: memoryview) -> int:
        real_write(self, data[:20])
        raise OSError(errno.EIO, "I/O error")

    def no_truncate(self: object, size: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    with monkeypatch.context() as m:
        m.setattr(embedded_mod._Journal, "_write", short)
        m.setattr(embedded_mod._Journal, "_truncate", no_truncate)
        with pytest.raises(ChainError, match="could not record"):
            c.register_app(None, rand32())
    # the torn bytes stay in the file: nothing may be appended after them, reads still work
    with pytest.raises(ChainError, match=r"journal is damaged.*restart"):
        c.register_app(None, rand32())
    assert _state(c) == before
    c.close()
    c2 = _open(teecloud_home)
    assert c2.transport.chain.torn_tail  # type: ignore[attr-defined]
    assert _state(c2) == before
    c2.register_app(None, rand32())
    c2.close()
    assert all(json.loads(line) for line in _journal(teecloud_home).read_text().splitlines())


def test_out_of_file_descriptors_still_journals(teecloud_home: Path) -> None:
    """EMFILE was seen in the field: the journal's descriptor is held open, so a process at its descriptor
    limit still records (and answers) transactions."""
    code = textwrap.dedent(
        """
        import os, resource, sys
        from pathlib import Path
        from teecloud.chain import DEV_KEYS, ChainClient, EmbeddedChain
        from teecloud.chain.client import LocalTransport
        home = Path(sys.argv[1])
        c = ChainClient(LocalTransport(EmbeddedChain(home / "chain")), DEV_KEYS[0], home=home)
        c.deploy()
        c.register_app(None, os.urandom(32))  # warm every lazy import before the limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == 24, exc
        app = c.register_app(None, b"\\x11" * 32)
        print(app, c.block_number())
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(teecloud_home)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    app, head = r.stdout.split()
    c = _open(teecloud_home)
    assert c.block_number() == int(head)
    assert c.is_compose_hash_allowed(app, b"\x11" * 32)
    c.close()


_CRASH_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from teecloud.chain import DEV_KEYS, ChainClient, EmbeddedChain
    from teecloud.chain import embedded
    from teecloud.chain.client import LocalTransport
    home, when = Path(sys.argv[1]), sys.argv[2]
    c = ChainClient(LocalTransport(EmbeddedChain(home / "chain")), DEV_KEYS[0], home=home)
    c.deploy()
    real = embedded._Journal.append

    def pause(self, entry):
        # the test hook: stop between mining the block and returning, and wait for kill -9
        if when == "after":
            real(self, entry)
        (home / "paused").write_text(str(c.block_number()))
        time.sleep(600)

    embedded._Journal.append = pause
    c.register_app(None, os.urandom(32))
    """
)


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_9_between_mining_and_journaling(teecloud_home: Path, when: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, str(teecloud_home), when])
    try:
        marker = teecloud_home / "paused"
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, "the child exited before pausing"
            assert time.monotonic() < deadline, "the child never paused"
            time.sleep(0.05)
        time.sleep(0.1)
        mined_head = int(marker.read_text())  # the block that was mined in memory
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    c = _open(teecloud_home)  # the lock died with the child
    head = c.block_number()
    # before: the block was never journaled, nobody was told about it, it is gone; after: it is kept
    assert head == (mined_head - 1 if when == "before" else mined_head)
    nonce = c.rpc_call("eth_getTransactionCount", OWNER, "latest")
    app = c.register_app(None, h := rand32())  # the next transaction takes the next nonce
    assert c.rpc_call("eth_getTransactionCount", OWNER, "latest") == hex(int(nonce, 16) + 1)
    after = _state(c)
    c.close()
    c2 = _open(teecloud_home)
    assert _state(c2) == after and c2.is_compose_hash_allowed(app, h)
    c2.close()


def test_journal_that_does_not_replay_stops_the_start_and_repair_keeps_the_rest(
    teecloud_home: Path,
) -> None:
    """The shape the old bug left: a transaction missing from the journal, so the next one has a nonce gap."""
    c = _open(teecloud_home)
    c.deploy()
    apps = [(c.register_app(None, h), h) for h in (rand32(), rand32(), rand32())]
    c.close()
    journal = _journal(teecloud_home)
    lines = journal.read_text().splitlines()
    del lines[-2]  # apps[1] lost: apps[2]'s transaction now has a nonce gap
    journal.write_text("\n".join(lines) + "\n")
    with pytest.raises(ChainStateError, match=r"line \d+ does not replay .*nonce.*teecloud chain repair"):
        EmbeddedChain(teecloud_home / "chain")
    c2 = _open(teecloud_home, repair=True)
    rejected = c2.transport.chain.rejected  # type: ignore[attr-defined]
    assert len(rejected) == 1 and "nonce" in rejected[0]["reason"].lower()
    assert c2.is_compose_hash_allowed(apps[0][0], apps[0][1])
    c2.register_app(None, rand32())  # usable again
    c2.close()
    kept = (teecloud_home / "chain" / "journal.rejected.jsonl").read_text().splitlines()
    assert json.loads(kept[0])["entry"] == lines[-1]
    EmbeddedChain(teecloud_home / "chain").close()  # and a plain start works from now on


def test_cli_repair(teecloud_home: Path) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app as cli

    c = _open(teecloud_home)
    c.deploy()
    c.register_app(None, rand32())
    c.register_app(None, rand32())
    c.close()
    journal = _journal(teecloud_home)
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-2] + lines[-1:]) + "\n")
    r = CliRunner().invoke(cli, ["chain", "status"])
    assert r.exit_code == 1 and "teecloud chain repair" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["chain", "repair"])
    assert r.exit_code == 0, r.output
    assert "set aside line" in r.output and "journal.rejected.jsonl" in r.output
    r = CliRunner().invoke(cli, ["chain", "status"])
    assert r.exit_code == 0 and "KmsAuth" in r.output, r.output
