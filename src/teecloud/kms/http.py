"""The KMS's HTTP layer: the public (RA-TLS) and admin FastAPI apps over a KmsService, one refusal shape
(`{"error", "reason", "step"}`) for every denial, unknown route and bad body."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from teecloud._asgi import BoundedBody
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsUsageError, SealingError
from teecloud.kms.service import KmsService
from teecloud.kms.threshold_env import EnvKeyBusy

log = logging.getLogger("teecloud.kms")

__all__ = ["PEER_CERT_STATE_KEY", "make_admin_app", "make_public_app", "peer_cert_der"]

PEER_CERT_STATE_KEY = "teecloud.tls_peer_cert_der"


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
        except (ValueError, x509.InvalidVersion):
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

    @app.exception_handler(EnvKeyBusy)
    async def on_busy(request: Request, exc: EnvKeyBusy) -> JSONResponse:
        response = _denied(503, str(exc), "retry")
        response.headers["retry-after"] = "2"
        return response

    @app.exception_handler(KmsUsageError)
    async def on_usage(request: Request, exc: KmsUsageError) -> JSONResponse:
        return _denied(400, str(exc), "request")

    @app.exception_handler(SealingError)
    async def on_sealing(request: Request, exc: SealingError) -> JSONResponse:
        # this node's sealed state does not open (corrupted, relabelled, another measurement's): not the
        # client's mistake and not a crash; the node serves nothing from it (review 6, R6-3)
        log.warning("sealed state refused: %s", exc)
        return _denied(503, f"this KMS node's sealed state does not open: {exc}"[:500], "sealing")


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

    @app.get(api.PATH_GET_BOOT_CHALLENGE, response_model=api.BootChallengeResponse)
    def get_boot_challenge() -> api.BootChallengeResponse:
        return service.boot_challenge()

    @app.post(api.PATH_GET_APP_ENV_ENCRYPT_PUBKEY, response_model=api.EnvEncryptPubKeyResponse)
    def get_env_pubkey(body: api.EnvEncryptPubKeyRequest) -> api.EnvEncryptPubKeyResponse:
        return service.env_encrypt_pubkey(body.app_id, body.epoch)

    @app.post(api.PATH_GET_APP_KEY, response_model=api.AppKeyResponse)
    def get_app_key(request: Request, body: api.GetAppKeyRequest) -> Response:
        return _json_response(
            service.get_app_key(
                peer_cert_der(request),
                vm_config=body.vm_config,
                peer_addr=_peer_addr(request),
                app_compose=body.app_compose,
            )
        )

    @app.post(api.PATH_SIGN_CERT, response_model=api.SignCertResponse)
    def sign_cert(request: Request, body: api.SignCertRequest) -> api.SignCertResponse:
        return service.sign_cert(
            peer_cert_der(request),
            body.csr,
            vm_config=body.vm_config,
            peer_addr=_peer_addr(request),
            app_compose=body.app_compose,
        )

    @app.post(api.PATH_THRESHOLD_EVALUATE, response_model=api.ThresholdEvaluateResponse)
    def threshold_evaluate(request: Request, body: api.ThresholdEvaluateRequest) -> Response:
        return _json_response(
            service.threshold_evaluate(
                peer_cert_der(request),
                vm_config=body.vm_config,
                peer_addr=_peer_addr(request),
                app_compose=body.app_compose,
                epoch=body.epoch,
            )
        )

    @app.post(api.PATH_THRESHOLD_SIGN, response_model=api.ThresholdSignResponse)
    def threshold_sign(request: Request, body: api.ThresholdSignRequest) -> Response:
        return _json_response(
            service.threshold_sign(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_THRESHOLD_KEEP_SIGNATURES, response_model=api.ThresholdKeepResponse)
    def threshold_keep(request: Request, body: api.ThresholdKeepRequest) -> Response:
        return _json_response(
            service.threshold_keep(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_THRESHOLD_SIGN_APP_CA, response_model=api.ThresholdSignResponse)
    def threshold_sign_app_ca(request: Request, body: api.ThresholdSignAppCaRequest) -> Response:
        return _json_response(
            service.threshold_sign_app_ca(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_THRESHOLD_APP_CA_CACHED, response_model=api.AppCaCachedResponse)
    def threshold_app_ca_cached(body: api.AppCaCachedRequest) -> Response:
        if body.certificate:
            return _denied(400, "a lookup names no certificate (ThresholdAppCaStore keeps one)", "request")
        return _json_response(service.app_ca_cached(body))

    @app.post(api.PATH_THRESHOLD_APP_CA_STORE, response_model=api.AppCaCachedResponse)
    def threshold_app_ca_store(request: Request, body: api.AppCaCachedRequest) -> Response:
        return _json_response(service.app_ca_store(body, peer_addr=_peer_addr(request)))

    @app.post(api.PATH_RESHARE_DEAL, response_model=api.ReshareDealResponse)
    def reshare_deal(request: Request, body: api.ReshareDealRequest) -> Response:
        return _json_response(
            service.reshare_deal(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_DKG_BOARD, response_model=api.DkgBoardResponse)
    def dkg_board(request: Request, body: api.DkgBoardRequest) -> Response:
        return _json_response(service.dkg_board(peer_cert_der(request), body, peer_addr=_peer_addr(request)))

    @app.post(api.PATH_PEER_HELLO, response_model=api.PeerHelloResponse)
    def peer_hello(request: Request, body: api.PeerHelloRequest) -> api.PeerHelloResponse:
        return service.peer_hello(peer_cert_der(request), body, peer_addr=_peer_addr(request))

    @app.post(api.PATH_PEER_ROUND, response_model=api.PeerRoundResponse)
    def peer_round(request: Request, body: api.PeerRoundRequest) -> Response:
        return _json_response(service.peer_round(peer_cert_der(request), body, peer_addr=_peer_addr(request)))

    @app.post(api.PATH_THRESHOLD_ENV_PARTIAL, response_model=api.ThresholdEnvPartialResponse)
    def threshold_env_partial(request: Request, body: api.ThresholdEnvPartialRequest) -> Response:
        return _json_response(
            service.threshold_env_partial(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_PEER_ENV_DKG, response_model=api.PeerEnvDkgResponse)
    def peer_env_dkg(request: Request, body: api.PeerEnvDkgRequest) -> Response:
        return _json_response(
            service.peer_env_dkg(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_PEER_ENV_SHARE, response_model=api.PeerEnvShareResponse)
    def peer_env_share(request: Request, body: api.PeerEnvShareRequest) -> Response:
        return _json_response(
            service.peer_env_share(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_PEER_ENV_RECOVER, response_model=api.PeerEnvRecoverResponse)
    def peer_env_recover(request: Request, body: api.PeerEnvRecoverRequest) -> Response:
        return _json_response(
            service.peer_env_recover(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_PEER_ENV_PIECE, response_model=api.PeerEnvPieceResponse)
    def peer_env_piece(request: Request, body: api.PeerEnvPieceRequest) -> Response:
        return _json_response(
            service.peer_env_piece(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_PEER_ENV_SIGN, response_model=api.PeerEnvSignResponse)
    def peer_env_sign(request: Request, body: api.PeerEnvSignRequest) -> Response:
        return _json_response(
            service.peer_env_sign(peer_cert_der(request), body, peer_addr=_peer_addr(request))
        )

    @app.post(api.PATH_GET_KMS_KEY, response_model=api.KmsKeyResponse)
    def get_kms_key(request: Request, body: api.GetKmsKeyRequest) -> api.KmsKeyResponse:
        return service.get_kms_key(peer_cert_der(request), peer_addr=_peer_addr(request))

    return app


def make_admin_app(service: KmsService, *, token: str, public_url: str = "", chain: str = "") -> FastAPI:
    """The admin listener: status and audit, behind a bearer token. Never key material."""
    app = FastAPI(title="teecloud KMS admin", version="1", docs_url=None, redoc_url=None)
    _install_common(app, 1 << 20)  # a presigning round's relayed broadcast (32 presignatures x members)
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

    @app.post("/reshare/open", response_model=api.ReshareOpenResponse)
    def reshare_open(body: api.ReshareOpenRequest) -> api.ReshareOpenResponse:
        return service.reshare_open(body)

    @app.post("/dkg/open", response_model=api.ReshareOpenResponse)
    def dkg_open(body: api.DkgOpenRequest) -> api.ReshareOpenResponse:
        return service.dkg_open(body)

    @app.get("/tround/pool", response_model=api.PoolResponse)
    def round_pool() -> api.PoolResponse:
        return service.presignature_pool()

    @app.post("/tround/open", response_model=api.RoundPublic)
    def round_open(body: api.RoundOpenRequest) -> api.RoundPublic:
        return service.round_open(body)

    @app.post("/tround/view", response_model=api.RoundViewResponse)
    def round_view(body: api.RoundViewRequest) -> api.RoundViewResponse:
        return service.round_view(body)

    @app.post("/tround/advance", response_model=api.RoundPublic)
    def round_advance(body: api.RoundAdvanceRequest) -> api.RoundPublic:
        return service.round_advance(body)

    @app.post("/tenv/peers", response_model=api.RoundViewResponse)
    def env_peers(body: api.EnvPeersRequest) -> api.RoundViewResponse:
        return service.env_peers(body)

    @app.post("/tround/ca-root-share", response_model=api.ThresholdSignResponse)
    def ca_root_share(body: api.CaRootShareRequest) -> api.ThresholdSignResponse:
        return service.ca_root_share(body)

    @app.post("/tround/ca-root", response_model=api.PoolResponse)
    def ca_root_install(body: api.CaRootInstallRequest) -> api.PoolResponse:
        return service.ca_root_install(body)

    @app.post("/threshold/retire", response_model=api.RetireShareResponse)
    def retire_share() -> api.RetireShareResponse:
        return service.retire_share()

    @app.get("/audit", response_model=api.AuditResponse)
    def audit(limit: int = 100) -> api.AuditResponse:
        return api.AuditResponse(records=service.audit.read(limit=max(0, min(limit, 100_000))))

    return app
