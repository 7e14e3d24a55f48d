"""Node vouching on the qemu backend, host and guest halves without booting a VM.

The node builds its statement from the guest's forwarded ports (`vouch_endpoints`, the same endpoints the
guest registers: `vm_agent.gateway_endpoints`), posts it to the guest agent (`QemuCvm.post_vouch`, POST
/node-vouch) after boot and renews it (`VouchRenewer`); the guest keeps the newest one for its instance
(`GuestStatus.take_vouch`) and its Registrar sends it. The statement the node posts passes the gateway's
check (`VouchChecker`); what the guest refuses to keep is refused with a clear status, never a traceback.
A VM left running by an earlier node process is re-attached (`QemuBackend.attach`, `Node.reattach`) with
one renewal, whichever handle started it, which its stop ends (the real VM: tests/node/test_qemu_boot.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from teecloud.agent.vm_agent import MAX_VOUCH_BODY, GuestStatus, gateway_endpoints, make_handler
from teecloud.chain.embedded import DEV_KEYS
from teecloud.gateway import api
from teecloud.gateway.vouch import StaticNodes, VouchChecker
from teecloud.node.runtime import qemu
from teecloud.node.runtime.base import ContainerState
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig, QemuCvm, VouchRenewer, vouch_endpoints
from teecloud.node.runtime.qemu_cmdline import GuestImage
from tests.gateway.test_vouch import APP, Node

NOW = 1_800_000_000


def _containers(forwards: dict[int, int]) -> list[dict[str, Any]]:
    """The guest's ListContainers: app port -> host port, published twice (IPv4 and IPv6) plus a udp port."""
    ports = [
        {"container_port": c, "protocol": "tcp", "host_ip": ip, "host_port": h}
        for c, h in forwards.items()
        for ip in ("0.0.0.0", "::")
    ]
    ports.append({"container_port": 53, "protocol": "udp", "host_ip": "0.0.0.0", "host_port": 5353})
    return [
        {
            "service": "web",
            "container": "c1",
            "state": "running",
            "health": None,
            "exit_code": 0,
            "ports": ports,
        }
    ]


class FakeCvm:
    """The part of QemuCvm a VouchRenewer uses: the guest's containers and the agent's POST."""

    def __init__(self, instance_id: str, forwards: dict[int, int]) -> None:
        self.instance_id = instance_id
        self.forwards = forwards
        self.posted: list[dict[str, Any]] = []
        self.alive = True
        self.refuse = False

    def containers(self) -> list[ContainerState]:
        return [ContainerState(**c) for c in _containers(self.forwards)]

    def post_vouch(self, statement: dict[str, Any]) -> None:
        from teecloud.node.errors import RuntimeFailed

        if self.refuse:
            raise RuntimeFailed("the guest agent did not answer")
        self.posted.append(statement)

    def running(self) -> bool:
        return self.alive


def test_the_statement_names_the_forwarded_ports_the_guest_registers() -> None:
    forwards = {8080: 18080, 9000: 19000}
    states = [ContainerState(**c) for c in _containers(forwards)]
    assert vouch_endpoints(states) == [(8080, "127.0.0.1", 18080), (9000, "127.0.0.1", 19000)]
    guest = [(e["port"], e["host"], e["host_port"]) for e in gateway_endpoints(_containers(forwards))]
    assert guest == vouch_endpoints(states)  # what the guest registers is exactly what the node vouches for


def test_the_node_posts_a_statement_the_gateway_takes_and_renews_it() -> None:
    clock = [float(NOW)]
    node = Node(0, DEV_KEYS[1], clock=lambda: clock[0])
    iid = node.launch()
    cvm = FakeCvm(iid.hex(), {8080: 18080})
    renewer = VouchRenewer(cvm, node.voucher.vouch, interval_s=0.05)  # type: ignore[arg-type]
    renewer.start()
    try:
        assert len(cvm.posted) == 1  # posted at once (the guest waits for it before registering)
        deadline = time.monotonic() + 10
        while len(cvm.posted) < 3 and time.monotonic() < deadline:
            clock[0] += 50  # time passes between renewals
            time.sleep(0.06)
        assert len(cvm.posted) >= 3
    finally:
        renewer.stop()
    n = len(cvm.posted)
    time.sleep(0.2)
    assert len(cvm.posted) == n  # stopped: nothing more is posted
    issued = [s["issued_at"] for s in cvm.posted]
    assert issued == sorted(issued) and issued[-1] > issued[0]  # each renewal is a fresh statement
    checker = VouchChecker(StaticNodes({0: node.operator}), clock=lambda: clock[0])
    endpoints = [api.Endpoint(port=8080, host="127.0.0.1", host_port=18080)]
    stmt = api.NodeVouch.model_validate(cvm.posted[-1])
    checker.check(stmt, app_id=APP, instance_id=iid, endpoints=endpoints)  # the gateway takes it
    assert stmt.endpoints[0].host_port == 18080 and stmt.expires_at - stmt.issued_at <= 600


