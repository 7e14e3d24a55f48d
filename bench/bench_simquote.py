"""Simulated TDX quote generation rate (and set-up cost), against the cost of one raw ECDSA P-256 signature
(the baseline: a quote needs exactly one) and of verifying the quote with dcap-qvl.

Run: python3 bench/bench_simquote.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dcap_qvl
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.tee.simulated import SimulatedTdx


def rate(fn: Callable[[], object], seconds: float) -> tuple[float, float]:
    """(operations per second, mean ms per operation) over about `seconds`."""
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed, 1000 * elapsed / n


def once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-simquote-"))
    os.environ["TEECLOUD_HOME"] = str(home)

    rows: list[tuple[str, str, str]] = []
    rows.append(("first use: create dev root + PKI (ms)", f"{once(lambda: SimulatedTdx(home)):.2f}", ""))
    rows.append(("open existing platform (ms)", f"{once(lambda: SimulatedTdx(home)):.2f}", ""))
    tee = SimulatedTdx(home)
    rows.append(("collateral, first build + write (ms)", f"{once(tee.collateral):.2f}", ""))
    rows.append(("collateral, cached read (ms)", f"{once(tee.collateral):.2f}", ""))

    key = ec.generate_private_key(ec.SECP256R1())
    data = os.urandom(632)
    ops, ms = rate(lambda: key.sign(data, ec.ECDSA(hashes.SHA256())), args.seconds)
    rows.append(("baseline: one ECDSA P-256 sign (ops/s)", f"{ops:,.0f}", f"{ms:.3f} ms"))
    ops, ms = rate(lambda: tee.quote(b"bench"), args.seconds)
    rows.append(("SimulatedTdx.quote (quotes/s)", f"{ops:,.0f}", f"{ms:.3f} ms"))
    ops_ev, ms_ev = rate(lambda: tee.emit_event("bench", b"x"), args.seconds / 2)
    rows.append(("SimulatedTdx.emit_event (events/s)", f"{ops_ev:,.0f}", f"{ms_ev:.3f} ms"))

    quote = tee.quote(b"bench")
    col = dcap_qvl.QuoteCollateralV3.from_json(tee.collateral().decode())
    root, now = tee.dev_root_der(), int(time.time())
    ops_v, ms_v = rate(lambda: dcap_qvl.verify_with_root_ca(quote, col, root, now), args.seconds)
    rows.append(("reference: dcap_qvl.verify_with_root_ca (verifies/s)", f"{ops_v:,.0f}", f"{ms_v:.3f} ms"))
    rows.append(("quote size (bytes)", f"{len(quote)}", ""))
    rows.append(("collateral size (bytes)", f"{len(tee.collateral())}", ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>12}  {'per op':>10}")
    print("-" * (width + 26))
    for name, value, per in rows:
        print(f"{name:<{width}}  {value:>12}  {per:>10}")


if __name__ == "__main__":
    main()
