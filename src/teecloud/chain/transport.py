"""JSON-RPC transports of the chain client. A transport is one method, `request(method, params) -> result`;
JSON-RPC error objects become ChainError subclasses here, at the boundary (httpx errors too).

  HttpTransport    any Ethereum JSON-RPC URL (short timeouts: an unreachable chain fails fast)
  LocalTransport   an EmbeddedChain in this process (no HTTP)

An http:// endpoint reached without a proxy is asked over the standard library's http.client on kept-alive
connections (`_PlainHttp`): a JSON-RPC call there costs ≈0.35 ms of CPU against httpx's ≈1 ms, and each
KMS node makes three per attested request (docs/benchmarks.md, issue 19). https:// endpoints and endpoints
behind a proxy (HTTP_PROXY and the like, which httpx honours) go through httpx as before.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import urllib.parse
import urllib.request
from typing import Any, Protocol

import httpx

from teecloud import _json

from ._abi import decode_revert
from .embedded import EmbeddedChain, RpcError
from .errors import ChainError, ChainUnreachable, ContractReverted, InsufficientFunds

__all__ = ["CONNECT_TIMEOUT", "REQUEST_TIMEOUT", "HttpTransport", "LocalTransport", "Transport", "rpc_error"]

CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 10.0


class Transport(Protocol):
    def request(self, method: str, params: list[Any]) -> Any: ...

    def close(self) -> None: ...


def rpc_error(code: int, message: str, data: Any) -> ChainError:
    """The ChainError for a JSON-RPC error object (revert reasons decoded from its data)."""
    text = message or ""
    low = text.lower()
    if "insufficient funds" in low or "enough balance" in low or "cannot afford" in low:
        return InsufficientFunds(f"the signer cannot pay for gas and value ({text})")
    if code == 3 or "revert" in low:
        reason = ""
        if isinstance(data, str) and data.startswith("0x"):
            try:
                reason = decode_revert(bytes.fromhex(data[2:]))
            except ValueError:
                reason = ""
        if not reason and "execution reverted:" in text:
            reason = text.split("execution reverted:", 1)[1].strip()
        return ContractReverted(reason)
    return ChainError(f"JSON-RPC error {code}: {text}")


# JSON-RPC methods that only read: one of these may be sent again on a new connection when a kept-alive
# one turns out closed on use (the server closed it as we wrote). Anything else (a transaction, evm_mine)
# is never resent: its error reaches the caller.
_READS = ("eth_call", "eth_chainId", "eth_blockNumber", "eth_estimateGas", "net_version")
_READ_PREFIXES = ("eth_get",)
_CLOSED_ON_USE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _only_reads(payload: Any) -> bool:
    calls = payload if isinstance(payload, list) else [payload]
    return all(
        isinstance(c, dict) and (c.get("method") in _READS or str(c.get("method")).startswith(_READ_PREFIXES))
        for c in calls
    )


class _PlainHttp:
    """POSTs of JSON to one http:// URL over kept-alive http.client connections, thread-safe: each call
    takes an idle connection (or opens one) and puts it back after a complete answer. An idle connection
    the server has closed (or that holds unread bytes) is dropped before use, as httpcore does; one the
    server closes just as it is written to fails the call — except a call of reads only (`_READS`), sent
    once more on a new connection: a transaction is never sent twice."""

    MAX_IDLE = 8

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain http:// URL: {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def post(self, payload: Any) -> tuple[int, bytes]:
        """(HTTP status, body). OSError (socket.timeout included) or http.client.HTTPException on failure."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        conn, reused = self._take()
        try:
            resp, content = self._exchange(conn, body)
        except _CLOSED_ON_USE:
            conn.close()
            if not (reused and _only_reads(payload)):
                raise
            conn = self._connect()  # once, on a connection of its own
            try:
                resp, content = self._exchange(conn, body)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return resp.status, content

    def _exchange(
        self, conn: http.client.HTTPConnection, body: bytes
    ) -> tuple[http.client.HTTPResponse, bytes]:
        conn.request("POST", self.target, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp, resp.read()

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection that still looks open (True), or a new one (False)."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                return conn, True  # nothing to read on an idle connection: still open
            conn.close()  # closed by the server (or unread bytes): never reused

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(self.timeout)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _plain_http(url: str, timeout: float) -> _PlainHttp | None:
    """The http.client path for `url`, or None where httpx must go (https://, credentials in the URL, which
    httpx sends as basic auth, or a proxy variable set)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
        return None
    proxies = urllib.request.getproxies_environment()
    if "http" in proxies or "all" in proxies:  # httpx decides (with NO_PROXY) whether the proxy applies
        return None
    return _PlainHttp(url, timeout)


class HttpTransport:
    def __init__(self, url: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RPC URL must start with http:// or https://: {url!r}")
        self.url = url
        self._timeout = timeout
        # httpx's client (≈18 ms to make: its TLS context) only where it is used: made at the first call
        # that goes through it (`_plain` None: https://, a proxy, credentials in the URL)
        self._http: httpx.Client | None = None
        self._http_lock = threading.Lock()
        self._plain = _plain_http(url, timeout)  # None: through httpx (`_http`)
        self._id = 0
        self._batches = True  # the endpoint answers JSON-RPC batches (request_batch)

    def request(self, method: str, params: list[Any]) -> Any:
        self._id += 1
        body = self._post({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params}, method)
        if not isinstance(body, dict):
            raise ChainError(f"malformed JSON-RPC answer from {self.url}")
        return _result(body)

    def request_batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Several calls in one HTTP request (a JSON-RPC 2.0 batch); their results in the order of `calls`.
        Strict: one answer per call, each under its own id; any error object fails the whole batch, as
        `request` would. An endpoint that answers a batch with one object (no batch support) gets the calls
        one by one (and from then on always)."""
        if not self._batches:
            return [self.request(method, params) for method, params in calls]
        first = self._id + 1
        self._id += len(calls)
        payload = [
            {"jsonrpc": "2.0", "id": first + k, "method": method, "params": params}
            for k, (method, params) in enumerate(calls)
        ]
        body = self._post(payload, "+".join(method for method, _ in calls))
        if isinstance(body, dict):
            self._batches = False
            return [self.request(method, params) for method, params in calls]
        if not isinstance(body, list) or len(body) != len(calls):
            raise ChainError(f"malformed JSON-RPC batch answer from {self.url}")
        by_id: dict[int, dict[str, Any]] = {}
        for item in body:
            rid = item.get("id") if isinstance(item, dict) else None
            if type(rid) is not int or not first <= rid < first + len(calls) or rid in by_id:
                raise ChainError(f"malformed JSON-RPC batch answer from {self.url}")
            by_id[rid] = item
        return [_result(by_id[first + k]) for k in range(len(calls))]

    def _post(self, payload: Any, what: str) -> Any:
        if self._plain is not None:
            return self._post_plain(self._plain, payload, what)
        try:
            resp = self._httpx().post(self.url, json=payload)
        except httpx.TimeoutException as exc:
            raise ChainUnreachable(f"no answer from {self.url} within the timeout ({what})") from exc
        except httpx.HTTPError as exc:
            raise ChainUnreachable(f"cannot reach the chain at {self.url}: {exc}") from exc
        if resp.status_code != 200:
            raise ChainUnreachable(f"{self.url} answered HTTP {resp.status_code} to {what}")
        try:
            return resp.json()
        except ValueError as exc:
            raise ChainUnreachable(f"{self.url} did not answer JSON-RPC") from exc

    def _httpx(self) -> httpx.Client:
        with self._http_lock:  # one client, also when threads make their first calls together
            if self._http is None:
                self._http = httpx.Client(timeout=httpx.Timeout(self._timeout, connect=CONNECT_TIMEOUT))
            return self._http

    def _post_plain(self, plain: _PlainHttp, payload: Any, what: str) -> Any:
        """`_post` over http.client, with the same errors as the httpx path."""
        try:
            status, content = plain.post(payload)
        except TimeoutError as exc:  # socket.timeout
            raise ChainUnreachable(f"no answer from {self.url} within the timeout ({what})") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ChainUnreachable(f"cannot reach the chain at {self.url}: {exc}") from exc
        if status != 200:
            raise ChainUnreachable(f"{self.url} answered HTTP {status} to {what}")
        try:
            return _json.loads(content)  # depth-bounded: py-evm raises this process's recursion limit
        except ValueError as exc:
            raise ChainUnreachable(f"{self.url} did not answer JSON-RPC") from exc

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._plain is not None:
            self._plain.close()


def _result(body: dict[str, Any]) -> Any:
    """A JSON-RPC answer object's result; its error object as a ChainError."""
    if body.get("error"):
        err = body["error"]
        if not isinstance(err, dict):
            raise ChainError(f"malformed JSON-RPC error object: {err!r:.200}")
        raise rpc_error(int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
    return body.get("result")


class LocalTransport:
    """The embedded chain in this process (no HTTP)."""

    def __init__(self, chain: EmbeddedChain) -> None:
        self.chain = chain

    def request(self, method: str, params: list[Any]) -> Any:
        try:
            return self.chain.request(method, params)
        except RpcError as exc:
            raise rpc_error(exc.code, exc.message, exc.data) from None

    def close(self) -> None:
        self.chain.close()
