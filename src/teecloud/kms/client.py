"""KMS client: the agent's key provider backed by a real KMS (mutual RA-TLS; the wire: kms.deadline).

    connect_kms(url, ...)              THE way to build a verifying KmsClient (RA-TLS check + KmsAuth)
    KmsClient(url, server_check=...)   implements teecloud.agent.keyprovider.KeyProvider
    ratls_server_check(...)            checks the KMS's RA-TLS server certificate: quote, report_data binding,
                                       event log, and (given a chain) KmsAuth.isKmsAllowed for its boot_info
    UnsafeNoServerCheck()              skips that check (tests of other things only); says so in a warning

Server first, then credentials. Python's ssl exposes no certificate-verify callback and no hook between the
server's Certificate and the client's, so the RA-TLS check cannot run inside the handshake that would send
the client certificate. Instead (`_pinned_context`):
  (a) a first TLS connection without any client certificate: handshake only, no request; its server
      certificate goes through `server_check` (RA-TLS evidence, KmsAuth / the KMS root key);
  (b) that exact certificate is pinned: every request, with or without a client certificate, goes over a
      context whose only trust anchor is the pinned certificate (OpenSSL, partial chains allowed). OpenSSL
      verifies the server's chain when it receives it and aborts the handshake on a mismatch, before the
      client's Certificate message (TLS 1.3: after the server's Finished; TLS 1.2: after its Certificate),
      so a client certificate only ever reaches the server that was checked; the peer certificate is
      compared with the pin again after each request;
  (c) when the pinned handshake fails verification (the KMS restarted with a new identity), the pin is
      dropped and (a) runs again, once.

One boot, one credential, kept connections per KMS (`BootCredential`, `KmsClient.bind_boot`): a key
provider that makes several attested calls during one boot (the threshold client: evaluate, then
signatures) makes one RA-TLS key and one quote for the boot; each KMS gets a certificate for that key under
its own temporary CA and kept-alive mutual-TLS connections for the boot's calls (one; more only while calls
to it run at once); unbinding (at the end of the boot) closes them and nothing of the credential is used
again. The KMS still applies its whole rule to every request on a kept connection (its evidence check is
cached per certificate; boot time, OS image, chain and boot challenge are judged per request). Calls for a
tee that is not bound make a fresh credential each.

`get_app_keys` procedure:
  (1) GetMeta (server checked) -> the KMS root CA and k256 public keys, cached;
  (2) GetTempCaCert -> the public temporary CA that makes stdlib TLS accept our self-made certificate;
  (3) a fresh P-256 key and an RA-TLS certificate for it, valid a few minutes, whose quote (from `tee`) binds
      the key and whose event log tells the KMS which app this is;
  (4) GetAppKey over mutual TLS with that certificate, carrying the CVM's vm_config (`tee.vm_config()`: the
      VM shape the KMS needs to check RTMR0, docs/kms.md step 6);
  (5) check what came back: the app id is ours, the k256 signature is the KMS root's, the app CA certificate
      is issued by the KMS root CA.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ValidationError

from teecloud import vmconfig
from teecloud.attestation.errors import VerificationError
from teecloud.attestation.models import EventLogEntry
from teecloud.attestation.policy import Policy
from teecloud.keys.appkeys import AppKeys, env_encrypt_pubkey_digest
from teecloud.keys.certs import key_to_pem
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import QuoteSource, make_ratls_cert
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest, recover_k256
from teecloud.kms import api
from teecloud.kms.challenge import TOKEN_SIZE
from teecloud.kms.deadline import (
    Answer,
    ConnectionPool,
    DeadlinePassed,
    WireError,
    encode_json,
    open_connection,
)
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.peer import AuthChain, ChainGate, PeerPolicy, PeerRejected, PeerVerifier

__all__ = [
    "BootCredential",
    "ComposeBook",
    "KmsClient",
    "ServerCheck",
    "UnsafeNoServerCheck",
    "connect_kms",
    "ratls_server_check",
    "read_answer",
    "vm_config_json",
]

log = logging.getLogger("teecloud.kms.client")

ServerCheck = Callable[[bytes], None]
"""Called with the server's TLS certificate (DER) before any response is used; raises KmsClientError."""

_M = TypeVar("_M", bound=BaseModel)
MAX_RESPONSE_BYTES = 1 << 20
CLIENT_CERT_LIFETIME_S = 300
TEMP_CA_CACHE_S = 300


