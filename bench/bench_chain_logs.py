"""Benchmark eth_getLogs on the embedded chain: the receipts path (embedded.py) against eth-tester's
get_logs (the answer before, and the named baseline), on one chain of N blocks with events, N = 100/200/400.
Plain script: prints a table, and with --profile where eth-tester's time goes (cProfile, top functions).

    python3 bench/bench_chain_logs.py [--sizes 100,200,400] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.chain.logs_helpers import EventChain, eth_tester_logs  # noqa: E402

from teecloud.chain import EmbeddedChain  # noqa: E402


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,200,400")
    ap.add_argument("--profile", action="store_true", help="cProfile eth-tester's path at the middle size")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    print(f"# machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} (1 min) at start")
    with tempfile.TemporaryDirectory() as tmp:
        chain = EmbeddedChain(Path(tmp) / "chain")
        ec = EventChain(chain)
        rng = random.Random(1)
        pool = [rng.randbytes(32) for _ in range(4)]
        print(
            f"{'blocks':>6} {'logs':>5} | {'filter':<22} | {'eth-tester s':>12} {'receipts s':>10} "
            f"{'(cached) s':>10} | {'ratio':>7}"
        )
        for n in sizes:
            while int(ec.tester.get_block_by_number("latest")["number"]) < n:
                e = rng.randrange(len(ec.emitters))
                ec.emit(e, [rng.choice(pool) for _ in range(ec.emitters[e][1])], rng.randbytes(32))
            address = ec.emitters[3][0]
            filters = {
                "whole range": {"fromBlock": "earliest", "toBlock": "latest"},
                "whole, one address": {"fromBlock": "0x0", "address": address},
                "last 10 blocks": {"fromBlock": hex(n - 9), "toBlock": "latest"},
            }
            for name, flt in filters.items():
                chain._logs_cache.clear()  # the first answer builds the per-block cache
                cold, got = timed(lambda flt=flt: chain.request("eth_getLogs", [flt]), 1)
                warm, _ = timed(lambda flt=flt: chain.request("eth_getLogs", [flt]), 5)
                base, want = timed(lambda flt=flt: eth_tester_logs(chain, flt), 1)
                assert got == want, name  # the same answer, field by field
                print(
                    f"{n:>6} {len(got):>5} | {name:<22} | {base:>12.3f} {cold:>10.4f} {warm:>10.4f} | "
                    f"{base / cold:>6.0f}x"
                )
            if args.profile and n == sizes[len(sizes) // 2]:
                prof = cProfile.Profile()
                prof.runcall(eth_tester_logs, chain, filters["whole range"])
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(12)
                print(buf.getvalue())
        print(f"# load average {os.getloadavg()[0]:.2f} (1 min) at end")
        chain.close()


if __name__ == "__main__":
    main()
