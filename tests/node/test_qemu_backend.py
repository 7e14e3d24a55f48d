"""The qemu backend (teecloud.node.runtime.qemu).

Fast: what it forwards, its serial log as a LogSource, and that a stale pid file never makes it signal
another process. Slow (real QEMU under TCG, Debian's kernel, OVMF): a Node whose backend is qemu boots a VM
of the labelled TEST GUEST (teecloud.image.testguest: busybox, not the teecloud agent), which reads the
host-shared app-compose.json from its read-only config disk and reports the compose hash it computed; the
app's published port answers through the loopback forward; the serial console is the CVM's log; stop and
remove leave no QEMU process and no VM directory. The real guest agent's boot (keys, LUKS, compose) inside
the VM is tests/node/test_qemu_boot.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from teecloud.agent.boot import normalize_app_compose
from teecloud.image.testguest import GUEST_NAME, build_test_guest_initramfs
from teecloud.node.api import CreateCvmRequest
from teecloud.node.errors import InstanceStateError
from teecloud.node.runtime import make_backend
from teecloud.node.runtime.base import ResourceLimits
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig, QemuCvm, _published_ports, record_vm
from teecloud.node.runtime.qemu_cmdline import GuestImage
from teecloud.node.service import Node
from teecloud.tee.simulated import SimulatedTdx
from tests.node.fakes import NoKeys, stored_instance

KERNEL_DIR = Path(os.environ.get("TEECLOUD_GUEST_KERNEL_DIR", "/var/cache/teecloud/guest-kernel"))
OVMF = Path("/usr/share/OVMF/OVMF_CODE.fd")


def _compose(port: int, long_port: int = 18089) -> str:
    compose = f'services:\n  web:\n    image: x\n    ports:\n      - "{port}:80"\n      - target: 81\n'
    compose += f"        published: {long_port}\n"
    return normalize_app_compose({"name": "web", "runner": "docker-compose", "docker_compose_file": compose})


def _instance(home: Path, port: int = 18088) -> object:
    return stored_instance(home, _compose(port))


def test_published_ports_are_forwarded_from_loopback(teecloud_home: Path) -> None:
    inst = _instance(teecloud_home)
    assert _published_ports(inst) == [18088, 18089]  # type: ignore[arg-type]


def test_a_stale_pid_file_never_signals_another_process(teecloud_home: Path, tmp_path: Path) -> None:
    inst = _instance(teecloud_home)
    other = subprocess.Popen(["sleep", "30"])
    try:
        work = tmp_path / "vm"
        work.mkdir()
        (work / "qemu.pid").write_text(str(other.pid))  # a reused pid: not this VM's QEMU
        cvm = QemuCvm(inst, work, agent_port=None, booted=False)  # type: ignore[arg-type]
        assert not cvm.running()
        cvm.stop()
        assert other.poll() is None, "stop signalled a process that is not the VM's QEMU"
        with pytest.raises(InstanceStateError, match="not running"):
            cvm.attestation(b"n")
    finally:
        other.kill()
        other.wait()


def test_the_serial_log_is_the_cvms_log(teecloud_home: Path, tmp_path: Path) -> None:
    inst = _instance(teecloud_home)
    work = tmp_path / "vm"
    work.mkdir()
    (work / "serial.log").write_bytes(b"".join(b"line %d\n" % i for i in range(10)))
    cvm = QemuCvm(inst, work, agent_port=None, booted=False)  # type: ignore[arg-type]
    assert b"".join(cvm.logs(tail=3)) == b"line 7\nline 8\nline 9\n"
    follow = cvm.logs(tail=1, follow=True)
    closed: list[bool] = []
    follow.on_close(lambda: closed.append(True))
    assert next(follow) == b"line 9\n"
    follow.close()
    assert closed == [True] and next(follow, None) is None


def test_make_backend_names_the_qemu_backend(teecloud_home: Path) -> None:
    image = GuestImage(bios=OVMF, kernel=KERNEL_DIR / "vmlinuz", initrd=Path("/x"), cmdline="console=ttyS0")
    backend = make_backend(
        "qemu",
        key_provider=NoKeys(),
        guest_tee_factory=lambda: SimulatedTdx(teecloud_home),
        config=QemuBackendConfig(image=image, mode="plain", accel="tcg"),
        home=teecloud_home,
    )
    assert isinstance(backend, QemuBackend) and backend.describe() == "qemu (plain, tcg)"


@pytest.fixture(scope="module")
def test_guest(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    if not (KERNEL_DIR / "vmlinuz").is_file() or not (KERNEL_DIR / "modules").is_dir() or not OVMF.is_file():
        pytest.fail(f"{KERNEL_DIR} or OVMF is missing: run scripts/setup.sh")
    initrd = tmp_path_factory.mktemp("guest") / "initramfs.cpio.gz"
    initrd.write_bytes(build_test_guest_initramfs(modules_dir=KERNEL_DIR / "modules"))
    return GuestImage(
        bios=OVMF, kernel=KERNEL_DIR / "vmlinuz", initrd=initrd, cmdline="console=ttyS0 panic=1"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_node_runs_a_cvm_as_a_vm_under_tcg(teecloud_home: Path, test_guest: GuestImage) -> None:
    backend = QemuBackend(
        QemuBackendConfig(
            image=test_guest, mode="plain", accel="tcg", host_share="vvfat", disk_gb=1, docker=None
        ),
        home=teecloud_home,
    )
    backend.check()
    node = Node(
        key_provider=NoKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        backend=backend,
        home=teecloud_home,
        memory_mb=4096,
    )
    try:
        port = _free_port()
        compose = _compose(port, _free_port())
        st = node.create(CreateCvmRequest(name="web", app_compose=compose, app_id="11" * 20, memory_mb=512))
        iid = st.instance_id
        node.wait_all(240)
        status = node.status(iid)
        assert status.status == "running", status.error
        assert status.timings["agent-ready"] > 0
        inst = node.store.get(iid)
        # (1) the guest read the compose from the read-only host share and hashed it itself
        cvm = node._cvm(iid).booted
        assert isinstance(cvm, QemuCvm)
        assert cvm.guest_info == {
            "guest": GUEST_NAME,
            "compose_hash": inst.compose_hash().hex(),
            "phase": "running",
        }
        # (2) the app's published port, forwarded from loopback
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text == f"hello from {GUEST_NAME}\n"
        # (3) the serial console is the CVM's log
        text = b"".join(node.logs(iid, service=None, tail=500, follow=False, public=False)).decode()
        assert "Linux version" in text and f"{GUEST_NAME}: ready" in text
        # (4) the host gets no quote from a guest whose agent offers none (and never sends report_data)
        with pytest.raises(InstanceStateError, match="serves no attestation"):
            node.attestation(iid, b"nonce", public=False)
        # (5) stop: no QEMU left; remove: no VM directory left
        pid = cvm.pid()
        assert pid is not None
        node.stop(iid)
        assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert node.status(iid).status == "stopped"
        workdir = cvm.workdir
        assert (workdir / "hda.img").is_file() and (workdir / "shared" / "app-compose.json").is_file()
        result = node.remove(iid)
        assert result.leftovers == [] and not workdir.exists()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            except httpx.HTTPError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the app's port still answers after remove")
    finally:
        node.close()  # a failed assertion must not leave a VM running (VMs outlive their node by design)


@pytest.mark.slow
def test_a_guest_without_an_agent_fails_at_agent_with_its_console_and_leaves_no_vm(
    teecloud_home: Path, test_guest: GuestImage, tmp_path: Path
) -> None:
    from dataclasses import replace

    from teecloud.image.initramfs import Entry, build_initramfs
    from teecloud.node.errors import BootFailed

    # an initramfs whose /init prints and waits: the kernel boots, no agent ever answers
    initrd = tmp_path / "silent.cpio.gz"
    script = (
        b"#!/bin/busybox sh\n/bin/busybox echo silent-guest-up\nwhile :; do /bin/busybox sleep 3600; done\n"
    )
    initrd.write_bytes(
        build_initramfs(
            {
                "init": Entry.file(script, 0o755),
                "bin/busybox": Entry.file(Path("/bin/busybox").read_bytes(), 0o755),
            }
        )
    )
    backend = QemuBackend(
        QemuBackendConfig(
            image=replace(test_guest, initrd=initrd),
            mode="plain",
            accel="tcg",
            host_share="vvfat",
            disk_gb=1,
            agent_timeout_s=5,
            docker=None,
        ),
        home=teecloud_home,
    )
    inst = _instance(teecloud_home, _free_port())
    with pytest.raises(BootFailed, match="no guest agent answered within 5 s") as failed:
        backend.launch(inst, inst.limits())  # type: ignore[arg-type]
    assert failed.value.phase == "agent"
    # the console's tail comes with the reason (what it holds depends on how far TCG got in 5 s under load)
    assert "serial log:" in failed.value.reason
    handle = backend.attach(inst)  # type: ignore[arg-type]
    assert not handle.running(), "a failed launch left its QEMU running"
    assert handle.remove() == [] and not handle.workdir.exists()


def test_a_tdx_vm_carries_the_compose_hash_in_mrconfigid_not_the_cmdline(teecloud_home: Path) -> None:
    import base64
    import json

    from teecloud.node.runtime.qemu_cmdline import qemu_argv

    image = GuestImage(bios=OVMF, kernel=KERNEL_DIR / "vmlinuz", initrd=Path("/i"), cmdline="console=ttyS0")
    backend = QemuBackend(QemuBackendConfig(image=image, mode="tdx"), home=teecloud_home)
    inst = _instance(teecloud_home)
    argv = qemu_argv(backend._vm_config(inst, ResourceLimits(cpus=2, memory_mb=4096), 40000))  # type: ignore[arg-type]
    tdx = json.loads(argv[argv.index("-object") + 1])
    assert base64.b64decode(tdx["mrconfigid"]) == b"\x01" + inst.compose_hash() + bytes(15)  # type: ignore[attr-defined]
    assert argv[argv.index("-append") + 1] == "console=ttyS0"
    assert argv[argv.index("-smp") + 1] == "2" and argv[argv.index("-m") + 1] == "4096M"
    assert "hostfwd=tcp:127.0.0.1:40000-:8090" in argv[argv.index("-netdev") + 1]


def test_the_node_reads_at_most_a_bounded_answer_from_a_guest() -> None:
    from teecloud.node.errors import RuntimeFailed
    from teecloud.node.runtime.qemu import MAX_AGENT_RESPONSE, _bounded_get

    def handler(request: httpx.Request) -> httpx.Response:
        size = int(request.url.params.get("size", "0"))
        return httpx.Response(200, content=b"x" * size)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert _bounded_get(client, "http://guest/info", {"size": "10"}) == (200, b"x" * 10)
        with pytest.raises(RuntimeFailed, match="exceeds"):
            _bounded_get(client, "http://guest/info", {"size": str(MAX_AGENT_RESPONSE + 1)})


def test_the_share_carries_the_pinned_kms_key_and_the_simulated_tee_but_no_sealing_secret(
    teecloud_home: Path, tmp_path: Path
) -> None:
    import json

    from teecloud.node.runtime.qemu import _write_shared
    from teecloud.tee.simulated import SEALING_SECRET_FILE

    inst = stored_instance(
        teecloud_home,
        _compose(18088),
        sys_config={"kms_urls": ["https://127.0.0.1:1"]},
        encrypted_env=b"\x01\x02",
    )
    sim = tmp_path / "simulated-tee"
    sim.mkdir()
    (sim / "attestation_key.pem").write_text("k")
    (sim / SEALING_SECRET_FILE).write_text("the simulated KMS's sealing secret")
    shared = tmp_path / "shared"
    _write_shared(inst, shared, kms_ca_pubkey="ab" * 8, simulated_tee=sim)  # type: ignore[arg-type]
    doc = json.loads((shared / ".sys-config.json").read_text())
    assert doc == {"kms_urls": ["https://127.0.0.1:1"], "kms_ca_pubkey": "ab" * 8}
    assert (shared / ".encrypted-env").read_bytes() == b"\x01\x02"
    assert (shared / "simulated-tee" / "attestation_key.pem").read_text() == "k"
    assert not (shared / "simulated-tee" / SEALING_SECRET_FILE).exists()
    # a later launch of another mode shares no simulated TEE
    _write_shared(inst, shared)  # type: ignore[arg-type]
    assert not (shared / "simulated-tee").exists()
    assert "kms_ca_pubkey" not in json.loads((shared / ".sys-config.json").read_text())


def test_only_images_present_in_the_hosts_docker_pass_the_check(teecloud_home: Path, tmp_path: Path) -> None:
    from teecloud.node.errors import ComposeRejected

    fake = tmp_path / "docker"  # answers `image inspect` for "present:1" only
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "image inspect" ] && [ "$5" = "present:1" ] && exit 0\nexit 1\n')
    fake.chmod(0o755)
    image = GuestImage(bios=OVMF, kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")
    backend = QemuBackend(QemuBackendConfig(image=image, docker=str(fake)), home=teecloud_home)
    backend.check_images(["present:1"])
    with pytest.raises(ComposeRejected, match="absent:2"):
        backend.check_images(["present:1", "absent:2"])
    QemuBackend(QemuBackendConfig(image=image, docker=None), home=teecloud_home).check_images(["absent:2"])


def test_teecloud_up_refuses_an_unknown_backend_or_accel_in_one_line(teecloud_home: Path) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app

    for args, reason in (
        (["--backend", "vmware"], "unknown CVM backend 'vmware' (one of: docker, qemu)"),
        (["--backend", "qemu", "--qemu-accel", "hvf"], "--qemu-accel is kvm or tcg"),
        (["--backend", "qemu", "--kms-nodes", "3", "--threshold", "4"], "need 1 <= KMS threshold"),
    ):
        result = CliRunner().invoke(app, ["up", *args])
        assert result.exit_code == 1, result.output
        assert reason in result.output and "Traceback" not in result.output
    assert not (teecloud_home / "chain").exists()  # refused before anything started


def test_the_guest_reaches_each_kms_and_gateway_at_a_fixed_address_forwarded_to_one_loopback_port() -> None:
    from teecloud.node.runtime.qemu import guest_services
    from teecloud.node.runtime.qemu_cmdline import GuestForward

    host = {"kms_urls": ["https://127.0.0.1:8443"], "gateway_urls": [], "vm_config": "{}"}
    doc, forwards = guest_services(
        host, kms_ca_pubkey="ab" * 8, gateway=(["https://127.0.0.1:9443"], "-----BEGIN CERTIFICATE-----")
    )
    assert doc == {
        "kms_urls": ["https://10.0.2.100:443"],
        "kms_ca_pubkey": "ab" * 8,
        "gateway_urls": ["https://10.0.2.120:443"],
        "gateway_ca_pem": "-----BEGIN CERTIFICATE-----",
        "vm_config": "{}",  # the rest of dstack's file unchanged
    }
    assert forwards == (GuestForward("10.0.2.100", 443, 8443), GuestForward("10.0.2.120", 443, 9443))
    # threshold: every node by share index (the node's own sys-config names only one), pins kept
    group = {
        "epoch": 1,
        "t": 2,
        "commitments": ["00"],
        "signing_key": "",
        "nodes": {
            str(i): {"url": f"https://localhost:{8000 + i}", "mr_aggregated": "11", "device_id": "22"}
            for i in (3, 1, 2)
        },
    }
    doc, forwards = guest_services(host, kms_ca_pubkey="ab" * 8, kms_group=group)
    assert doc["kms_urls"] == [f"https://10.0.2.{99 + i}:443" for i in (1, 2, 3)]
    assert doc["kms_group"]["nodes"]["2"] == {
        "url": "https://10.0.2.101:443",
        "mr_aggregated": "11",
        "device_id": "22",
    }
    assert "kms_ca_pubkey" not in doc and doc["gateway_urls"] == []  # no gateway: nothing to reach
    assert forwards == tuple(GuestForward(f"10.0.2.{99 + i}", 443, 8000 + i) for i in (1, 2, 3))


@pytest.mark.parametrize(
    ("urls", "reason"),
    [
        (["https://10.1.2.3:8443"], "host loopback services"),  # a remote KMS: never routed from a guest
        (["https://0.0.0.0:8443"], "host loopback services"),
        (["https://127.0.0.1"], "host loopback services"),  # no explicit port
        (["https://127.0.0.1:99999"], "not an http"),
        (["file:///etc/passwd"], "not an http"),
        ([7], "not an http"),
        ([f"https://127.0.0.1:{8000 + k}" for k in range(17)], "at most 16"),
    ],
)
def test_a_kms_url_the_guest_cannot_be_forwarded_to_fails_the_boot_at_keys(
    urls: list[object], reason: str
) -> None:
    from teecloud.node.errors import BootFailed
    from teecloud.node.runtime.qemu import guest_services

    with pytest.raises(BootFailed, match=reason) as info:
        guest_services({"kms_urls": urls})
    assert info.value.phase == "keys"


def test_the_share_carries_the_guests_sys_config(teecloud_home: Path, tmp_path: Path) -> None:
    import json

    from teecloud.node.runtime.qemu import _write_shared

    inst = stored_instance(teecloud_home, _compose(18088), sys_config={"kms_urls": ["https://127.0.0.1:1"]})
    guest = {"kms_urls": ["https://10.0.2.100:443"], "gateway_urls": []}
    _write_shared(inst, tmp_path / "shared", sys_config=guest)  # type: ignore[arg-type]
    assert json.loads((tmp_path / "shared" / ".sys-config.json").read_text()) == guest


def test_the_hosts_view_of_the_guests_containers_keeps_only_the_ports_it_forwards(
    teecloud_home: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys
    import threading
    from http.server import HTTPServer

    from teecloud.agent.vm_agent import make_handler

    inst = _instance(teecloud_home)  # publishes 18088:80 and 18089:81
    listed = [
        {
            "service": "web",
            "container": "app-web-1",
            "state": "running",
            "health": None,
            "exit_code": 0,
            "ports": [
                {"container_port": 80, "protocol": "tcp", "host_ip": "0.0.0.0", "host_port": 18088},
                {"container_port": 80, "protocol": "tcp", "host_ip": "::", "host_port": 18088},
                {
                    "container_port": 22,
                    "protocol": "tcp",
                    "host_ip": "0.0.0.0",
                    "host_port": 2222,
                },  # not forwarded
            ],
        }
    ]
    server = HTTPServer(("127.0.0.1", 0), make_handler({}, containers=lambda: listed))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    workdir = tmp_path / "vm"
    workdir.mkdir()
    # a process standing in for the VM's QEMU (its command line names the VM's directory)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(workdir)])
    try:
        # Popen can return while the child's exec is still replacing its image (/proc/PID/cmdline reads
        # empty for a moment): wait until the stand-in shows its command line, as a running QEMU does
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        for _ in range(500):
            if str(workdir).encode() in cmdline.read_bytes():
                break
            time.sleep(0.01)
        assert record_vm(workdir, proc.pid)
        cvm = QemuCvm(inst, workdir, agent_port=server.server_address[1], booted=True)  # type: ignore[arg-type]
        (state,) = cvm.containers()
        assert (state.service, state.state) == ("web", "running")
        # where the gateway and `teecloud deploy` reach it: the host's loopback forward, once per port
        assert state.ports == [
            {"container_port": 80, "protocol": "tcp", "host_ip": "127.0.0.1", "host_port": 18088}
        ]
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
        server.server_close()


def test_a_pccs_on_the_hosts_loopback_is_forwarded_and_a_remote_one_refused() -> None:
    from teecloud.node.errors import BootFailed
    from teecloud.node.runtime.qemu import guest_services
    from teecloud.node.runtime.qemu_cmdline import GuestForward

    host = {
        "kms_urls": ["https://127.0.0.1:8443"],
        "pccs_url": "https://127.0.0.1:8081/sgx/certification/v4/",
    }
    doc, forwards = guest_services(host, kms_ca_pubkey="ab" * 8)
    assert doc["pccs_url"] == "https://10.0.2.124:443/sgx/certification/v4/"
    assert GuestForward("10.0.2.124", 443, 8081) in forwards
    with pytest.raises(BootFailed, match="host loopback services"):
        guest_services({**host, "pccs_url": "https://api.trustedservices.intel.com/sgx/certification/v4/"})


def test_the_guests_sys_config_states_the_backends_tee_mode(teecloud_home: Path) -> None:
    image = GuestImage(bios=OVMF, kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")
    backend = QemuBackend(
        QemuBackendConfig(image=image, mode="plain", accel="tcg", kms_ca_pubkey=lambda: "ab" * 8),
        home=teecloud_home,
    )
    # the backend's mode wins over the sys-config's
    sys_config = {"kms_urls": ["https://127.0.0.1:8443"], "tee_mode": "tdx"}
    inst = stored_instance(teecloud_home, _compose(18088), sys_config=sys_config)
    doc, forwards = backend._guest_sys_config(inst)  # type: ignore[arg-type]
    assert doc["tee_mode"] == "plain" and doc["kms_ca_pubkey"] == "ab" * 8
    assert doc["kms_urls"] == ["https://10.0.2.100:443"] and len(forwards) == 1
