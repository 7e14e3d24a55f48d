"""The guest image's figures (docs/benchmarks.md, "QEMU guest image"): `teecloud image build` cached (a
cache hit), the assembly of an image from the cached Debian rootfs (squashfs, verity, initramfs: what a
change of the agent or the init costs), optionally the whole first build (`--first`: mmdebstrap from
deb.debian.org into a fresh cache), and the TCG boots of a whole CVM of the built image: a local cloud with
`--backend qemu` (chain, KMS, node) deploys a one-container app (busybox httpd, `docker import`ed, with an
encrypted env and a volume): boot 1 is the deploy (LUKS2 format, `docker load` into an empty data root),
then `--boots - 1` stop + start cycles (a fresh VM opening the same disk). Each boot: QEMU start to the
guest agent's first `/info` (agent-ready), to the app's containers running in the guest (the node's
`running`), and to the app's first HTTP answer through the loopback forward. Baseline of the boot: the
labelled test guest of bench_qemu.py (busybox initramfs only) to agent-ready, in the same run.

    python3 bench/bench_qemu_guest.py [--boots 3] [--first] [--boots-only]

`--boots-only`: the image from the cache (built if missing), no assembly timing. Needs scripts/setup.sh
(QEMU, OVMF, Debian's cloud kernel, mmdebstrap, squashfs-tools, cryptsetup-bin), Docker (the app's image)
and root; run it under the e2e lock. Bounded: at most 10 boots, each with a 900 s timeout.
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from teecloud.agent.boot import normalize_app_compose
from teecloud.image.build import build_image, guest_image_fields
from teecloud.image.testguest import build_test_guest_initramfs
from teecloud.node.instance import InstanceStore
from teecloud.node.runtime.base import ResourceLimits
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig
from teecloud.node.runtime.qemu_cmdline import GuestImage

KERNEL_DIR = Path("/var/cache/teecloud/guest-kernel")


def _test_guest_boots(image: GuestImage, home: Path, n: int) -> list[float]:
    """The labelled test guest (no TEE, no keys, no app) to agent-ready: the baseline."""
    backend = QemuBackend(
        QemuBackendConfig(
            image=image,
            mode="plain",
            accel="tcg",
            host_share="vvfat",
            disk_gb=1,
            agent_timeout_s=600,
            docker=None,
        ),
        home=home,
    )
    compose = normalize_app_compose(
        {"name": "b", "runner": "docker-compose", "docker_compose_file": "services:\n  b:\n    image: x\n"}
    )
    ready: list[float] = []
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
        cvm.remove()
    return ready


APP_IMAGE = "teecloud-bench-qboot:1"
APP_SCRIPT = (
    '/bin/busybox --install -s /bin && mkdir -p /data/www && echo "$$SECRET" > /data/www/index.html && '
    "exec httpd -f -p 8080 -h /data/www"
)


def _app_image() -> None:
    busybox = Path(shutil.which("busybox") or "/bin/busybox").resolve()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("bin/busybox")
        data = busybox.read_bytes()
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    subprocess.run(
        ["docker", "import", "-", APP_IMAGE], input=buf.getvalue(), check=True, capture_output=True
    )


def _serving(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def _cvm_boots(image_dir: Path, home: Path, n: int) -> dict[str, list[float]]:
    """Whole CVMs through `LocalCloud(backend="qemu")`: deploy, then stop + start cycles."""
    from teecloud.cloud.deploy import Session, deploy
    from teecloud.devstack import LocalCloud

    _app_image()
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    compose = home / "docker-compose.yml"
    compose.write_text(
        f"services:\n  web:\n    image: {APP_IMAGE}\n"
        f'    command: ["/bin/busybox", "sh", "-c", \'{APP_SCRIPT}\']\n'
        f'    environment: [SECRET]\n    ports: ["{port}:8080"]\n    volumes: ["data:/data"]\n'
        "volumes:\n  data: {}\n"
    )
    out: dict[str, list[float]] = {"agent": [], "running": [], "serving": [], "stop": []}
    cloud = LocalCloud(home / "cloud", backend="qemu", qemu_image=image_dir)
    cloud.start(check=False)
    session = Session(cloud.home)
    try:
        url = f"http://127.0.0.1:{port}/"
        t = time.perf_counter()
        r = deploy(session, compose, name="bench", env={"SECRET": "s"}, allowed_envs=["SECRET"], timeout=900)
        if r.status != "running":
            raise RuntimeError(f"deploy: {r.error}")
        _serving(url)
        serving = time.perf_counter() - t
        for i in range(n):
            if i:
                t = time.perf_counter()
                cloud.node.stop(r.instance_id)
                out["stop"].append(time.perf_counter() - t)
                t = time.perf_counter()
                cloud.node.start(r.instance_id)
                cloud.node.wait_all(900)
                _serving(url)
                serving = time.perf_counter() - t
            timings = cloud.node._cvm(r.instance_id).booted.timings
            out["agent"].append(timings["agent-ready"])
            out["running"].append(timings["app-running"])
            out["serving"].append(serving)
        cloud.node.remove(r.instance_id)
    finally:
        session.close()
        cloud.stop()
    return out


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} s (min {min(xs):.1f}, max {max(xs):.1f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--first", action="store_true", help="also the whole first build (mmdebstrap)")
    ap.add_argument("--boots-only", action="store_true", help="no assembly timing: the cached image")
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
        if args.boots_only:
            built = build_image()
        else:
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
        cvm = _cvm_boots(built.path, home / "a", boots)
        first_of = {k: v[:1] for k, v in cvm.items()}
        rest = {k: v[1:] for k, v in cvm.items()}
        rows.append(
            (
                "CVM boot 1 (deploy: LUKS2 format, docker load), QEMU start to agent-ready",
                _fmt(first_of["agent"]),
            )
        )
        rows.append(("  to the app's containers running (the node's `running`)", _fmt(first_of["running"])))
        rows.append(("  deploy call to the app's first HTTP answer", _fmt(first_of["serving"])))
        if rest["agent"]:
            rows.append(
                ("CVM restart (stop + start, same disk), QEMU start to agent-ready", _fmt(rest["agent"]))
            )
            rows.append(("  to the app's containers running", _fmt(rest["running"])))
            rows.append(("  start call to the app's first HTTP answer", _fmt(rest["serving"])))
            rows.append(("  stop (QMP powerdown, quit after 5 s)", _fmt(cvm["stop"])))
        # baseline, same run: the busybox-only test guest (no verity rootfs, no python)
        initrd = home / "testguest.gz"
        initrd.write_bytes(build_test_guest_initramfs(modules_dir=KERNEL_DIR / "modules"))
        test_guest = GuestImage(
            bios=image.bios, kernel=image.kernel, initrd=initrd, cmdline="console=ttyS0 panic=1"
        )
        base = _test_guest_boots(test_guest, home / "b", boots)
        rows.append(("baseline: the test guest to agent-ready, same run", _fmt(base)))
        agent = cvm["agent"]
        rows.append(
            (
                "ratio CVM agent-ready / test guest (median)",
                f"{statistics.median(agent) / statistics.median(base):.2f}",
            )
        )
    print("| step | time |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
