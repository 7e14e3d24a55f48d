"""Boot time added by the GPU gate (issue 21): boot() of the same app with and without
`"gpu_attestation": "required"`, on a simulated TDX with simulated GPUs (labelled: a real GPU's NVML call
and its evidence size differ), interleaved so machine load hits both alike; and the gate alone (collect +
verify + measure) for 1, 4 and 8 GPUs.

    python3 bench/bench_gpu_gate.py [--boots 40]

The key provider is the local development one (no KMS round trip), so the difference is the gate's own cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]


class ManyGpus:
    """n simulated GPUs, each with its own device key under one trusted development root set."""

    def __init__(self, gpus: list[Any]) -> None:
        self.gpus = gpus

    def collect(self, nonce: bytes) -> list[dict[str, Any]]:
        return [item for g in self.gpus for item in g.collect(nonce)]


def main() -> None:
    from teecloud.agent.boot import GpuGate, _run_gpu_gate, boot
    from teecloud.agent.keyprovider import LocalDevKeyProvider
    from teecloud.tee.gpu import SimulatedGpu
    from teecloud.tee.simulated import SimulatedTdx

    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=40)
    args = ap.parse_args()
    boots = max(1, min(args.boots, 1000))

    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        provider = LocalDevKeyProvider(home)
        gpu = SimulatedGpu(home)
        gate = GpuGate(gpu, trust_anchors=(gpu.root_der(),))
        plain = {
            "manifest_version": 2,
            "name": "bench",
            "runner": "docker-compose",
            "docker_compose_file": "",
        }
        with_gpu = {**plain, "gpu_attestation": "required"}
        times: dict[str, list[float]] = {"plain": [], "gpu": []}
        for i in range(boots + 2):
            for label, compose in (("plain", plain), ("gpu", with_gpu))[:: 1 if i % 2 else -1]:
                tee = SimulatedTdx(home)
                t0 = time.perf_counter()
                boot(tee, json.dumps(compose), None, None, provider, gpu=gate)
                if i >= 2:  # two warm-up rounds
                    times[label].append(time.perf_counter() - t0)
        diffs = [g - p for g, p in zip(times["gpu"], times["plain"], strict=True)]
        print(f"boot() without the gate: median {statistics.median(times['plain']) * 1e3:.2f} ms")
        print(
            f"boot() with the gate (1 simulated GPU): median {statistics.median(times['gpu']) * 1e3:.2f} ms"
        )
        print(f"added by the gate, paired median: {statistics.median(diffs) * 1e3:.2f} ms")

        for n in (1, 4, 8):
            gpus = [SimulatedGpu(home / f"gpu{k}") for k in range(n)]
            many = GpuGate(ManyGpus(gpus), trust_anchors=tuple(g.root_der() for g in gpus))
            gate_times = []
            for _ in range(max(5, boots // 2)):
                t0 = time.perf_counter()
                _run_gpu_gate(many, b"\x01" * 32)
                gate_times.append(time.perf_counter() - t0)
            print(f"gate alone, {n} simulated GPU(s): median {statistics.median(gate_times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