def test_a_failed_round_is_retried_and_a_vm_gone_ends_the_renewal() -> None:
    node = Node(0, DEV_KEYS[1], clock=time.time)
    iid = node.launch()
    cvm = FakeCvm(iid.hex(), {8080: 18080})
    cvm.refuse = True
    renewer = VouchRenewer(cvm, node.voucher.vouch, interval_s=0.05)  # type: ignore[arg-type]
    renewer.start()
    try:
        assert cvm.posted == [] and renewer.last_error and "did not answer" in renewer.last_error
        cvm.refuse = False
        deadline = time.monotonic() + 10
        while not cvm.posted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cvm.posted and renewer.last_error is None
        cvm.alive = False
        time.sleep(0.2)
        n = len(cvm.posted)
        time.sleep(0.2)
        assert len(cvm.posted) == n
    finally:
        renewer.stop()
    # an instance this node did not launch: no statement at all (the voucher refuses), never a traceback
    other = FakeCvm("22" * 20, {8080: 18080})
    assert VouchRenewer(other, node.voucher.vouch).post_once() is False  # type: ignore[arg-type]
    assert other.posted == []
    # a guest publishing no forwarded TCP port: nothing to vouch for
    bare = FakeCvm(iid.hex(), {})
    assert VouchRenewer(bare, node.voucher.vouch).post_once() is False  # type: ignore[arg-type]


@pytest.fixture
def agent() -> Iterator[tuple[GuestStatus, int]]:
    status = GuestStatus({"guest": "g", "compose_hash": "00" * 32, "tee": "none"})
    server = HTTPServer(
        ("127.0.0.1", 0),
        make_handler(status.snapshot, lambda: status.attest, status.list_containers, status.take_vouch),
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield status, int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_the_guest_keeps_the_newest_statement_for_its_own_instance(
    agent: tuple[GuestStatus, int], teecloud_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, port = agent
    clock = [float(NOW)]
    node = Node(0, DEV_KEYS[1], clock=lambda: clock[0])
    iid = node.launch()
    url = f"http://127.0.0.1:{port}/node-vouch"
    first = node.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 18080)])
    assert httpx.post(url, json=first).status_code == 409  # before boot: nothing kept
    status.identity = (APP.hex(), iid.hex())
    assert status.node_vouch() is None and not status.wait_vouch(0)
    # the host side: QemuCvm.post_vouch against the real agent handler
    cvm = QemuCvm(SimpleNamespace(instance_id=iid.hex()), tmp_path, agent_port=port, booted=True)  # type: ignore[arg-type]
    monkeypatch.setattr(cvm, "running", lambda: True)
    cvm.post_vouch(first)
    assert status.wait_vouch(0) and status.node_vouch().issued_at == first["issued_at"]
    clock[0] += 60
    newer = node.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 18080)])
    cvm.post_vouch(newer)
    assert status.node_vouch().issued_at == newer["issued_at"]
    # refused, and the newest statement kept: older, another instance, malformed, oversized, no body
    from teecloud.node.errors import RuntimeFailed

    with pytest.raises(RuntimeFailed, match="older"):
        cvm.post_vouch(first)
    other = node.launch()
    with pytest.raises(RuntimeFailed, match="another instance"):
        cvm.post_vouch(node.voucher.vouch(other.hex(), [(8080, "127.0.0.1", 18080)]))
    for bad in ({**newer, "issued_at": "soon"}, {**newer, "extra": 1}, {"purpose": "x"}):
        r = httpx.post(url, json=bad)
        assert r.status_code == 400 and "error" in r.json()
    big = json.dumps({**newer, "pad": "x" * MAX_VOUCH_BODY}).encode()
    assert httpx.post(url, content=big, headers={"Content-Type": "application/json"}).status_code == 413
    assert httpx.post(url, content=b"").status_code == 400
    assert httpx.post(f"http://127.0.0.1:{port}/info", json=newer).status_code == 405
    assert status.node_vouch().issued_at == newer["issued_at"]


