"""The node pins a qemu guest is given come from a public accessor (ThresholdKeyProvider.node_certificate,
over KmsClient.server_certificate): the certificate each node's client checked, never one it did not. A TLS
server the test controls presents a self-signed certificate; the client's server_check decides."""

from __future__ import annotations

import datetime
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teecloud.keys import threshold as th
from teecloud.kms.client import KmsClient
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider


class _TlsServer:
    """Presents one self-signed certificate to each handshake, then closes (at most 8 connections)."""

    def __init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms-node")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .sign(key, hashes.SHA256())
        )
        self.der = cert.public_bytes(serialization.Encoding.DER)
        self._dir = tempfile.TemporaryDirectory(prefix="teecloud-pin-test-")
        pem = Path(self._dir.name) / "server.pem"
        pem.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(str(pem))
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.url = f"https://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(8):
            while not self._stop.is_set():
                try:
                    raw, _ = self._sock.accept()
                    break
                except TimeoutError:
                    continue
            else:
                return
            raw.settimeout(5)
            try:
                with self._ctx.wrap_socket(raw, server_side=True):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._dir.cleanup()


@pytest.fixture
def server() -> Iterator[_TlsServer]:
    s = _TlsServer()
    try:
        yield s
    finally:
        s.close()


def _provider(urls: dict[int, str], checks: dict[int, list[bytes]], refuse: set[int]) -> ThresholdKeyProvider:
    def check_for(i: int) -> Callable[[bytes], None]:
        def check(der: bytes) -> None:
            checks[i].append(der)
            if i in refuse:
                raise KmsClientError(f"node {i}: not allowed on chain (test)")

        return check

    dealing = th.deal(None, 1, len(urls))
    group = ThresholdGroup(1, 1, dealing.commitments, urls)
    return ThresholdKeyProvider(group, {i: KmsClient(u, server_check=check_for(i)) for i, u in urls.items()})


def test_node_certificate_is_the_certificate_the_nodes_client_checked(server: _TlsServer) -> None:
    checks: dict[int, list[bytes]] = {1: []}
    provider = _provider({1: server.url}, checks, refuse=set())
    der = provider.node_certificate(1)
    assert der == server.der
    assert checks[1] == [server.der]  # checked once, before it was handed out
    assert provider.node_certificate(1) == der and len(checks[1]) == 1  # pinned: no second probe


def test_a_node_whose_check_fails_gives_no_certificate(server: _TlsServer) -> None:
    checks: dict[int, list[bytes]] = {1: [], 2: []}
    provider = _provider({1: server.url, 2: server.url}, checks, refuse={2})
    assert provider.node_certificate(1) == server.der
    with pytest.raises(KmsClientError, match="not allowed on chain"):
        provider.node_certificate(2)
    assert checks[2] == [server.der]


def test_an_index_outside_the_group_or_an_unreachable_node_is_an_error(server: _TlsServer) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    checks: dict[int, list[bytes]] = {1: [], 2: []}
    provider = _provider({1: server.url, 2: dead}, checks, refuse=set())
    with pytest.raises(KmsClientError, match="not in the group"):
        provider.node_certificate(3)
    with pytest.raises(KmsClientError, match="cannot reach"):
        provider.node_certificate(2)
    assert checks[2] == []
