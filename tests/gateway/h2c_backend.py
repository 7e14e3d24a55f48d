"""A real HTTP/2 cleartext backend (hypercorn, h2c by prior knowledge) on 127.0.0.1, in a thread: it answers
`h2c <http_version> <path>`, so a test sees which protocol reached the app behind the gateway."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f"h2c {scope['http_version']} {scope['path']}".encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


class H2cBackend:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        config = Config()
        config.bind = [self.address]
        config.accesslog = None
        config.errorlog = None
        self._loop = asyncio.new_event_loop()
        self._stopped = asyncio.Event()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete,
            args=(serve(_app, config, shutdown_trigger=self._stopped.wait),),  # type: ignore[arg-type]
            daemon=True,
        )
        self._thread.start()
        for _ in range(200):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                threading.Event().wait(0.025)
        raise RuntimeError("the h2c backend did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)
