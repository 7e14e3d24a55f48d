"""The KMS service: decisions (KmsService), its two HTTP listeners, and the runner.

Trust procedure for every attested request (`KmsService.attest`):
  (1) the TLS layer (stdlib ssl) proved the caller holds the private key of the certificate it presented;
      the chain to the public temporary CA carries no trust (docs/kms.md);
  (2) the certificate is fresh: now within [not_before, not_after] and its lifetime at most
      `KmsConfig.max_client_cert_lifetime_s`;
  (3) RA-TLS: the quote verifies against collateral for its FMSPC (a development root only in dev mode),
      report_data = sha512("ratls-cert:" ‖ SPKI) binds that same key, the event log replays to the RTMRs,
      and the policy holds (TCB floor, no debug) — teecloud.keys.ratls.verify_ratls_cert;
  (4) production mode never accepts simulated evidence, whatever the verifier said;
  (5) boot_info is built from the verified evidence only;
  (1)-(5) are the shared RA-TLS peer verifier's (teecloud.peer.PeerVerifier), under the KMS's PeerPolicy;
  (6) app endpoints (GetAppKey, SignCert): the RTMR3 log ends at the boot measurement — keys only to a
      booting CVM, never on a quote taken after boot (authz.require_boot_time), and the OS image and VM
      shape are the measured ones;
then, per endpoint, the chain decides (KmsAuth.isAppAllowed / isKmsAllowed, failing closed) and only then
are keys derived. Each request is audited with its boot_info, decision and reason, never with keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from teecloud._asgi import BoundedBody
from teecloud._serve import (
    KMS_ADMIN,
    KMS_PUBLIC,
    LimitedH11Protocol,
    LimitedServer,
    ServeLimits,
    limited_config,
)
from teecloud.attestation.policy import Policy
from teecloud.keys.certs import cert_to_pem, key_to_pem
from teecloud.keys.ratls import make_ratls_cert
from teecloud.kms import api
from teecloud.kms.audit import AuditLog, new_request_id
from teecloud.kms.authz import (
    AuthChain,
    Authorizer,
    ChainAuthorizer,
    OsImageReference,
    parse_vm_config,
)
from teecloud.kms.bootstrap import KmsIdentity, KmsState
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.issuer import KeyIssuer
from teecloud.kms.rootkeys import LocalRootKeys, RootKeyHolder
from teecloud.kms.tlsaudit import TlsRejectionAudit
from teecloud.peer import (
    AttestedPeer,
    CollateralSource,
    PeerPolicy,
    PeerVerifier,
    StaticCollateral,
)
from teecloud.tee.base import TeePlatform

__all__ = [
    "PEER_CERT_STATE_KEY",
    "AttestedPeer",
    "CollateralSource",
    "KmsConfig",
    "KmsServer",
    "KmsService",
    "OsImageReference",
    "RaTlsH11Protocol",
    "StaticCollateral",
    "bootstrap_report_data",
    "make_admin_app",
    "make_public_app",
    "make_server_identity",
    "parse_vm_config",
    "peer_cert_der",
    "publish_kms_info",
]

log = logging.getLogger("teecloud.kms")

_T = TypeVar("_T")

PEER_CERT_STATE_KEY = "teecloud.tls_peer_cert_der"


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class KmsConfig:
    """Limits and modes, in one place.

    dev_mode                    trust the installation's development root (simulated TEEs); not for production
    max_client_cert_lifetime_s  client RA-TLS certificates valid longer than this are refused (freshness)
    clock_skew_s                tolerated clock difference for not_before
    evidence_cache_s            verified evidence is reused (keyed by certificate hash) for at most this long,
                                and never past the certificate's not_after
    signed_cert_lifetime_s      lifetime of certificates issued by SignCert
    max_body_bytes              request bodies above this are refused before parsing
    accepted_tcb_statuses       TCB floor enforced by the KMS itself, on top of the attestation policy
    app_key_cache_s             derived app keys are reused per (app_id, instance_id, os image, gateway) for
                                at most this long: derivation is a pure function of the immutable root keys;
                                only the app CA certificate's not_before (the derivation time) ages. 0: off
    """

    dev_mode: bool = False
    max_client_cert_lifetime_s: int = 3600
    clock_skew_s: int = 60
    evidence_cache_s: int = 300
    evidence_cache_entries: int = 4096
    signed_cert_lifetime_s: int = 30 * 24 * 3600
    max_body_bytes: int = 256 * 1024
    gateway_app_id: str = ""
    kms_contract: str = ""
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    app_key_cache_s: int = 600
    app_key_cache_entries: int = 4096


# ------------------------------------------------------------------------------------------------ logic


def _norm_app_id(text: str) -> bytes:
    raw = text.strip().lower().removeprefix("0x")
    try:
        value = bytes.fromhex(raw)
    except ValueError as exc:
        raise KmsUsageError(f"app_id {text!r} is not hex") from exc
    if len(value) != 20:
        raise KmsUsageError(f"app_id must be 20 bytes (40 hex digits), got {len(value)}")
    return value


class KmsService:
    """The KMS's decisions, independent of HTTP (tests and the bench call it directly too)."""

    def __init__(
        self,
        *,
        state: KmsState,
        identity: KmsIdentity,
        tee: TeePlatform,
        chain: AuthChain,
        collateral: CollateralSource,
        audit: AuditLog,
        config: KmsConfig | None = None,
        policy: Policy | None = None,
        dev_root_der: bytes | None = None,
        block_number: Callable[[], int] | None = None,
        os_image_reference: OsImageReference | None = None,
        root_keys: RootKeyHolder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`os_image_reference` gives an OS image's reference measurements (simulated images:
        `teecloud.tee.simulated.simulated_os_image_reference`). `root_keys` holds the root (default: the
        whole key from `state`, `LocalRootKeys`)."""
        self.state = state
        self.identity = identity
        self.tee = tee
        self.config = config or KmsConfig()
        self.collateral = collateral
        self.audit = audit
        # The attestation policy: TCB floor UpToDate, no debug; simulated evidence only in dev mode.
        # A production KMS never accepts simulated evidence, whatever policy it was handed.
        if policy is None:
            policy = dataclasses.replace(Policy.default(), allow_simulated=self.config.dev_mode)
        elif policy.allow_simulated and not self.config.dev_mode:
            policy = dataclasses.replace(policy, allow_simulated=False)
        self.policy = policy
        if dev_root_der is not None and not self.config.dev_mode:
            raise KmsUsageError("a development root may be trusted only in dev mode")
        if self.config.dev_mode and dev_root_der is None:
            raise KmsUsageError("dev mode needs the development root certificate (dev_root_der)")
        self.dev_root_der = dev_root_der if self.config.dev_mode else None
        peer_policy = PeerPolicy(
            dev_root_der=self.dev_root_der,
            accepted_tcb_statuses=self.config.accepted_tcb_statuses,
            max_cert_lifetime_s=self.config.max_client_cert_lifetime_s,
            clock_skew_s=self.config.clock_skew_s,
            base=self.policy,
        )
        self.peers = PeerVerifier(
            peer_policy,
            collateral,
            clock=clock,
            cache_s=self.config.evidence_cache_s,
            cache_entries=self.config.evidence_cache_entries,
        )
        self.authorizer = ChainAuthorizer(chain, block_number=block_number)
        self.authz = Authorizer(
            self.peers,
            self.authorizer,
            os_image_reference=os_image_reference,
            dev_mode=self.config.dev_mode,
        )
        self.keys: RootKeyHolder = root_keys if root_keys is not None else LocalRootKeys(state)
        self.issuer = KeyIssuer(
            self.keys,
            gateway_app_id=self.config.gateway_app_id,
            signed_cert_lifetime_s=self.config.signed_cert_lifetime_s,
            app_key_cache_s=self.config.app_key_cache_s,
            app_key_cache_entries=self.config.app_key_cache_entries,
            clock=clock,
        )
        self.clock = clock

    @property
    def os_image_reference(self) -> OsImageReference | None:
        return self.authz.os_image_reference

    @os_image_reference.setter
    def os_image_reference(self, value: OsImageReference | None) -> None:
        self.authz.os_image_reference = value

    # --- (1)-(6): teecloud.kms.authz.Authorizer (peer verifier, boot time, OS image, chain)

    def attest(self, cert_der: bytes | None) -> AttestedPeer:
        return self.authz.attest(cert_der)

    def _audited(
        self, endpoint: str, cert_der: bytes | None, peer_addr: str, fn: Callable[[dict[str, Any]], _T]
    ) -> _T:
        """Run `fn(ctx)` and audit its outcome: allowed unless it raised (AccessDenied is re-raised as is).
        Returns (or raises) only once the record is durable (AuditLog group commit): an answered request
        always has its record on disk. If the record cannot be written, the request fails, keys unsent."""
        ctx: dict[str, Any] = {"boot_info": None, "reason": "ok", "request_id": new_request_id()}
        cert_hash = hashlib.sha256(cert_der).hexdigest() if cert_der else ""
        error: BaseException | None = None
        result: _T | None = None
        try:
            result = fn(ctx)
        except AccessDenied as exc:
            error, decision, reason, step = exc, "denied", exc.reason, exc.step
            if ctx["boot_info"] is None:
                ctx["boot_info"] = exc.boot_info
        except Exception as exc:
            error, decision, reason, step = (
                exc,
                "denied",
                f"internal error ({type(exc).__name__})",
                "internal",
            )
        else:
            decision, reason, step = "allowed", ctx["reason"], "released"
        rec = self.audit.prepare(
            ts=int(self.clock()),
            endpoint=endpoint,
            decision=decision,
            reason=reason,
            step=step,
            peer=peer_addr,
            cert_sha256=cert_hash,
            boot_info=ctx["boot_info"],
            request_id=ctx["request_id"],
        )
        self.audit.submit(rec).result()  # raises OSError if it could not be made durable
        if error is not None:
            raise error
        assert result is not None
        return result

    # --- endpoints: each key-releasing one passes only an Authorized* object to the issuer

    def get_app_key(
        self, cert_der: bytes | None, *, vm_config: str | Mapping[str, Any] = "", peer_addr: str = ""
    ) -> api.AppKeyResponse:
        """An attested, allowed app's keys. `vm_config` is the request's (dstack VmConfig JSON): its VM
        shape selects the RTMR0 reference; missing or malformed, nothing is released."""

        def decide(ctx: dict[str, Any]) -> api.AppKeyResponse:
            app = self.authz.authorize_app(cert_der, vm_config, ctx=ctx)
            ctx["reason"] = f"app allowed by KmsAuth{': ' + app.reason if app.reason else ''}"
            return self.issuer.app_keys(app)

        return self._audited(api.PATH_GET_APP_KEY, cert_der, peer_addr, decide)

    def sign_cert(
        self,
        cert_der: bytes | None,
        csr_pem: str,
        *,
        vm_config: str | Mapping[str, Any] = "",
        peer_addr: str = "",
    ) -> api.SignCertResponse:
        """Issue a certificate for the CSR's key under the caller's app CA, for an attested caller the chain
        allows. `vm_config` as for get_app_key (RTMR0 is checked for the VM shape it states)."""

        def decide(ctx: dict[str, Any]) -> api.SignCertResponse:
            app = self.authz.authorize_app(cert_der, vm_config, ctx=ctx)
            cn, answer = self.issuer.sign_cert(app, csr_pem)
            ctx["reason"] = f"certificate issued for CN={cn}"
            return answer

        return self._audited(api.PATH_SIGN_CERT, cert_der, peer_addr, decide)

    def get_kms_key(self, cert_der: bytes | None, *, peer_addr: str = "") -> api.KmsKeyResponse:
        """Onboarding: root keys, only to an attested KMS that KmsAuth.isKmsAllowed accepts."""

        def decide(ctx: dict[str, Any]) -> api.KmsKeyResponse:
            kms = self.authz.authorize_kms(cert_der, ctx=ctx)
            ctx["reason"] = (
                f"KMS allowed by KmsAuth{': ' + kms.reason if kms.reason else ''}; root keys replicated"
            )
            return self.issuer.kms_keys(kms)

        return self._audited(api.PATH_GET_KMS_KEY, cert_der, peer_addr, decide)

    def env_encrypt_pubkey(self, app_id_text: str) -> api.EnvEncryptPubKeyResponse:
        """Public: the app's X25519 env-encryption key, signed by the KMS root k256 key (dstack format)."""
        return self.issuer.env_encrypt_pubkey(_norm_app_id(app_id_text))

    def meta(self) -> api.KmsMeta:
        return api.KmsMeta(
            ca_cert=self.state.root_ca_cert_pem,
            ca_pubkey=self.state.root.ca_public_key_der.hex(),
            k256_pubkey=self.state.root.k256_public_key.hex(),
            dev_mode=self.config.dev_mode,
            tee=str(self.tee.kind),
            mr_aggregated=self.identity.mr_aggregated.hex(),
            gateway_app_id=self.config.gateway_app_id,
            kms_contract=self.config.kms_contract,
        )

    def temp_ca(self) -> api.TempCaCertResponse:
        return api.TempCaCertResponse(
            temp_ca_cert=self.state.temp_ca_cert_pem, temp_ca_key=self.state.temp_ca_key_pem
        )

    def status(self, *, public_url: str = "", chain: str = "") -> api.StatusResponse:
        return api.StatusResponse(
            status="serving",
            dev_mode=self.config.dev_mode,
            tee=str(self.tee.kind),
            ca_pubkey=self.state.root.ca_public_key_der.hex(),
            k256_pubkey=self.state.root.k256_public_key.hex(),
            mr_aggregated=self.identity.mr_aggregated.hex(),
            public_url=public_url,
            requests_allowed=self.audit.allowed,
            requests_denied=self.audit.denied,
            chain=chain,
        )


