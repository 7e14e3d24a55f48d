"""End-to-end encryption of prompts and answers to the model's key (X25519 + HKDF-SHA256 + AES-256-GCM).

Request envelope (the JSON body a client sends instead of the plain OpenAI request):
    {"teecloud_e2ee": 1, "model": str, "epk": hex32, "nonce": hex12, "ts": seconds, "ciphertext": hex}
    shared  = X25519(client ephemeral secret, model e2ee key)       (RFC 7748)
    key     = HKDF-SHA256(shared, salt = epk ‖ model public key, info = "teecloud-ai-e2ee-v1 " ‖ direction)
    AD      = JCS({"v": 1, "model", "direction", "ts", "epk", "request_nonce"})   (RFC 8785)
Response envelope: {"teecloud_e2ee": 1, "nonce": hex12, "ciphertext": hex}, direction "response", the same
epk and the request's nonce in its AD, so an answer can be opened only for the request it answers.
Streamed answer: every SSE event of the engine is sealed whole as one event
`data: {"teecloud_e2ee": 1, "seq", "final", "nonce", "ciphertext"}` (direction "response-stream", seq and
final in the AD); an empty final event ends the stream, so dropping, reordering or truncating is detected.

The server refuses an envelope whose timestamp is outside the window or whose (epk, nonce) it has seen within
the window (ReplayCache, bounded: when full of live entries it refuses new ones rather than forget one).
The model name travels in clear (the gateway routes on it) but is bound by the AD.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teecloud.ai._fields import get_hex, get_int, get_obj, get_str
from teecloud.ai._jcs import jcs
from teecloud.ai.errors import EnvelopeRejected, MalformedInput

__all__ = [
    "E2EE_VERSION",
    "ClientSession",
    "ReplayCache",
    "ServerKey",
    "is_envelope",
]

E2EE_VERSION = 1
MAX_CIPHERTEXT_BYTES = 1024 * 1024


def is_envelope(obj: Any) -> bool:
    return isinstance(obj, dict) and "teecloud_e2ee" in obj


def _key(shared: bytes, epk: bytes, model_pk: bytes, direction: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=epk + model_pk,
        info=b"teecloud-ai-e2ee-v1 " + direction.encode(),
    ).derive(shared)


def _ad(
    model: str,
    direction: str,
    ts: int,
    epk: bytes,
    request_nonce: bytes,
    stream: tuple[int, bool] | None = None,
) -> bytes:
    ad: dict[str, Any] = {
        "v": E2EE_VERSION,
        "model": model,
        "direction": direction,
        "ts": ts,
        "epk": epk.hex(),
        "request_nonce": request_nonce.hex(),
    }
    if stream is not None:  # a streamed answer's events: their order and the end are authenticated
        ad["seq"], ad["final"] = stream
    return jcs(ad)


class ReplayCache:
    """(epk, nonce) pairs seen within the timestamp window; bounded."""

    def __init__(self, window_s: int = 120, max_entries: int = 100_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    def check_and_add(self, key: bytes, ts: int, now: int) -> None:
        with self._lock:
            while self._seen:
                oldest_key, oldest_ts = next(iter(self._seen.items()))
                if oldest_ts >= now - self.window_s:
                    break
                del self._seen[oldest_key]
            if key in self._seen:
                raise EnvelopeRejected("replayed envelope (this epk and nonce were already used)")
            if len(self._seen) >= self.max_entries:
                raise EnvelopeRejected("too many encrypted requests in the window; retry later", status=429)
            # Insert in timestamp order is not guaranteed; eviction above is conservative (keeps extra).
            self._seen[key] = max(ts, now)


@dataclass
class OpenedRequest:
    plaintext: bytes
    model: str
    epk: bytes
    nonce: bytes
    ts: int
    stream_cipher: AESGCM | None = None


class ServerKey:
    """The model side: opens request envelopes and seals their answers."""

    def __init__(self, secret: bytes, *, window_s: int = 120, replay: ReplayCache | None = None) -> None:
        if len(secret) != 32:
            raise ValueError("an X25519 secret is 32 bytes")
        self._sk = X25519PrivateKey.from_private_bytes(secret)
        self.public_key = self._sk.public_key().public_bytes_raw()
        self.window_s = window_s
        self.replay = replay if replay is not None else ReplayCache(window_s)

    def open_request(self, envelope: Any, *, model: str, now: int) -> OpenedRequest:
        try:
            obj = get_obj(envelope, "envelope")
            if obj.get("teecloud_e2ee") != E2EE_VERSION:
                raise EnvelopeRejected(f"unsupported envelope version (expected {E2EE_VERSION})")
            if set(obj) != {"teecloud_e2ee", "model", "epk", "nonce", "ts", "ciphertext"}:
                raise EnvelopeRejected("envelope has unknown or missing fields")
            env_model = get_str(obj, "model")
            epk = get_hex(obj, "epk", size=32)
            nonce = get_hex(obj, "nonce", size=12)
            ts = get_int(obj, "ts")
            ct = get_hex(obj, "ciphertext", max_size=MAX_CIPHERTEXT_BYTES)
        except MalformedInput as exc:
            raise EnvelopeRejected(f"malformed envelope: {exc}") from None
        if env_model != model:
            raise EnvelopeRejected(f"envelope is for model {env_model!r}, this is {model!r}")
        if abs(now - ts) > self.window_s:
            raise EnvelopeRejected(f"envelope timestamp outside the {self.window_s} s window")
        try:
            shared = self._sk.exchange(X25519PublicKey.from_public_bytes(epk))
        except ValueError:
            raise EnvelopeRejected("epk is not a usable X25519 public key") from None
        key = _key(shared, epk, self.public_key, "request")
        try:
            plaintext = AESGCM(key).decrypt(nonce, ct, _ad(model, "request", ts, epk, nonce))
        except InvalidTag:
            raise EnvelopeRejected("envelope does not decrypt (wrong key, model or tampered)") from None
        self.replay.check_and_add(epk + nonce, ts, now)  # only authentic envelopes enter the cache
        return OpenedRequest(plaintext, model, epk, nonce, ts)

    def seal_stream_event(
        self, req: OpenedRequest, seq: int, plaintext: bytes, *, final: bool
    ) -> dict[str, Any]:
        """One event of a streamed answer (direction "response-stream"): `seq` counts from 0, the last event
        has `final` (and may be empty), so a client detects reordering, dropping and truncation."""
        if req.stream_cipher is None:  # one X25519 + HKDF per answer, not per event
            shared = self._sk.exchange(X25519PublicKey.from_public_bytes(req.epk))
            req.stream_cipher = AESGCM(_key(shared, req.epk, self.public_key, "response-stream"))
        nonce = os.urandom(12)
        ad = _ad(req.model, "response-stream", req.ts, req.epk, req.nonce, (seq, final))
        ct = req.stream_cipher.encrypt(nonce, plaintext, ad)
        return {
            "teecloud_e2ee": E2EE_VERSION,
            "seq": seq,
            "final": final,
            "nonce": nonce.hex(),
            "ciphertext": ct.hex(),
        }

    def seal_response(self, req: OpenedRequest, plaintext: bytes) -> dict[str, Any]:
        shared = self._sk.exchange(X25519PublicKey.from_public_bytes(req.epk))
        key = _key(shared, req.epk, self.public_key, "response")
        nonce = os.urandom(12)
        ct = AESGCM(key).encrypt(nonce, plaintext, _ad(req.model, "response", req.ts, req.epk, req.nonce))
        return {"teecloud_e2ee": E2EE_VERSION, "nonce": nonce.hex(), "ciphertext": ct.hex()}


class ClientSession:
    """The client side of one request: seal it to the model's key, open the answer."""

    def __init__(self, model_public_key: bytes, model: str, *, now: int) -> None:
        if len(model_public_key) != 32:
            raise ValueError("an X25519 public key is 32 bytes")
        self._esk = X25519PrivateKey.generate()
        self.epk = self._esk.public_key().public_bytes_raw()
        self.model_pk = model_public_key
        self.model = model
        self.ts = now
        self.nonce = os.urandom(12)
        self._shared = self._esk.exchange(X25519PublicKey.from_public_bytes(model_public_key))
        self._stream_cipher: AESGCM | None = None

    def seal_request(self, plaintext: bytes) -> dict[str, Any]:
        key = _key(self._shared, self.epk, self.model_pk, "request")
        ad = _ad(self.model, "request", self.ts, self.epk, self.nonce)
        return {
            "teecloud_e2ee": E2EE_VERSION,
            "model": self.model,
            "epk": self.epk.hex(),
            "nonce": self.nonce.hex(),
            "ts": self.ts,
            "ciphertext": AESGCM(key).encrypt(self.nonce, plaintext, ad).hex(),
        }

    def open_stream_event(self, envelope: Any, expected_seq: int) -> tuple[bytes, bool]:
        """(plaintext, final) of the event numbered `expected_seq`; raises EnvelopeRejected otherwise."""
        try:
            obj = get_obj(envelope, "stream event")
            if obj.get("teecloud_e2ee") != E2EE_VERSION or not isinstance(obj.get("final"), bool):
                raise EnvelopeRejected("not an encrypted stream event")
            seq = get_int(obj, "seq")
            nonce = get_hex(obj, "nonce", size=12)
            ct = get_hex(obj, "ciphertext", max_size=MAX_CIPHERTEXT_BYTES)
        except MalformedInput as exc:
            raise EnvelopeRejected(f"malformed stream event: {exc}") from None
        if seq != expected_seq:
            raise EnvelopeRejected(f"stream event {seq} arrived where {expected_seq} was due")
        final = bool(obj["final"])
        if self._stream_cipher is None:
            self._stream_cipher = AESGCM(_key(self._shared, self.epk, self.model_pk, "response-stream"))
        ad = _ad(self.model, "response-stream", self.ts, self.epk, self.nonce, (seq, final))
        try:
            return self._stream_cipher.decrypt(nonce, ct, ad), final
        except InvalidTag:
            raise EnvelopeRejected("a stream event does not decrypt for this request") from None

    def open_response(self, envelope: Any) -> bytes:
        try:
            obj = get_obj(envelope, "response envelope")
            if obj.get("teecloud_e2ee") != E2EE_VERSION:
                raise EnvelopeRejected("not an encrypted response")
            nonce = get_hex(obj, "nonce", size=12)
            ct = get_hex(obj, "ciphertext", max_size=MAX_CIPHERTEXT_BYTES * 4)
        except MalformedInput as exc:
            raise EnvelopeRejected(f"malformed response envelope: {exc}") from None
        key = _key(self._shared, self.epk, self.model_pk, "response")
        try:
            return AESGCM(key).decrypt(nonce, ct, _ad(self.model, "response", self.ts, self.epk, self.nonce))
        except InvalidTag:
            raise EnvelopeRejected("the response does not decrypt for this request") from None
