"""A restarted `teecloud up` adopts a running VM only where its guest still reaches this node's services, and
powers off what it must, without booting a VM (the real VM: tests/e2e/test_up_reattach.py).

- `QemuBackend.attach` adopts a booted VM only when the gateway forwards on its QEMU command line name the
  registration ports the node's gateways listen on now (a guest registering with a gateway that went
  elsewhere, or none, is booted afresh by `resume`), and says why once;
- a guest booting now reaches the KMS where it listens now (`QemuBackendConfig.kms_urls`), not at the
  port the instance recorded at deploy;
- `release` ends the renewals and leaves the VMs running (`teecloud down --keep-vms`);
- `power_off_left_vms` (`teecloud down` with no `up` running) powers off exactly the VMs of this data
  directory whose QEMU still runs, never a process a stale pid file names;
- `teecloud down` signals only a `teecloud up` process: SIGTERM (power off), or SIGUSR1 with --keep-vms."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from teecloud.agent.vm_agent import GuestStatus
from teecloud.chain.embedded import DEV_KEYS
from teecloud.node.runtime import qemu
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig, power_off_left_vms
from teecloud.node.runtime.qemu_cmdline import GUESTFWD_RELAY, GuestImage
from tests.gateway.test_vouch import APP, Node
from tests.gateway.test_vouch_qemu import _containers, agent  # noqa: F401  (a fixture)

COMPOSE_HASH = bytes(range(32))
COMPOSE = {"docker_compose_file": "services:\n  web:\n    ports: ['18080:8080']\n"}
CA = "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"


class _Vm:
    """A stand-in for a QEMU an earlier node process left: its command line names the work directory, the
    agent's hostfwd and the gateway guestfwd rules as qemu_argv writes them; its pid file."""

    def __init__(self, workdir: Path, agent_port: int, gateway_ports: list[int]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        netdev = f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{agent_port}-:{qemu.AGENT_GUEST_PORT}"
        for k, port in enumerate(gateway_ports):
            relay = GUESTFWD_RELAY.format(host="127.0.0.1", port=port)
            netdev += f",guestfwd=tcp:{qemu.GATEWAY_GUEST_ADDRESSES[k]}:443-cmd:{relay}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)", str(workdir / "qmp.sock"), netdev]
        )
        deadline = time.monotonic() + 10
        while str(workdir).encode() not in Path(f"/proc/{self.proc.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in QEMU did not start"
            time.sleep(0.01)
        assert qemu.record_vm(workdir, self.proc.pid)  # its pid record, as launch writes it

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _backend(home: Path, vouch: Any, gateway: list[str] | None, **kw: Any) -> QemuBackend:
    image = GuestImage(bios=Path("/b"), kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")
    config = QemuBackendConfig(
        image=image,
        mode="plain",
        accel="tcg",
        vouch=vouch,
        gateway=(lambda: (gateway, CA)) if gateway is not None else (lambda: None),
        **kw,
    )
    return QemuBackend(config, home=home)


@pytest.mark.parametrize(
    ("vm_ports", "gateway_now", "adopted"),
    [
        ([18443], ["https://127.0.0.1:18443"], True),  # the gateway came back on its port
        ([18443], ["https://127.0.0.1:18444"], False),  # it listens elsewhere now (its port was taken)
        ([18443], None, False),  # no gateway runs now
        ([], ["https://127.0.0.1:18443"], False),  # the VM was booted without one: boot it to register
        ([], None, True),  # no gateway then or now
    ],
)
def test_a_running_vm_is_adopted_only_where_its_guest_reaches_the_gateway_now(
    agent: tuple[GuestStatus, int],  # noqa: F811
    teecloud_home: Path,
    caplog: pytest.LogCaptureFixture,
    vm_ports: list[int],
    gateway_now: list[str] | None,
    adopted: bool,
) -> None:
    status, port = agent
    node = Node(0, DEV_KEYS[1], clock=time.time)
    iid = node.launch()
    inst = SimpleNamespace(
        instance_id=iid.hex(), compose_hash=lambda: COMPOSE_HASH, app_compose=lambda: COMPOSE
    )
    backend = _backend(teecloud_home, node.voucher.vouch, gateway_now)
    status.identity = (APP.hex(), iid.hex())
    status.set(phase="running", compose_hash=COMPOSE_HASH.hex())
    status.containers = lambda: _containers({8080: 18080})
    vm = _Vm(backend.workdir(inst), port, vm_ports)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.WARNING, logger="teecloud.node.runtime.qemu"):
            for _ in range(3):  # a node attaches at every status call: one log line per VM, not per call
                handle = backend.attach(inst)  # type: ignore[arg-type]
                assert handle.running() and handle.booted is adopted
                assert (handle.vouch_renewer is not None) is adopted
        refused = [r.message for r in caplog.records if "not re-attached" in r.message]
        if adopted:
            assert refused == [] and status.node_vouch() is not None
        else:
            assert len(refused) == 1 and "gateway" in refused[0], refused
            assert status.node_vouch() is None  # nothing vouched for a guest that is not adopted
    finally:
        backend._end_renewal(iid.hex())
        vm.kill()


def test_release_ends_the_renewals_and_leaves_the_vm_running(
    agent: tuple[GuestStatus, int],  # noqa: F811
    teecloud_home: Path,
) -> None:
    status, port = agent
    node = Node(0, DEV_KEYS[1], clock=time.time)
    iid = node.launch()
    inst = SimpleNamespace(
        instance_id=iid.hex(), compose_hash=lambda: COMPOSE_HASH, app_compose=lambda: COMPOSE
    )
    backend = _backend(teecloud_home, node.voucher.vouch, None)
    status.identity = (APP.hex(), iid.hex())
    status.set(phase="running", compose_hash=COMPOSE_HASH.hex())
    status.containers = lambda: _containers({8080: 18080})
    vm = _Vm(backend.workdir(inst), port, [])  # type: ignore[arg-type]
    try:
        handle = backend.attach(inst)  # type: ignore[arg-type]
        renewer = handle.vouch_renewer
        assert handle.booted and renewer is not None and renewer.active
        backend.release()
        assert not renewer.active and backend._renewers == {}
        assert vm.proc.poll() is None and handle.running()  # the VM runs on
    finally:
        vm.kill()


def test_a_guest_booting_now_reaches_the_kms_where_it_listens_now(
    teecloud_home: Path, tmp_path: Path
) -> None:
    sys_config = tmp_path / ".sys-config.json"
    sys_config.write_text(json.dumps({"kms_urls": ["https://127.0.0.1:41000"]}))  # recorded at deploy
    inst = SimpleNamespace(sys_config_path=sys_config)
    recorded = _backend(teecloud_home, None, None)
    doc, forwards = recorded._guest_sys_config(inst)  # type: ignore[arg-type]
    assert [f.host_port for f in forwards] == [41000]
    current = _backend(teecloud_home, None, None, kms_urls=lambda: ["https://127.0.0.1:42000"])
    doc, forwards = current._guest_sys_config(inst)  # type: ignore[arg-type]
    assert [f.host_port for f in forwards] == [42000]
    assert doc["kms_urls"] == [f"https://{qemu.KMS_GUEST_ADDRESSES[0]}:443"]


def test_down_without_up_powers_off_only_this_directorys_running_vms(
    teecloud_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "STOP_GRACE_S", 0.2)  # no QMP socket: SIGKILL after the grace periods
    vms = teecloud_home / "node" / "vms"
    running = [_Vm(vms / name, 1, []) for name in ("aaaa", "bbbb")]
    # a stale pid file naming a live process that is not this VM's QEMU (a reused pid): never signalled
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (vms / "cccc").mkdir()
    assert qemu.record_vm(vms / "cccc", stray.pid)  # its own record even: its command line names no VM
    (vms / "dddd").mkdir()  # a VM that is not running
    try:
        result = CliRunner().invoke(_app(), ["down"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "powered off 2 VM(s) left running" in " ".join(result.output.split())
        assert all(vm.proc.poll() is not None for vm in running)
        assert stray.poll() is None
        assert power_off_left_vms(teecloud_home) == []  # nothing left
        result = CliRunner().invoke(_app(), ["down"], catch_exceptions=False)
        assert result.exit_code == 0 and "nothing to stop" in result.output
    finally:
        for vm in running:
            vm.kill()
        stray.kill()
        stray.wait()


def _app() -> Any:
    from teecloud.cli import app

    return app


def _fake_up(home: Path, argv0: str, start: str = "0") -> subprocess.Popen[bytes]:
    """A process standing in for `teecloud up`: writes endpoints.json naming itself (its start time plus
    `start`, or none with "none"), reports the signal it gets to a file and exits."""
    code = (
        "import json, os, signal, sys, time\n"
        "home = sys.argv[1]\n"
        "def got(sig, _f):\n"
        "    open(os.path.join(home, 'signal'), 'w').write(signal.Signals(sig).name)\n"
        "    os.unlink(os.path.join(home, 'cloud', 'endpoints.json'))\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, got)\n"
        "signal.signal(signal.SIGUSR1, got)\n"
        "os.makedirs(os.path.join(home, 'cloud'), exist_ok=True)\n"
        "ep = dict(chain_rpc='', kms='', kms_admin='', node='', pid=os.getpid(), node_token_file='')\n"
        "start = int(open('/proc/self/stat').read().rpartition(')')[2].split()[19])\n"
        "if sys.argv[3] != 'none':\n"
        "    ep['pid_start_time'] = start + int(sys.argv[3])\n"
        "json.dump(ep, open(os.path.join(home, 'cloud', 'endpoints.json'), 'w'))\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(home), argv0, start])
    deadline = time.monotonic() + 10
    while not (home / "cloud" / "endpoints.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize(("flags", "sent"), [([], "SIGTERM"), (["--keep-vms"], "SIGUSR1")])
def test_down_signals_the_running_up(teecloud_home: Path, flags: list[str], sent: str) -> None:
    proc = _fake_up(teecloud_home, "up")  # `python -c ... teecloud-home... up`, as `teecloud up` runs
    try:
        result = CliRunner().invoke(_app(), ["down", *flags], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert proc.wait(timeout=10) == 0
        assert (teecloud_home / "signal").read_text() == sent
    finally:
        proc.kill()


def test_down_never_signals_a_process_that_is_not_teecloud_up(teecloud_home: Path) -> None:
    # (its command line names the data directory, "teecloud-home...", but it runs no `up`)
    proc = _fake_up(teecloud_home, "an-unrelated-program")
    try:
        result = CliRunner().invoke(_app(), ["down"])
        assert result.exit_code == 1 and "not a `teecloud up` process" in " ".join(result.output.split())
        time.sleep(0.2)
        assert proc.poll() is None and not (teecloud_home / "signal").exists()
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists(teecloud_home / "cloud" / "endpoints.json")


def test_the_forwards_read_back_are_those_qemu_argv_writes(tmp_path: Path) -> None:
    from teecloud.node.runtime.qemu_cmdline import GuestForward, PortForward, QemuVmConfig, VmShape, qemu_argv

    image = GuestImage(bios=Path("/b"), kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")
    forwards = (
        GuestForward(guest_address=qemu.KMS_GUEST_ADDRESSES[0], guest_port=443, host_port=18000),
        GuestForward(guest_address=qemu.GATEWAY_GUEST_ADDRESSES[0], guest_port=443, host_port=18100),
        GuestForward(guest_address=qemu.GATEWAY_GUEST_ADDRESSES[1], guest_port=443, host_port=18101),
    )
    cfg = QemuVmConfig(
        mode="plain",
        image=image,
        shape=VmShape(vcpus=1, memory_mb=2048, disk_gb=20),
        workdir=tmp_path,
        accel="tcg",
        ports=(PortForward(host_port=18090, guest_port=qemu.AGENT_GUEST_PORT),),
        guest_forwards=forwards,
    )
    argv = [a.encode() for a in qemu_argv(cfg)]
    assert qemu.guest_forwards_in(argv) == {(f.guest_address, f.host_port) for f in forwards}
