"""Review 12: whom the h11 wire talks to. Renegotiation, a TLS 1.2-only impostor, session resumption, the
pools' (pin, host:port) keys, the Host header, and the deadline's reach over connect and the pin lock."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from teecloud.kms.client import KmsClient, UnsafeNoServerCheck, ratls_server_check
from teecloud.kms.deadline import Connection, WireError, open_connection
from teecloud.kms.errors import KmsClientError
from teecloud.kms.server import KmsServer
from tests.kms.conftest import Kms
from tests.kms.test_client_pinning import (
    RecordingTlsServer,
    _ratls_server_identity,
    _send_with_cert,
)
from tests.review12._scripted import Scripted, read_request

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    start = time.monotonic()
    yield
    assert time.monotonic() - start < 40


def _self_signed() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a fresh self-signed P-256 certificate."""
    import datetime

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


class RenegotiatingNode:
    """A TLS 1.2 node (pyOpenSSL: the standard library cannot renegotiate) that, after reading the request,
    starts a server-initiated renegotiation (HelloRequest) and then sends its answer."""

    def __init__(self) -> None:
        cert_pem, key_pem = _self_signed()
        self.der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        self.ctx = SSL.Context(SSL.TLS_METHOD)
        self.ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        self.ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
        self.ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.error: BaseException | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            raw, _ = self.sock.accept()
        except OSError:
            return
        raw.settimeout(None)  # pyOpenSSL needs a blocking socket (a timeout makes it non-blocking)
        conn = SSL.Connection(self.ctx, raw)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.renegotiate()
            conn.do_handshake()  # sends the HelloRequest
            conn.sendall(OK)
            while conn.recv(65536):  # carries the renegotiation on, if the client takes it up
                pass
        except (SSL.Error, OSError) as exc:
            self.error = exc
        finally:
            raw.close()


def test_the_client_never_renegotiates_a_pinned_connection() -> None:
    """A node asks for a TLS 1.2 renegotiation mid-answer (a new handshake in which it could present another
    certificate). Answer.server_der and the pin comparison after the answer read the certificate of the
    FIRST handshake, so a renegotiated identity would go unseen by it; the client must refuse to
    renegotiate (OP_NO_RENEGOTIATION), sending exactly one ClientHello."""
    node = RenegotiatingNode()
    client = KmsClient("https://127.0.0.1:9", server_check=UnsafeNoServerCheck())
    ctx = client._ssl_context(None, pinned=node.der)
    hellos: list[str] = []

    def record(_conn, direction, _version, content_type, msg_type, _data):  # type: ignore[no-untyped-def]
        if direction == "write" and content_type == ssl._TLSContentType.HANDSHAKE:  # type: ignore[attr-defined]
            if msg_type == ssl._TLSMessageType.CLIENT_HELLO:  # type: ignore[attr-defined]
                hellos.append("hello")

    ctx._msg_callback = record  # type: ignore[attr-defined]
    conn = open_connection("127.0.0.1", node.port, ctx, deadline=time.monotonic() + 10, timeout=10)
    try:
        answer = conn.exchange("GET", "/x", None, deadline=time.monotonic() + 3, max_bytes=1 << 20)
        assert answer.server_der == node.der
    except WireError:
        pass  # refusing the renegotiation may end the exchange: a domain error, no second handshake
    finally:
        conn.close()
        node.sock.close()
    assert hellos == ["hello"]


def test_a_tls12_only_impostor_never_receives_the_client_certificate(
    teecloud_home: Path, kms: Kms, server: KmsServer, client_cred: tuple[str, str, str]
) -> None:
    """As tests/kms/test_client_pinning's swap, with the impostor capped at TLS 1.2 (the client allows 1.2,
    where the client Certificate follows the server's Certificate in the same flight exchange): OpenSSL
    still refuses the impostor before sending it."""
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    client = KmsClient(server.url, server_check=check)
    assert client.meta().ca_pubkey
    cert_pem, key_pem = _ratls_server_identity(teecloud_home)
    evil = RecordingTlsServer(cert_pem, key_pem, client_cred[2])
    evil._ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with evil:
        client.url = evil.url
        with pytest.raises(KmsClientError):
            _send_with_cert(client, client_cred)
        time.sleep(0.3)
        assert evil.seen.handshakes >= 1
        assert evil.seen.client_certs == [] and evil.seen.requests == 0


def _ok_forever(tls: ssl.SSLSocket) -> None:
    while read_request(tls):
        tls.sendall(OK)


def _scripted_with(cert_pem: bytes, key_pem: bytes) -> Scripted:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
        f.write(cert_pem + key_pem)
        f.flush()
        ctx.load_cert_chain(f.name)
    return Scripted(_ok_forever, ctx)


