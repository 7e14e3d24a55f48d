"""The runtime's HTTP API (FastAPI), served through teecloud._serve (connection caps, timeouts):

    GET  /info                          the runtime app's identity and limits
    GET  /secrets-key/{function_hash}   the X25519 key to seal a function's secrets to (signed, see api)
    POST /functions                     deploy (DeployRequest)
    GET  /functions, /functions/{ref}   what is deployed ({ref}: function hash or function id)
    POST /functions/{ref}/invoke        run once and sign (InvokeRequest -> InvokeResponse)
    GET  /functions/{ref}/logs          the function's last calls

Client mistakes are 4xx with {"error", "detail"} (and the call's report when a function was stopped).
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from teecloud._asgi import BoundedBody
from teecloud._serve import LimitedServer, ServeLimits, limited_config

from . import api
from .errors import (
    BadFunction,
    FunctionError,
    InvocationFailed,
    NotAllowed,
    ReservedRequestId,
    SecretError,
    UnknownFunction,
)
from .service import FunctionRuntime, describe_error

__all__ = ["FUNCTIONS_LIMITS", "FunctionServer", "make_app"]

FUNCTIONS_LIMITS = ServeLimits(max_connections=128, backlog=512)
MAX_BODY = 8 << 20  # a deploy carries the module in base64


def _hex(value: str | None, what: str, size: int | None = None) -> bytes | None:
    if value is None:
        return None
    try:
        out = bytes.fromhex(value.removeprefix("0x"))
    except ValueError as exc:
        raise BadFunction(f"{what} is not hex") from exc
    if size is not None and len(out) != size:
        raise BadFunction(f"{what} must be {size} bytes")
    return out


def _status(exc: FunctionError) -> int:
    if isinstance(exc, UnknownFunction):
        return 404
    if isinstance(exc, NotAllowed):
        return 409 if isinstance(exc, ReservedRequestId) or "already taken" in str(exc) else 403
    if isinstance(exc, InvocationFailed):
        return 422
    if isinstance(exc, BadFunction | SecretError):
        return 400
    return 503  # the guest agent / chain behind the runtime failed


def make_app(runtime: FunctionRuntime, relayer: str | None = None) -> FastAPI:
    app = FastAPI(title="teecloud functions", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(BoundedBody, max_bytes=MAX_BODY)

    @app.exception_handler(FunctionError)
    async def on_error(request: Request, exc: FunctionError) -> JSONResponse:
        return JSONResponse(describe_error(exc), status_code=_status(exc))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse({"error": "BadRequest", "detail": f"malformed request: {errors}"[:500]}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "BadRequest", "detail": str(exc.detail)}, exc.status_code)

    @app.get(api.PATH_INFO, response_model=api.RuntimeInfo)
    def info() -> api.RuntimeInfo:
        ident = runtime.keys.identity()
        return api.RuntimeInfo(
            app_id="0x" + ident.app_id.hex(),
            compose_hash="0x" + ident.compose_hash.hex(),
            functions=len(runtime.functions()),
            limits=runtime.max_limits.as_dict(),
            relayer=relayer,
        )

    @app.get(api.PATH_SECRETS_KEY, response_model=api.SecretsKeyResponse)
    def secrets_key(function_hash: str) -> api.SecretsKeyResponse:
        fh = _hex(function_hash, "function_hash", 32)
        assert fh is not None
        return api.SecretsKeyResponse(**runtime.secrets_key_statement(fh))

    @app.post(api.PATH_FUNCTIONS)
    def deploy(body: api.DeployRequest) -> dict[str, Any]:
        try:
            wasm = base64.b64decode(body.wasm_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadFunction("wasm_base64 is not base64") from exc
        rec = runtime.deploy(
            wasm,
            allowed_hosts=body.allowed_hosts,
            limits=body.limits,
            sealed_secrets=_hex(body.sealed_secrets, "sealed_secrets"),
            function_id=_hex(body.function_id, "function_id", 20),
        )
        return rec.to_json()

    @app.get(api.PATH_FUNCTIONS)
    def list_functions() -> list[dict[str, Any]]:
        return [r.to_json() for r in runtime.functions()]

    @app.get(api.PATH_FUNCTION)
    def get_function(ref: str) -> dict[str, Any]:
        return runtime.record(ref).to_json()

    @app.post(api.PATH_INVOKE, response_model=api.InvokeResponse)
    def invoke(ref: str, body: api.InvokeRequest) -> api.InvokeResponse:
        if body.input is not None and body.input_hex is not None:
            raise BadFunction("give input or input_hex, not both")
        data = body.input.encode() if body.input is not None else (_hex(body.input_hex, "input_hex") or b"")
        inv = runtime.invoke(ref, data, request_id=_hex(body.request_id, "request_id", 32), ttl_s=body.ttl_s)
        try:
            text: str | None = inv.result.output.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return api.InvokeResponse(
            result=inv.result.to_json(), output_text=text, report=inv.report.as_dict(), logs=inv.logs
        )

    @app.get(api.PATH_LOGS)
    def logs(ref: str, limit: int = 50) -> list[dict[str, Any]]:
        return runtime.logs(ref, limit=max(1, min(limit, 200)))

    return app


class FunctionServer:
    """The HTTP API on host:port (127.0.0.1 unless told otherwise), in a thread of its own."""

    def __init__(
        self,
        runtime: FunctionRuntime,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServeLimits = FUNCTIONS_LIMITS,
        relayer: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.host = host
        self._server = LimitedServer(
            limited_config(make_app(runtime, relayer), limits, host=host, port=port),
            limits,
            name="functions runtime",
        )
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._server.run, name="functions-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise FunctionError("the functions runtime's HTTP server did not start")
            time.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])

    def serve_forever(self) -> None:
        self._server.run()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
