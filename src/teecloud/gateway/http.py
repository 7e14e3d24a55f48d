"""The gateway's HTTP layer: the registration app (mutual RA-TLS) and the admin app (bearer token,
Prometheus metrics), one refusal shape (`{"error", "reason", "step"}`) for every denial and bad body."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from teecloud._asgi import BoundedBody
from teecloud.gateway import api
from teecloud.gateway.certkeys import CERT_KEYS_PATH
from teecloud.gateway.driver import unix_exchange
from teecloud.gateway.errors import BadHostName, GatewayError, RegistrationRefused
from teecloud.gateway.service import GatewayService

__all__ = [
    "PEER_CERT_STATE_KEY",
    "make_admin_app",
    "make_cert_keys_app",
    "make_custom_domain_app",
    "make_registration_app",
]

PEER_CERT_STATE_KEY = "teecloud.gateway.tls_peer_cert_der"
MAX_BODY = 16 * 1024


def _refusal(status: int, reason: str, step: str = "", error: str = "refused") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "reason": reason, "step": step})


def _common(app: FastAPI) -> None:
    app.add_middleware(BoundedBody, max_bytes=MAX_BODY)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_r: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _refusal(400, f"bad request body at {where}: {first.get('msg', 'invalid')}"[:300], "request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _refusal(exc.status_code, str(exc.detail)[:300], "request", error="http")


def _no_tee() -> JSONResponse:
    return _refusal(404, "this gateway has no TEE to quote its certificate keys", "cert_keys")


def make_cert_keys_app(cert_keys: Callable[[], bytes] | None) -> FastAPI:
    """The published quotes of the gateway's certificate keys, alone: HAProxy sends
    `https://<base domain>/.well-known/teecloud/cert-keys` here (loopback, plain HTTP)."""
    app = FastAPI(title="teecloud gateway cert-keys", docs_url=None, redoc_url=None)
    _common(app)

    @app.get(CERT_KEYS_PATH)
    def published_cert_keys() -> Response:
        if cert_keys is None:
            return _no_tee()
        return Response(cert_keys(), media_type="application/json")

    return app


def make_registration_app(
    service: GatewayService, *, cert_keys: Callable[[], bytes] | None = None
) -> FastAPI:
    """The registration route, and the published quotes of the gateway's certificate keys (public)."""
    app = FastAPI(title="teecloud gateway registration", docs_url=None, redoc_url=None)
    _common(app)

    @app.get(CERT_KEYS_PATH)
    def published_cert_keys() -> Response:
        if cert_keys is None:
            return _no_tee()
        return Response(cert_keys(), media_type="application/json")

    @app.post(api.PATH_REGISTER, response_model=api.RegisterCvmResponse)
    def register(request: Request, body: api.RegisterCvmRequest) -> Any:
        state = request.scope.get("state") or {}
        der = state.get(PEER_CERT_STATE_KEY)
        try:
            return service.register(der if isinstance(der, bytes) and der else None, body)
        except RegistrationRefused as exc:
            return _refusal(403, exc.reason, exc.step)
        except GatewayError as exc:  # the data plane failed: the CVM retries at its next interval
            reason = f"the gateway cannot apply routes now: {exc}"[:300]
            return _refusal(503, reason, "data_plane", "unavailable")

    return app


