"""A restarted `teecloud up --backend qemu` keeps its running VMs: `up` is killed with SIGKILL (no clean-up),
its VM runs on; the next `up` brings the KMS and the gateway back on the ports recorded in the data
directory (cloud/ports.json) and re-attaches the VM (`Node.reattach`) instead of booting it again: the same
QEMU process, the serial console not restarted, the app's boot counter on its encrypted volume still at one,
and the app served through the gateway again within the guest's re-registration bound. `teecloud down`
then powers the VM off. (`down` with no `up` running, and `down --keep-vms`: tests/node/
test_qemu_reattach_ports.py, with stand-in QEMU processes.)

One VM boot under TCG (minutes): slow, under the e2e lock (`flock /tmp/teecloud-e2e.lock`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.node.test_qemu_boot import IMAGE, _docker_ok, _free_port, _tiny_image, _via_gateway

pytestmark = [pytest.mark.slow, pytest.mark.docker]

SRC = Path(__file__).resolve().parents[2] / "src"
# the app: one line per boot appended to its (LUKS) volume, served over HTTP
APP = (
    "/bin/busybox --install -s /bin && mkdir -p /data/www && cd /data/www && echo boot >> boots && "
    "exec httpd -f -p 8080 -h /data/www"
)
BOOT_MARK = b"initramfs: verity rootfs"  # the first line the image's initramfs writes at each boot
ROUTE_BOUND_S = 30.0  # the guest's Registrar round (teecloud.gateway.client.Registrar interval_s)


def _env(home: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "TEECLOUD_HOME": str(home), "PYTHONPATH": path}


def _teecloud(home: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from teecloud.cli import main; main()", *args],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start_up(home: Path, image: Path, log: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """`teecloud up --backend qemu` in its own process; returns it once its endpoints.json names it."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-c", "from teecloud.cli import main; main()"),
                *("up", "--backend", "qemu", "--image", str(image)),
            ],
            env=_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    ep_file = home / "cloud" / "endpoints.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            ep = json.loads(ep_file.read_text())
            if ep.get("pid") == proc.pid:
                return proc, ep
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, f"teecloud up exited: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"teecloud up did not come up: {log.read_text()[-3000:]}")


def _served(gateway: dict[str, Any], app_id: str, timeout: float) -> float:
    """Seconds until the app answers through the gateway (its boot counter), failing after `timeout`."""
    t0 = time.monotonic()
    while True:
        r = _via_gateway(gateway, app_id, "/boots")
        if r.returncode == 0 and r.stdout.split() and set(r.stdout.split()) == {"boot"}:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"not served through the gateway: {r.stdout} {r.stderr}"
        time.sleep(1)


def _alive(pid: int, workdir: Path) -> bool:
    try:
        return str(workdir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.timeout(2400)
def test_a_restarted_up_keeps_its_running_vm(tmp_path: Path) -> None:
    if not _docker_ok():
        pytest.skip("no Docker engine reachable (the test's image is built and saved with it)")
    from teecloud.cloud.deploy import Session, deploy
    from teecloud.image.build import build_image
    from teecloud.node.runtime.qemu import power_off_left_vms

    _tiny_image()
    given = os.environ.get("TEECLOUD_GUEST_IMAGE")
    image = Path(given) if given else build_image().path
    home = tmp_path / "home"
    log = tmp_path / "up.log"
    port = _free_port()
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        "services:\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        f'    command: ["/bin/busybox", "sh", "-c", "{APP}"]\n'
        "    ports:\n"
        f'      - "{port}:8080"\n'
        "    volumes:\n"
        "      - appdata:/data\n"
        "volumes:\n"
        "  appdata: {}\n"
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc, ep = _start_up(home, image, log)
        procs.append(proc)
        assert ep["gateway"], "no gateway (HAProxy missing? scripts/setup.sh installs it)"
        r = deploy(Session(home), compose, name="reweb", timeout=1500)
        assert r.status == "running", r.error
        workdir = home / "node" / "vms" / r.instance_id[:16]
        vm_pid = json.loads((workdir / "qemu.pid").read_text())["pid"]
        _served(ep["gateway"], r.app_id, 120)
        serial_head = (workdir / "serial.log").read_bytes()[:4096]
        assert BOOT_MARK in serial_head
        ports = json.loads((home / "cloud" / "ports.json").read_text())

        # (1) `up` killed with no clean-up at all: the VM runs on
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert _alive(vm_pid, workdir)

        # (2) up again: the same ports, the VM adopted (no second boot), served through the gateway again
        t0 = time.monotonic()
        proc, ep2 = _start_up(home, image, log)
        procs.append(proc)
        up_s = time.monotonic() - t0
        assert json.loads((home / "cloud" / "ports.json").read_text()) == ports
        assert ep2["kms"] == ep["kms"] and ep2["gateway"]["registration"] == ep["gateway"]["registration"]
        assert ep2["gateway"]["public_port"] == ep["gateway"]["public_port"]
        assert _alive(vm_pid, workdir) and json.loads((workdir / "qemu.pid").read_text())["pid"] == vm_pid
        assert "re-attached 1 running CVM(s) without a reboot" in log.read_text()
        status = Session(home).node.get(r.instance_id)
        assert status.status == "running", status
        routed_s = _served(ep2["gateway"], r.app_id, ROUTE_BOUND_S + 60)  # + TCG guest slack
        serial = (workdir / "serial.log").read_bytes()
        assert serial.startswith(serial_head) and serial.count(BOOT_MARK) == 1
        boots = subprocess.run(
            ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/boots"],
            capture_output=True,
            text=True,
        )
        assert boots.stdout.split() == ["boot"], boots.stdout
        print(f"second up ready in {up_s:.1f} s; routed through the gateway {routed_s:.1f} s later")

        # (3) `teecloud down` stops the cloud and powers the VM off
        done = _teecloud(home, "down")
        assert done.returncode == 0, done.stdout + done.stderr
        assert proc.wait(timeout=30) is not None and not _alive(vm_pid, workdir)
        assert not (home / "cloud" / "endpoints.json").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        power_off_left_vms(home)