# ------------------------------------------------------------------------------------------------- HTTP


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


def peer_cert_der(request: Request) -> bytes | None:
    """The TLS client certificate of this request, DER, or None."""
    state = request.scope.get("state") or {}
    der = state.get(PEER_CERT_STATE_KEY)
    if isinstance(der, bytes) and der:
        return der
    tls = (request.scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if chain:
        first = chain[0]
        try:
            cert = x509.load_pem_x509_certificate(first.encode() if isinstance(first, str) else first)
        except ValueError:
            return None
        return cert.public_bytes(serialization.Encoding.DER)
    return None


def _peer_addr(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else ""


def _denied(status: int, reason: str, step: str = "") -> JSONResponse:
    return JSONResponse(status_code=status, content=api.Denied(reason=reason, step=step).model_dump())


class _ContentLengthLimit:
    """Refuses a declared Content-Length above the limit (413) before the body is read. A plain ASGI
    middleware: starlette's BaseHTTPMiddleware costs a task and a stream per request on the hot path."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers") or ():
                if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                    reply = _denied(413, f"request body above {self.max_bytes} bytes", "request")
                    await reply(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _json_response(model: Any) -> Response:
    """A pydantic model as JSON, without FastAPI re-validating it against the response_model (it is one)."""
    return Response(content=model.model_dump_json(), media_type="application/json")


def _install_common(app: FastAPI, max_body: int) -> None:
    app.add_middleware(BoundedBody, max_bytes=max_body)
    app.add_middleware(_ContentLengthLimit, max_bytes=max_body)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return _denied(400, f"malformed request: {errors}"[:500], "request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes, wrong methods, unparsable bodies, missing admin token: one refusal shape.
        response = _denied(exc.status_code, str(exc.detail), "request")
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(AccessDenied)
    async def on_denied(request: Request, exc: AccessDenied) -> JSONResponse:
        return _denied(403, exc.reason, exc.step)

    @app.exception_handler(KmsUsageError)
    async def on_usage(request: Request, exc: KmsUsageError) -> JSONResponse:
        return _denied(400, str(exc), "request")


def make_public_app(service: KmsService) -> FastAPI:
    """The public listener: metadata, env-encrypt public keys, and the attested endpoints."""
    app = FastAPI(title="teecloud KMS", version="1", docs_url=None, redoc_url=None)
    _install_common(app, service.config.max_body_bytes)

    @app.get(api.PATH_GET_META, response_model=api.KmsMeta)
    def get_meta() -> Response:
        return _json_response(service.meta())

    @app.get(api.PATH_GET_TEMP_CA_CERT, response_model=api.TempCaCertResponse)
    def get_temp_ca_cert() -> api.TempCaCertResponse:
        return service.temp_ca()

    @app.post(api.PATH_GET_APP_ENV_ENCRYPT_PUBKEY, response_model=api.EnvEncryptPubKeyResponse)
    def get_env_pubkey(body: api.EnvEncryptPubKeyRequest) -> api.EnvEncryptPubKeyResponse:
        return service.env_encrypt_pubkey(body.app_id)

    @app.post(api.PATH_GET_APP_KEY, response_model=api.AppKeyResponse)
    def get_app_key(request: Request, body: api.GetAppKeyRequest) -> Response:
        return _json_response(
            service.get_app_key(
                peer_cert_der(request), vm_config=body.vm_config, peer_addr=_peer_addr(request)
            )
        )

    @app.post(api.PATH_SIGN_CERT, response_model=api.SignCertResponse)
    def sign_cert(request: Request, body: api.SignCertRequest) -> api.SignCertResponse:
        return service.sign_cert(
            peer_cert_der(request), body.csr, vm_config=body.vm_config, peer_addr=_peer_addr(request)
        )

    @app.post(api.PATH_GET_KMS_KEY, response_model=api.KmsKeyResponse)
    def get_kms_key(request: Request, body: api.GetKmsKeyRequest) -> api.KmsKeyResponse:
        return service.get_kms_key(peer_cert_der(request), peer_addr=_peer_addr(request))

    return app


def make_admin_app(service: KmsService, *, token: str, public_url: str = "", chain: str = "") -> FastAPI:
    """The admin listener: status and audit, behind a bearer token. Never key material."""
    app = FastAPI(title="teecloud KMS admin", version="1", docs_url=None, redoc_url=None)
    _install_common(app, 4096)
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def require_token(request: Request, call_next: Callable[[Request], Any]) -> Any:
        got = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(got, expected):
            return _denied(
                401, "admin API: missing or wrong bearer token (see data_home()/kms/admin-token)", "auth"
            )
        return await call_next(request)

    @app.get("/status", response_model=api.StatusResponse)
    def status() -> api.StatusResponse:
        return service.status(public_url=public_url, chain=chain)

    @app.get("/audit", response_model=api.AuditResponse)
    def audit(limit: int = 100) -> api.AuditResponse:
        return api.AuditResponse(records=service.audit.read(limit=max(0, min(limit, 100_000))))

    return app


# ----------------------------------------------------------------------------------------------- runner


@dataclass(frozen=True)
class ServerIdentity:
    key_pem: str
    cert_pem: str


def make_server_identity(
    service: KmsService,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    validity_s: int = 7 * 24 * 3600,
) -> ServerIdentity:
    """The KMS's own RA-TLS server certificate: a fresh key, a quote binding it, issued by the root CA, so a
    client can check both the KMS's attestation and its root key."""
    now = int(service.clock())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_ratls_cert(
        service.tee,
        key,
        issuer_key=service.state.root.ca_key,
        issuer_cert=service.state.root_ca_cert,
        subject="teecloud KMS",
        usage="kms:rpc",
        not_before=now - 60,
        not_after=now + validity_s,
        alt_names=hosts,
        server_auth=True,
        client_auth=True,
    )
    key_pem = key_to_pem(key)
    return ServerIdentity(key_pem=key_pem, cert_pem=cert_to_pem(cert) + service.state.root_ca_cert_pem)


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
        ssl_ctx = server_ssl_context(self.identity, service.state.temp_ca_cert_pem)
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
        await asyncio.gather(pub_task, self._admin.serve())

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


BOOTSTRAP_REPORT_PREFIX = b"teecloud-kms-bootstrap:"


def bootstrap_report_data(state: KmsState) -> bytes:
    """report_data of the KMS's bootstrap quote: sha512(prefix ‖ k256 pubkey ‖ CA SPKI DER), so the quote
    published (by hash) in KmsAuth vouches that these root public keys were made in this TEE."""
    return hashlib.sha512(
        BOOTSTRAP_REPORT_PREFIX + state.root.k256_public_key + state.root.ca_public_key_der
    ).digest()


def publish_kms_info(chain: Any, state: KmsState, tee: TeePlatform, home: Path | None = None) -> str:
    """Quote over the root public keys, kept in data_home()/kms/bootstrap-quote.* for anyone to verify, and
    its hash with the public keys written to KmsAuth (`set_kms_info`). Returns the quote hash (hex)."""
    from teecloud._fs import atomic_write
    from teecloud.keys.ratls import event_log_json
    from teecloud.kms.bootstrap import kms_dir

    quote = tee.quote(bootstrap_report_data(state))
    quote_hash = hashlib.sha256(quote).digest()
    atomic_write(kms_dir(home) / "bootstrap-quote.bin", quote, mode=0o644)
    atomic_write(
        kms_dir(home) / "bootstrap-event-log.json", event_log_json(tee.event_log()).encode(), mode=0o644
    )
    chain.set_kms_info(state.root.k256_public_key, state.root.ca_public_key_der, quote_hash)
    return quote_hash.hex()
