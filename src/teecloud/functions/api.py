"""The function runtime's HTTP contract (request/response models and paths): all that clients import."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "PATH_FUNCTION",
    "PATH_FUNCTIONS",
    "PATH_INFO",
    "PATH_INVOKE",
    "PATH_LOGS",
    "PATH_SECRETS_KEY",
    "DeployRequest",
    "InvokeRequest",
    "InvokeResponse",
    "RuntimeInfo",
    "SecretsKeyResponse",
]

PATH_INFO = "/info"
PATH_FUNCTIONS = "/functions"
PATH_FUNCTION = "/functions/{ref}"
PATH_INVOKE = "/functions/{ref}/invoke"
PATH_LOGS = "/functions/{ref}/logs"
PATH_SECRETS_KEY = "/secrets-key/{function_hash}"

_HEX = r"^(0x)?[0-9a-fA-F]*$"


class DeployRequest(BaseModel):
    wasm_base64: str = Field(max_length=6 << 20)
    allowed_hosts: list[str] = Field(default_factory=list, max_length=16)
    limits: dict[str, int] = Field(default_factory=dict, max_length=16)
    sealed_secrets: str | None = Field(default=None, max_length=140_000, pattern=_HEX)
    function_id: str | None = Field(default=None, max_length=42, pattern=_HEX)


class InvokeRequest(BaseModel):
    # the input as text (UTF-8), or as hex bytes
    input: str | None = Field(default=None, max_length=32 << 10)
    input_hex: str | None = Field(default=None, max_length=64 << 10, pattern=_HEX)
    request_id: str | None = Field(default=None, max_length=66, pattern=_HEX)
    ttl_s: int = Field(default=300, ge=1, le=3600)


class InvokeResponse(BaseModel):
    result: dict[str, Any]  # SignedResult.to_json()
    output_text: str | None  # the output, when it is UTF-8
    report: dict[str, Any]
    logs: list[str]


class SecretsKeyResponse(BaseModel):
    """The X25519 key to seal a function's secrets to, signed by the function's result key, whose GetKey
    chain goes up to the KMS root (check it before sealing: teecloud.functions.client)."""

    function_hash: str
    x25519_public_key: str
    signature: str  # result key over keccak256("teecloud-fn-secrets-key:" ‖ function_hash ‖ x25519 key)
    result_public_key: str
    signature_chain: list[str]
    runtime_app_id: str


class RuntimeInfo(BaseModel):
    app_id: str
    compose_hash: str
    functions: int
    limits: dict[str, int]
    relayer: str | None = None  # the address that sends the oracle's fulfil transactions (fund it)
