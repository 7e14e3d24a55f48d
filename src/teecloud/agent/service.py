"""The guest agent's API logic over one booted CVM (`AgentService`), no HTTP: every dstack method (GetKey,
GetQuote, Attest, GetTlsKey, Info, EmitEvent, Sign, Verify, Version) and the legacy tappd ones (DeriveKey,
TdxQuote). A client mistake raises ClientError (HTTP 400/404 in teecloud.agent.http).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from Crypto.Hash import keccak as _keccak
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud import __version__
from teecloud.agent import api
from teecloud.agent.boot import AgentState
from teecloud.attestation.eventlog import mr_aggregated
from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem
from teecloud.keys.errors import KeyUsageError
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

__all__ = ["AgentService", "ClientError"]

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
    """A request the agent refuses: 400 (bad input), 404 (unknown method) or 503 (not possible now: GetKey
    without the KMS signature its threshold KMS could not give at boot)."""

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
        keys = self.state.keys
        if len(keys.k256_signature) != 65 and keys.kms_k256_pubkey:
            # a threshold group that signs, whose nodes held no common presignature at this CVM's boot: the
            # signature is made at boot only (boot-time evidence), so a restart after the refill gets it
            raise ClientError(
                "the KMS signature of this app's key was not obtained at boot (no presignatures, refill in "
                "progress; or fewer than t signing nodes answered): restart this CVM once the threshold KMS "
                "nodes' pools are refilled (docs/kms.md, 'Threshold mode')",
                503,
            )
        if len(keys.k256_signature) != 65:
            raise ClientError(
                "GetKey needs the KMS signature of this app's key, which this CVM's key provider did not "
                "give (a threshold KMS group without a signing key: docs/kms.md, 'Threshold mode')"
            )
        dk = self._derived_key(req.path, algo)
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
