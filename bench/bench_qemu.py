"""The qemu backend's figures (docs/benchmarks.md, "QEMU backend"): build of the test guest's initramfs (first
and again: the same bytes), reference measurements of Debian's kernel (RTMR1 Authenticode, RTMR2), and TCG
boot to agent-ready of the labelled TEST GUEST through QemuBackend.launch (then stop), `--boots` times.

    python3 bench/bench_qemu.py [--boots 3]

Needs scripts/setup.sh (QEMU, OVMF, Debian's cloud kernel and modules). Bounded: at most 10 boots, each
with a 180 s agent timeout.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from teecloud.agent.boot import normalize_app_compose
from teecloud.image.tdx import rtmr1_events, rtmr2_events
from teecloud.image.testguest import build_test_guest_initramfs
from teecloud.node.instance import InstanceStore
from teecloud.node.runtime.base import ResourceLimits
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig
from teecloud.node.runtime.qemu_cmdline import GuestImage

KERNEL_DIR = Path("/var/cache/teecloud/guest-kernel")
OVMF = Path("/usr/share/OVMF/OVMF_CODE.fd")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=3)
    args = ap.parse_args()
    boots = max(1, min(args.boots, 10))
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        t = time.perf_counter()
        initrd = build_test_guest_initramfs(modules_dir=KERNEL_DIR / "modules")
        first = time.perf_counter() - t
        t = time.perf_counter()
        again = build_test_guest_initramfs(modules_dir=KERNEL_DIR / "modules")
        second = time.perf_counter() - t
        same = hashlib.sha256(initrd).digest() == hashlib.sha256(again).digest()
        rows.append(("test-guest initramfs build, first", f"{first:.2f} s ({len(initrd) / 1e6:.1f} MB)"))
        rows.append((f"test-guest initramfs build, again (same bytes: {same})", f"{second:.2f} s"))
        (home / "initrd.gz").write_bytes(initrd)

        kernel = (KERNEL_DIR / "vmlinuz").read_bytes()
        t = time.perf_counter()
        rtmr1_events(kernel, initrd_size=len(initrd), memory_bytes=2 << 30)
        rows.append(
            (
                f"RTMR1 events ({len(kernel) / 1e6:.1f} MB kernel, patch + Authenticode)",
                f"{time.perf_counter() - t:.3f} s",
            )
        )
        t = time.perf_counter()
        rtmr2_events("console=ttyS0 panic=1", initrd)
        rows.append(("RTMR2 events", f"{time.perf_counter() - t:.3f} s"))

        image = GuestImage(
            bios=OVMF,
            kernel=KERNEL_DIR / "vmlinuz",
            initrd=home / "initrd.gz",
            cmdline="console=ttyS0 panic=1",
        )
        backend = QemuBackend(
            # the test guest runs no app: no `docker save` of its images
            QemuBackendConfig(
                image=image, mode="plain", accel="tcg", host_share="vvfat", disk_gb=1, docker=None
            ),
            home=home,
        )
        backend.check()
        compose = normalize_app_compose(
            {
                "name": "b",
                "runner": "docker-compose",
                "docker_compose_file": "services:\n  a:\n    image: x\n",
            }
        ).encode()
        inst = InstanceStore(home).create(
            app_compose=compose,
            app_id=b"\x22" * 20,
            name="b",
            encrypted_env=None,
            user_config=None,
            sys_config={},
            limits=ResourceLimits(memory_mb=512),
        )
        ready, stops = [], []
        for _ in range(boots):
            cvm = backend.launch(inst, inst.limits())
            ready.append(cvm.timings["agent-ready"])
            t = time.perf_counter()
            cvm.stop()
            stops.append(time.perf_counter() - t)
        rows.append(
            (
                f"TCG boot to agent-ready (OVMF, 1 vCPU, 512 MB), median of {boots}",
                f"{statistics.median(ready):.1f} s (min {min(ready):.1f}, max {max(ready):.1f})",
            )
        )
        rows.append(
            (
                "stop (QMP powerdown, then quit after 5 s: the test guest has no ACPI handler)",
                f"{statistics.median(stops):.1f} s",
            )
        )
    print("| step | time |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
