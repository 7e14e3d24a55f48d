"""Node vouching on the qemu backend, host and guest halves without booting a VM.

The node builds its statement from the guest's forwarded ports (`vouch_endpoints`, the same endpoints the
guest registers: `vm_agent.gateway_endpoints`), posts it to the guest agent (`QemuCvm.post_vouch`, POST
/node-vouch) after boot and renews it (`VouchRenewer`); the guest keeps the newest one for its instance
(`GuestStatus.take_vouch`) and its Registrar sends it. The statement the node posts passes the gateway's
check (`VouchChecker`); what the guest refuses to keep is refused with a clear status, never a traceback."""

from __future__ import annotations

import json
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
from teecloud.node.runtime.base import ContainerState
from teecloud.node.runtime.qemu import QemuCvm, VouchRenewer, vouch_endpoints
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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