def make_admin_app(
    service: GatewayService,
    *,
    token: str,
    status: Callable[[], api.GatewayStatus],
    haproxy_metrics: Callable[[], bytes],
    custom_domains: Callable[[], list[api.CustomDomainView]] | None = None,
) -> FastAPI:
    """Every route needs `Authorization: Bearer <token>` (compared in constant time). `custom_domains`: the
    pinned custom domains now, sorted by name (None: the gateway serves none)."""
    if len(token) < 16:
        raise ValueError("the admin listener needs a token of at least 16 characters")
    app = FastAPI(title="teecloud gateway admin", docs_url=None, redoc_url=None)
    _common(app)
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            return _refusal(401, "the admin API needs Authorization: Bearer <token>", "auth")
        response: Response = await call_next(request)
        return response

    @app.get("/admin/status", response_model=api.GatewayStatus)
    def get_status() -> api.GatewayStatus:
        return status()

    @app.get("/admin/routes", response_model=list[api.RouteView])
    def routes() -> list[api.RouteView]:
        now = service.clock()
        draining = set(service.registry.draining)
        return [
            api.RouteView(
                app_id=r.app_id,
                instance_id=r.instance_id,
                port=r.port,
                address=r.address,
                expires_in_s=max(0, int(reg.expires_at - now)),
                draining=r.address.rpartition(":")[0].strip("[]") in draining,
                proxy_protocol=r.proxy_protocol,
                h2c=r.h2c,
            )
            for reg in service.registry.registrations()
            for r in reg.routes
        ]

    @app.get("/admin/domains", response_model=api.CustomDomainList)
    def domains(
        limit: int = Query(api.DOMAINS_PAGE_DEFAULT, ge=1, le=api.DOMAINS_PAGE_MAX),
        after: str = Query("", max_length=253, description="the last domain of the previous page"),
    ) -> api.CustomDomainList:
        if custom_domains is None:
            return api.CustomDomainList(enabled=False, total=0, domains=[])
        pinned = custom_domains()  # at most the CustomDomains cache's bound (max_entries)
        later = [d for d in pinned if d.domain > after.lower()]
        page = later[:limit]
        return api.CustomDomainList(
            enabled=True,
            total=len(pinned),
            domains=page,
            next_after=page[-1].domain if len(later) > limit else None,
        )

    @app.post("/admin/drain", response_model=api.GatewayStatus)
    def drain(body: api.DrainRequest) -> api.GatewayStatus:
        service.registry.drain(body.host)
        service.on_change()
        return status()

    @app.post("/admin/undrain", response_model=api.GatewayStatus)
    def undrain(body: api.DrainRequest) -> api.GatewayStatus:
        service.registry.undrain(body.host)
        service.on_change()
        return status()

    @app.get("/metrics")
    async def metrics() -> Response:
        c = service.counters
        regs = service.registry.registrations()
        lines = [
            "# HELP teecloud_gateway_registrations_accepted_total Registrations accepted.",
            "# TYPE teecloud_gateway_registrations_accepted_total counter",
            f"teecloud_gateway_registrations_accepted_total {c.accepted}",
            "# HELP teecloud_gateway_registrations_refused_total Registrations refused, by failing step.",
            "# TYPE teecloud_gateway_registrations_refused_total counter",
            *(
                f'teecloud_gateway_registrations_refused_total{{step="{s}"}} {n}'
                for s, n in sorted((c.refused or {}).items())
            ),
            "# HELP teecloud_gateway_instances Registered instances.",
            "# TYPE teecloud_gateway_instances gauge",
            f"teecloud_gateway_instances {len(regs)}",
            "",
        ]
        data = await asyncio.to_thread(haproxy_metrics)
        return PlainTextResponse("\n".join(lines).encode() + data, media_type="text/plain; version=0.0.4")

    return app


def fetch_unix_http(path: str, target: str, *, timeout: float = 5.0, max_bytes: int = 8 << 20) -> bytes:
    """GET `target` over HTTP/1.0 on a unix socket (HAProxy's Prometheus exporter); the body."""
    raw = unix_exchange(
        path, f"GET {target} HTTP/1.0\r\nHost: haproxy\r\n\r\n".encode(), timeout=timeout, max_bytes=max_bytes
    )
    _head, _sep, body = raw.partition(b"\r\n\r\n")
    return body


def make_custom_domain_app(resolve: Callable[[str], str | None], *, token: str) -> FastAPI:
    """HAProxy's Lua hook asks `GET /resolve/<sni>` (header X-Teecloud-Hook: <token>); the answer is the
    passthrough backend serving that custom domain, or `-` (none: the connection gets a TLS alert)."""
    if len(token) < 16:
        raise ValueError("the custom domain hook needs a token of at least 16 characters")
    app = FastAPI(title="teecloud gateway custom domain hook", docs_url=None, redoc_url=None)
    _common(app)
    expected = token.encode()

    @app.get("/resolve/{sni}")
    def resolve_sni(request: Request, sni: str) -> Response:
        got = request.headers.get("x-teecloud-hook", "").encode()
        if not hmac.compare_digest(got, expected):
            return PlainTextResponse("-", status_code=401)
        try:
            backend = resolve(sni[:300])
        except BadHostName as exc:
            return PlainTextResponse(f"- {str(exc)[:200]}", status_code=400)
        return PlainTextResponse(backend or "-")

    return app
