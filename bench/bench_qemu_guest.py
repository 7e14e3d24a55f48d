"""The guest image's figures (docs/benchmarks.md, "QEMU guest image"): `teecloud image build` cached (a
cache hit), the assembly of an image from the cached Debian rootfs (squashfs, verity, initramfs: what a
change of the agent or the init costs), optionally the whole first build (`--first`: mmdebstrap from
deb.debian.org into a fresh cache), and the TCG boot of the built image to agent-ready through
QemuBackend.launch (then stop), `--boots` times. Baseline of the boot: the labelled test guest of
bench_qemu.py (busybox initramfs only) in the same run.

    python3 bench/bench_qemu_guest.py [--boots 3] [--first]

Needs scripts/setup.sh (QEMU, OVMF, Debian's cloud kernel, mmdebstrap, squashfs-tools, cryptsetup-bin) and
root. Bounded: at most 10 boots, each with a 600 s agent timeout.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from teecloud.agent.boot import normalize_app_compose
from teecloud.image.build import build_image, guest_image_fields
from teecloud.image.testguest import build_test_guest_initramfs
from teecloud.node.instance import InstanceStore
from teecloud.node.runtime.base import ResourceLimits
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig
from teecloud.node.runtime.qemu_cmdline import GuestImage

KERNEL_DIR = Path("/var/cache/teecloud/guest-kernel")


def _boots(image: GuestImage, home: Path, n: int) -> tuple[list[float], list[float]]:
    backend = QemuBackend(
        QemuBackendConfig(
            image=image, mode="plain", accel="tcg", host_share="vvfat", disk_gb=1, agent_timeout_s=600
        ),
        home=home,
    )
    compose = normalize_app_compose(
        {"name": "b", "runner": "docker-compose", "docker_compose_file": "services:\n  b:\n    image: x\n"}
    )
    ready, stops = [], []
    for _ in range(n):
        inst = InstanceStore(home).create(
            app_compose=compose.encode(),
            app_id=b"\x22" * 20,
            name=f"b{len(ready)}",
            encrypted_env=None,
            user_config=None,
            sys_config={},
            limits=ResourceLimits(memory_mb=1024),
        )
        t = time.perf_counter()
        cvm = backend.launch(inst, ResourceLimits(memory_mb=1024))
        ready.append(time.perf_counter() - t)
        t = time.perf_counter()
        cvm.remove()
        stops.append(time.perf_counter() - t)
    return ready, stops


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} s (min {min(xs):.1f}, max {max(xs):.1f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--first", action="store_true", help="also the whole first build (mmdebstrap)")
    args = ap.parse_args()
    boots = max(1, min(args.boots, 10))
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        if args.first:
            t = time.perf_counter()
            first = build_image(cache=home / "cache")
            rows.append(
                ("first build (mmdebstrap + assembly, empty cache)", f"{time.perf_counter() - t:.1f} s")
            )
            rows.append(("  of which rootfs (mmdebstrap)", f"{first.timings.get('rootfs', 0):.1f} s"))
        t = time.perf_counter()
        built = build_image(out=home / "img", force=True)
        rows.append(
            ("assembly from the cached rootfs (squashfs + verity + initramfs)", f"{built.seconds:.1f} s")
        )
        rows.append(("  of which mksquashfs + veritysetup", f"{built.timings.get('squashfs', 0):.1f} s"))
        t = time.perf_counter()
        hit = build_image()
        rows.append((f"cached build (a cache hit: {hit.cached})", f"{time.perf_counter() - t:.2f} s"))
        sizes = {p.name: p.stat().st_size for p in built.path.iterdir()}
        rows.append(
            (
                "image size: rootfs.img.verity / initramfs.cpio.gz",
                f"{sizes['rootfs.img.verity'] / 1e6:.0f} MB / {sizes['initramfs.cpio.gz'] / 1e6:.1f} MB",
            )
        )
        image = GuestImage(**guest_image_fields(built.path))  # type: ignore[arg-type]
        ready, stops = _boots(image, home / "a", boots)
        rows.append(("TCG boot of the built image to agent-ready (OVMF, 1 vCPU, 1 GB)", _fmt(ready)))
        rows.append(("  stop + remove", _fmt(stops)))
        # baseline, same run: the busybox-only test guest (no verity rootfs, no python)
        initrd = home / "testguest.gz"
        initrd.write_bytes(build_test_guest_initramfs(modules_dir=KERNEL_DIR / "modules"))
        test_guest = GuestImage(
            bios=image.bios, kernel=image.kernel, initrd=initrd, cmdline="console=ttyS0 panic=1"
        )
        base, _ = _boots(test_guest, home / "b", boots)
        rows.append(("baseline: the test guest to agent-ready, same run", _fmt(base)))
        rows.append(
            (
                "ratio built image / test guest (median)",
                f"{statistics.median(ready) / statistics.median(base):.2f}",
            )
        )
    print("| step | time |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
