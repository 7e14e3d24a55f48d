#!/usr/bin/env python3
"""Upgrade flows of teecloud.cloud (issue 17), for examples/hello (image prebuilt), on a local cloud in this
process under a temporary data directory:

  compose-hash          plan_compose: read + whole compose policy + normalized app-compose.json + hash
  pending upgrade       upgrade to a hash the app's timelock has not let through: node check + chain check
                        + finding (or queuing) the governance call; the app keeps running (no rollout)
  allowed upgrade       upgrade to an allowed hash: chain check, rollout (stop, new compose, boot, keys),
                        external attestation, until the app answers HTTP again
  commit                the timelocked call executed (`--commit`) and the new version rolled out and serving

    python3 bench/bench_upgrade.py [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
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


def variant(tmp: Path, tag: str) -> Path:
    d = tmp / tag
    d.mkdir(exist_ok=True)
    text = (HELLO / "docker-compose.yml").read_text()
    text = text.replace("GREETING=hello", f"GREETING={tag}").replace('"8080:8080"', '"127.0.0.1::8080"')
    (d / "docker-compose.yml").write_text(text)
    return d / "docker-compose.yml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = max(1, min(args.runs, 10))

    spec = importlib.util.spec_from_file_location("hello_build_image", HELLO / "build_image.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.build()

    with tempfile.TemporaryDirectory(prefix="bench-upgrade-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["TEECLOUD_HOME"] = str(tmp / "home")
        from teecloud.cloud.deploy import Session, deploy, upgrade
        from teecloud.cloud.options import AppOptions, plan_compose
        from teecloud.devstack import LocalCloud

        cloud = LocalCloud(tmp / "home", dev_time_travel=True)
        cloud.start()
        session = Session(tmp / "home")
        plan_s: list[float] = []
        allowed_s: list[float] = []
        pending_s: list[float] = []
        commit_s: list[float] = []
        try:
            opts = AppOptions.build(env={"SECRET": "bench"})
            for i in range(20):
                t0 = time.perf_counter()
                plan_compose(variant(tmp, f"p{i}"), opts, name="bench")
                plan_s.append(time.perf_counter() - t0)
            r = deploy(session, variant(tmp, "v0"), opts, name="bench")
            if r.status != "running":
                raise SystemExit(f"deploy failed: {r.error}")
            for i in range(runs):
                t0 = time.perf_counter()
                u = upgrade(session, "bench", variant(tmp, f"a{i}"))
                wait_http(session.node.get("bench").urls[0] + "/health")
                allowed_s.append(time.perf_counter() - t0)
                if u.status != "running":
                    raise SystemExit(f"upgrade failed: {u.error}")
            chain = session.chain
            timelock = chain.deploy_timelock(chain.address, 3600)
            r2 = deploy(session, variant(tmp, "t0"), opts, name="benchtl", app_id=None)
            from teecloud.cloud.governance import transfer_ownership

            transfer_ownership(chain, "0x" + r2.app_id, to=timelock)
            # the timelock accepts: queue accept_ownership, skip its delay (dev chain), execute
            from teecloud.chain.connection import abi_of

            tl = chain.timelock(timelock)
            cid = tl.queue("0x" + r2.app_id, abi_of("AppAuth").encode_call("accept_ownership"))
            chain.increase_time(3601)
            tl.execute(cid)
            for i in range(runs):
                new = variant(tmp, f"t{i + 1}")
                t0 = time.perf_counter()
                p = upgrade(session, "benchtl", new)
                pending_s.append(time.perf_counter() - t0)
                if p.status != "pending":
                    raise SystemExit(f"expected pending, got {p.status}")
                chain.increase_time(3601)
                t0 = time.perf_counter()
                c = upgrade(session, "benchtl", new, commit=True)
                wait_http(session.node.get("benchtl").urls[0] + "/health")
                commit_s.append(time.perf_counter() - t0)
                if c.status != "running":
                    raise SystemExit(f"commit failed: {c.error}")
        finally:
            for inst in cloud.node.store.all() if cloud.node else []:
                cloud.node.remove(inst.instance_id)
            session.close()
            cloud.stop()

    med = statistics.median
    print(f"\n{'flow':<58}{'median s':>10}{'min s':>10}{'max s':>10}")

    def row(name: str, values: list[float]) -> None:
        print(f"{name:<58}{med(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}")

    row("compose-hash (plan_compose, 20 runs)", plan_s)
    row("upgrade, pending under a timelock (app untouched)", pending_s)
    row("upgrade, allowed (owner direct) -> attested and serving", allowed_s)
    row("upgrade --commit (execute timelocked call) -> serving", commit_s)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
