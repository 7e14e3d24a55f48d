"""The guest agent's HTTP services (dstack.sock, tappd.sock, public info) and how they are hosted.

    AgentService         the API's logic over one AgentState (no HTTP); raises ClientError for 4xx
    make_agent_app       dstack.sock routes: POST|GET /<Method>
    make_tappd_app       legacy tappd.sock routes: POST|GET /prpc/Tappd.<Method>
    make_public_app      what a CVM shows to the world: Info honouring public_tcbinfo, Version
    AgentRunner          hosts the apps on Unix sockets (and optionally 127.0.0.1:PORT) in a background
                         thread with its own event loop — one per CVM on a node; start()/stop()
    serve_agent          the same, blocking, for `teecloud agent simulate`

Routes are plain Starlette routes on a FastAPI app: the handlers parse and validate bodies themselves so
a bad request is always a 400 `{"error": ...}` (never FastAPI's 422), and the hot path stays short.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from Crypto.Hash import keccak as _keccak
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from teecloud import __version__, _json
from teecloud._serve import AGENT, LimitedServer, ServeLimits, limited_config
from teecloud.agent import api
from teecloud.agent.boot import AgentState, boot
from teecloud.attestation.eventlog import mr_aggregated
from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem
from teecloud.keys.errors import KeysError, KeyUsageError
from teecloud.keys.kdf import derive_p256_key
from teecloud.keys.ratls import OID_APP_ID, OID_CERT_USAGE, event_log_json, make_ratls_cert
from teecloud.keys.sigchain import (
    SIGN_KEY_PATH,
    SIGN_KEY_PURPOSE,
    DerivedKey,
    build_key_signature_chain,
    derive_get_key,
    normalize_get_key_algorithm,
    sign_data,
    verify_data_signature,
)

__all__ = [
    "AgentRunner",
    "AgentService",
    "AgentState",
    "ClientError",
    "boot",
    "make_agent_app",
    "make_public_app",
    "make_tappd_app",
    "serve_agent",
]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
_JSON = "application/json"
# RFC 5280 Appendix A ub-common-name; cryptography counts it in UTF-8 bytes and refuses more with ValueError
_MAX_CN = 64


def _cn_too_long(text: str) -> bool:
    return len(text.encode("utf-8", "surrogatepass")) > _MAX_CN


def _cn(text: str) -> str:
    """`text` cut to the longest prefix that fits a common name."""
    return text.encode("utf-8", "surrogatepass")[:_MAX_CN].decode("utf-8", "ignore")


# RFC 1035 §2.3.1 preferred name syntax (RFC 5280 §4.2.1.6 requires it for dNSName): letters, digits and
# hyphens, labels of 1..63 characters not starting or ending with a hyphen, 253 characters in all; plus a
# leading "*" label (RFC 6125 §6.4.3 wildcard). Anything else (a NUL byte, spaces, "/", "_") is refused.
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAX_DNS_NAME = 253


def _check_alt_names(names: Sequence[str], max_names: int) -> None:
    if len(names) > max_names:
        raise ClientError(f"alt_names: at most {max_names} names")
    for name in names:
        try:
            ipaddress.ip_address(name)
            continue
        except ValueError:
            pass
        labels = name.split(".")
        ok = 0 < len(name) <= _MAX_DNS_NAME and all(
            _DNS_LABEL.match(label) or (i == 0 and label == "*" and len(labels) > 2)
            for i, label in enumerate(labels)
        )
        if not ok:
            raise ClientError(
                f"alt_names: invalid alt name {name!r}: a DNS name of letters, digits, hyphens and dots "
                f"(labels of 1-63 characters, {_MAX_DNS_NAME} in all, an optional leading `*.`; IDNA names "
                "in their xn-- form) or an IP address"
            )


class ClientError(Exception):
    """A request the agent refuses: 400 (bad input) or 404 (unknown method)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _hex(value: str, name: str, *, max_bytes: int | None = None) -> bytes:
    text = value[2:] if value[:2] in ("0x", "0X") else value
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ClientError(f"{name}: not a valid hex string") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise ClientError(f"{name}: at most {max_bytes} bytes, got {len(raw)}")
    return raw


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _keccak_digest(bits: int, data: bytes) -> bytes:
    return bytes(_keccak.new(digest_bits=bits, data=data).digest())