class _LeftoverVm:
    """What an earlier node process leaves in a VM's work directory: a running "QEMU" (a sleeping process
    whose command line names the work directory and forwards `agent_port` to the guest agent's port, as
    launch writes it) and its pid file."""

    def __init__(self, workdir: Path, agent_port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        netdev = f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{agent_port}-:{qemu.AGENT_GUEST_PORT}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)", str(workdir / "qmp.sock"), netdev]
        )
        deadline = time.monotonic() + 10  # until the child has exec'd: its command line is then the VM's
        while str(workdir).encode() not in Path(f"/proc/{self.proc.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in QEMU did not start"
            time.sleep(0.01)
        assert qemu.record_vm(workdir, self.proc.pid)  # its pid record, as launch writes it

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _backend(home: Path, vouch: Any) -> QemuBackend:
    """A mode-plain backend (no VM is launched: its image files are never opened) with `vouch` as signer."""
    image = GuestImage(bios=Path("/b"), kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")
    return QemuBackend(QemuBackendConfig(image=image, mode="plain", accel="tcg", vouch=vouch), home=home)


def test_a_vm_left_running_is_re_attached_with_one_renewal_that_its_stop_ends(
    agent: tuple[GuestStatus, int], teecloud_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, port = agent
    node = Node(0, DEV_KEYS[1], clock=time.time)
    iid = node.launch()
    compose_hash = bytes(range(32))
    compose = {"docker_compose_file": "services:\n  web:\n    ports: ['18080:8080']\n"}
    inst = SimpleNamespace(
        instance_id=iid.hex(), compose_hash=lambda: compose_hash, app_compose=lambda: compose
    )
    backend = _backend(teecloud_home, node.voucher.vouch)
    status.identity = (APP.hex(), iid.hex())
    status.containers = lambda: _containers({8080: 18080})
    vm = _LeftoverVm(backend.workdir(inst), port)  # type: ignore[arg-type]
    try:
        # still booting, or another instance's guest on that port: a handle, not booted, nothing posted
        status.set(phase="running", compose_hash="ff" * 32)
        assert not backend.attach(inst).booted  # type: ignore[arg-type]
        status.set(phase="starting", compose_hash=compose_hash.hex())
        early = backend.attach(inst)  # type: ignore[arg-type]
        assert early.running() and early.agent_port == port and not early.booted
        assert early.vouch_renewer is None and status.node_vouch() is None
        # booted: re-attached, and the node's statement is posted at once (a fresh one, this node's)
        status.set(phase="running")
        first = backend.attach(inst)  # type: ignore[arg-type]
        assert first.booted and first.agent_port == port
        renewer = first.vouch_renewer
        assert renewer is not None and renewer.active and renewer.posted == 1
        held = status.node_vouch()
        assert held is not None and held.instance_id == iid.hex() and held.endpoints[0].host_port == 18080
        # attached again (every status call of a node attaches): the same renewal, no second one
        again = backend.attach(inst)  # type: ignore[arg-type]
        assert again.vouch_renewer is renewer and renewer.posted == 1
        assert [t.name for t in threading.enumerate()].count(f"vouch-{iid.hex()[:8]}") == 1
        # stop through any handle ends the renewal with the VM
        monkeypatch.setattr(qemu, "STOP_GRACE_S", 0.2)
        again.stop()
        assert not renewer.active and vm.proc.poll() is not None
        assert not backend.attach(inst).running()  # type: ignore[arg-type]
    finally:
        vm.kill()
        backend._end_renewal(iid.hex())


def test_a_renewal_for_an_earlier_vm_of_the_instance_is_replaced_not_doubled(
    agent: tuple[GuestStatus, int], teecloud_home: Path
) -> None:
    status, port = agent
    node = Node(0, DEV_KEYS[1], clock=time.time)
    iid = node.launch()
    inst = SimpleNamespace(instance_id=iid.hex(), compose_hash=lambda: b"\x01" * 32, app_compose=lambda: {})
    backend = _backend(teecloud_home, node.voucher.vouch)
    status.identity = (APP.hex(), iid.hex())
    status.set(phase="running", compose_hash=(b"\x01" * 32).hex())
    status.containers = lambda: _containers({8080: 18080})
    vm = _LeftoverVm(backend.workdir(inst), port)  # type: ignore[arg-type]
    try:
        # a handle on the instance's earlier VM (another agent port, gone): its renewal runs, posting nothing
        earlier = QemuCvm(inst, backend.workdir(inst), agent_port=1, booted=True)  # type: ignore[arg-type]
        backend._renew(earlier)
        old = earlier.vouch_renewer
        assert old is not None and old.active and old.posted == 0
        current = backend.attach(inst)  # type: ignore[arg-type]
        assert current.vouch_renewer is not None and current.vouch_renewer is not old
        assert not old.active and current.vouch_renewer.active  # the earlier VM's renewal was stopped
        assert backend._renewers == {iid.hex(): current.vouch_renewer}
    finally:
        backend._end_renewal(iid.hex())
        vm.kill()
    # no vouch signer: a re-attached VM is booted, with no renewal
    bare = _backend(teecloud_home, None)
    vm = _LeftoverVm(bare.workdir(inst), port)  # type: ignore[arg-type]
    try:
        handle = bare.attach(inst)  # type: ignore[arg-type]
        assert handle.booted and handle.vouch_renewer is None and bare._renewers == {}
    finally:
        vm.kill()


class _AttachBackend:
    """A CvmBackend whose `attach` finds a VM booted by an earlier node process (`running` says which)."""

    kind = "fake"

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def check(self) -> None:
        pass

    def check_images(self, refs: Any) -> None:
        pass

    def describe(self) -> str:
        return "fake"

    def launch(self, instance: Any, limits: Any, *, progress: Any = None) -> Any:
        self.calls.append(("launch", instance.instance_id))
        self.running.add(instance.instance_id)
        return _Handle(self, instance.instance_id, booted=True)

    def attach(self, instance: Any) -> Any:
        self.calls.append(("attach", instance.instance_id))
        return _Handle(self, instance.instance_id, booted=instance.instance_id in self.running)


class _Handle:
    def __init__(self, backend: _AttachBackend, instance_id: str, booted: bool) -> None:
        self.backend, self.instance_id, self._booted = backend, instance_id, booted
        self.timings: dict[str, float] = {}
        self.dropped_env: list[str] = []
        self.public_tcbinfo = False

    @property
    def booted(self) -> bool:
        return self._booted

    def containers(self) -> list[ContainerState]:
        return []

    def stop(self) -> None:
        self.backend.calls.append(("stop", self.instance_id))
        self.backend.running.discard(self.instance_id)
        self._booted = False

    def remove(self) -> list[str]:
        self.stop()
        return []


def test_a_restarted_node_adopts_the_booted_vms_and_boots_only_the_others(teecloud_home: Path) -> None:
    from teecloud.node.api import CreateCvmRequest
    from teecloud.node.service import Node as WorkerNode
    from teecloud.tee.simulated import SimulatedTdx
    from tests.node.fakes import NoKeys, app_compose

    def worker(backend: _AttachBackend) -> WorkerNode:
        return WorkerNode(
            key_provider=NoKeys(),
            tee_factory=lambda: SimulatedTdx(teecloud_home),
            backend=backend,  # type: ignore[arg-type]
            home=teecloud_home,
            memory_mb=4096,
        )

    backend = _AttachBackend()
    first = worker(backend)
    a = first.create(CreateCvmRequest(name="a", app_compose=app_compose(), app_id="11" * 20)).instance_id
    b = first.create(CreateCvmRequest(name="b", app_compose=app_compose(), app_id="11" * 20)).instance_id
    c = first.create(CreateCvmRequest(name="c", app_compose=app_compose(), app_id="11" * 20)).instance_id
    first.wait_all(10)
    first.stop(c)  # desired: stopped
    backend.running.discard(b)  # b's VM died with the host; a's outlived the node process
    del first
    backend.calls.clear()
    second = worker(backend)
    assert second.reattach() == [a]
    assert second.status(a, with_containers=False).status == "running"
    assert second.reattach() == []  # already adopted: not attached again
    assert [x for x in backend.calls if x[1] == a] == [("attach", a)]
    second.resume()
    second.wait_all(10)
    assert ("launch", a) not in backend.calls and ("launch", b) in backend.calls
    assert ("attach", c) not in backend.calls  # desired stopped: not adopted
    # the adopted handle is the one stop / remove reach (its renewal ends there, on qemu)
    second.stop(a)
    assert ("stop", a) in backend.calls and a not in backend.running
    assert second.status(a, with_containers=False).status == "stopped"


def test_a_failed_round_is_retried_soon_not_a_whole_interval_later(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "VOUCH_RETRY_S", 0.05)
    node = Node(0, DEV_KEYS[1], clock=time.time)
    cvm = FakeCvm(node.launch().hex(), {8080: 18080})
    cvm.refuse = True  # the guest's Docker too slow to answer at the first round
    renewer = VouchRenewer(cvm, node.voucher.vouch, interval_s=3600)  # type: ignore[arg-type]
    renewer.start()
    try:
        assert cvm.posted == [] and renewer.last_error
        cvm.refuse = False
        deadline = time.monotonic() + 10
        while not cvm.posted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cvm.posted) == 1 and renewer.last_error is None  # retried at once, then the hour's wait
        time.sleep(0.3)
        assert len(cvm.posted) == 1
    finally:
        renewer.stop()
