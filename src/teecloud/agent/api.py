"""The guest agent's wire contract: request/response models of the dstack-compatible API, the limits, and
the Attest envelope codec. This module is all that other components and clients import from the agent.

Wire rules (dstack guest-agent, reference/dstack.md §2): `POST /<Method>` with a JSON body or
`GET /<Method>?field=value`; bytes are lowercase hex (an optional "0x" is accepted on input); errors are
HTTP 400 (client mistake) or 500 (agent fault) with `{"error": "..."}`; unknown methods are 404.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import cbor2
from cbor2._decoder import CBORDecoder as _PureCborDecoder  # cbor2 5.x, pinned
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ATTESTATION_FORMAT",
    "ATTESTATION_VERSION",
    "RESERVED_EVENTS",
    "AgentLimits",
    "AttestRequest",
    "AttestResponse",
    "AttestationEnvelope",
    "EmitEventRequest",
    "GetKeyRequest",
    "GetKeyResponse",
    "GetQuoteRequest",
    "GetQuoteResponse",
    "GetTlsKeyRequest",
    "GetTlsKeyResponse",
    "InfoResponse",
    "SignRequest",
    "SignResponse",
    "TappdDeriveKeyRequest",
    "TappdTdxQuoteRequest",
    "VerifyRequest",
    "VerifyResponse",
    "VersionResponse",
    "decode_attestation",
    "encode_attestation",
]

# Boot events the agent itself measures into RTMR3 (reference/dstack.md §4); EmitEvent refuses them, so an
# app cannot forge a second "compose-hash" after boot.
RESERVED_EVENTS = frozenset(
    {
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "mr-kms",
        "os-image-hash",
        "key-provider",
        "storage-fs",
        "system-ready",
        "init-script-hash",
        "gpu-policy-hash",
        "gpu-attestation",
        "gpu-evidence",  # the GPU gate's event (teecloud.agent.boot)
    }
)


@dataclass(frozen=True)
class AgentLimits:
    """Every limit of the agent in one place."""

    max_body_bytes: int = 256 * 1024  # request body (JSON) or query string
    max_report_data: int = 64
    max_sign_data: int = 128 * 1024
    max_event_payload: int = 64 * 1024
    # EmitEvent, per CVM (per boot): every event grows the event log each quote, Info and attestation carries,
    # in the node process's memory; beyond either bound EmitEvent is a 400
    max_app_events: int = 1024
    max_app_event_bytes: int = 256 * 1024  # names + payloads of the app's events
    max_path_chars: int = 1024
    max_alt_names: int = 64
    key_cache_entries: int = 4096  # GetKey/Sign responses are deterministic and cached per request
    tls_max_validity_s: int = 10 * 365 * 24 * 3600
    default_tls_validity_s: int = 365 * 24 * 3600


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class GetKeyRequest(_Req):
    path: str = ""
    purpose: str = ""
    algorithm: str = "secp256k1"


class GetQuoteRequest(_Req):
    report_data: str = ""


class AttestRequest(_Req):
    report_data: str = ""


class GetTlsKeyRequest(_Req):
    subject: str = ""
    alt_names: list[str] = Field(default_factory=list)
    usage_ra_tls: bool = False
    usage_server_auth: bool = True
    usage_client_auth: bool = False
    not_before: int | None = None
    not_after: int | None = None
    with_app_info: bool | None = None


class EmitEventRequest(_Req):
    event: str
    payload: str = ""


class SignRequest(_Req):
    algorithm: str
    data: str = ""


class VerifyRequest(_Req):
    algorithm: str
    data: str = ""
    signature: str
    public_key: str


class TappdDeriveKeyRequest(_Req):
    path: str = ""
    subject: str = ""
    alt_names: list[str] = Field(default_factory=list)


class TappdTdxQuoteRequest(_Req):
    report_data: str = ""
    hash_algorithm: str = ""


class GetKeyResponse(BaseModel):
    key: str
    signature_chain: list[str]


class GetQuoteResponse(BaseModel):
    quote: str
    event_log: str
    report_data: str
    vm_config: str


class AttestResponse(BaseModel):
    attestation: str


class GetTlsKeyResponse(BaseModel):
    key: str
    certificate_chain: list[str]


class InfoResponse(BaseModel):
    app_id: str
    instance_id: str
    app_cert: str
    tcb_info: str
    app_name: str
    device_id: str
    mr_aggregated: str
    os_image_hash: str
    key_provider_info: str
    compose_hash: str
    vm_config: str
    cloud_vendor: str
    cloud_product: str


class SignResponse(BaseModel):
    signature: str
    signature_chain: list[str]
    public_key: str


class VerifyResponse(BaseModel):
    valid: bool


class VersionResponse(BaseModel):
    version: str
    rev: str


# -- Attest envelope (docs/attest-format.md) --------------------------------------------------------------

ATTESTATION_FORMAT = "teecloud-attestation"
ATTESTATION_VERSION = 1
_MAX_ATTESTATION = 2 * 1024 * 1024


@dataclass(frozen=True)
class AttestationEnvelope:
    tee: str  # "tdx" or "tdx-simulated" ...
    quote: bytes
    event_log: str  # dstack event-log JSON
    vm_config: str  # JSON
    report_data: bytes  # 64 bytes, as bound in the quote


def encode_attestation(env: AttestationEnvelope) -> bytes:
    """Deterministic CBOR (RFC 8949 §4.2.1 core deterministic encoding) map, see docs/attest-format.md."""
    doc: dict[str, Any] = {
        "format": ATTESTATION_FORMAT,
        "version": ATTESTATION_VERSION,
        "tee": env.tee,
        "evidence": {"kind": "tdx-dcap-quote", "quote": env.quote},
        "event_log": env.event_log,
        "vm_config": env.vm_config,
        "report_data": env.report_data,
    }
    return bytes(cbor2.dumps(doc, canonical=True))


def decode_attestation(data: bytes) -> AttestationEnvelope:
    """Parse an untrusted envelope (structure only; verify the quote separately). Raises ValueError."""
    if len(data) > _MAX_ATTESTATION:
        raise ValueError(f"attestation is {len(data)} bytes, above {_MAX_ATTESTATION}")
    try:
        # cbor2's pure decoder, not its C one: the C decoder leaks every failed decode of a non-UTF-8 string
        # with the frames holding the input (agronholm/cbor2 #257; see teecloud.attestation.nitro._loads).
        doc = _PureCborDecoder(io.BytesIO(data)).decode()
    except RecursionError as exc:
        raise ValueError("attestation is nested too deeply") from exc
    except Exception as exc:  # cbor2 raises CBORDecodeError and friends
        raise ValueError(f"attestation is not CBOR: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != ATTESTATION_FORMAT:
        raise ValueError(f"not a {ATTESTATION_FORMAT} envelope")
    if doc.get("version") != ATTESTATION_VERSION:
        raise ValueError(f"unsupported {ATTESTATION_FORMAT} version {doc.get('version')!r}")
    ev = doc.get("evidence")
    if (
        not isinstance(ev, dict)
        or ev.get("kind") != "tdx-dcap-quote"
        or not isinstance(ev.get("quote"), bytes)
    ):
        raise ValueError("evidence must be {kind: 'tdx-dcap-quote', quote: bytes}")
    fields = {k: doc.get(k) for k in ("tee", "event_log", "vm_config")}
    if not all(isinstance(v, str) for v in fields.values()) or not isinstance(doc.get("report_data"), bytes):
        raise ValueError("tee, event_log, vm_config must be text and report_data bytes")
    return AttestationEnvelope(
        tee=doc["tee"],
        quote=ev["quote"],
        event_log=doc["event_log"],
        vm_config=doc["vm_config"],
        report_data=doc["report_data"],
    )
