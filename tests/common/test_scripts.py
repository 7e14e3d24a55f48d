"""scripts/dockerd.sh stops only the engine it started, by the PID it recorded; no script or test stops
processes by name (pkill/killall would take down every other user's engine or server on the machine)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "dockerd.sh"


def _stop(tools: Path) -> str:
    env = {**os.environ, "TEECLOUD_TOOLS": str(tools)}
    return subprocess.run(
        ["bash", str(SCRIPT), "stop"], env=env, check=True, capture_output=True, text=True
    ).stdout


def test_stop_kills_only_the_recorded_dockerd(tmp_path: Path) -> None:
    # a stand-in process whose command name is "dockerd" (a copy of sleep), as if dockerd.sh had started it
    fake = tmp_path / "dockerd"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    ours = subprocess.Popen([str(fake), "60"])
    other = subprocess.Popen([str(fake), "60"])  # another "dockerd" this script did not start
    try:
        (tmp_path / "dockerd.pid").write_text(str(ours.pid))
        assert f"stopped {ours.pid}" in _stop(tmp_path)
        assert ours.wait(10) is not None
        assert other.poll() is None  # untouched
        assert not (tmp_path / "dockerd.pid").exists()
    finally:
        for p in (ours, other):
            if p.poll() is None:
                p.terminate()
                p.wait(10)


def test_stop_refuses_a_recorded_pid_that_is_not_dockerd(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "dockerd.pid").write_text(str(bystander.pid))  # a stale file whose PID was reused
        assert "no dockerd started by this script" in _stop(tmp_path)
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        bystander.terminate()
        bystander.wait(10)


def test_no_script_or_test_kills_by_name() -> None:
    pattern = re.compile(r"\b(pkill|killall)\b")
    offenders = []
    for top in ("scripts", "tests", "bench", "fuzz", ".ci"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in (".sh", ".py", "") and path != Path(__file__):
                text = path.read_text(errors="replace")
                offenders += [
                    f"{path.relative_to(ROOT)}: {line.strip()}"
                    for line in text.splitlines()
                    if pattern.search(line) and not line.lstrip().startswith("#")
                ]
    assert not offenders, offenders
