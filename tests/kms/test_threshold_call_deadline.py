"""One wall-clock deadline over every threshold call (issue 19, "Bad input and faults"; kms.deadline): a
KMS node that trickles its answers — one byte per STEP_S, through a real TCP relay in front of a real node —
fails at the call's deadline as that node's fault, frees its fan-out thread, and the boot is served by
another node; a reshare dealer that trickles fails the joining member's round by its deadline, named. And
the lean wire's own refusals: an answer cut short, an oversized head, a server that closes without
answering, a closed kept connection that is not reused."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from teecloud.kms import api
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee
from teecloud.kms.client import connect_kms
from teecloud.kms.deadline import ConnectionPool, WireError, open_connection
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold import ResharePlan
from teecloud.kms.threshold_client import ThresholdKeyProvider, join_reshare
from teecloud.tee.simulated import SimulatedTdx
from tests.kms import test_threshold_nodes
from tests.kms.conftest import World
from tests.kms.test_threshold_dkg_deadline import Relay, _client_context, _server_context
from tests.kms.test_threshold_nodes import Cluster, boot_hello
from tests.kms.test_threshold_reshare import DEALERS, _allow_kms_build, _open, member_token

cluster = test_threshold_nodes.cluster  # five nodes, 3-of-5

CALL_S = 3.0  # the injected per-call deadline (production: CALL_TIMEOUT_S = 15 s)


def _address(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None
    return u.hostname, u.port


@pytest.fixture
def relay_1(cluster: Cluster) -> Iterator[Relay]:
    relay = Relay(_address(cluster.nodes[1].server.url))
    yield relay
    relay.close()


@pytest.mark.slow
def test_a_trickling_node_fails_at_the_calls_deadline_and_another_node_serves_the_boot(
    teecloud_home: Path, world: World, cluster: Cluster, relay_1: Relay
) -> None:
    """Node 1 (asked first) is reached through a relay that trickles once the boot challenge is in. The
    hedge is 60 s, so only the deadline can end node 1's call: by CALL_S it fails, named with the deadline,
    node 4 is asked in its place, the keys are the ones the honest nodes give, and node 1's fan-out thread
    is free again. Without the deadline, httpx's 15 s per-read timeout never fires on a trickle."""
    clients = {
        i: connect_kms(
            relay_1.url if i == 1 else n.server.url,
            collateral_for=lambda _q, _now: cluster.dev_tee.collateral(),
            dev_root_der=cluster.dev_tee.dev_root_der(),
            expected_ca_pubkey_der=n.root_ca_spki,
        )
        for i, n in cluster.nodes.items()
    }
    app_id, honest = boot_hello(teecloud_home, world, cluster.provider())
    provider = ThresholdKeyProvider(cluster.group, clients, hedge_s=60.0, call_timeout_s=CALL_S)
    real_nonce = provider.boot_nonce

    def nonce_then_trickle() -> bytes:
        got = real_nonce()  # every node's challenge at full speed (node 1's through the relay)
        relay_1.trickle.set()
        return got

    provider.boot_nonce = nonce_then_trickle  # type: ignore[method-assign]
    start = time.monotonic()
    _, state = boot_hello(teecloud_home, world, provider, app_id=app_id)
    elapsed = time.monotonic() - start
    assert relay_1.trickle.is_set()
    assert state.keys.disk_crypt_key == honest.keys.disk_crypt_key
    assert "deadline" in provider.faults.get(1, ""), provider.faults
    assert set(provider.faults) == {1}
    asked = {
        i
        for i, n in cluster.nodes.items()
        if any(r.endpoint == api.PATH_THRESHOLD_EVALUATE for r in n.kms.audit.read()[-3:])
    }
    assert 4 in asked  # asked in node 1's place
    assert elapsed < CALL_S + 15  # the deadline, not the trickle's HOLD_S (20 s) nor a per-read timeout
    deadline = time.monotonic() + 5
    while provider._fan._running.get(1, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert provider._fan._running.get(1, 0) == 0  # node 1's thread came back


@pytest.mark.slow
def test_a_trickling_reshare_dealer_fails_the_joining_members_round_by_its_deadline(
    teecloud_home: Path, world: World, cluster: Cluster, relay_1: Relay
) -> None:
    _allow_kms_build(world, teecloud_home)
    plan = ResharePlan(os.urandom(16), 1, cluster.group.commitments, DEALERS, 3, 5)
    _open(cluster, plan)
    tee = SimulatedTdx(teecloud_home)
    boot_kms_tee(tee, finish=False)
    clients = {
        i: connect_kms(
            relay_1.url if i == 1 else cluster.nodes[i].server.url,
            collateral_for=lambda _q, _n: tee.collateral(),
            dev_root_der=tee.dev_root_der(),
            expected_ca_pubkey_der=cluster.nodes[i].root_ca_spki,
        )
        for i in plan.dealers
    }
    clients[1].server_certificate()  # pinned at full speed; the round's calls trickle
    relay_1.trickle.set()
    start = time.monotonic()
    with pytest.raises(KmsClientError, match=r"node 1: .*deadline"):
        join_reshare(
            plan, 1, tee, clients, app_id=KMS_APP_ID, member_token=member_token(plan, 1), timeout_s=CALL_S
        )
    assert time.monotonic() - start < CALL_S + 10


class _OneAnswer:
    """A TLS listener that answers every request on a connection with `answer` (raw bytes), then closes
    the connection when `close` is set; counts connections."""

    def __init__(self, answer: bytes, *, close: bool = False) -> None:
        self.answer, self.close_after = answer, close
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ctx = _server_context()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                while conn.recv(65536):
                    conn.sendall(self.answer)
                    if self.close_after:
                        return
        except (OSError, ssl.SSLError):
            return

    def stop(self) -> None:
        self.sock.close()


def _exchange(answer: bytes, **kw: object) -> bytes:
    server = _OneAnswer(answer, close=True)
    try:
        conn = open_connection(
            "127.0.0.1", server.port, _client_context(), deadline=time.monotonic() + 10, timeout=10
        )
        return conn.exchange("POST", "/x", b"{}", deadline=time.monotonic() + 10, max_bytes=1 << 20).content
    finally:
        server.stop()


def test_an_answer_cut_short_is_refused_never_taken_as_complete() -> None:
    with pytest.raises(WireError, match=r"cut|closed"):
        _exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10)
    with pytest.raises(WireError, match=r"cut|closed"):  # chunked, its last chunk never sent
        _exchange(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")


def test_an_oversized_answer_or_head_and_a_silent_close_are_refused() -> None:
    with pytest.raises(WireError, match="larger than"):
        _exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 2000000\r\n\r\n")
    with pytest.raises(WireError, match=r"head|malformed"):
        _exchange(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70000 + b"\r\ncontent-length: 0\r\n\r\n")
    with pytest.raises(WireError, match="without an answer"):
        _exchange(b"")
    with pytest.raises(WireError, match="malformed"):
        _exchange(b"SMTP ready\r\n\r\n")
    assert _exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}") == b"{}"