# tappd TdxQuote: report_data = H("app-data:" ‖ data) unless "raw" (reference/dstack.md §2).
_TAPPD_HASHES: dict[str, Callable[[bytes], bytes]] = {
    "sha256": lambda d: hashlib.sha256(d).digest(),
    "sha384": lambda d: hashlib.sha384(d).digest(),
    "sha512": lambda d: hashlib.sha512(d).digest(),
    "sha3-256": lambda d: hashlib.sha3_256(d).digest(),
    "sha3-384": lambda d: hashlib.sha3_384(d).digest(),
    "sha3-512": lambda d: hashlib.sha3_512(d).digest(),
    "keccak256": lambda d: _keccak_digest(256, d),
    "keccak384": lambda d: _keccak_digest(384, d),
    "keccak512": lambda d: _keccak_digest(512, d),
}
_TAPPD_PREFIX = b"app-data:"


class AgentService:
    """The guest-agent API over one booted CVM. Thread-safe; GetKey/Sign key material is cached."""

    def __init__(self, state: AgentState, limits: api.AgentLimits | None = None) -> None:
        self.state = state
        self.limits = limits or api.AgentLimits()
        keys = state.keys
        self._ca_key = keys.ca_key()
        self._ca_cert = x509.load_pem_x509_certificate(keys.ca_cert_pem.encode())
        self._ca_cert_pem = keys.ca_cert_pem
        self._vm_config_json = json.dumps(state.vm_config, separators=(",", ":"))
        self._kp_info_json = json.dumps(keys.key_provider_info, separators=(",", ":"))
        self._key_cache: dict[tuple[str, ...], bytes] = {}
        self._derived: dict[tuple[str, str], DerivedKey] = {}
        self._lock = threading.Lock()
        self._log_cache: tuple[int, str, list[dict[str, Any]]] = (-1, "", [])
        self._tappd_cache: dict[tuple[str, str, tuple[str, ...]], bytes] = {}
        self._app_cert_pem = ""
        self._app_events = 0
        self._app_event_bytes = 0

    # -- helpers -----------------------------------------------------------------------------------------

    def _event_log(self) -> tuple[str, list[dict[str, Any]]]:
        entries = self.state.tee.event_log()
        n, text, objs = self._log_cache
        if n != len(entries):  # the log only grows, so its length identifies a version of it
            objs = [e.to_json() for e in entries]
            text = event_log_json(entries)
            self._log_cache = (len(entries), text, objs)
        return text, objs

    def _derived_key(self, path: str, algorithm: str) -> DerivedKey:
        k = (path, algorithm)
        dk = self._derived.get(k)
        if dk is None:
            dk = derive_get_key(self.state.keys.k256_key, path, algorithm)
            with self._lock:
                if len(self._derived) >= self.limits.key_cache_entries:
                    self._derived.clear()
                self._derived[k] = dk
        return dk

    def _quote(self, report_data: bytes) -> dict[str, str]:
        rd = report_data.ljust(64, b"\x00")
        quote = self.state.tee.quote(rd)
        text, _ = self._event_log()
        return {
            "quote": quote.hex(),
            "event_log": text,
            "report_data": rd.hex(),
            "vm_config": self._vm_config_json,
        }

    # -- dstack methods ----------------------------------------------------------------------------------

    def get_key(self, req: api.GetKeyRequest) -> bytes:
        if len(req.path) > self.limits.max_path_chars or len(req.purpose) > self.limits.max_path_chars:
            raise ClientError(f"path and purpose are at most {self.limits.max_path_chars} characters")
        try:
            algo = normalize_get_key_algorithm(req.algorithm)
        except KeyUsageError as exc:
            raise ClientError(str(exc)) from None
        ck = (req.path, req.purpose, algo)
        cached = self._key_cache.get(ck)
        if cached is not None:
            return cached
        dk = self._derived_key(req.path, algo)
        keys = self.state.keys
        chain = build_key_signature_chain(keys.k256_key, keys.k256_signature, req.purpose, dk.public_key)
        body = _dumps({"key": dk.secret.hex(), "signature_chain": [s.hex() for s in chain]})
        with self._lock:
            if len(self._key_cache) >= self.limits.key_cache_entries:
                self._key_cache.clear()
            self._key_cache[ck] = body
        return body

    def get_quote(self, req: api.GetQuoteRequest) -> dict[str, Any]:
        rd = _hex(req.report_data, "report_data", max_bytes=self.limits.max_report_data)
        return self._quote(rd)

    def attest(self, req: api.AttestRequest) -> dict[str, Any]:
        rd = _hex(req.report_data, "report_data", max_bytes=self.limits.max_report_data).ljust(64, b"\x00")
        quote = self.state.tee.quote(rd)
        text, _ = self._event_log()
        env = api.AttestationEnvelope(
            tee=self.state.tee.kind,
            quote=quote,
            event_log=text,
            vm_config=self._vm_config_json,
            report_data=rd,
        )
        return {"attestation": api.encode_attestation(env).hex()}

    def get_tls_key(self, req: api.GetTlsKeyRequest, *, now: int | None = None) -> dict[str, Any]:
        lim = self.limits
        _check_alt_names(req.alt_names, lim.max_alt_names)
        if _cn_too_long(req.subject):
            raise ClientError(
                f"subject: at most {_MAX_CN} bytes of UTF-8 (X.509 common name, RFC 5280 ub-common-name)"
            )
        now = int(time.time()) if now is None else now
        nb = req.not_before if req.not_before is not None else now
        na = req.not_after if req.not_after is not None else nb + lim.default_tls_validity_s
        if not 0 <= nb < na:
            raise ClientError("not_after must be later than not_before (unix seconds)")
        if na - nb > lim.tls_max_validity_s:
            raise ClientError(f"validity is at most {lim.tls_max_validity_s} seconds")
        app_cert_not_after = int(self._ca_cert.not_valid_after_utc.timestamp())
        na = min(na, app_cert_not_after)
        subject = req.subject or _cn(self.state.app_name) or "teecloud app"
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            if req.usage_ra_tls:
                cert = make_ratls_cert(
                    self.state.tee,
                    key,
                    issuer_key=self._ca_key,
                    issuer_cert=self._ca_cert,
                    subject=subject,
                    usage="app:tls",
                    not_before=nb,
                    not_after=na,
                    app_id=self.state.app_id,
                    alt_names=req.alt_names,
                    server_auth=req.usage_server_auth,
                    client_auth=req.usage_client_auth,
                )
            else:
                extra = []
                if req.with_app_info:
                    extra = [
                        x509.UnrecognizedExtension(OID_APP_ID, _octets(self.state.app_id)),
                        x509.UnrecognizedExtension(OID_CERT_USAGE, _octets(b"app:tls")),
                    ]
                cert = issue_cert(
                    key.public_key(),
                    issuer_key=self._ca_key,
                    issuer_name=self._ca_cert.subject,
                    subject_cn=subject,
                    not_before=nb,
                    not_after=na,
                    alt_names=req.alt_names,
                    server_auth=req.usage_server_auth,
                    client_auth=req.usage_client_auth,
                    extra_extensions=extra,
                )
        except KeyUsageError as exc:
            raise ClientError(str(exc)) from None
        key_pem = key_to_pem(key)
        return {"key": key_pem, "certificate_chain": [cert_to_pem(cert), self._ca_cert_pem]}

    def app_cert(self) -> str:
        if not self._app_cert_pem:
            out = self.get_tls_key(api.GetTlsKeyRequest(usage_ra_tls=True, usage_client_auth=True))
            self._app_cert_pem = out["certificate_chain"][0]
        return self._app_cert_pem

    def tcb_info(self) -> dict[str, Any]:
        ms = self.state.tee.measurements()
        _, entries = self._event_log()
        return {
            "mrtd": ms["mrtd"].hex(),
            "rtmr0": ms["rtmr0"].hex(),
            "rtmr1": ms["rtmr1"].hex(),
            "rtmr2": ms["rtmr2"].hex(),
            "rtmr3": ms["rtmr3"].hex(),
            "mr_aggregated": mr_aggregated(ms).hex(),
            "os_image_hash": self.state.os_image_hash.hex(),
            "compose_hash": self.state.compose_hash.hex(),
            "device_id": self.state.device_id.hex(),
            "event_log": entries,
            "app_compose": self.state.app_compose_text,
        }

    def info(self, *, public: bool = False) -> dict[str, Any]:
        st = self.state
        tcb = self.tcb_info()
        hide = public and not st.public_tcbinfo
        return {
            "app_id": st.app_id.hex(),
            "instance_id": st.instance_id.hex(),
            "app_cert": self.app_cert(),
            "tcb_info": "" if hide else json.dumps(tcb, separators=(",", ":")),
            "app_name": st.app_name,
            "device_id": st.device_id.hex(),
            "mr_aggregated": tcb["mr_aggregated"],
            "os_image_hash": tcb["os_image_hash"],
            "key_provider_info": self._kp_info_json,
            "compose_hash": st.compose_hash.hex(),
            "vm_config": self._vm_config_json,
            "cloud_vendor": st.cloud_vendor,
            "cloud_product": st.cloud_product,
        }

    def emit_event(self, req: api.EmitEventRequest) -> dict[str, Any]:
        lim = self.limits
        payload = _hex(req.payload, "payload", max_bytes=lim.max_event_payload)
        if not req.event:
            raise ClientError("event: the event name must not be empty")
        if self.state.booted and req.event in self.state.reserved_events:
            raise ClientError(
                f"event: {req.event!r} is a reserved boot event and cannot be emitted after boot"
            )
        size = len(req.event.encode("utf-8", "surrogatepass")) + len(payload)
        with self._lock:  # reserve the room first: concurrent calls cannot overshoot the bounds together
            if self._app_events >= lim.max_app_events:
                raise ClientError(
                    f"event log full: this CVM already emitted {lim.max_app_events} events (the limit per "
                    "boot)"
                )
            if self._app_event_bytes + size > lim.max_app_event_bytes:
                raise ClientError(
                    f"event log full: this CVM's events would exceed {lim.max_app_event_bytes} bytes of "
                    f"names and payloads (the limit per boot; {self._app_event_bytes} used)"
                )
            self._app_events += 1
            self._app_event_bytes += size
        try:
            self.state.tee.emit_event(req.event, payload)
        except ValueError as exc:  # TeeUsageError: bad name (":" or unprintable) or payload
            with self._lock:
                self._app_events -= 1
                self._app_event_bytes -= size
            raise ClientError(f"event: {exc}") from None
        return {}

    def sign(self, req: api.SignRequest) -> dict[str, Any]:
        data = _hex(req.data, "data", max_bytes=self.limits.max_sign_data)
        algo = req.algorithm.lower()
        if algo == "k256":
            algo = "secp256k1"
        if algo not in ("ed25519", "secp256k1", "secp256k1_prehashed"):
            raise ClientError(
                f"unknown algorithm {req.algorithm!r}; "
                "expected one of ed25519, secp256k1, secp256k1_prehashed"
            )
        if algo == "secp256k1_prehashed" and len(data) != 32:
            raise ClientError(f"data: secp256k1_prehashed needs a 32-byte digest, got {len(data)} bytes")
        dk = self._derived_key(SIGN_KEY_PATH, "ed25519" if algo == "ed25519" else "secp256k1")
        sig = sign_data(algo, dk.secret, data)
        keys = self.state.keys
        chain = build_key_signature_chain(keys.k256_key, keys.k256_signature, SIGN_KEY_PURPOSE, dk.public_key)
        return {
            "signature": sig.hex(),
            "signature_chain": [sig.hex(), *(s.hex() for s in chain)],
            "public_key": dk.public_key.hex(),
        }

    def verify(self, req: api.VerifyRequest) -> dict[str, Any]:
        data = _hex(req.data, "data", max_bytes=self.limits.max_sign_data)
        sig = _hex(req.signature, "signature", max_bytes=1024)
        pub = _hex(req.public_key, "public_key", max_bytes=1024)
        try:
            return {"valid": verify_data_signature(req.algorithm, data, sig, pub)}
        except KeyUsageError as exc:
            raise ClientError(str(exc)) from None

    def version(self) -> dict[str, Any]:
        return {"version": __version__, "rev": "teecloud"}

    # -- tappd methods -----------------------------------------------------------------------------------

    def tappd_derive_key(self, req: api.TappdDeriveKeyRequest, *, now: int | None = None) -> bytes:
        if len(req.path) > self.limits.max_path_chars:
            raise ClientError(f"path: at most {self.limits.max_path_chars} characters")
        _check_alt_names(req.alt_names, self.limits.max_alt_names)
        if _cn_too_long(req.subject):
            raise ClientError(
                f"subject: at most {_MAX_CN} bytes of UTF-8 (X.509 common name, RFC 5280 ub-common-name)"
            )
        ck = (req.path, req.subject, tuple(req.alt_names))
        cached = self._tappd_cache.get(ck)
        if cached is not None:
            return cached
        # A deterministic P-256 key per path, from the app CA key; a certificate for it signed by the app CA.
        key = derive_p256_key(self._ca_key, [b"tappd-derive-key:", req.path.encode()])
        now = int(time.time()) if now is None else now
        try:
            cert = issue_cert(
                key.public_key(),
                issuer_key=self._ca_key,
                issuer_name=self._ca_cert.subject,
                subject_cn=req.subject or _cn(req.path) or "teecloud app",
                not_before=now,
                not_after=min(
                    now + self.limits.default_tls_validity_s,
                    int(self._ca_cert.not_valid_after_utc.timestamp()),
                ),
                alt_names=req.alt_names,
                server_auth=True,
                client_auth=True,
            )
        except KeyUsageError as exc:
            raise ClientError(str(exc)) from None
        key_pem = key_to_pem(key)
        body = _dumps({"key": key_pem, "certificate_chain": [cert_to_pem(cert), self._ca_cert_pem]})
        with self._lock:
            if len(self._tappd_cache) >= self.limits.key_cache_entries:
                self._tappd_cache.clear()
            self._tappd_cache[ck] = body
        return body

    def tappd_tdx_quote(self, req: api.TappdTdxQuoteRequest) -> dict[str, Any]:
        algo = (req.hash_algorithm or "sha512").lower()
        if algo == "raw":
            rd = _hex(req.report_data, "report_data", max_bytes=64)
            prefix = ""
        else:
            h = _TAPPD_HASHES.get(algo)
            if h is None:
                raise ClientError(
                    f"unknown hash_algorithm {req.hash_algorithm!r}; expected raw, "
                    + ", ".join(sorted(_TAPPD_HASHES))
                )
            data = _hex(req.report_data, "report_data", max_bytes=self.limits.max_sign_data)
            rd = h(_TAPPD_PREFIX + data)
            prefix = _TAPPD_PREFIX.decode()
        out = self._quote(rd)
        out["hash_algorithm"] = algo
        out["prefix"] = prefix
        return out


