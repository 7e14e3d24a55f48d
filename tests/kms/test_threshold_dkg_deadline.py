"""A wall-clock deadline over each DKG call and the whole ceremony (issue 19, "Bad input and faults";
kms.deadline). httpx's timeout is per read: a listener that trickles a byte at a time holds a caller as
long as it likes. Real trickling listeners here: a TLS one (status line, headers or body trickled; an
oversized body), and a TCP relay in front of a real dealer that starts trickling the dealer's answers
mid-ceremony. Deadlines are short and injected (`timeout_s`), so each case ends in seconds."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee
from teecloud.kms.client import connect_kms
from teecloud.kms.deadline import DeadlinePassed, open_connection, peer_certificate
from teecloud.kms.errors import KmsClientError
from teecloud.kms.server import KmsServer
from teecloud.kms.threshold import DkgPlan, ReshareDealer
from teecloud.kms.threshold_client import join_dkg
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_threshold_dkg import _allow_kms_build, dealers  # noqa: F401 (fixture)
from tests.kms.test_threshold_dkg_gjkr import _open

N, T = 5, 3
STEP_S = 0.1  # one byte per step
HOLD_S = 20.0  # a trickler never runs longer than this


def _server_context() -> ssl.SSLContext:
    """A TLS server context with a fresh self-signed certificate (the client under test trusts anything)."""
    import datetime
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trickler")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        f.flush()
        ctx.load_cert_chain(f.name)
    return ctx


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


class Trickler:
    """A TLS listener on 127.0.0.1 that answers each connection by `mode`: "status" trickles its status
    line, "body" sends headers at once then trickles a long body, "big" sends 2 MiB at once, "ok" a short
    answer, "handshake" accepts TCP and never speaks TLS."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ctx = _server_context()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, raw: socket.socket) -> None:
        with raw:
            raw.settimeout(5)
            try:
                if self.mode == "handshake":
                    self._stop.wait(HOLD_S)
                    return
                conn = self.ctx.wrap_socket(raw, server_side=True)
                conn.recv(65536)
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                if self.mode == "status":
                    self._trickle(conn, head + b"content-length: 2\r\n\r\n{}")
                elif self.mode == "body":
                    conn.sendall(head + b"content-length: 100000\r\n\r\n")
                    self._trickle(conn, b"x" * 100000)
                elif self.mode == "big":
                    conn.sendall(head + b"content-length: 2097152\r\n\r\n" + b"x" * 2097152)
                else:
                    conn.sendall(head + b"content-length: 2\r\n\r\n{}")
            except OSError:
                return  # the client gave up

    def _trickle(self, conn: ssl.SSLSocket, data: bytes) -> None:
        until = time.monotonic() + HOLD_S
        for b in data:
            if self._stop.wait(STEP_S) or time.monotonic() > until:
                return
            conn.sendall(bytes([b]))

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def trickler(request: pytest.FixtureRequest) -> Iterator[Trickler]:
    t = Trickler(request.param)
    yield t
    t.close()


def _get(port: int, deadline: float) -> bytes:
    conn = open_connection("127.0.0.1", port, _client_context(), deadline=deadline, timeout=30)
    try:
        return conn.exchange("GET", "/", None, deadline=deadline, max_bytes=1 << 20).content
    finally:
        conn.close()


@pytest.mark.parametrize("trickler", ["status", "body"], indirect=True)
def test_a_trickled_answer_is_cut_off_at_the_deadline(trickler: Trickler) -> None:
    start = time.monotonic()
    with pytest.raises(DeadlinePassed):
        _get(trickler.port, start + 1.0)
    assert 0.9 <= time.monotonic() - start < 2.5  # the deadline, not the 30 s per-read timeout nor HOLD_S


@pytest.mark.parametrize("trickler", ["body"], indirect=True)
def test_without_the_deadline_httpx_keeps_reading_a_trickle(trickler: Trickler) -> None:
    """The gap the deadline closes: a 1 s per-read timeout never fires while a byte comes every 0.1 s."""
    got = 0
    start = time.monotonic()
    with (
        httpx.Client(timeout=1.0, verify=_client_context()) as c,
        c.stream("GET", f"https://127.0.0.1:{trickler.port}/") as resp,
    ):
        for chunk in resp.iter_bytes():
            got += len(chunk)
            if time.monotonic() - start > 2.0:
                break
    assert got >= 5 and time.monotonic() - start > 2.0


