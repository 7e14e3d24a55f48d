"""The KMS client checks the server before any credential leaves: its RA-TLS certificate is verified on a
handshake without a client certificate, then pinned; OpenSSL refuses any other server before the client's
Certificate message. A TLS server the tests control records, per handshake, whether a client certificate
arrived and whether any request did."""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem
from teecloud.keys.ratls import make_ratls_cert
from teecloud.kms import api
from teecloud.kms.client import KmsClient, UnsafeNoServerCheck, ratls_server_check
from teecloud.kms.errors import KmsClientError
from teecloud.kms.server import KmsServer
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import COMPOSE_V1, Kms, boot_app


@dataclass
class Seen:
    handshakes: int = 0
    client_certs: list[bytes] = field(default_factory=list)
    requests: int = 0


class RecordingTlsServer:
    """A TLS server on 127.0.0.1 with the given certificate; it asks for a client certificate (and accepts one
    issued by `client_ca`), records what arrived and answers any request with HTTP 500. Bounded: at most
    `max_conns` connections, each with a 5 s timeout."""

    def __init__(self, cert_pem: str, key_pem: str, client_ca_pem: str, *, max_conns: int = 16) -> None:
        self.seen = Seen()
        self._dir = tempfile.TemporaryDirectory(prefix="teecloud-evil-")
        chain = Path(self._dir.name) / "server.pem"
        chain.write_text(cert_pem + key_pem)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(str(chain))
        self._ctx.verify_mode = ssl.CERT_OPTIONAL
        self._ctx.load_verify_locations(cadata=client_ca_pem)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._max = max_conns
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> RecordingTlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._dir.cleanup()

    def _run(self) -> None:
        served = 0
        while not self._stop.is_set() and served < self._max:
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            served += 1
            raw.settimeout(5)
            try:
                with self._ctx.wrap_socket(raw, server_side=True) as tls:
                    self.seen.handshakes += 1
                    peer = tls.getpeercert(binary_form=True)
                    if peer:
                        self.seen.client_certs.append(peer)
                    if tls.recv(65536):
                        self.seen.requests += 1
                        tls.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            except (OSError, ValueError):
                raw.close()  # the client aborted the handshake (or the connection): nothing arrived