class ComposeBook:
    """The app-compose documents boot() handed to a key provider (`bind_app_compose`), found again by the
    compose-hash the requesting CVM measured: a provider shared by many booting CVMs (the local docker
    runtime) sends each CVM its own compose, which the KMS reads for the GPU gate. Bounded, thread-safe."""

    MAX_ENTRIES = 256
    # the KMS refuses request bodies above KmsConfig.max_body_bytes (256 KiB): a larger compose is not sent
    # (a KMS with require_app_compose then refuses, saying so; the default KMS reads no GPU requirement)
    MAX_SENT_BYTES = 192 * 1024

    def __init__(self) -> None:
        self._by_hash: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def add(self, app_compose: str) -> None:
        if not app_compose or len(app_compose.encode("utf-8", "surrogatepass")) > self.MAX_SENT_BYTES:
            return
        digest = hashlib.sha256(app_compose.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            self._by_hash.pop(digest, None)
            self._by_hash[digest] = app_compose
            while len(self._by_hash) > self.MAX_ENTRIES:
                self._by_hash.pop(next(iter(self._by_hash)))

    def for_tee(self, tee: QuoteSource) -> str:
        """The compose whose sha256 is the compose-hash `tee` measured, or "" (then the KMS decides)."""
        measured = [
            bytes(e.event_payload) for e in tee.event_log() if e.imr == 3 and e.event == "compose-hash"
        ]
        if len(measured) != 1:
            return ""
        with self._lock:
            return self._by_hash.get(measured[0], "")


class _OneQuote:
    """A QuoteSource that quotes once: the first report data asked for is quoted (with the event log read
    at that moment); the same report data again gets the same quote, any other is refused. So the
    certificates of one BootCredential all carry one quote, which binds the credential's one key."""

    def __init__(self, tee: QuoteSource) -> None:
        self._tee = tee
        self._taken: tuple[bytes, bytes, list[EventLogEntry]] | None = None
        self._lock = threading.Lock()

    def quote(self, report_data: bytes) -> bytes:
        with self._lock:
            if self._taken is None:
                quote = self._tee.quote(report_data)
                self._taken = (report_data, quote, list(self._tee.event_log()))
            if self._taken[0] != report_data:
                raise KmsClientError("a boot credential's quote binds its own key only")
            return self._taken[1]

    def event_log(self) -> list[EventLogEntry]:
        with self._lock:
            if self._taken is None:
                raise KmsClientError("a boot credential's event log is read with its quote")
            return list(self._taken[2])


class BootCredential:
    """One boot's RA-TLS client key and the one quote that binds it, shown to every KMS the boot calls.

    A KMS accepts a client certificate only under its own public temporary CA (server_ssl_context), so
    each KMS gets its own certificate (`cert_for`) — for the same key, carrying the same quote and event
    log; the quote is taken at the first certificate. Valid for `lifetime_s` from its making; it lives only
    as long as the boot scope that made it (ThresholdKeyProvider.get_app_keys), in this process's memory."""

    def __init__(
        self,
        tee: QuoteSource,
        *,
        usage: str,
        app_id: bytes | None,
        clock: Callable[[], float] = time.time,
        lifetime_s: int = CLIENT_CERT_LIFETIME_S,
    ) -> None:
        self.usage = usage
        self.app_id = app_id
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._key_pem = key_to_pem(self._key)
        self._evidence = _OneQuote(tee)
        now = int(clock())
        self._not_before, self._not_after = now - 30, now - 30 + lifetime_s

    def cert_for(self, temp_cert: x509.Certificate, temp_key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
        """(key PEM, certificate PEM) for a KMS whose temporary CA is (temp_cert, temp_key)."""
        cert = make_ratls_cert(
            self._evidence,
            self._key,
            issuer_key=temp_key,
            issuer_cert=temp_cert,
            subject="teecloud KMS client",
            usage=self.usage,
            not_before=self._not_before,
            not_after=self._not_after,
            app_id=self.app_id,
            server_auth=False,
            client_auth=True,
        )
        return self._key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class _BootSession:
    """A boot's credential at one KMS and, once the boot calls it, its kept-alive connections (pinned to
    `pinned`, the server certificate they were opened for; one, more only while calls run at once)."""

    tee: QuoteSource
    credential: BootCredential
    pool: ConnectionPool | None = None
    pinned: bytes | None = None
    client_cert: tuple[str, str] | None = None  # (key PEM, certificate PEM) the connections present
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: bool = False  # unbound: a call still running (abandoned by a hedge) opens nothing new

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool, self.pinned = None, None


def _load_cert_chain(ctx: ssl.SSLContext, pem: str) -> None:
    """ssl loads a private key only from a path: an anonymous in-memory file (Linux memfd, opened through
    /proc) keeps it off every file system and costs no directory to make and remove (a temporary directory
    per request cost ≈6 ms here); elsewhere a 0600 file in a temporary directory."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("teecloud-kms-client", os.MFD_CLOEXEC)
        try:
            data = pem.encode()
            while data:
                data = data[os.write(fd, data) :]
            try:
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
                return
            except FileNotFoundError:  # no /proc: the temporary file below
                pass
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="teecloud-kms-client-") as tmp:
        path = Path(tmp) / "client.pem"
        path.touch(mode=0o600)
        path.write_text(pem)
        ctx.load_cert_chain(str(path))


class UnsafeNoServerCheck:
    """Accepts any KMS server certificate. Only for tests of something else; logs a warning when used."""

    def __call__(self, cert_der: bytes) -> None:
        log.warning("KMS server certificate NOT verified (UnsafeNoServerCheck)")


def ratls_server_check(
    *,
    collateral_for: Callable[[bytes, int], bytes],
    dev_root_der: bytes | None,
    policy: Policy | None = None,
    chain: AuthChain | None = None,
    expected_ca_pubkey_der: bytes | None = None,
    clock: Callable[[], float] = time.time,
) -> ServerCheck:
    """A ServerCheck that verifies the KMS's RA-TLS certificate (cached per certificate hash for its
    validity): quote + event log + binding (teecloud.keys.ratls), not debug, TCB UpToDate; with `chain`,
    KmsAuth.isKmsAllowed(boot_info); with `expected_ca_pubkey_der`, the certificate chains to that root.

    One of `chain` or `expected_ca_pubkey_der` is required: attestation alone only says "some CVM", and any
    tenant app can mint an RA-TLS certificate from its own quote and pose as the KMS."""
    if chain is None and expected_ca_pubkey_der is None:
        raise ValueError(
            "ratls_server_check needs `chain` (KmsAuth.isKmsAllowed) or `expected_ca_pubkey_der`: "
            "an attested CVM is not necessarily the KMS"
        )
    # Simulated evidence is acceptable exactly when the caller trusts a development root (PeerPolicy).
    peer_policy = PeerPolicy(dev_root_der=dev_root_der, base=policy, max_cert_lifetime_s=_MAX_SERVER_CERT_S)

    class _Collateral:
        def collateral_for(self, quote: bytes, *, now: int) -> bytes:
            return collateral_for(quote, now)

    peers = PeerVerifier(peer_policy, _Collateral(), clock=clock, cache_s=_MAX_SERVER_CERT_S)
    gate = ChainGate(chain) if chain is not None else None

    def check(cert_der: bytes) -> None:
        try:
            peer = peers.verify_cert(cert_der)
        except PeerRejected as exc:
            raise KmsClientError(f"the KMS's RA-TLS certificate does not verify: {exc.reason}") from exc
        if expected_ca_pubkey_der is not None and not _issued_by(cert_der, expected_ca_pubkey_der):
            raise KmsClientError("the KMS's certificate is not issued by the expected KMS root CA key")
        if gate is not None:
            try:
                gate.kms_allowed(peer.boot_info)
            except PeerRejected as exc:
                raise KmsClientError(f"the KMS is not an authorized KMS: {exc.reason}") from exc

    return check


def connect_kms(
    url: str,
    *,
    collateral_for: Callable[[bytes, int], bytes],
    dev_root_der: bytes | None,
    chain: AuthChain | None = None,
    expected_ca_pubkey_der: bytes | None = None,
    policy: Policy | None = None,
    clock: Callable[[], float] = time.time,
) -> KmsClient:
    """A KmsClient for `url` that verifies the KMS's RA-TLS certificate (ratls_server_check: evidence, and
    KmsAuth.isKmsAllowed with `chain` and/or the expected root CA key). The one factory for KMS client
    wiring: the node, `teecloud deploy`, the CLI and onboarding all build their client here."""
    check = ratls_server_check(
        collateral_for=collateral_for,
        dev_root_der=dev_root_der,
        policy=policy,
        chain=chain,
        expected_ca_pubkey_der=expected_ca_pubkey_der,
        clock=clock,
    )
    return KmsClient(url, server_check=check, clock=clock)


# A KMS server certificate lives as long as the KMS's RA-TLS identity (make_server_identity): up to a year.
_MAX_SERVER_CERT_S = 366 * 24 * 3600


def _issued_by(cert_der: bytes, issuer_pubkey_der: bytes) -> bool:
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        issuer_pub = serialization.load_der_public_key(issuer_pubkey_der)
        if not isinstance(issuer_pub, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
            return False
        issuer_pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except (ValueError, InvalidSignature, x509.InvalidVersion):
        return False
    return True


def vm_config_json(tee: object) -> str:
    """The CVM's VmConfig as dstack sends it (teecloud.vmconfig.of)."""
    return vmconfig.of(tee)


