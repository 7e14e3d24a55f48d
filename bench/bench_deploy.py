#!/usr/bin/env python3
"""Deploy -> attested and serving, for examples/hello (image prebuilt), with the boot-phase breakdown.

Starts a local cloud (chain + KMS + node) in this process under a temporary data directory, then deploys
examples/hello N times (each deploy registers a new app on chain, encrypts one env var, boots a CVM, verifies
its attestation from outside, and waits for its HTTP answer), removing each CVM afterwards.
Baseline in the same run: a bare `docker-compose up` of the same compose file (no TEE, no keys, no volume
encryption, no attestation). Goal: deploy -> attested and serving <= 5 s.

    python3 bench/bench_deploy.py [--runs 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello"


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"{url} never answered")


def baseline(tmp: Path) -> float:
    d = tmp / "baseline"
    d.mkdir(exist_ok=True)
    (d / "docker-compose.yml").write_text(
        (HELLO / "docker-compose.yml").read_text().replace('"8080:8080"', '"127.0.0.1:18080:8080"')
    )
    from teecloud.node.runtime.docker import detect_compose

    cmd = [*detect_compose(), "-p", "tc-bench-baseline", "-f", str(d / "docker-compose.yml")]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "up", "-d"], check=True, capture_output=True)
    wait_http("http://127.0.0.1:18080/health")
    elapsed = time.perf_counter() - t0
    subprocess.run([*cmd, "down", "-v", "-t", "1"], check=True, capture_output=True)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location("hello_build_image", HELLO / "build_image.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build()

    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["TEECLOUD_HOME"] = str(tmp / "home")
        from teecloud.cloud.deploy import Session, deploy
        from teecloud.devstack import LocalCloud

        cloud = LocalCloud(tmp / "home")
        t0 = time.perf_counter()
        cloud.start()
        up_s = time.perf_counter() - t0
        session = Session(tmp / "home")
        rows = []
        try:
            for i in range(args.runs):
                t0 = time.perf_counter()
                r = deploy(
                    session,
                    HELLO / "docker-compose.yml",
                    name=f"bench{i}",
                    env={"SECRET": "bench"},
                    allowed_envs=["SECRET"],
                )
                if r.status != "running" or not (r.verdict and r.verdict.ok):
                    raise SystemExit(f"deploy failed: {r.error or r.verdict.reason}")
                attested = time.perf_counter() - t0
                wait_http(r.urls[0] + "/health")
                serving = time.perf_counter() - t0
                rows.append((attested, serving, r.timings, r.boot_timings))
                session.node.remove(r.instance_id)
            base = [baseline(tmp) for _ in range(min(3, args.runs))]
        finally:
            session.close()
            cloud.stop()

    med = statistics.median
    print(f"local cloud start (fresh data dir): {up_s:.2f} s")
    print(f"\n{'phase':<34}{'median s':>10}{'min s':>10}{'max s':>10}")

    def row(name: str, values: list[float]) -> None:
        print(f"{name:<34}{med(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}")

    for key in ("registering", "env"):
        row(f"client: {key}", [r[2].get(key, 0.0) for r in rows])
    for key in ("measuring", "keys", "env", "storage", "agent", "starting", "healthy"):
        row(f"  node boot: {key}", [r[3].get(key, 0.0) for r in rows])
    row("client: boot (incl. polling)", [r[2].get("boot", 0.0) for r in rows])
    row("client: external attestation", [r[2].get("attest", 0.0) for r in rows])
    row("deploy -> attested", [r[0] for r in rows])
    row("deploy -> attested and serving", [r[1] for r in rows])
    row("baseline: bare compose up -> serving", base)
    goal = med([r[1] for r in rows])
    print(f"\ngoal <= 5 s: {'met' if goal <= 5 else 'NOT met'} (median {goal:.2f} s, {args.runs} runs)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