@pytest.fixture
def client_cred() -> tuple[str, str, str]:
    """A client credential (key PEM, certificate PEM) and the CA the recording server accepts it under."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    ca = issue_cert(
        ca_key.public_key(),
        issuer_key=ca_key,
        issuer_name=None,
        subject_cn="ca",
        not_before=now - 60,
        not_after=now + 600,
        ca=True,
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = issue_cert(
        key.public_key(),
        issuer_key=ca_key,
        issuer_name=ca.subject,
        subject_cn="teecloud KMS client",
        not_before=now - 60,
        not_after=now + 600,
        server_auth=False,
        client_auth=True,
    )
    return key_to_pem(key), cert_to_pem(leaf), cert_to_pem(ca)


def _ratls_server_identity(home: Path, *, booted: bool = False) -> tuple[str, str]:
    """A self-signed RA-TLS server certificate from a simulated TEE at `home` (booted as an app: a genuine
    attested CVM that is not the KMS)."""
    tee = SimulatedTdx(home)
    if booted:
        boot_app(tee, b"\x11" * 20, COMPOSE_V1, b"\x22" * 20)
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    cert = make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject="kms",
        usage="kms:rpc",
        not_before=now - 60,
        not_after=now + 600,
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_to_pem(key)


def _send_with_cert(client: KmsClient, cred: tuple[str, str, str]) -> None:
    client._call("POST", api.PATH_GET_APP_KEY, api.AppKeyResponse, body={}, client_cert=(cred[0], cred[1]))


def test_a_server_with_wrong_evidence_never_receives_the_client_certificate(
    teecloud_home: Path, kms: Kms, client_cred: tuple[str, str, str]
) -> None:
    cert_pem, key_pem = _ratls_server_identity(teecloud_home / "elsewhere")
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),  # the genuine installation's root, not the server's
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    with RecordingTlsServer(cert_pem, key_pem, client_cred[2]) as evil:
        with pytest.raises(KmsClientError, match="does not verify"):
            _send_with_cert(KmsClient(evil.url, server_check=check), client_cred)
        time.sleep(0.3)
        assert evil.seen.handshakes >= 1  # it was reached: the probe handshake
        assert evil.seen.client_certs == [] and evil.seen.requests == 0


def test_control_an_unchecked_client_does_hand_its_certificate_over(
    teecloud_home: Path, client_cred: tuple[str, str, str]
) -> None:
    """The recorder works: a client that accepts any server (pins whatever it sees) sends its certificate."""
    cert_pem, key_pem = _ratls_server_identity(teecloud_home / "elsewhere")
    with RecordingTlsServer(cert_pem, key_pem, client_cred[2]) as evil:
        with pytest.raises(KmsClientError):
            _send_with_cert(KmsClient(evil.url, server_check=UnsafeNoServerCheck()), client_cred)
        time.sleep(0.3)
    assert len(evil.seen.client_certs) == 1 and evil.seen.requests == 1
    from cryptography import x509

    assert evil.seen.client_certs[0] == x509.load_pem_x509_certificate(client_cred[1].encode()).public_bytes(
        serialization.Encoding.DER
    )


@pytest.mark.parametrize(
    ("booted", "refusal"),
    [(False, "RA-TLS certificate does not verify"), (True, "not issued by the expected KMS root")],
)
def test_a_server_swapped_in_after_the_check_never_receives_the_client_certificate(
    teecloud_home: Path,
    kms: Kms,
    server: KmsServer,
    client_cred: tuple[str, str, str],
    booted: bool,
    refusal: str,
) -> None:
    """(1) the client checks and pins the genuine KMS; (2) the route to the KMS's URL is taken over by a
    server presenting another certificate (here: the same URL now reaches it); (3) the next request with a
    client certificate: OpenSSL refuses the server before sending it, and the re-check refuses it too."""
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    client = KmsClient(server.url, server_check=check)
    assert client.meta().ca_pubkey  # (1) checked and pinned
    pinned = client._pinned
    # the attacker's server presents an RA-TLS certificate from this installation's simulated TEE (booted:
    # a genuine attested app), not the KMS's: OpenSSL refuses it against the pin (nothing is sent), then
    # the check of the new identity refuses it
    cert_pem, key_pem = _ratls_server_identity(teecloud_home, booted=booted)
    with RecordingTlsServer(cert_pem, key_pem, client_cred[2]) as evil:
        client.url = evil.url  # (2)
        with pytest.raises(KmsClientError, match=refusal):
            _send_with_cert(client, client_cred)  # (3)
        time.sleep(0.3)
        assert evil.seen.handshakes >= 1
        assert evil.seen.client_certs == [] and evil.seen.requests == 0
    assert client._pinned in (None, pinned)  # the refused identity was never pinned


def test_the_pin_is_renewed_when_the_kms_presents_a_new_checked_identity(
    teecloud_home: Path, kms: Kms, server: KmsServer
) -> None:
    """A stale pin (the KMS's identity changed) is dropped and the new identity checked, once."""
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    client = KmsClient(server.url, server_check=check)
    cert_pem, _ = _ratls_server_identity(teecloud_home / "old")
    from cryptography import x509

    client._pinned = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    assert client.meta().ca_pubkey
    assert client._pinned != x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )


def test_no_client_certificate_without_a_pin() -> None:
    client = KmsClient("https://127.0.0.1:9", server_check=UnsafeNoServerCheck())
    with pytest.raises(RuntimeError, match="pinned"):
        client._ssl_context(("k", "c"), pinned=None)


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    start = time.monotonic()
    yield
    assert time.monotonic() - start < 30


def test_calls_without_a_client_certificate_share_one_kept_alive_connection(
    teecloud_home: Path, kms: Kms, server: KmsServer, client_cred: tuple[str, str, str]
) -> None:
    """Boot challenges, metadata and the temporary CA go over one kept-alive pool pinned to the checked
    server (one handshake for many calls, issue 19's CPU); a pin change re-makes it; a server swapped in
    behind the URL still gets no request, and the client certificate never travels on that pool."""
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    client = KmsClient(server.url, server_check=check)
    nonces = {client.boot_nonce() for _ in range(4)}
    assert len(nonces) == 4 and client.meta(refresh=True).ca_pubkey
    assert client._open is not None and client._open[0] == client._pinned
    assert client._open[1].opened == 1  # one TLS connection for the five calls
    first = client._open[1]

    cert_pem, key_pem = _ratls_server_identity(teecloud_home, booted=False)
    with RecordingTlsServer(cert_pem, key_pem, client_cred[2]) as evil:
        client.url = evil.url
        with pytest.raises(KmsClientError):
            client.boot_nonce()
        time.sleep(0.3)
        assert evil.seen.handshakes >= 1 and evil.seen.requests == 0 and evil.seen.client_certs == []
    client.url = server.url

    from cryptography import x509

    client._pinned = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )  # a stale pin: the next call renews it and opens a new pool for the new pin
    assert len(client.boot_nonce()) == len(next(iter(nonces)))
    assert client._open is not None and client._open[1] is not first and client._open[0] == client._pinned
    client.close()
    assert client._open is None
