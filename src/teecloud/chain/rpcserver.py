"""Serve an EmbeddedChain over standard Ethereum JSON-RPC (HTTP POST, single or batch) on 127.0.0.1.

The listening URL is recorded in <chain dir>/rpc.json while the server runs, so other local processes
(ChainClient.embedded, the CLI) find it. Request bodies are capped (MAX_BODY); connections, threads and
read/keep-alive deadlines by teecloud._serve.CHAIN_RPC (BoundedHTTPServer).

Time travel (evm_increaseTime, evm_mine) is refused unless the server was built with time_travel=True
(`teecloud chain up --dev-time-travel`, `teecloud up --dev-time-travel`): over an open local port it would let
any process on the machine skip a timelock's delay or a registry's unstake and close delays."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from teecloud import _json
from teecloud._fs import atomic_write_json
from teecloud._serve import CHAIN_RPC, BoundedHTTPServer, BoundedRequestHandler, ServeLimits

from .embedded import EmbeddedChain, RpcError

__all__ = ["MAX_BODY", "TIME_TRAVEL_METHODS", "ChainRpcServer"]

MAX_BODY = 8 * 1024 * 1024
TIME_TRAVEL_METHODS = frozenset({"evm_increaseTime", "evm_mine"})


def _answer(chain: EmbeddedChain, req: Any, *, time_travel: bool = False) -> dict[str, Any]:
    rid = req.get("id") if isinstance(req, dict) else None
    if not isinstance(req, dict) or not isinstance(req.get("method"), str):
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32600, "message": "invalid request"}}
    params = req.get("params") or []
    if not isinstance(params, list):
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": "params must be a list"}}
    if req["method"] in TIME_TRAVEL_METHODS and not time_travel:
        message = (
            f"{req['method']} is disabled: time travel is for development chains only "
            "(start the chain with --dev-time-travel)"
        )
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": message}}
    try:
        return {"jsonrpc": "2.0", "id": rid, "result": chain.request(req["method"], params)}
    except RpcError as exc:
        return {"jsonrpc": "2.0", "id": rid, "error": exc.to_json()}
    except Exception as exc:  # never a traceback to a client: an internal error object
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32603, "message": f"internal error: {exc}"}}


class ChainRpcServer:
    def __init__(
        self,
        chain: EmbeddedChain,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        time_travel: bool = False,
        limits: ServeLimits = CHAIN_RPC,
    ) -> None:
        self.chain = chain
        self.time_travel = time_travel

        class Handler(BoundedRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms per call
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet: no request logging
                return

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    length = -1
                if length < 0 or length > MAX_BODY:
                    self._send(
                        413, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"body too large"}}'
                    )
                    self.close_connection = True
                    return
                if server._stopping:
                    self.close_connection = True
                    return
                self.reading_body()  # under the read deadline until the body is in
                raw = self.rfile.read(length)
                self.busy()
                try:
                    # depth-bounded: py-evm has raised the recursion limit in this process (teecloud._json)
                    req = _json.loads(raw)
                except ValueError:
                    out: Any = {
                        "jsonrpc": "2.0",
                        "id": None,
                        "error": {"code": -32700, "message": "parse error"},
                    }
                else:
                    if isinstance(req, list):
                        out = [_answer(chain, r, time_travel=server.time_travel) for r in req[:1000]]
                    else:
                        out = _answer(chain, req, time_travel=server.time_travel)
                self._send(200, json.dumps(out).encode())

            def do_GET(self) -> None:
                self._send(405, b'{"error":"POST JSON-RPC requests"}')

        server = self
        self._stopping = False
        self.httpd = BoundedHTTPServer((host, port), Handler, limits, name="chain RPC listener")
        self.host: str = str(self.httpd.server_address[0])
        self.port: int = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _record(self) -> None:
        atomic_write_json(self.chain.dir / "rpc.json", {"url": self.url, "pid": os.getpid()}, mode=0o644)

    def _unrecord(self) -> None:
        try:
            (self.chain.dir / "rpc.json").unlink()
        except FileNotFoundError:
            pass

    def start(self) -> ChainRpcServer:
        """Serve in a background thread."""
        self._record()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="chain-rpc", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._record()
        try:
            self.httpd.serve_forever()
        finally:
            self._unrecord()

    def stop(self) -> None:
        # Kept-alive connections are served by their own threads after the listener closes: cut them too,
        # so a stopped chain is unreachable (the KMS's fail-closed test depends on that).
        self._stopping = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.cut_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._unrecord()
