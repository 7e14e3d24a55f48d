"""The runtime's keys, obtained only through the guest API (GetKey / Info), like any teecloud app.

Per function (identified by its `function_hash`):
  result signing key  GetKey(path "teecloud-fn/<hash>/result", purpose "teecloud-fn-result:<hash>",
                      secp256k1): its GetKey chain [app key over keccak("<purpose>:<hex compressed key>"),
                      KMS root over keccak("dstack-kms-issued:" ‖ app_id ‖ app key)] binds the key to the
                      function hash and the runtime app, up to the KMS root recorded in KmsAuth.
  secrets key         GetKey(path "teecloud-fn/<hash>/secrets"): used as an X25519 secret; deployers seal
                      a function's secrets to its public key, and only code with that hash can open them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from teecloud.keys.sigchain import k256_public_key

from .errors import FunctionError

__all__ = [
    "FunctionKeys",
    "GuestAgentKeys",
    "KeySource",
    "RuntimeIdentity",
    "result_key_purpose",
]


def result_key_purpose(function_hash: bytes) -> str:
    return f"teecloud-fn-result:{function_hash.hex()}"


@dataclass(frozen=True)
class RuntimeIdentity:
    app_id: bytes  # 20 bytes: the runtime app's AppAuth address
    compose_hash: bytes  # 32 bytes: measured at boot (RTMR3)


class KeySource(Protocol):
    """The two guest-API calls the runtime needs (dstack's GetKey and Info)."""

    def get_key(self, path: str, purpose: str) -> tuple[bytes, list[bytes]]: ...

    def identity(self) -> RuntimeIdentity: ...


class GuestAgentKeys:
    """KeySource over the guest agent's socket (/var/run/dstack.sock), with the official dstack-sdk client."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = 3.0) -> None:
        from dstack_sdk import DstackClient

        self._client = DstackClient(endpoint, timeout=timeout)

    def get_key(self, path: str, purpose: str) -> tuple[bytes, list[bytes]]:
        try:
            r = self._client.get_key(path, purpose, "secp256k1")
            return r.decode_key(), r.decode_signature_chain()
        except Exception as exc:  # the sdk raises httpx / pydantic / ValueError errors
            raise FunctionError(f"the guest agent did not give a key: {exc}") from exc

    def identity(self) -> RuntimeIdentity:
        try:
            info = self._client.info()
            app_id = bytes.fromhex(info.app_id.removeprefix("0x"))
            compose_hash = bytes.fromhex(info.compose_hash.removeprefix("0x"))
        except Exception as exc:
            raise FunctionError(f"the guest agent did not answer Info: {exc}") from exc
        if len(app_id) != 20 or len(compose_hash) != 32:
            raise FunctionError("the runtime needs a 20-byte app_id (an AppAuth address) and a compose hash")
        return RuntimeIdentity(app_id, compose_hash)


@dataclass(frozen=True)
class SigningKey:
    secret: bytes
    public_key: bytes  # compressed
    signature_chain: tuple[bytes, bytes]


class FunctionKeys:
    """Per-function keys from a KeySource, cached (GetKey is deterministic)."""

    MAX_CACHED = 1024

    def __init__(self, source: KeySource) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._signing: dict[bytes, SigningKey] = {}
        self._secrets: dict[bytes, X25519PrivateKey] = {}
        self._identity: RuntimeIdentity | None = None

    def identity(self) -> RuntimeIdentity:
        if self._identity is None:
            self._identity = self.source.identity()
        return self._identity

    def signing_key(self, function_hash: bytes) -> SigningKey:
        with self._lock:
            hit = self._signing.get(function_hash)
        if hit is not None:
            return hit
        h = function_hash.hex()
        secret, chain = self.source.get_key(f"teecloud-fn/{h}/result", result_key_purpose(function_hash))
        if len(secret) != 32 or len(chain) != 2:
            raise FunctionError("GetKey returned an unexpected key or signature chain")
        key = SigningKey(secret, k256_public_key(secret), (chain[0], chain[1]))
        with self._lock:
            if len(self._signing) >= self.MAX_CACHED:
                self._signing.clear()
            self._signing[function_hash] = key
        return key

    def secrets_key(self, function_hash: bytes) -> X25519PrivateKey:
        with self._lock:
            hit = self._secrets.get(function_hash)
        if hit is not None:
            return hit
        secret, _ = self.source.get_key(f"teecloud-fn/{function_hash.hex()}/secrets", "teecloud-fn-secrets")
        key = X25519PrivateKey.from_private_bytes(secret)
        with self._lock:
            if len(self._secrets) >= self.MAX_CACHED:
                self._secrets.clear()
            self._secrets[function_hash] = key
        return key
