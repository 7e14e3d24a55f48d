"""Networked presigning benchmark (issue 19): presignature rounds among five RUNNING threshold KMS node
processes at 3-of-5 (teecloud.kms.threshold_net over kms.peering's mutual RA-TLS channel), driven through
their admin listeners as `teecloud up` does; baseline in the same run: the same batch with every
participant's math in this one process (keys.threshold_ecdsa.presign_local, no network, no TLS).

    python bench/bench_tnet.py [--reps 3] [--batches 1,16]

The local cloud (`teecloud up --kms-nodes 5 --threshold 3`: five `teecloud kms up` processes, embedded
chain) starts in a temporary TEECLOUD_HOME; its own start already ran the DKG, the signing-key DKG and one
batch of 16 presignatures (timed here as `start`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-tnet-") as tmp:
        home = Path(tmp) / "home"
        os.environ["TEECLOUD_HOME"] = str(home)
        from teecloud.devstack import LocalCloud
        from teecloud.keys import threshold_ecdsa as te
        from teecloud.kms.launcher import load_admin_token
        from teecloud.kms.threshold import node_home
        from teecloud.kms.threshold_net import AdminEndpoint, run_presign_round

        cloud = LocalCloud(home, kms_nodes=5, kms_threshold=3)
        t0 = time.perf_counter()
        cloud.start(check=False, resume=False)
        start_s = time.perf_counter() - t0
        try:
            nodes = {}
            for i in range(1, 6):
                ep = json.loads((node_home(i, home) / "kms" / "endpoint.json").read_text())
                nodes[i] = AdminEndpoint(ep["admin_url"], load_admin_token(node_home(i, home)), ep["url"])
            keys = te.dkg_local(3, 5)
            rows = []
            for b in batches:
                net, local = [], []
                for _ in range(args.reps):
                    t1 = time.perf_counter()
                    run_presign_round(nodes, b, 3)
                    net.append((time.perf_counter() - t1) * 1000)
                    t2 = time.perf_counter()
                    for _ in range(b):
                        te.presign_local(keys, [1, 2, 3, 4, 5])
                    local.append((time.perf_counter() - t2) * 1000)
                rows.append((b, statistics.median(net), min(net), statistics.median(local)))
        finally:
            cloud.stop()
    print(f"local cloud start (DKG + signing-key DKG + 16 presignatures, 5 processes): {start_s:.1f} s")
    print("| batch | networked round, median ms (min) | per presignature ms | one-process math ms | ratio |")
    print("|---|---|---|---|---|")
    for b, med, lo, loc in rows:
        print(f"| {b} | {med:.0f} ({lo:.0f}) | {med / b:.0f} | {loc:.0f} | {med / loc:.2f} |")
    print(f"load average: {os.getloadavg()[0]:.1f}, cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