def _octets(content: bytes) -> bytes:
    from teecloud.keys.ratls import _der_octet_string

    return _der_octet_string(content)


# -- HTTP layer ----------------------------------------------------------------------------------------------


def _error(message: str, status: int) -> Response:
    return Response(_dumps({"error": message}), status_code=status, media_type=_JSON)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _check_unicode(value: Any, where: str = "body") -> None:
    """Refuse strings holding a lone surrogate (JSON allows the escape "\\ud800"; UTF-8 has no form for it,
    so key derivation and certificates would fail on it deep inside)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ClientError(f"{where}: not valid Unicode (lone surrogate escape)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where)
            _check_unicode(v, k if where == "body" else f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, where)


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            declared = int(cl)
        except ValueError:
            raise ClientError("invalid Content-Length") from None
        if declared > limit:
            raise ClientError(f"request body is {declared} bytes, above the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(f"request body is above the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model: type[M], limits: api.AgentLimits) -> M:
    """GET: query parameters; POST: the JSON body (query parameters when the body is empty)."""
    body = b""
    if request.method != "GET":
        body = await _read_body(request, limits.max_body_bytes)
    if body.strip():
        try:
            data = _json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ClientError("request body must be JSON (protobuf bodies are not supported)") from None
        if not isinstance(data, dict):
            raise ClientError("request body must be a JSON object")
        _check_unicode(data)
        strict = True
    else:
        if len(request.url.query) > limits.max_body_bytes:
            raise ClientError(f"query string above the {limits.max_body_bytes}-byte limit")
        data = {}
        list_fields = {n for n, f in model.model_fields.items() if "list" in str(f.annotation)}
        for k, v in request.query_params.multi_items():
            if k == "json":
                continue
            if k in list_fields:
                data.setdefault(k, []).append(v)
            else:
                data[k] = v
        strict = False
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise ClientError(_validation_message(exc)) from None


Handler = Callable[[Request], Awaitable[Response]]


def _route(
    model: type[M] | None,
    fn: Callable[[M], dict[str, Any] | bytes] | Callable[[], dict[str, Any] | bytes],
    limits: api.AgentLimits,
) -> Handler:
    async def endpoint(request: Request) -> Response:
        try:
            if model is None:
                if request.method != "GET":
                    await _read_body(request, limits.max_body_bytes)
                out = fn()  # type: ignore[call-arg]
            else:
                req = await _parse(request, model, limits)
                out = fn(req)  # type: ignore[call-arg]
        except ClientError as exc:
            return _error(exc.message, exc.status)
        except KeysError as exc:
            log.exception("agent: key operation failed")
            return _error(f"key operation failed: {exc}", 500)
        except Exception:
            log.exception("agent: internal error in %s", request.url.path)
            return _error("internal error in the guest agent (see its log)", 500)
        return Response(out if isinstance(out, bytes) else _dumps(out), media_type=_JSON)

    return endpoint


def _base_app(title: str) -> FastAPI:
    app = FastAPI(title=title, version=__version__, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error(f"unknown method {request.url.path!r}", 404)
        return _error(str(exc.detail), exc.status_code if exc.status_code < 500 else 500)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("agent: unhandled error", exc_info=exc)
        return _error("internal error in the guest agent (see its log)", 500)

    return app


def _add_methods(
    app: FastAPI,
    prefix: str,
    methods: dict[str, tuple[type[BaseModel] | None, Any, type[BaseModel] | None]],
    limits: api.AgentLimits,
) -> None:
    paths: dict[str, Any] = {}
    for name, (req_model, fn, resp_model) in methods.items():
        app.add_route(
            f"{prefix}{name}", _route(req_model, fn, limits), methods=["GET", "POST"], include_in_schema=False
        )
        op: dict[str, Any] = {
            "operationId": name,
            "responses": {
                "200": {
                    "description": "ok",
                    "content": {
                        _JSON: {
                            "schema": resp_model.model_json_schema() if resp_model else {"type": "object"}
                        }
                    },
                },
                "400": {"description": 'client error: {"error": "..."}'},
                "500": {"description": 'agent fault: {"error": "..."}'},
            },
        }
        if req_model is not None:
            op["requestBody"] = {"content": {_JSON: {"schema": req_model.model_json_schema()}}}
        paths[f"{prefix}{name}"] = {"post": op}

    def openapi() -> dict[str, Any]:
        return {"openapi": "3.1.0", "info": {"title": app.title, "version": app.version}, "paths": paths}

    app.openapi = openapi  # type: ignore[method-assign]


def make_agent_app(state: AgentState | AgentService, limits: api.AgentLimits | None = None) -> FastAPI:
    """The dstack.sock API (reference/dstack.md §2)."""
    svc = state if isinstance(state, AgentService) else AgentService(state, limits)
    app = _base_app("teecloud guest agent (dstack-compatible)")
    _add_methods(
        app,
        "/",
        {
            "GetKey": (api.GetKeyRequest, svc.get_key, api.GetKeyResponse),
            "GetQuote": (api.GetQuoteRequest, svc.get_quote, api.GetQuoteResponse),
            "Attest": (api.AttestRequest, svc.attest, api.AttestResponse),
            "GetTlsKey": (api.GetTlsKeyRequest, svc.get_tls_key, api.GetTlsKeyResponse),
            "Info": (None, svc.info, api.InfoResponse),
            "EmitEvent": (api.EmitEventRequest, svc.emit_event, None),
            "Sign": (api.SignRequest, svc.sign, api.SignResponse),
            "Verify": (api.VerifyRequest, svc.verify, api.VerifyResponse),
            "Version": (None, svc.version, api.VersionResponse),
        },
        svc.limits,
    )
    app.state.service = svc
    return app


def make_tappd_app(state: AgentState | AgentService, limits: api.AgentLimits | None = None) -> FastAPI:
    """The legacy tappd.sock API: /prpc/Tappd.DeriveKey, .TdxQuote, .Info (plus ?json, accepted and
    ignored: responses are always JSON)."""
    svc = state if isinstance(state, AgentService) else AgentService(state, limits)
    app = _base_app("teecloud guest agent (legacy tappd)")
    _add_methods(
        app,
        "/prpc/Tappd.",
        {
            "DeriveKey": (api.TappdDeriveKeyRequest, svc.tappd_derive_key, api.GetTlsKeyResponse),
            "TdxQuote": (api.TappdTdxQuoteRequest, svc.tappd_tdx_quote, api.GetQuoteResponse),
            "Info": (None, svc.info, api.InfoResponse),
        },
        svc.limits,
    )
    app.state.service = svc
    return app


def make_public_app(state: AgentState | AgentService, limits: api.AgentLimits | None = None) -> FastAPI:
    """What a CVM shows publicly (dstack's port-8090 service): Info with tcb_info withheld when the compose
    sets public_tcbinfo=false, and Version. No keys, no quotes."""
    svc = state if isinstance(state, AgentService) else AgentService(state, limits)
    app = _base_app("teecloud guest agent (public)")
    _add_methods(
        app,
        "/",
        {
            "Info": (None, lambda: svc.info(public=True), api.InfoResponse),
            "Version": (None, svc.version, api.VersionResponse),
        },
        svc.limits,
    )
    return app


# -- hosting ---------------------------------------------------------------------------------------------


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