def read_answer(status: int, content: bytes, model: type[_M], *, who: str) -> _M:
    """A KMS answer judged once for every client (`who` names the server in errors: "the KMS", "the
    node"): at most MAX_RESPONSE_BYTES; 400/401/403/413/422 carry a Denied (KmsDenied); any other status
    but 200 is a KmsClientError; the body must validate as `model`."""
    if len(content) > MAX_RESPONSE_BYTES:
        raise KmsClientError(f"{who}'s response is too large")
    if status in (400, 401, 403, 413, 422):
        try:
            denied = api.Denied.model_validate_json(content)
        except ValidationError:
            raise KmsClientError(f"{who} answered HTTP {status}") from None
        raise KmsDenied(denied.reason, step=denied.step)
    if status != 200:
        raise KmsClientError(f"{who} answered HTTP {status}")
    try:
        return model.model_validate_json(content)
    except ValidationError as exc:
        raise KmsClientError(
            f"unexpected answer from {who}: {exc.errors(include_input=False, include_url=False)[:1]}"
        ) from exc


def _at(pool: ConnectionPool, host: str, port: int) -> bool:
    return pool.host == host and pool.port == port


class KmsClient:
    """Key provider that fetches an app's keys from a KMS (teecloud.agent.keyprovider.KeyProvider)."""

    name = "kms"

    def __init__(
        self,
        url: str,
        *,
        server_check: ServerCheck,
        timeout: float = 15.0,
        cert_lifetime_s: int = CLIENT_CERT_LIFETIME_S,
        clock: Callable[[], float] = time.time,
        app_compose: str = "",
    ) -> None:
        """`app_compose`: a CVM's normalized app-compose.json, sent with GetAppKey (and SignCert) when the CVM
        measured it, so that the KMS can read its GPU requirement (ComposeBook; boot() adds its own)."""
        self.composes = ComposeBook()
        self.composes.add(app_compose)
        if not url.startswith("https://"):
            raise KmsClientError(f"KMS URL must be https:// (got {url!r})")
        self.url = url.rstrip("/")
        self._server_check = server_check
        self._timeout = timeout
        self._lifetime = cert_lifetime_s
        self._clock = clock
        self._meta: api.KmsMeta | None = None
        # The KMS's temporary CA is public and part of its sealed state: fetched once per TEMP_CA_CACHE_S,
        # which saves one TLS handshake per key request.
        self._temp_ca: tuple[float, x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        # The server certificate (DER) that passed server_check; the only one requests are sent to.
        self._pinned: bytes | None = None
        self._pin_lock = threading.Lock()
        # bound boots (bind_boot): id(tee) -> that boot's credential and connection here
        self._boots: dict[int, _BootSession] = {}
        self._boots_lock = threading.Lock()
        # calls without a client certificate (boot challenge, metadata, temporary CA): one kept-alive pool
        # for the pinned server certificate, reused across boots (a handshake per call before)
        self._open: tuple[bytes, ConnectionPool] | None = None
        self._open_lock = threading.Lock()
        self._address()  # a malformed URL fails here, not at the first call

    # --- transport

    def _address(self) -> tuple[str, int]:
        """(host, port) of `url` (read at each call: a caller may point the client elsewhere)."""
        split = urlsplit(self.url)
        try:
            port = split.port or 443
        except ValueError as exc:
            raise KmsClientError(f"KMS URL has a bad port: {self.url!r}") from exc
        if not split.hostname or split.path.strip("/") or split.query or "@" in split.netloc:
            raise KmsClientError(f"KMS URL must be https://host[:port] (got {self.url!r})")
        return split.hostname, port

    def _ssl_context(self, client: tuple[str, str] | None, *, pinned: bytes | None) -> ssl.SSLContext:
        """`pinned` None: no server verification, for the identity probe only (no request is sent on it).
        Otherwise OpenSSL accepts exactly a server whose chain contains the pinned certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # the identity is the RA-TLS-checked certificate, not a host name
        # no TLS 1.2 renegotiation: a second handshake on a kept connection would bring a certificate the
        # after-answer comparison (the first handshake's) never sees (review 12)
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        if pinned is None:
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=pinned)
            # the pinned certificate is an anchor even when it is not self-signed (a KMS leaf under its root)
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if client is not None:
            if pinned is None:
                raise RuntimeError("a client certificate is only ever sent to a pinned, checked server")
            key_pem, chain_pem = client
            _load_cert_chain(ctx, chain_pem + key_pem)
        return ctx

    def _probe_server_identity(self, deadline: float | None = None) -> bytes:
        """(a): one TLS handshake without a client certificate and without a request; the server's
        certificate, checked by server_check. The handshake ends by `deadline` (default: the timeout)."""
        if deadline is None:
            deadline = time.monotonic() + self._timeout
        host, port = self._address()
        try:
            conn = open_connection(
                host,
                port,
                self._ssl_context(None, pinned=None),
                deadline=deadline,
                timeout=self._timeout,
            )
        except DeadlinePassed as exc:
            raise KmsClientError(
                f"the KMS at {self.url} did not finish a TLS handshake by the deadline"
            ) from exc
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise KmsClientError(f"cannot reach the KMS at {self.url}: {exc}") from exc
        conn.close()
        der = conn.server_der
        if not der:
            raise KmsClientError("the KMS presented no TLS certificate")
        self._server_check(der)
        return der

    def _pin(self, *, renew: bool = False, deadline: float | None = None) -> bytes:
        """The pinned, checked server certificate; a first (or renewed) identity probe ends by `deadline`
        when one is given."""
        # another call's probe holds the lock for up to its own deadline: wait only until this call's
        if deadline is None:
            got = self._pin_lock.acquire()
        else:
            got = self._pin_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
        if not got:
            raise KmsClientError(
                f"the KMS at {self.url}: another call's identity probe did not end by this call's deadline"
            )
        try:
            if self._pinned is None or renew:
                self._pinned = None
                self._pinned = self._probe_server_identity(deadline)
            return self._pinned
        finally:
            self._pin_lock.release()

    def _call(
        self,
        method: str,
        path: str,
        model: type[_M],
        *,
        body: dict[str, Any] | None = None,
        client_cert: tuple[str, str] | None = None,
        deadline: float | None = None,
    ) -> _M:
        """One call, all of it — identity probe, handshake, request, answer — by `deadline` (a
        time.monotonic() instant; default: the client's timeout from now)."""
        if deadline is None:
            deadline = time.monotonic() + self._timeout
        pinned = self._pin(deadline=deadline)
        try:
            answer = self._request(method, path, body, client_cert, pinned, deadline=deadline)
        except ssl.SSLCertVerificationError:
            # (c) the server is no longer the pinned one: check the new identity, then try once more
            pinned = self._pin(renew=True, deadline=deadline)
            try:
                answer = self._request(method, path, body, client_cert, pinned, deadline=deadline)
            except ssl.SSLCertVerificationError as exc:
                raise KmsClientError(
                    f"the KMS at {self.url} is not the server that was checked: {exc}"
                ) from exc
        if answer.server_der != pinned:  # OpenSSL enforced it; say so if it ever did not
            raise KmsClientError("the KMS's certificate changed during the request")
        return read_answer(answer.status, answer.content, model, who="the KMS")

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        client_cert: tuple[str, str] | None,
        pinned: bytes,
        *,
        deadline: float,
        pool: ConnectionPool | None = None,
    ) -> Answer:
        """One request over a context pinned to `pinned` (b): on `pool` (a boot's kept-alive connections,
        whose context is pinned and holds the boot's certificate), on the kept pool of calls without a
        client certificate, or on a connection of its own; the whole exchange ends by `deadline` (a
        time.monotonic() instant) and its answer is read at most MAX_RESPONSE_BYTES (kms.deadline). Raises
        ssl.SSLCertVerificationError when the server is not the pinned one (nothing was sent),
        KmsClientError on other failures."""
        data = encode_json(body) if body is not None else None
        try:
            if pool is None and client_cert is None:
                pool = self._open_pool(pinned)
            if pool is not None:
                return pool.exchange(method, path, data, deadline=deadline, max_bytes=MAX_RESPONSE_BYTES)
            conn = open_connection(
                *self._address(),
                self._ssl_context(client_cert, pinned=pinned),
                deadline=deadline,
                timeout=self._timeout,
            )
            try:
                return conn.exchange(method, path, data, deadline=deadline, max_bytes=MAX_RESPONSE_BYTES)
            finally:
                conn.close()
        except DeadlinePassed as exc:
            raise KmsClientError(f"the KMS at {self.url} did not answer by the call's deadline") from exc
        except WireError as exc:
            raise KmsClientError(f"the KMS at {self.url}: {exc}") from exc
        except ssl.SSLCertVerificationError:
            raise
        except ssl.SSLError as exc:
            raise KmsClientError(f"TLS with the KMS at {self.url} failed: {exc}") from exc
        except TimeoutError as exc:  # the TCP connect
            if time.monotonic() >= deadline:
                raise KmsClientError(f"the KMS at {self.url} did not answer by the call's deadline") from exc
            raise KmsClientError(f"cannot reach the KMS at {self.url}: timed out") from exc
        except (OSError, ValueError) as exc:
            raise KmsClientError(f"cannot reach the KMS at {self.url}: {exc}") from exc

    def _open_pool(self, pinned: bytes) -> ConnectionPool:
        """The kept-alive pool for calls without a client certificate, pinned to `pinned` (re-made when the
        pin changed: the KMS restarted with a new identity). Only unattested requests use it: nothing sent
        on it is bound to a boot, so sharing it across boots mixes no identities."""
        host, port = self._address()
        with self._open_lock:
            if self._open is not None and self._open[0] == pinned and _at(self._open[1], host, port):
                return self._open[1]
            stale = self._open
            # the KMS closes an idle kept-alive connection after 5 s (teecloud._serve KMS_PUBLIC)
            pool = ConnectionPool(
                host,
                port,
                self._ssl_context(None, pinned=pinned),
                timeout=self._timeout,
                max_idle=8,
            )
            self._open = (pinned, pool)
        if stale is not None:
            stale[1].close()  # a call still running on it closes its connection when it ends
        return pool

    def close(self) -> None:
        """Close the kept-alive pool of unattested calls (bound boots close theirs at unbind_boot)."""
        with self._open_lock:
            stale, self._open = self._open, None
        if stale is not None:
            stale[1].close()

    # --- boots (one credential and one kept-alive connection per boot)

    def bind_boot(self, tee: QuoteSource, credential: BootCredential) -> bool:
        """Until unbind_boot(tee), attested calls for `tee` with the credential's usage and app_id use
        `credential` and one kept-alive connection to this KMS (opened at the first such call). Returns
        False (and changes nothing) when `tee` is already bound: the outer binding owns it."""
        with self._boots_lock:
            if id(tee) in self._boots:
                return False
            self._boots[id(tee)] = _BootSession(tee, credential)
            return True

    def unbind_boot(self, tee: QuoteSource) -> None:
        """End the boot's binding: its connection is closed and its credential is not used again."""
        with self._boots_lock:
            session = self._boots.pop(id(tee), None)
        if session is not None:
            with session.lock:
                session.ended = True
                session.close()

    def hand_over_boot(self, tee: QuoteSource, holder: QuoteSource) -> bool:
        """Move the boot binding of `tee` to `holder`: from now on a call for `tee` gets a credential and a
        quote of its own (a quote taken now, after the boot, is judged as such), while calls made with
        `holder` in place of the tee use the boot's credential (its boot-time quote) and kept-alive
        connection, until unbind_boot(holder). For the boot's own work that finishes after its scope
        (ThresholdKeyProvider's keep hand-over). False when `tee` is not bound here."""
        with self._boots_lock:
            session = self._boots.get(id(tee))
            if session is None or session.tee is not tee or id(holder) in self._boots:
                return False
            del self._boots[id(tee)]
            session.tee = holder
            self._boots[id(holder)] = session
            return True

    def _boot_of(self, tee: QuoteSource, usage: str, app_id: bytes | None) -> _BootSession | None:
        with self._boots_lock:
            session = self._boots.get(id(tee))
        if session is None or session.tee is not tee:
            return None
        if session.credential.usage != usage or session.credential.app_id != app_id:
            return None  # another kind of call of the same boot: a credential of its own
        return session

    def _boot_pool(self, session: _BootSession, pinned: bytes, deadline: float) -> ConnectionPool:
        """The boot's connections to this KMS, for the pinned server certificate `pinned` (re-made when the
        pin changed: the KMS restarted with a new identity)."""
        temp_ca = self._temp_ca_pair(deadline)  # (outside the session's lock: it may call the KMS)
        host, port = self._address()
        with session.lock:
            if session.ended:
                raise KmsClientError("the boot this call belonged to has ended")
            if session.pool is None or session.pinned != pinned or not _at(session.pool, host, port):
                session.close()
                client_cert = session.credential.cert_for(*temp_ca)
                session.client_cert = client_cert
                session.pool = ConnectionPool(
                    host,
                    port,
                    self._ssl_context(client_cert, pinned=pinned),
                    timeout=self._timeout,
                )
                session.pinned = pinned
            return session.pool

    def _boot_call(
        self, session: _BootSession, path: str, model: type[_M], body: dict[str, Any], deadline: float
    ) -> _M:
        """An attested call on the boot's connections; (c) as in _call when the KMS's identity changed."""
        pinned = self._pin(deadline=deadline)
        try:
            answer = self._request(
                "POST",
                path,
                body,
                None,
                pinned,
                deadline=deadline,
                pool=self._boot_pool(session, pinned, deadline),
            )
        except ssl.SSLCertVerificationError:
            pinned = self._pin(renew=True, deadline=deadline)
            self._temp_ca = None  # a new KMS identity comes with its own temporary CA
            try:
                answer = self._request(
                    "POST",
                    path,
                    body,
                    None,
                    pinned,
                    deadline=deadline,
                    pool=self._boot_pool(session, pinned, deadline),
                )
            except ssl.SSLCertVerificationError as exc:
                raise KmsClientError(
                    f"the KMS at {self.url} is not the server that was checked: {exc}"
                ) from exc
        if answer.server_der != pinned:
            raise KmsClientError("the KMS's certificate changed during the request")
        return read_answer(answer.status, answer.content, model, who="the KMS")

    def attested_call(
        self,
        tee: QuoteSource,
        path: str,
        model: type[_M],
        *,
        body: dict[str, Any],
        usage: str,
        app_id: bytes | None,
        deadline: float | None = None,
    ) -> _M:
        """Steps (2)-(4): an RA-TLS client certificate from `tee`, then one mutual-TLS call that ends by
        `deadline` (a time.monotonic() instant; default: the client's timeout from now). For a bound boot
        (bind_boot) the boot's credential and kept-alive connections; otherwise a fresh certificate and a
        connection of this call's own."""
        if deadline is None:
            deadline = time.monotonic() + self._timeout
        session = self._boot_of(tee, usage, app_id)
        if session is not None:
            return self._boot_call(session, path, model, body, deadline)
        temp_cert, temp_key = self._temp_ca_pair(deadline)
        now = int(self._clock())
        key = ec.generate_private_key(ec.SECP256R1())
        cert = make_ratls_cert(
            tee,
            key,
            issuer_key=temp_key,
            issuer_cert=temp_cert,
            subject="teecloud KMS client",
            usage=usage,
            not_before=now - 30,
            not_after=now - 30 + self._lifetime,
            app_id=app_id,
            server_auth=False,
            client_auth=True,
        )
        chain_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        return self._call(
            "POST", path, model, body=body, client_cert=(key_to_pem(key), chain_pem), deadline=deadline
        )

    def _temp_ca_pair(
        self, deadline: float | None = None
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cached = self._temp_ca
        if cached is not None and 0 <= self._clock() - cached[0] < TEMP_CA_CACHE_S:
            return cached[1], cached[2]
        temp = self._call("GET", api.PATH_GET_TEMP_CA_CERT, api.TempCaCertResponse, deadline=deadline)
        try:
            temp_cert = x509.load_pem_x509_certificate(temp.temp_ca_cert.encode())
            temp_key = serialization.load_pem_private_key(temp.temp_ca_key.encode(), password=None)
        except ValueError as exc:
            raise KmsClientError(f"the KMS's temporary CA does not parse: {exc}") from exc
        if not isinstance(temp_key, ec.EllipticCurvePrivateKey):
            raise KmsClientError("the KMS's temporary CA key is not an EC key")
        self._temp_ca = (self._clock(), temp_cert, temp_key)
        return temp_cert, temp_key

    # --- public API

    def meta(self, *, refresh: bool = False) -> api.KmsMeta:
        if self._meta is None or refresh:
            self._meta = self._call("GET", api.PATH_GET_META, api.KmsMeta)
        return self._meta

    def boot_nonce(self, *, deadline: float | None = None) -> bytes:
        """This KMS's boot challenge (teecloud.kms.challenge), measured by the booting CVM (boot-nonce); the
        call ends by `deadline` (default: the client's timeout from now)."""
        resp = self._call("GET", api.PATH_GET_BOOT_CHALLENGE, api.BootChallengeResponse, deadline=deadline)
        try:
            challenge = bytes.fromhex(resp.challenge)
        except ValueError as exc:
            raise KmsClientError("the KMS's boot challenge is not hex") from exc
        if len(challenge) != TOKEN_SIZE:
            raise KmsClientError(f"the KMS's boot challenge is {len(challenge)} bytes, not {TOKEN_SIZE}")
        return challenge

    def server_certificate(self) -> bytes:
        """The KMS's TLS certificate (DER) this client checked with its server_check and pinned (one probe
        handshake the first time): what a party without a chain client (a qemu guest) may pin in turn.
        KmsClientError when the KMS cannot be reached or its certificate fails the check."""
        return self._pin()

    def bind_app_compose(self, app_compose: str) -> None:
        """Send this normalized app-compose.json with the requests of the CVM that measured it (boot() calls
        it before asking for keys)."""
        self.composes.add(app_compose)

    def info(self) -> dict[str, Any]:
        """dstack's key_provider_info: {"name": "kms", "id": hex(KMS root CA SubjectPublicKeyInfo DER)}."""
        return {"name": self.name, "id": self.meta().ca_pubkey}

    def get_app_keys(self, tee: QuoteSource, app_id: bytes, instance_id: bytes) -> AppKeys:
        meta = self.meta()  # (1)
        # (2)-(4)
        resp = self.attested_call(
            tee,
            api.PATH_GET_APP_KEY,
            api.AppKeyResponse,
            body=api.GetAppKeyRequest(
                vm_config=vm_config_json(tee), app_compose=self.composes.for_tee(tee)
            ).model_dump(),
            usage="app:kms-client",
            app_id=app_id,
        )
        # (5)
        try:
            if resp.app_id != app_id.hex():
                raise KmsClientError(f"the KMS returned keys for app {resp.app_id}, not {app_id.hex()}")
            expected_instance = instance_id.hex() if instance_id else "00" * 20
            if resp.instance_id != expected_instance:
                raise KmsClientError(f"the KMS returned keys for instance {resp.instance_id}, not ours")
            k256_key = bytes.fromhex(resp.k256_key)
            signature = bytes.fromhex(resp.k256_signature)
            kms_pub = bytes.fromhex(meta.k256_pubkey)
            signer = recover_k256(kms_issued_digest(app_id, k256_public_key(k256_key)), signature)
            if signer != kms_pub or bytes.fromhex(resp.kms_k256_pubkey) != kms_pub:
                raise KmsClientError("the app key is not signed by the KMS root k256 key")
            ca_cert = x509.load_pem_x509_certificate(resp.ca_cert.encode())
            root = x509.load_pem_x509_certificate(meta.ca_cert.encode())
            ca_cert.verify_directly_issued_by(root)
            keys = AppKeys(
                ca_key_pem=resp.ca_key,
                ca_cert_pem=resp.ca_cert,
                disk_crypt_key=bytes.fromhex(resp.disk_crypt_key),
                env_crypt_key=bytes.fromhex(resp.env_crypt_key),
                k256_key=k256_key,
                k256_signature=signature,
                kms_k256_pubkey=kms_pub,
                key_provider_info=self.info(),
                gateway_app_id=resp.gateway_app_id,
                os_image_hash=bytes.fromhex(resp.os_image_hash),
            )
        except KmsClientError:
            raise
        except (ValueError, TypeError, InvalidSignature, KeysError, VerificationError) as exc:
            raise KmsClientError(f"the KMS's answer does not check out: {exc}") from exc
        return keys

    def get_env_encrypt_pubkey(self, app_id: bytes) -> tuple[bytes, api.EnvEncryptPubKeyResponse]:
        """The app's X25519 env-encryption public key, with its signature checked against the KMS root."""
        meta = self.meta()
        resp = self._call(
            "POST",
            api.PATH_GET_APP_ENV_ENCRYPT_PUBKEY,
            api.EnvEncryptPubKeyResponse,
            body={"app_id": app_id.hex()},
        )
        try:
            pub = bytes.fromhex(resp.public_key)
            signer = recover_k256(
                env_encrypt_pubkey_digest(app_id, pub, resp.timestamp), bytes.fromhex(resp.signature_v1)
            )
        except (ValueError, KeysError, VerificationError) as exc:
            raise KmsClientError(f"the env-encrypt public key's signature does not parse: {exc}") from exc
        if signer != bytes.fromhex(meta.k256_pubkey):
            raise KmsClientError("the env-encrypt public key is not signed by the KMS root k256 key")
        return pub, resp

    def sign_cert(self, tee: QuoteSource, csr_pem: str, *, app_id: bytes | None = None) -> list[str]:
        resp = self.attested_call(
            tee,
            api.PATH_SIGN_CERT,
            api.SignCertResponse,
            body={
                "csr": csr_pem,
                "vm_config": vm_config_json(tee),
                "app_compose": self.composes.for_tee(tee),
            },
            usage="app:kms-client",
            app_id=app_id,
        )
        return resp.certificate_chain
