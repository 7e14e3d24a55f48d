"""The KMS's listeners: its RA-TLS server identity, the TLS context that asks for client certificates, the
h11 protocol that hands the peer certificate to the app, and `KmsServer` (both listeners in one thread,
with the listener limits of teecloud._serve)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from teecloud._serve import (
    KMS_ADMIN,
    KMS_PUBLIC,
    LimitedH11Protocol,
    LimitedServer,
    ServeLimits,
    limited_config,
)
from teecloud.keys.certs import cert_to_pem, key_to_pem
from teecloud.kms.http import PEER_CERT_STATE_KEY, make_admin_app, make_public_app
from teecloud.kms.service import KmsService
from teecloud.kms.tlsaudit import TlsRejectionAudit

__all__ = ["KmsServer", "RaTlsH11Protocol", "ServerIdentity", "make_server_identity", "server_ssl_context"]

log = logging.getLogger("teecloud.kms")


class RaTlsH11Protocol(LimitedH11Protocol):
    """uvicorn's h11 protocol (with the listener limits of teecloud._serve) that hands the TLS peer
    certificate (DER) to the app.

    The handshake is complete when an SSL transport calls connection_made, so the certificate is known for
    the whole connection; it is placed in this connection's copy of the lifespan state, which uvicorn copies
    into every request's scope["state"]. (uvicorn 0.54 has no ASGI TLS extension; `peer_cert_der` also reads
    scope["extensions"]["tls"] for servers that do.)
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        self.app_state = {**self.app_state, PEER_CERT_STATE_KEY: der}


@dataclass(frozen=True)
class ServerIdentity:
    key_pem: str
    cert_pem: str


SERVER_CERT_VALIDITY_S = 7 * 24 * 3600
# A threshold member's server certificate is reissued (same boot-time key and quote) once half its life has
# passed, checked this often (review 4, R4-5: running members talk for longer than one certificate lives).
RENEW_CHECK_S = 3600.0


def make_server_identity(
    service: KmsService,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    validity_s: int = SERVER_CERT_VALIDITY_S,
) -> ServerIdentity:
    """The KMS's own RA-TLS server certificate: a fresh key, a quote binding it, issued by the root CA, so a
    client can check both the KMS's attestation and its root key. A threshold member's server key is its
    boot-time peer key with the quote taken at boot (teecloud.kms.peering), so that the other running
    members can apply the same rule to it as it applies to them."""
    now = int(service.clock())
    peer = service.peer_identity
    key = peer.key if peer is not None else ec.generate_private_key(ec.SECP256R1())
    cert = service.keys.issue_server_identity(
        peer.evidence if peer is not None else service.tee,
        key,
        subject="teecloud KMS",
        usage="kms:rpc",
        not_before=now - 60,
        not_after=now + validity_s,
        alt_names=hosts,
    )
    key_pem = key_to_pem(key)
    return ServerIdentity(key_pem=key_pem, cert_pem=cert_to_pem(cert) + service.keys.root_ca_cert_pem)


# OpenSSL X509_V_FLAG_NO_CHECK_TIME: certificate dates are checked by KmsService.attest (with an audited
# reason) instead of failing the handshake anonymously.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000


