"""The port record of `teecloud up` (teecloud.devstack: cloud/ports.json): written atomically, read strictly
(a record this code did not write is a clear NodeError, and the start then falls back to new ports with a
warning), and a recorded port that is taken falls back to a new one, saying so. Also: which stop keeps the
qemu VMs (`LocalCloud._close_node`). The restart itself, with a real VM: tests/e2e/test_up_reattach.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from teecloud import devstack
from teecloud.devstack import (
    LocalCloud,
    claim_port,
    port_free,
    ports_path,
    read_ports,
    recorded_ports,
    write_ports,
)
from teecloud.node.errors import NodeError

PORTS = {"kms": 40001, "gateway_public": 40002, "gateway_registration": 40003, "gateway_admin": 0}


def test_the_record_round_trips_and_is_replaced_atomically(tmp_path: Path, monkeypatch: Any) -> None:
    assert read_ports(tmp_path) == {}  # nothing recorded yet
    write_ports(PORTS, tmp_path)
    assert read_ports(tmp_path) == PORTS
    assert json.loads(ports_path(tmp_path).read_text())["version"] == 1
    # a write that fails before its rename leaves the old record whole, and no temporary file behind
    real_replace = os.replace

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_ports({**PORTS, "kms": 40009}, tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert read_ports(tmp_path) == PORTS
    assert [p.name for p in ports_path(tmp_path).parent.iterdir()] == ["ports.json"]


@pytest.mark.parametrize(
    "bad",
    [
        {**PORTS, "kms": "40001"},
        {**PORTS, "kms": True},
        {**PORTS, "kms": 40001.0},
        {**PORTS, "kms": -1},
        {**PORTS, "gateway_public": 65536},
        {**PORTS, "extra": 1},
        {k: v for k, v in PORTS.items() if k != "gateway_registration"},
    ],
)
def test_write_refuses_what_is_not_a_record(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        write_ports(bad, tmp_path)
    assert not ports_path(tmp_path).exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "not a version 1 record"),
        (json.dumps({**PORTS, "version": 2}).encode(), "not a version 1 record"),
        (json.dumps(PORTS).encode(), "not a version 1 record"),
        (json.dumps({**PORTS, "version": 1, "chain": 8545}).encode(), "names"),
        (json.dumps({"version": 1, "kms": 1}).encode(), "names"),
        (json.dumps({**PORTS, "version": 1, "kms": "1"}).encode(), "kms is not a port number"),
        (json.dumps({**PORTS, "version": 1, "kms": True}).encode(), "kms is not a port number"),
        (json.dumps({**PORTS, "version": 1, "gateway_admin": 70000}).encode(), "gateway_admin is not"),
        (b" " * (devstack.MAX_PORTS_FILE + 1), "larger than"),
    ],
)
def test_a_corrupt_record_is_a_clear_error_and_the_start_falls_back(
    tmp_path: Path, content: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = ports_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(NodeError, match=why) as err:
        read_ports(tmp_path)
    assert str(path) in str(err.value)
    # what `up` does with it: new ports, the VMs left running booted afresh, and a log line that says why
    with caplog.at_level(logging.WARNING, logger="teecloud.devstack"):
        assert recorded_ports(tmp_path) == {}
    assert why in caplog.text and "booted afresh" in caplog.text


def test_a_free_recorded_port_is_claimed_a_taken_one_falls_back_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert claim_port(0, "KMS") == 0  # nothing recorded: a new port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert port_free(port) and claim_port(port, "KMS", wait_s=0) == port
    holder = socket.create_server(("127.0.0.1", port))
    try:
        assert not port_free(port)
        with caplog.at_level(logging.WARNING, logger="teecloud.devstack"):
            t0 = time.monotonic()
            assert claim_port(port, "gateway's registration listener", wait_s=0.5) == 0
            assert time.monotonic() - t0 >= 0.5  # it waited for the port first
        assert f"registration listener's recorded port {port}" in caplog.text
        assert "is taken" in caplog.text and "booted afresh" in caplog.text
    finally:
        holder.close()


def test_a_port_let_go_of_while_waiting_is_claimed() -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    threading.Timer(0.3, holder.close).start()  # a killed `up`'s HAProxy going away
    assert claim_port(port, "gateway's public listener", wait_s=5) == port


def test_a_closed_connection_does_not_hold_a_port() -> None:
    # a connection's TIME_WAIT after the last `up` stopped: the servers bind with SO_REUSEADDR, so may we
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    server.close()
    assert port_free(port)


class _Backend:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


class _Node:
    def __init__(self) -> None:
        self.backend = _Backend()
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize(
    ("backend", "keep", "closed", "released"),
    [("qemu", False, 1, 0), ("qemu", True, 0, 1), ("docker", True, 1, 0), ("docker", False, 1, 0)],
)
def test_only_a_detach_on_qemu_leaves_the_cvms_running(
    tmp_path: Path, backend: str, keep: bool, closed: int, released: int
) -> None:
    """Ctrl-C / SIGTERM / `teecloud down` power the CVMs off; `down --keep-vms` leaves qemu VMs running
    (their renewals end); a docker CVM's guest half lives in the `up` process, so it stops either way."""
    cloud = LocalCloud(tmp_path, backend=backend)
    node = _Node()
    cloud.node, cloud.keep_vms = node, keep
    cloud._close_node()
    assert (node.closed, node.backend.released) == (closed, released)
