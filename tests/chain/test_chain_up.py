"""`teecloud chain up` as a real process: JSON-RPC URL, clean stop on SIGINT/SIGTERM, state kept across
processes, and one owner per TEECLOUD_HOME (a second `chain up` fails clearly)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from teecloud.chain import DEV_KEYS, ChainClient, ChainError

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120.0  # first start compiles the contracts (2 cores, noisy)
STOP_TIMEOUT = 30.0
OWNER = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"  # DEV_KEYS[0]


class ChainUp:
    """One `teecloud chain up --port 0` process; its stdout and stderr are drained by threads."""

    def __init__(self, home: Path, *extra: str, sigint_ignored: bool = False) -> None:
        env = {
            **os.environ,
            "TEECLOUD_HOME": str(home),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("TEECLOUD_RPC_URL", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from teecloud.cli import main; main()",
                "chain",
                "up",
                "--port",
                "0",
                *extra,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            # as a shell starts a background job (`teecloud chain up &`): SIGINT inherited as ignored
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout, True), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _drain(self, stream: object, sink: list[str], forward: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)
            if forward:
                self.lines.put(line)

    def url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    self.join()
                    pytest.fail(f"chain up exited ({self.proc.returncode}): {''.join(self.stderr)}")
                continue
            m = re.search(r"RPC URL: (http://127\.0\.0\.1:\d+)", line)
            if m:
                return m.group(1)
        pytest.fail(f"chain up printed no RPC URL within {START_TIMEOUT:.0f} s: {''.join(self.stdout)}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # chain up dumps its threads' stacks to stderr
            time.sleep(2)
            self.kill()
            pytest.fail(
                f"chain up did not stop within {STOP_TIMEOUT:.0f} s of signal {sig}; "
                f"its threads:\n{self.err[-6000:]}"
            )
        self.join()
        return rc

    def wait(self, timeout: float = START_TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"chain up still running after {timeout:.0f} s")
        self.join()
        return rc

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.join()

    @property
    def err(self) -> str:
        return "".join(self.stderr)


def test_chain_up_serves_stops_and_keeps_state(teecloud_home: Path) -> None:
    procs: list[ChainUp] = []
    try:
        first = ChainUp(teecloud_home)
        procs.append(first)
        url = first.url()
        rpc_json = teecloud_home / "chain" / "rpc.json"
        assert json.loads(rpc_json.read_text())["url"] == url
        assert "KmsAuth: 0x" in "".join(first.stdout)

        # another process drives the chain through the URL
        with ChainClient.rpc(url, DEV_KEYS[0], home=teecloud_home) as c:
            kms = c.kms_auth
            app_id = c.register_app(OWNER, b"\x01" * 32)
            c.add_compose_hash(app_id, b"\x02" * 32)
            assert c.is_compose_hash_allowed(app_id, b"\x02" * 32)
            block = c.block_number()
        # ChainClient.embedded finds the running chain through rpc.json instead of opening the files
        with ChainClient.embedded(teecloud_home) as c:
            assert c.label == f"embedded via {url}" and c.is_registered(app_id)

        # a second `chain up` on the same home: refused clearly, while the first keeps serving
        second = ChainUp(teecloud_home)
        procs.append(second)
        assert second.wait() != 0
        assert f"already running at {url}" in second.err and "Traceback" not in second.err
        # without the URL record, the file lock still refuses it
        aside = rpc_json.with_name("rpc.json.aside")
        rpc_json.rename(aside)
        try:
            third = ChainUp(teecloud_home)
            procs.append(third)
            assert third.wait() != 0
            assert "in use by another process" in third.err and "Traceback" not in third.err
        finally:
            aside.rename(rpc_json)
        with ChainClient.rpc(url, DEV_KEYS[0], home=teecloud_home) as c:
            assert c.block_number() == block
            # time travel is off unless asked for: a local process cannot skip a delay through the RPC
            now = c.timestamp()
            for method in ("evm_increaseTime", "evm_mine"):
                with pytest.raises(ChainError, match=f"{method} is disabled.*--dev-time-travel"):
                    c.rpc_call(method, 86400) if method == "evm_increaseTime" else c.rpc_call(method)
            assert c.block_number() == block and c.timestamp() < now + 86400

        rc = first.stop(signal.SIGINT)
        assert rc in (0, 130), first.err
        assert "Traceback" not in first.err, first.err
        assert not rpc_json.exists()

        # a new process replays the journal: the app and both hashes are still there
        again = ChainUp(teecloud_home, "--dev-time-travel")
        procs.append(again)
        url2 = again.url()
        assert re.search(r"[1-9]\d* journal entries replayed", "".join(again.stdout))
        assert "time travel is on" in again.err
        with ChainClient.rpc(url2, DEV_KEYS[0], home=teecloud_home) as c:
            assert c.kms_auth == kms and c.block_number() == block
            t = c.timestamp()
            c.increase_time(86400)  # asked for explicitly: served
            assert c.timestamp() >= t + 86400
            block += 1
            state = c.app_state(app_id)
            assert state.registered and state.owner == OWNER
            assert set(state.allowed_compose_hashes) == {"0x" + "01" * 32, "0x" + "02" * 32}
        assert again.stop(signal.SIGTERM) == 0
        assert "Traceback" not in again.err, again.err
    finally:
        for p in procs:
            p.kill()


def test_chain_up_stops_on_sigint_even_when_started_with_sigint_ignored(teecloud_home: Path) -> None:
    """A shell without job control starts `chain up &` with SIGINT ignored, and Python keeps an inherited
    SIG_IGN (no KeyboardInterrupt): chain up handles SIGINT itself, so it still stops cleanly."""
    up = ChainUp(teecloud_home, sigint_ignored=True)
    try:
        up.url()
        assert up.stop(signal.SIGINT) == 0, up.err
        assert "Traceback" not in up.err
        assert not (teecloud_home / "chain" / "rpc.json").exists()
    finally:
        up.kill()