def test_no_session_is_resumed_across_connections_or_pins() -> None:
    """Each new connection of a pinned pool is a full handshake (a resumed session would carry an earlier
    handshake's identity and skip the certificate check)."""
    cert_pem, key_pem = _self_signed()
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    node = _scripted_with(cert_pem, key_pem)
    client = KmsClient(f"https://127.0.0.1:{node.port}", server_check=UnsafeNoServerCheck())
    ctx = client._ssl_context(None, pinned=der)
    try:
        for _ in range(3):
            conn = open_connection("127.0.0.1", node.port, ctx, deadline=time.monotonic() + 5, timeout=5)
            conn.exchange("GET", "/x", None, deadline=time.monotonic() + 5, max_bytes=1 << 20)
            assert conn._tls.session_reused is False
            conn.close()
    finally:
        node.stop()


def test_a_pool_is_never_reused_for_another_address_with_the_same_pin() -> None:
    """Node i's URL is moved (port reuse, a relay) to another listener presenting the same pinned
    certificate: the kept connections to the old address are not used for the new one."""
    cert_pem, key_pem = _self_signed()
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    a, b = _scripted_with(cert_pem, key_pem), _scripted_with(cert_pem, key_pem)
    client = KmsClient(f"https://127.0.0.1:{a.port}", server_check=UnsafeNoServerCheck())
    try:
        for _ in range(2):
            client._request("GET", "/x", None, None, der, deadline=time.monotonic() + 5)
        assert (a.connections, b.connections) == (1, 0)
        client.url = f"https://127.0.0.1:{b.port}"
        client._request("GET", "/x", None, None, der, deadline=time.monotonic() + 5)
        assert (a.connections, b.connections) == (1, 1)
    finally:
        client.close()
        a.stop()
        b.stop()


def test_an_ipv6_literal_gets_a_bracketed_host_header() -> None:
    """RFC 9110 §7.2 / RFC 3986 §3.2.2: Host for https://[::1]:8443 is "[::1]:8443"; "::1:8443" is not a
    valid authority (a strict server answers 400)."""
    fake = object.__new__(Connection)
    Connection.__init__(fake, None, "::1", 8443, None, timeout=1.0)  # type: ignore[arg-type]
    assert fake._authority == "[::1]:8443"


class _FullBacklog:
    """A listener whose accept queue is full: a further connect's SYN is dropped and the connect hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)
        time.sleep(0.2)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


def test_the_deadline_bounds_a_connect_to_a_name_with_several_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node's name resolves to three addresses that never answer a SYN (a DNS answer the attacker
    controls, or simply localhost's ::1 and 127.0.0.1): socket.create_connection gives EACH address the
    whole time left, so the call ends after 3 x the deadline."""
    holes = [_FullBacklog() for _ in range(3)]
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kw):  # type: ignore[no-untyped-def]
        if host == "node.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", h.port)) for h in holes]
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    client = KmsClient("https://node.example:443", server_check=UnsafeNoServerCheck(), timeout=10)
    try:
        start = time.monotonic()
        with pytest.raises(KmsClientError):
            client.boot_nonce(deadline=start + 1.5)
        elapsed = time.monotonic() - start
    finally:
        for h in holes:
            h.close()
    assert elapsed < 1.5 + 1.5, f"the call took {elapsed:.1f} s past a 1.5 s deadline"


def test_the_deadline_bounds_a_wait_for_another_threads_identity_probe() -> None:
    """Thread A probes the node's identity (the first call) and the node stalls the handshake; thread B's
    call, with a 1 s deadline, waits for A's probe on the pin lock — past its own deadline."""
    hole = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never speaks TLS
    port = hole.getsockname()[1]
    client = KmsClient(f"https://127.0.0.1:{port}", server_check=UnsafeNoServerCheck(), timeout=6)

    def first_call() -> None:
        with pytest.raises(KmsClientError):
            client.boot_nonce()

    a = threading.Thread(target=first_call, daemon=True)
    try:
        a.start()
        time.sleep(0.3)
        start = time.monotonic()
        with pytest.raises(KmsClientError):
            client.boot_nonce(deadline=start + 1.0)
        elapsed = time.monotonic() - start
        a.join(10)
    finally:
        hole.close()
    assert elapsed < 1.0 + 1.5, f"the call took {elapsed:.1f} s past a 1 s deadline"


def test_the_deadline_bounds_a_slow_name_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver for the node's name answers after 3 s (a slow or attacker-held DNS server); the call
    has a 1 s deadline."""
    real = socket.getaddrinfo

    def slow(host, port, *args, **kw):  # type: ignore[no-untyped-def]
        if host == "slow.example":
            time.sleep(3.0)
            return real("127.0.0.1", 9, *args, **kw)
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    client = KmsClient("https://slow.example:9", server_check=UnsafeNoServerCheck(), timeout=10)
    start = time.monotonic()
    with pytest.raises(KmsClientError):
        client.boot_nonce(deadline=start + 1.0)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0 + 1.5, f"the call took {elapsed:.1f} s past a 1 s deadline"
