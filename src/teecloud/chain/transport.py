"""JSON-RPC transports of the chain client. A transport is one method, `request(method, params) -> result`;
JSON-RPC error objects become ChainError subclasses here, at the boundary (httpx errors too).

  HttpTransport    any Ethereum JSON-RPC URL (short timeouts: an unreachable chain fails fast)
  LocalTransport   an EmbeddedChain in this process (no HTTP)
"""

from __future__ import annotations

from typing import Any, Protocol

import httpx

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


class HttpTransport:
    def __init__(self, url: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RPC URL must start with http:// or https://: {url!r}")
        self.url = url
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))
        self._id = 0

    def request(self, method: str, params: list[Any]) -> Any:
        self._id += 1
        try:
            resp = self._http.post(
                self.url, json={"jsonrpc": "2.0", "id": self._id, "method": method, "params": params}
            )
        except httpx.TimeoutException as exc:
            raise ChainUnreachable(f"no answer from {self.url} within the timeout ({method})") from exc
        except httpx.HTTPError as exc:
            raise ChainUnreachable(f"cannot reach the chain at {self.url}: {exc}") from exc
        if resp.status_code != 200:
            raise ChainUnreachable(f"{self.url} answered HTTP {resp.status_code} to {method}")
        try:
            body = resp.json()
        except ValueError as exc:
            raise ChainUnreachable(f"{self.url} did not answer JSON-RPC") from exc
        if not isinstance(body, dict):
            raise ChainError(f"malformed JSON-RPC answer from {self.url}")
        if body.get("error"):
            err = body["error"]
            raise rpc_error(int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
        return body.get("result")

    def close(self) -> None:
        self._http.close()


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
