"""Python client of the function runtime's HTTP API (what `teecloud fn` uses)."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from teecloud.keys.envcrypt import encrypt_env
from teecloud.keys.errors import KeysError

from . import api
from .errors import BadFunction, FunctionError, ResultInvalid, SecretError
from .result import SignedResult, verify_secrets_key
from .service import function_hash_of, normalize_hosts

__all__ = ["FunctionsClient", "RemoteError"]

MAX_RESPONSE = 1 << 20


class RemoteError(FunctionError):
    """The runtime refused or failed a request; `status` and `body` say how."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body.get('error', '')}: {body.get('detail', '')}")
        self.status = status
        self.body = body


class FunctionsClient:
    def __init__(
        self, url: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"), timeout=timeout, transport=transport, trust_env=False
        )

    def close(self) -> None:
        self._http.close()

    def _req(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise FunctionError(f"cannot reach the function runtime at {self._http.base_url}: {exc}") from exc
        if len(r.content) > MAX_RESPONSE:
            raise FunctionError("the runtime's answer is too large")
        try:
            body = r.json()
        except ValueError as exc:
            raise FunctionError(f"the runtime answered {r.status_code} with non-JSON") from exc
        if r.status_code >= 400:
            raise RemoteError(r.status_code, body if isinstance(body, dict) else {"detail": str(body)})
        return body

    def info(self) -> dict[str, Any]:
        return dict(self._req("GET", api.PATH_INFO))

    def secrets_key(self, function_hash: bytes, *, kms_root_public_key: bytes) -> bytes:
        """The X25519 key to seal this function's secrets to, checked up to the KMS root."""
        st = self._req("GET", api.PATH_SECRETS_KEY.format(function_hash=function_hash.hex()))
        return verify_secrets_key(st, function_hash=function_hash, kms_root_public_key=kms_root_public_key)

    def deploy(
        self,
        wasm: bytes,
        *,
        allowed_hosts: list[str] | None = None,
        limits: dict[str, int] | None = None,
        secrets: dict[str, str] | None = None,
        kms_root_public_key: bytes | None = None,
        function_id: bytes | None = None,
    ) -> dict[str, Any]:
        hosts = normalize_hosts(allowed_hosts or [])
        fh = function_hash_of(wasm, hosts, dict(limits or {}))
        body: dict[str, Any] = {
            "wasm_base64": base64.b64encode(wasm).decode(),
            "allowed_hosts": hosts,
            "limits": dict(limits or {}),
        }
        if secrets:
            if kms_root_public_key is None:
                raise SecretError("sealing secrets needs the KMS root public key to check the runtime's key")
            x = self.secrets_key(fh, kms_root_public_key=kms_root_public_key)
            try:
                body["sealed_secrets"] = encrypt_env(x, secrets).hex()
            except KeysError as exc:
                raise BadFunction(str(exc)) from exc
        if function_id is not None:
            body["function_id"] = "0x" + function_id.hex()
        out = dict(self._req("POST", api.PATH_FUNCTIONS, json=body))
        if out.get("function_hash") != "0x" + fh.hex():
            raise ResultInvalid(
                "the runtime deployed the function under another hash than this client computed"
            )
        return out

    def call(
        self, ref: str, input: bytes | str = b"", *, request_id: bytes | None = None, ttl_s: int = 300
    ) -> tuple[SignedResult, dict[str, Any]]:
        body: dict[str, Any] = {"ttl_s": ttl_s}
        if isinstance(input, str):
            body["input"] = input
        else:
            body["input_hex"] = input.hex()
        if request_id is not None:
            body["request_id"] = "0x" + request_id.hex()
        out = self._req("POST", api.PATH_INVOKE.format(ref=ref), json=body)
        return SignedResult.from_json(out["result"]), out

    def logs(self, ref: str, *, limit: int = 50) -> list[dict[str, Any]]:
        return list(self._req("GET", api.PATH_LOGS.format(ref=ref), params={"limit": limit}))

    def functions(self) -> list[dict[str, Any]]:
        return list(self._req("GET", api.PATH_FUNCTIONS))
