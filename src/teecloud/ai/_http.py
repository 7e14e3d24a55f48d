"""Shared HTTP plumbing of the inference front and the verifying proxy: a listener under teecloud._serve's
limits in a background thread, bounded body reads, OpenAI-shaped JSON errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from teecloud._serve import LimitedServer, ServeLimits, limited_config

__all__ = [
    "AI_LISTENER",
    "BodyTooLarge",
    "CompletionRoutes",
    "Listener",
    "fast_event_loop",
    "openai_error",
    "peer_spki_sha256",
    "read_body",
]

# An inference listener: few clients, long answers (a streamed completion holds its connection).
AI_LISTENER = ServeLimits(max_connections=128, backlog=256, keep_alive_timeout_s=15.0)


class BodyTooLarge(Exception):
    pass


def openai_error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """The error shape OpenAI clients parse: {"error": {"message", "type", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge(f"request body above {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body above {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def fast_event_loop() -> str:
    """The event loop the AI listeners serve on (the verifying proxy, the inference front): uvloop (a
    declared dependency of teecloud[ai]) where it is installed, which takes ~15 % less CPU per streamed event
    here (docs/benchmarks.md); else asyncio's. Every other teecloud listener stays on asyncio."""
    import importlib.util

    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


class CompletionRoutes:
    """POST on the completion routes served straight from the ASGI server: past FastAPI's routing and the
    exception, telemetry and body-limit layers, each of which wraps every message of a streamed answer (the
    body limit is read_body's). Added as the app's middleware, so Starlette's ServerErrorMiddleware (and an
    app's handler for Exception) still answers 500 to anything that escapes. The verifying proxy's and the
    inference front's completion routes."""

    def __init__(
        self, app: ASGIApp, handler: Callable[[Request, str], Awaitable[Response]], routes: Collection[str]
    ) -> None:
        self.app = app
        self.handler = handler
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes:
            response = await self.handler(Request(scope, receive), scope["path"])
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Listener:
    """An ASGI app on host:port (127.0.0.1 unless told) in a daemon thread, under `limits`."""

    def __init__(
        self,
        app: Any,
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServeLimits = AI_LISTENER,
        tls: tuple[Path, Path] | None = None,
        loop: str = "asyncio",
    ) -> None:
        """`tls`: (certificate chain PEM file, key PEM file) to serve HTTPS. `loop`: uvicorn's event loop,
        "asyncio" or "uvloop" (the verifying proxy's: teecloud.ai.proxy.proxy_event_loop)."""
        self.host = host
        self.name = name
        self.scheme = "https" if tls else "http"
        extra: dict[str, Any] = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
        config = limited_config(app, limits, host=host, port=port, loop=loop, **extra)
        self._server = LimitedServer(config, limits, name=name)
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> Listener:
        self._thread = threading.Thread(target=self._server.run, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start on {self.host} (port in use?)")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def run_forever(self) -> None:
        self._server.run()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peer_spki_sha256(resp: Any) -> bytes | None:
    """sha256 of the DER SubjectPublicKeyInfo of the TLS certificate the server of an httpx response
    presented on that very connection; None over plain HTTP."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    stream = resp.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(True)  # positional: the sync transport gives a _ssl._SSLSocket
    if not der:
        return None
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(spki).digest()
