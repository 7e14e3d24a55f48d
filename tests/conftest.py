"""Shared fixtures: every test gets its own TEECLOUD_HOME; the real vectors are used in place."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors"


@pytest.fixture(autouse=True)
def teecloud_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("teecloud-home")
    monkeypatch.setenv("TEECLOUD_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS} (expected ../shared/vectors beside the repo)")
    return VECTORS
