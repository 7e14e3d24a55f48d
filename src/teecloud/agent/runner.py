"""Hosting the guest agent: `AgentRunner` serves one CVM's dstack.sock and tappd.sock (and optionally
127.0.0.1:PORT) in a background thread with its own event loop, each listener capped and timed out
(teecloud._serve); `serve_agent` is the same, blocking, for `teecloud agent simulate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from teecloud._serve import AGENT, LimitedServer, ServeLimits, limited_config
from teecloud.agent import api
from teecloud.agent.boot import AgentState
from teecloud.agent.http import make_agent_app, make_tappd_app
from teecloud.agent.service import AgentService

__all__ = ["AgentRunner", "serve_agent"]


def _prepare_socket(path: Path) -> None:
    path = Path(path)
    if len(os.fsencode(path)) > 107:
        raise ValueError(f"Unix socket path is too long (max 107 bytes): {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # stale socket from a previous run
        else:
            raise ValueError(f"{path} exists and is not a socket; refusing to replace it")


class AgentRunner:
    """Hosts one CVM's agent: dstack.sock (+ tappd.sock, + 127.0.0.1:PORT serving the dstack API) in a
    background thread with its own event loop. `start()` returns once every listener accepts."""

    def __init__(
        self,
        state: AgentState,
        *,
        dstack_sock: Path | None,
        tappd_sock: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        limits: api.AgentLimits | None = None,
        serve_limits: ServeLimits = AGENT,
    ) -> None:
        if dstack_sock is None and port is None and tappd_sock is None:
            raise ValueError("AgentRunner needs at least one listener")
        self.service = AgentService(state, limits)
        self.serve_limits = serve_limits  # per listener: connections, timeouts (teecloud._serve)
        self.dstack_sock = Path(dstack_sock) if dstack_sock else None
        self.tappd_sock = Path(tappd_sock) if tappd_sock else None
        self.port = port
        self.host = host
        self._servers: list[LimitedServer] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _configs(self) -> list[tuple[str, uvicorn.Config]]:
        common: dict[str, Any] = {"server_header": False}
        lim = self.serve_limits
        out = []
        agent_app = make_agent_app(self.service)
        if self.dstack_sock:
            _prepare_socket(self.dstack_sock)
            out.append(
                ("agent dstack.sock", limited_config(agent_app, lim, uds=str(self.dstack_sock), **common))
            )
        if self.tappd_sock:
            _prepare_socket(self.tappd_sock)
            tappd = make_tappd_app(self.service)
            out.append(("agent tappd.sock", limited_config(tappd, lim, uds=str(self.tappd_sock), **common)))
        if self.port is not None:
            tcp = limited_config(agent_app, lim, host=self.host, port=self.port, **common)
            out.append(("agent TCP listener", tcp))
        return out

    @property
    def bound_port(self) -> int | None:
        """The TCP port actually bound (useful with port=0)."""
        for server in self._servers:
            for s in getattr(server, "servers", []):
                for sock in s.sockets:
                    addr = sock.getsockname()
                    if isinstance(addr, tuple):
                        return int(addr[1])
        return None

    def start(self, timeout: float = 15.0) -> AgentRunner:
        if self._thread is not None:
            raise RuntimeError("AgentRunner already started")
        self._servers = [LimitedServer(c, self.serve_limits, name=n) for n, c in self._configs()]

        def run() -> None:
            try:
                asyncio.run(self._serve_all())
            except BaseException as exc:  # reported to start()/stop()
                self._error = exc

        self._thread = threading.Thread(target=run, name="teecloud-agent", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not all(s.started for s in self._servers):
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"guest agent failed to start: {self._error}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("guest agent did not start in time")
            time.sleep(0.01)
        return self

    async def _serve_all(self) -> None:
        await asyncio.gather(*(s.serve() for s in self._servers))

    def stop(self, timeout: float = 10.0) -> None:
        for s in self._servers:
            s.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for p in (self.dstack_sock, self.tappd_sock):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def __enter__(self) -> AgentRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def listening_on(self) -> list[str]:
        out = []
        if self.dstack_sock:
            out.append(f"dstack API: unix:{self.dstack_sock}")
        if self.tappd_sock:
            out.append(f"tappd API:  unix:{self.tappd_sock}")
        if self.port is not None:
            out.append(f"dstack API: http://{self.host}:{self.bound_port or self.port}")
        return out


def serve_agent(
    state: AgentState,
    dstack_sock: Path | None,
    tappd_sock: Path | None = None,
    port: int | None = None,
    *,
    limits: api.AgentLimits | None = None,
    on_ready: Callable[[AgentRunner], None] | None = None,
) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import signal

    runner = AgentRunner(state, dstack_sock=dstack_sock, tappd_sock=tappd_sock, port=port, limits=limits)
    stop = threading.Event()
    prev = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner.start()
        if on_ready is not None:
            on_ready(runner)
        while not stop.wait(0.5):
            if runner._thread is None or not runner._thread.is_alive():
                break
    finally:
        runner.stop()
        for sig, handler in prev.items():
            signal.signal(sig, handler)
