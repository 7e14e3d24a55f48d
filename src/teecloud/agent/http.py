"""The guest agent's HTTP routes over an AgentService:

    make_agent_app       dstack.sock: POST|GET /<Method>
    make_tappd_app       legacy tappd.sock: POST|GET /prpc/Tappd.<Method>
    make_public_app      what a CVM shows to the world: Info honouring public_tcbinfo, Version

Routes are plain Starlette routes on a FastAPI app: the handlers parse and validate bodies themselves so
a bad request is always a 400 `{"error": ...}` (never FastAPI's 422), and the hot path stays short.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from teecloud import __version__, _json
from teecloud.agent import api
from teecloud.agent.boot import AgentState
from teecloud.agent.service import AgentService, ClientError, _dumps
from teecloud.keys.errors import KeysError

__all__ = ["make_agent_app", "make_public_app", "make_tappd_app"]

log = logging.getLogger("teecloud.agent")
M = TypeVar("M", bound=BaseModel)
_JSON = "application/json"


def _error(message: str, status: int) -> Response:
    return Response(_dumps({"error": message}), status_code=status, media_type=_JSON)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _check_unicode(value: Any, where: str = "body") -> None:
    """Refuse strings holding a lone surrogate (JSON allows the escape "\\ud800"; UTF-8 has no form for it,
    so key derivation and certificates would fail on it deep inside)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ClientError(f"{where}: not valid Unicode (lone surrogate escape)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where)
            _check_unicode(v, k if where == "body" else f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, where)


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            declared = int(cl)
        except ValueError:
            raise ClientError("invalid Content-Length") from None
        if declared > limit:
            raise ClientError(f"request body is {declared} bytes, above the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(f"request body is above the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model: type[M], limits: api.AgentLimits) -> M:
    """GET: query parameters; POST: the JSON body (query parameters when the body is empty)."""
    body = b""
    if request.method != "GET":
        body = await _read_body(request, limits.max_body_bytes)
    if body.strip():
        try:
            data = _json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ClientError("request body must be JSON (protobuf bodies are not supported)") from None
        if not isinstance(data, dict):
            raise ClientError("request body must be a JSON object")
        _check_unicode(data)
        strict = True
    else:
        if len(request.url.query) > limits.max_body_bytes:
            raise ClientError(f"query string above the {limits.max_body_bytes}-byte limit")
        data = {}
        list_fields = {n for n, f in model.model_fields.items() if "list" in str(f.annotation)}
        for k, v in request.query_params.multi_items():
            if k == "json":
                continue
            if k in list_fields:
                data.setdefault(k, []).append(v)
            else:
                data[k] = v
        strict = False
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise ClientError(_validation_message(exc)) from None


Handler = Callable[[Request], Awaitable[Response]]


def _route(
    model: type[M] | None,
    fn: Callable[[M], dict[str, Any] | bytes] | Callable[[], dict[str, Any] | bytes],
    limits: api.AgentLimits,
) -> Handler:
    async def endpoint(request: Request) -> Response:
        try:
            if model is None:
                if request.method != "GET":
                    await _read_body(request, limits.max_body_bytes)
                out = fn()  # type: ignore[call-arg]
            else:
                req = await _parse(request, model, limits)
                out = fn(req)  # type: ignore[call-arg]
        except ClientError as exc:
            return _error(exc.message, exc.status)
        except KeysError as exc:
            log.exception("agent: key operation failed")
            return _error(f"key operation failed: {exc}", 500)
        except Exception:
            log.exception("agent: internal error in %s", request.url.path)
            return _error("internal error in the guest agent (see its log)", 500)
        return Response(out if isinstance(out, bytes) else _dumps(out), media_type=_JSON)

    return endpoint


def _base_app(title: str) -> FastAPI:
    app = FastAPI(title=title, version=__version__, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error(f"unknown method {request.url.path!r}", 404)
        return _error(str(exc.detail), exc.status_code if exc.status_code < 500 else 500)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("agent: unhandled error", exc_info=exc)
        return _error("internal error in the guest agent (see its log)", 500)

    return app


def _add_methods(
    app: FastAPI,
    prefix: str,
    methods: dict[str, tuple[type[BaseModel] | None, Any, type[BaseModel] | None]],
    limits: api.AgentLimits,
) -> None:
    paths: dict[str, Any] = {}
    for name, (req_model, fn, resp_model) in methods.items():
        app.add_route(
            f"{prefix}{name}", _route(req_model, fn, limits), methods=["GET", "POST"], include_in_schema=False
        )
        op: dict[str, Any] = {
            "operationId": name,
            "responses": {
                "200": {
                    "description": "ok",
                    "content": {
                        _JSON: {
                            "schema": resp_model.model_json_schema() if resp_model else {"type": "object"}
                        }
                    },
                },
                "400": {"description": 'client error: {"error": "..."}'},
                "500": {"description": 'agent fault: {"error": "..."}'},
            },
        }
        if req_model is not None:
            op["requestBody"] = {"content": {_JSON: {"schema": req_model.model_json_schema()}}}
        paths[f"{prefix}{name}"] = {"post": op}

    def openapi() -> dict[str, Any]:
        return {"openapi": "3.1.0", "info": {"title": app.title, "version": app.version}, "paths": paths}

    app.openapi = openapi  # type: ignore[method-assign]


def make_agent_app(state: AgentState | AgentService, limits: api.AgentLimits | None = None) -> FastAPI:
    """The dstack.sock API (reference/dstack.md §2)."""
    svc = state if isinstance(state, AgentService) else AgentService(state, limits)
    app = _base_app("teecloud guest agent (dstack-compatible)")
    _add_methods(
        app,
        "/",
        {
            "GetKey": (api.GetKeyRequest, svc.get_key, api.GetKeyResponse),
            "GetQuote": (api.GetQuoteRequest, svc.get_quote, api.GetQuoteResponse),
            "Attest": (api.AttestRequest, svc.attest, api.AttestResponse),
            "GetTlsKey": (api.GetTlsKeyRequest, svc.get_tls_key, api.GetTlsKeyResponse),
            "Info": (None, svc.info, api.InfoResponse),
            "EmitEvent": (api.EmitEventRequest, svc.emit_event, None),
            "Sign": (api.SignRequest, svc.sign, api.SignResponse),
            "Verify": (api.VerifyRequest, svc.verify, api.VerifyResponse),
            "Version": (None, svc.version, api.VersionResponse),
        },
        svc.limits,
    )
    app.state.service = svc
    return app


def make_tappd_app(state: AgentState | AgentService, limits: api.AgentLimits | None = None) -> FastAPI:
    """The legacy tappd.sock API: /prpc/Tappd.DeriveKey, .TdxQuote, .Info (plus ?json, accepted and
    ignored: responses are always JSON)."""
    svc = state if isinstance(state, AgentService) else AgentService(state, limits)
    app = _base_app("teecloud guest agent (legacy tappd)")
    _add_methods(
        app,
        "/prpc/Tappd.",
        {
            "DeriveKey": (api.TappdDeriveKeyRequest, svc.tappd_derive_key, api.GetTlsKeyResponse),
            "TdxQuote": (api.TappdTdxQuoteRequest, svc.tappd_tdx_quote, api.GetQuoteResponse),
            "Info": (None, svc.info, api.InfoResponse),
        },
        svc.limits,
    )
    app.state.service = svc
    return app


def make_public_app(state: AgentState | AgentService, limits: api.AgentLimits | None = None) -> FastAPI:
    """What a CVM shows publicly (dstack's port-8090 service): Info with tcb_info withheld when the compose
    sets public_tcbinfo=false, and Version. No keys, no quotes."""
    svc = state if isinstance(state, AgentService) else AgentService(state, limits)
    app = _base_app("teecloud guest agent (public)")
    _add_methods(
        app,
        "/",
        {
            "Info": (None, lambda: svc.info(public=True), api.InfoResponse),
            "Version": (None, svc.version, api.VersionResponse),
        },
        svc.limits,
    )
    return app