def server_ssl_context(identity: ServerIdentity, temp_ca_cert_pem: str) -> ssl.SSLContext:
    """TLS 1.2+ server context that asks for (but does not require) a client certificate chained to the
    public temporary CA — which proves only possession of the leaf key; RA-TLS evidence does the rest."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="teecloud-kms-tls-") as tmp:
        path = Path(tmp) / "server.pem"
        path.touch(mode=0o600)
        path.write_text(identity.cert_pem + identity.key_pem)
        ctx.load_cert_chain(str(path))
    ctx.load_verify_locations(cadata=temp_ca_cert_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
    return ctx


class KmsServer:
    """Both listeners in one background thread (used by `teecloud kms up`, tests and the bench)."""

    def __init__(
        self,
        service: KmsService,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_port: int = 0,
        admin_token: str | None = None,
        chain_label: str = "",
        limits: ServeLimits = KMS_PUBLIC,
        admin_limits: ServeLimits = KMS_ADMIN,
    ) -> None:
        self.service = service
        self.host = host
        self.admin_token = admin_token or secrets.token_urlsafe(24)
        self.identity = make_server_identity(service)
        self._identity_issued = service.clock()
        ssl_ctx = server_ssl_context(self.identity, service.state.temp_ca_cert_pem)
        self._ssl_ctx = ssl_ctx
        public = make_public_app(service)
        self.limits = limits
        self.admin_limits = admin_limits
        # Handshakes OpenSSL refuses never reach the service: audited here, rate-limited (kms.tlsaudit).
        self.tls_audit = TlsRejectionAudit(service.audit, clock=service.clock)
        self._public = LimitedServer(
            limited_config(
                public,
                limits,
                host=host,
                port=port,
                http=RaTlsH11Protocol,
                ssl_context_factory=lambda _config, _default: ssl_ctx,
            ),
            limits,
            name="kms public listener",
            on_tls_error=self.tls_audit,
            on_tick=self.tls_audit.flush_due,
        )
        self._chain_label = chain_label
        self._admin_port = admin_port
        self._admin: LimitedServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self.admin_port = 0

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def start(self, timeout: float = 15.0) -> KmsServer:
        self._thread = threading.Thread(target=self._run, name="teecloud-kms", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not (self._public.started and self._admin is not None and self._admin.started):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the KMS listeners did not start (is the port in use?)")
            time.sleep(0.02)
        self.port = self._public.servers[0].sockets[0].getsockname()[1]
        assert self._admin is not None
        self.admin_port = self._admin.servers[0].sockets[0].getsockname()[1]
        return self

    def renew_identity_if_due(self) -> bool:
        """R4-5: a threshold member's server certificate, reissued from the same boot-time key and quote
        (never a new key or a post-boot quote: peers admit boot-time evidence only) once half of its
        SERVER_CERT_VALIDITY_S has passed; new handshakes get it. Runs in the listeners' event loop (the
        SSL context is never changed under a handshake). A KMS that is not a threshold member keeps its
        certificate (not renewed: its key and quote are not boot-time ones). Returns whether it renewed."""
        loop = self._loop
        if loop is not None and loop.is_running() and threading.current_thread() is not self._thread:
            return asyncio.run_coroutine_threadsafe(self._renew_async(), loop).result(timeout=30)
        return self._renew()

    async def _renew_async(self) -> bool:
        return self._renew()

    def _renew(self) -> bool:
        now = self.service.clock()
        if self.service.peer_identity is None or now - self._identity_issued < SERVER_CERT_VALIDITY_S / 2:
            return False
        identity = make_server_identity(self.service)
        with tempfile.TemporaryDirectory(prefix="teecloud-kms-tls-") as tmp:
            path = Path(tmp) / "server.pem"
            path.touch(mode=0o600)
            path.write_text(identity.cert_pem + identity.key_pem)
            self._ssl_ctx.load_cert_chain(str(path))
        self.identity, self._identity_issued = identity, now
        log.info("server certificate reissued from the boot-time peer key")
        return True

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_CHECK_S)
            try:
                self._renew()
            except Exception as exc:  # the old certificate serves on; the next check tries again
                log.warning("could not reissue the server certificate: %s", exc)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        # Admin is plain HTTP bound to the same (loopback) host; the public listener's port is known first so
        # the status page can name it.
        pub_task = asyncio.create_task(self._public.serve())
        while not self._public.started and not pub_task.done():
            await asyncio.sleep(0.01)
        if pub_task.done():
            return
        url = f"https://{self.host}:{self._public.servers[0].sockets[0].getsockname()[1]}"
        admin = make_admin_app(self.service, token=self.admin_token, public_url=url, chain=self._chain_label)
        self._admin = LimitedServer(
            limited_config(admin, self.admin_limits, host=self.host, port=self._admin_port),
            self.admin_limits,
            name="kms admin listener",
        )
        self._loop = asyncio.get_running_loop()
        renew = asyncio.create_task(self._renew_loop())
        try:
            await asyncio.gather(pub_task, self._admin.serve())
        finally:
            renew.cancel()

    def stop(self) -> None:
        self._public.should_exit = True
        if self._admin is not None:
            self._admin.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.tls_audit.flush()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.tls_audit.flush()

    def __enter__(self) -> KmsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