def test_a_kept_connection_is_reused_and_one_the_server_closed_is_not() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    kept = _OneAnswer(ok)
    closing = _OneAnswer(ok, close=True)
    try:
        pool = ConnectionPool("127.0.0.1", kept.port, _client_context(), timeout=10)
        for _ in range(3):
            assert (
                pool.exchange("GET", "/", None, deadline=time.monotonic() + 10, max_bytes=100).content
                == b"{}"
            )
        assert pool.opened == 1 and kept.connections == 1
        pool = ConnectionPool("127.0.0.1", closing.port, _client_context(), timeout=10)
        for _ in range(3):
            assert (
                pool.exchange("GET", "/", None, deadline=time.monotonic() + 10, max_bytes=100).content
                == b"{}"
            )
            time.sleep(0.1)  # the server's close arrives: the idle connection is seen closed, not reused
        assert pool.opened == 3
        pool.close()
        with pytest.raises(WireError, match="closed"):
            pool.exchange("GET", "/", None, deadline=time.monotonic() + 10, max_bytes=100)
    finally:
        kept.stop()
        closing.stop()


def test_bytes_after_an_answer_are_never_read_as_the_next_answer() -> None:
    """A server that sends a second, unasked answer right after the first: the connection is not kept (the
    next request would otherwise read the pre-sent answer as its own)."""
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    early = _OneAnswer(ok + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlies")
    try:
        pool = ConnectionPool("127.0.0.1", early.port, _client_context(), timeout=10)
        for _ in range(2):
            assert (
                pool.exchange("GET", "/", None, deadline=time.monotonic() + 10, max_bytes=100).content
                == b"{}"
            )
            time.sleep(0.05)
        assert pool.opened == 2
    finally:
        early.stop()


@pytest.mark.slow
def test_a_node_url_that_leads_to_another_node_gets_no_request_and_is_named(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """Mid-boot, node 1's URL leads to node 2 (a real, authorized node, but not the one node 1's client
    checked and pinned): the boot's call is refused by OpenSSL against node 1's pin before the boot's
    certificate is sent, the re-check of the new identity refuses node 2's certificate (not under node 1's
    root), node 1 is named, and node 4 serves in its place; node 2 answered only its own client."""
    provider = cluster.provider()
    app_id, honest = boot_hello(teecloud_home, world, provider)
    node2 = cluster.nodes[2]
    before = len([r for r in node2.kms.audit.read() if r.endpoint == api.PATH_THRESHOLD_EVALUATE])
    real_nonce = provider.boot_nonce

    def nonce_then_swap() -> bytes:
        got = real_nonce()
        provider._clients[1].url = node2.server.url
        return got

    provider.boot_nonce = nonce_then_swap  # type: ignore[method-assign]
    _, state = boot_hello(teecloud_home, world, provider, app_id=app_id)
    assert state.keys.disk_crypt_key == honest.keys.disk_crypt_key
    assert set(provider.faults) == {1}, provider.faults
    assert "root CA" in provider.faults[1] or "not the server" in provider.faults[1], provider.faults
    records = [r for r in node2.kms.audit.read() if r.endpoint == api.PATH_THRESHOLD_EVALUATE][before:]
    assert len(records) == 1 and records[0].decision == "allowed"  # its own client's request only
    asked = [
        i
        for i, n in cluster.nodes.items()
        if any(r.endpoint == api.PATH_THRESHOLD_EVALUATE for r in n.kms.audit.read()[-2:])
    ]
    assert 4 in asked
