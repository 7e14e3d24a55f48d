"""Keep a size-bounded corpus from a fuzzing run in the repository (fuzz/corpus/<target>/).

    python3 fuzz/keep_corpus.py TARGET WORKDIR [--budget 600000]

libFuzzer keeps only inputs that added coverage; this copies the smallest of them (named by their SHA-1, as
libFuzzer names them) until `budget` bytes, replacing what was kept for TARGET before. The whole corpus stays
under 5 MB with the default budget for the eight targets; fuzz/run.py seeds every later run with it.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
DEFAULT_BUDGET = 600_000


def keep(target: str, workdir: Path, budget: int = DEFAULT_BUDGET) -> tuple[int, int]:
    """Returns (files kept, bytes kept)."""
    files = sorted(
        (p for p in workdir.iterdir() if p.is_file() and not p.name.startswith("seed-")),
        key=lambda p: (p.stat().st_size, p.name),
    )
    dest = CORPUS / target
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    kept = total = 0
    seen: set[str] = set()
    for path in files:
        data = path.read_bytes()
        if total + len(data) > budget:
            break
        name = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        if name in seen:
            continue
        seen.add(name)
        (dest / name).write_bytes(data)
        kept += 1
        total += len(data)
    return kept, total


def main() -> int:
    ap = argparse.ArgumentParser(description="Keep a size-bounded fuzzing corpus in the repository.")
    ap.add_argument("target")
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    args = ap.parse_args()
    kept, total = keep(args.target, args.workdir, args.budget)
    print(f"{args.target}: kept {kept} inputs, {total} bytes, in {CORPUS / args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