@pytest.mark.parametrize("trickler", ["big"], indirect=True)
def test_an_answer_past_the_size_cap_is_refused(trickler: Trickler) -> None:
    with pytest.raises(KmsClientError, match="larger than 1048576 bytes"):
        _get(trickler.port, time.monotonic() + 10)


@pytest.mark.parametrize("trickler", ["ok"], indirect=True)
def test_a_prompt_answer_is_read_and_a_past_deadline_sends_nothing(trickler: Trickler) -> None:
    assert _get(trickler.port, time.monotonic() + 5) == b"{}"
    with pytest.raises(DeadlinePassed):
        _get(trickler.port, time.monotonic() - 1)


@pytest.mark.parametrize("trickler", ["handshake"], indirect=True)
def test_a_handshake_that_never_finishes_ends_at_the_deadline(trickler: Trickler) -> None:
    """The identity probe's TLS handshake against a listener that never speaks TLS back in time."""
    start = time.monotonic()
    assert (
        peer_certificate("127.0.0.1", trickler.port, _client_context(), deadline=start + 1.0, timeout=30)
        is None
    )
    assert time.monotonic() - start < 2.5
    with pytest.raises(DeadlinePassed):
        open_connection(
            "127.0.0.1", trickler.port, _client_context(), deadline=time.monotonic() + 1.0, timeout=30
        )
    assert time.monotonic() - start < 4.5


class Relay:
    """A TCP relay on 127.0.0.1 in front of `upstream` (host, port): the client's bytes go up at once; the
    upstream's come back at once until `trickle` is set, then one byte per STEP_S (for at most HOLD_S)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.trickle = threading.Event()
        self._stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream, timeout=HOLD_S)
            threading.Thread(target=self._pump, args=(client, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        until = time.monotonic() + HOLD_S
        src.settimeout(HOLD_S)
        try:
            while time.monotonic() < until and not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if down and self.trickle.is_set():
                    for b in data:
                        if self._stop.wait(STEP_S) or time.monotonic() > until:
                            return
                        dst.sendall(bytes([b]))
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


class TricklingBoard(ReshareDealer):
    """An honest dealer whose relay starts trickling its answers once the first statement reaches its
    board (the sub-share stage went through at full speed)."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(None)
        self.relay = relay

    def board(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        self.relay.trickle.set()
        return super().board(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_dealer_trickling_its_board_holds_no_member_past_the_ceremony_deadline(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """Dealer 3 sits behind a relay that trickles once the complaint phase starts. Without the deadline
    each member would wait on its board for minutes (15 s per read never fires); with `timeout_s` = 8 every
    member's join fails by then, naming dealer 3 and the deadline, and no member makes a share."""
    _allow_kms_build(world, teecloud_home)
    host, port = httpx.URL(dealers[3].url).host, httpx.URL(dealers[3].url).port
    assert port is not None
    relay = Relay((host, port))
    try:
        dealers[3].service.reshare = TricklingBoard(relay)
        plan = DkgPlan(os.urandom(16), 1, tuple(range(1, N + 1)), T, N, complaint_round=True)
        _open(dealers, plan)

        def member(j: int) -> tuple[float, BaseException | None]:
            tee = SimulatedTdx(teecloud_home)
            boot_kms_tee(tee, finish=False)
            clients = {
                i: connect_kms(
                    relay.url if i == 3 else s.url,
                    collateral_for=lambda _q, _n: tee.collateral(),
                    dev_root_der=tee.dev_root_der(),
                    expected_ca_pubkey_der=s.service.keys.ca_public_key_der,
                )
                for i, s in dealers.items()
            }
            start = time.monotonic()
            try:
                join_dkg(plan, j, tee, clients, app_id=KMS_APP_ID, timeout_s=8)
            except KmsClientError as exc:
                return time.monotonic() - start, exc
            return time.monotonic() - start, None

        with ThreadPoolExecutor(max_workers=N) as pool:
            results = list(pool.map(member, range(1, N + 1)))
    finally:
        relay.close()
    assert relay.trickle.is_set()  # the sub-shares went through; the boards trickled
    for elapsed, exc in results:
        assert exc is not None, "a member made a share"
        assert "node 3: " in str(exc) and "deadline" in str(exc), str(exc)
        assert elapsed < 8 + 3  # the ceremony's deadline (plus one poll and the teardown)
