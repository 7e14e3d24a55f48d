"""Every input that once crashed (or leaked under) fuzz/run.py, replayed: only teecloud's own errors may
come out. Inputs live in fuzz/regressions/<target>/ (the target names of fuzz/run.py)."""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from teecloud.attestation import nitro
from teecloud.attestation.errors import MalformedEvidence

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
REGRESSIONS = sorted((FUZZ / "regressions").glob("*/*.bin"))


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("teecloud_fuzz_run", FUZZ / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_regressions_exist() -> None:
    assert REGRESSIONS, "fuzz/regressions/<target>/*.bin holds the inputs that once crashed the harness"


@pytest.mark.parametrize("path", REGRESSIONS, ids=[f"{p.parent.name}/{p.name}" for p in REGRESSIONS])
def test_fuzz_regression(harness: ModuleType, path: Path) -> None:
    target = path.parent.name
    assert target in harness.TARGETS, f"unknown fuzz target directory {target!r}"
    harness.run_target(target, path.read_bytes())  # raises only on a non-teecloud error


def _live(kinds: tuple[type, ...]) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kinds))


def test_invalid_utf8_in_nitro_cbor_leaks_nothing() -> None:
    # cbor2's C decoder kept every CBORDecodeValueError (and its frames, holding the input) alive when a
    # text string was not UTF-8: the fuzzing run's out-of-memory. The Nitro parser must not leak them.
    import cbor2
    import cbor2._types

    kinds = (cbor2.CBORDecodeError, cbor2._types.CBORDecodeError, UnicodeDecodeError)
    doc = b"\x84\x43\xa1\x01\x38\x22\xa0\x63\xff\xfe\xfd\x58\x60" + bytes(96)
    before = _live(kinds)
    for _ in range(200):
        with pytest.raises(MalformedEvidence):
            nitro.parse_nitro_document(doc)
    assert _live(kinds) - before < 5


CORPUS = FUZZ / "corpus"
CORPUS_TARGETS = sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) if CORPUS.is_dir() else []


def test_kept_corpus_is_size_bounded() -> None:
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024, f"fuzz/corpus holds {total} bytes"


@pytest.mark.parametrize("target", CORPUS_TARGETS)
def test_kept_corpus_replays(harness: ModuleType, target: str) -> None:
    # Every input the campaign kept (it reached new coverage) still ends in teecloud's own errors or passes.
    assert target in harness.TARGETS
    for path in sorted((CORPUS / target).iterdir()):
        harness.run_target(target, path.read_bytes())
