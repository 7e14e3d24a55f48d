"""`teecloud up` without a cloud: LocalCloud replaced by a recorder of its keyword arguments (the CLI tests of
`up`'s options: tests/cli/test_up_qemu.py, tests/node/test_up_kms_url.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

import teecloud.devstack as devstack
from teecloud.cli import app
from teecloud.node.errors import NodeError


class _Recorder:
    """Stands in for LocalCloud: records its keyword arguments, and start() stops the command (exit 1)."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        _Recorder.calls.append(kwargs)

    def start(self) -> Any:
        raise NodeError("recorder: not starting a cloud in this test")


@pytest.fixture(name="up")
def up_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(devstack, "LocalCloud", _Recorder)
    _Recorder.calls = []

    def run(*argv: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["up", *argv], catch_exceptions=True)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        text = (result.stdout or "") + (result.stderr or "")
        assert "Traceback" not in text
        return result.exit_code, " ".join(text.split())

    return run
