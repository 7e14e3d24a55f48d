"""End-to-end encryption of prompts and answers to the model's key (X25519 or secp256k1 ECDH + HKDF-SHA256 +
AES-256-GCM).

Request envelope (the JSON body a client sends instead of the plain OpenAI request):
    {"teecloud_e2ee": 1, "model": str, "epk": hex32, "nonce": hex12, "ts": seconds, "ciphertext": hex}
    shared  = X25519(client ephemeral secret, model e2ee key)       (RFC 7748)
    key     = HKDF-SHA256(shared, salt = epk ‖ model public key, info = "teecloud-ai-e2ee-v1 " ‖ direction)
    AD      = JCS({"v": 1, "model", "direction", "ts", "epk", "request_nonce"})   (RFC 8785)
With secp256k1 (for clients that hold Ethereum tooling rather than X25519) the envelope carries
"alg": "secp256k1" and epk is a 33-byte compressed SEC1 point:
    shared  = x-coordinate of ECDH(client ephemeral secret, model k256 e2ee key)   (SEC 1 v2 §3.3.1)
    key     = HKDF-SHA256 as above (salt = epk ‖ the model's 33-byte compressed key)
    AD      = JCS({... as above, "alg": "secp256k1"})
and every other rule (nonce, window, replay cache, response and stream sealing) is the same. The model's k256
E2EE secret is HKDF-SHA256(the E2EE GetKey secret, info "teecloud-ai-e2ee-v1 secp256k1 key") mod n: the same
in every replica, independent of the X25519 use of that secret; its public key is the key set's
`e2ee_k256_public_key`.
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
from dataclasses import dataclass, field
from typing import Any

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teecloud.ai._fields import get_hex, get_int, get_obj, get_str
from teecloud.ai._jcs import jcs
from teecloud.ai.errors import EnvelopeRejected, MalformedInput

__all__ = [
    "ALG_K256",
    "ALG_X25519",
    "E2EE_VERSION",
    "ClientSession",
    "Ephemeral",
    "EphemeralSpare",
    "ReplayCache",
    "ServerKey",
    "is_envelope",
    "k256_e2ee_public_key",
    "k256_e2ee_secret",
    "new_ephemeral",
]

E2EE_VERSION = 1
MAX_CIPHERTEXT_BYTES = 1024 * 1024
ALG_X25519 = "x25519"  # the envelope's default: no "alg" field
ALG_K256 = "secp256k1"
_K256_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def k256_e2ee_secret(e2ee_secret: bytes) -> bytes:
    """The model's secp256k1 E2EE secret, derived from the E2EE GetKey secret (see the module docstring)."""
    counter = 0
    while True:  # a value >= n or 0 has probability ~2^-128; the loop keeps the derivation total
        okm = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=b"teecloud-ai-e2ee-v1 secp256k1 key" + (bytes([counter]) if counter else b""),
        ).derive(e2ee_secret)
        d = int.from_bytes(okm, "big")
        if 0 < d < _K256_ORDER:
            return okm
        counter += 1


def k256_e2ee_public_key(e2ee_secret: bytes) -> bytes:
    """The 33-byte compressed public key of k256_e2ee_secret(e2ee_secret): the key set's
    e2ee_k256_public_key."""
    return _k256_public(_k256_private(e2ee_secret))


def _k256_private(e2ee_secret: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(k256_e2ee_secret(e2ee_secret), "big"), ec.SECP256K1())


def _k256_public(sk: ec.EllipticCurvePrivateKey) -> bytes:
    pub = sk.public_key()
    return pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def _k256_exchange(secret: bytes, peer: bytes) -> bytes:
    """ECDH's shared x-coordinate (SEC 1 v2 §3.3.1) of the 32-byte scalar `secret` and a compressed point:
    the x of secret·peer, by libsecp256k1 (coincurve; ten times OpenSSL's generic curve code here, a tenth
    of a millisecond off the first token each side). Raises ValueError for a point not on the curve."""
    if len(peer) != 33 or peer[0] not in (2, 3):
        raise ValueError("not a compressed secp256k1 point")
    try:
        point = coincurve.PublicKey(peer).multiply(secret)
    except Exception as exc:  # coincurve raises ValueError or a bare Exception for a bad point
        raise ValueError("not a secp256k1 point") from exc
    return point.format(compressed=True)[1:]


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
    alg: str = ALG_X25519,
) -> bytes:
    ad: dict[str, Any] = {
        "v": E2EE_VERSION,
        "model": model,
        "direction": direction,
        "ts": ts,
        "epk": epk.hex(),
        "request_nonce": request_nonce.hex(),
    }
    if alg != ALG_X25519:  # the X25519 AD stays as it always was
        ad["alg"] = alg
    if stream is not None:  # a streamed answer's events: their order and the end are authenticated
        ad["seq"], ad["final"] = stream
    return jcs(ad)


class _StreamAd:
    """The associated data of one streamed answer's events, `_ad(model, "response-stream", ...,
    (seq, final))`, made per event from the RFC 8785 bytes of one probe: only `seq` and `final` change, and
    JCS writes an integer below 2**53 in decimal and a boolean as true/false (RFC 8785 §3.2.2).
    Canonicalising the whole object per event cost 12-40 µs on each side (docs/benchmarks.md, AI round 8);
    the bytes are the same (tests/ai/test_e2ee_stream_ad.py)."""

    __slots__ = ("_args", "_parts")
    _PROBE = 2**53 - 1  # the largest seq get_int accepts

    def __init__(self, model: str, ts: int, epk: bytes, nonce: bytes, alg: str) -> None:
        self._args = (model, ts, epk, nonce, alg)
        whole = _ad(model, "response-stream", ts, epk, nonce, (self._PROBE, False), alg=alg)
        final, seq = b'"final":false', b'"seq":%d' % self._PROBE
        self._parts: tuple[bytes, bytes, bytes] | None = None
        # Each key occurs once (a quote inside a string value is escaped); else every event is made whole.
        if whole.count(final) == 1 and whole.count(seq) == 1 and whole.index(final) < whole.index(seq):
            head, rest = whole.split(final)
            middle, tail = rest.split(seq)
            self._parts = (head + b'"final":', middle + b'"seq":', tail)

    def __call__(self, seq: int, final: bool) -> bytes:
        if self._parts is None or type(seq) is not int or not 0 <= seq <= self._PROBE:
            model, ts, epk, nonce, alg = self._args
            return _ad(model, "response-stream", ts, epk, nonce, (seq, final), alg=alg)
        head, middle, tail = self._parts
        return b"".join((head, b"true" if final else b"false", middle, b"%d" % seq, tail))


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
    alg: str = ALG_X25519
    stream_ad: _StreamAd | None = None
    # The ECDH secret of this request's epk and the model key, computed once by open_request and reused for
    # the answer's keys (one ECDH per request, not one per direction: 0.25 ms each with secp256k1).
    shared: bytes = field(default=b"", repr=False)


class ServerKey:
    """The model side: opens request envelopes and seals their answers."""

    def __init__(self, secret: bytes, *, window_s: int = 120, replay: ReplayCache | None = None) -> None:
        if len(secret) != 32:
            raise ValueError("an X25519 secret is 32 bytes")
        self._sk = X25519PrivateKey.from_private_bytes(secret)
        self.public_key = self._sk.public_key().public_bytes_raw()
        self._k256 = k256_e2ee_secret(secret)
        self.k256_public_key = k256_e2ee_public_key(secret)
        self.window_s = window_s
        self.replay = replay if replay is not None else ReplayCache(window_s)

    def open_request(self, envelope: Any, *, model: str, now: int) -> OpenedRequest:
        try:
            obj = get_obj(envelope, "envelope")
            if obj.get("teecloud_e2ee") != E2EE_VERSION:
                raise EnvelopeRejected(f"unsupported envelope version (expected {E2EE_VERSION})")
            alg = obj.get("alg", ALG_X25519)
            if alg not in (ALG_X25519, ALG_K256) or obj.get("alg") == ALG_X25519:
                raise EnvelopeRejected(f"unsupported envelope algorithm (absent for X25519, or {ALG_K256!r})")
            fields = {"teecloud_e2ee", "model", "epk", "nonce", "ts", "ciphertext"}
            if set(obj) != (fields | {"alg"} if alg == ALG_K256 else fields):
                raise EnvelopeRejected("envelope has unknown or missing fields")
            env_model = get_str(obj, "model")
            epk = get_hex(obj, "epk", size=33 if alg == ALG_K256 else 32)
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
            shared = self._shared(alg, epk)
        except ValueError:
            raise EnvelopeRejected(f"epk is not a usable {alg} public key") from None
        key = _key(shared, epk, self._model_pk(alg), "request")
        try:
            plaintext = AESGCM(key).decrypt(nonce, ct, _ad(model, "request", ts, epk, nonce, alg=alg))
        except InvalidTag:
            raise EnvelopeRejected("envelope does not decrypt (wrong key, model or tampered)") from None
        self.replay.check_and_add(epk + nonce, ts, now)  # only authentic envelopes enter the cache
        return OpenedRequest(plaintext, model, epk, nonce, ts, alg=alg, shared=shared)

    def _shared(self, alg: str, epk: bytes) -> bytes:
        if alg == ALG_K256:
            return _k256_exchange(self._k256, epk)
        return self._sk.exchange(X25519PublicKey.from_public_bytes(epk))

    def _model_pk(self, alg: str) -> bytes:
        return self.k256_public_key if alg == ALG_K256 else self.public_key

    def _request_shared(self, req: OpenedRequest) -> bytes:
        return req.shared or self._shared(req.alg, req.epk)

    def seal_stream_event(
        self, req: OpenedRequest, seq: int, plaintext: bytes, *, final: bool
    ) -> dict[str, Any]:
        """One event of a streamed answer (direction "response-stream"): `seq` counts from 0, the last event
        has `final` (and may be empty), so a client detects reordering, dropping and truncation."""
        if req.stream_cipher is None or req.stream_ad is None:  # one HKDF per answer, not per event
            shared = self._request_shared(req)
            req.stream_cipher = AESGCM(_key(shared, req.epk, self._model_pk(req.alg), "response-stream"))
            req.stream_ad = _StreamAd(req.model, req.ts, req.epk, req.nonce, req.alg)
        nonce = os.urandom(12)
        ct = req.stream_cipher.encrypt(nonce, plaintext, req.stream_ad(seq, final))
        return {
            "teecloud_e2ee": E2EE_VERSION,
            "seq": seq,
            "final": final,
            "nonce": nonce.hex(),
            "ciphertext": ct.hex(),
        }

    def seal_response(self, req: OpenedRequest, plaintext: bytes) -> dict[str, Any]:
        shared = self._request_shared(req)
        key = _key(shared, req.epk, self._model_pk(req.alg), "response")
        nonce = os.urandom(12)
        ad = _ad(req.model, "response", req.ts, req.epk, req.nonce, alg=req.alg)
        ct = AESGCM(key).encrypt(nonce, plaintext, ad)
        return {"teecloud_e2ee": E2EE_VERSION, "nonce": nonce.hex(), "ciphertext": ct.hex()}


@dataclass(frozen=True)
class Ephemeral:
    """A client's one-use ephemeral key with its ECDH secret for one model key and algorithm. Made ahead of
    the request that uses it (the verifying proxy makes the next one while an answer is on its way, off the
    first token's path: 0.05 ms with X25519, 0.5 ms with secp256k1), then used by one ClientSession only."""

    alg: str
    model_public_key: bytes
    epk: bytes
    shared: bytes = field(repr=False)


def new_ephemeral(model_public_key: bytes, alg: str = ALG_X25519) -> Ephemeral:
    """A fresh ephemeral key and its shared secret with `model_public_key`; ValueError for a key that is not
    one of `alg`'s."""
    if alg == ALG_K256:  # the key set's e2ee_k256_public_key (33-byte compressed)
        esk = coincurve.PrivateKey()
        epk = esk.public_key.format(compressed=True)
        return Ephemeral(alg, model_public_key, epk, _k256_exchange(esk.secret, model_public_key))
    if alg == ALG_X25519:
        if len(model_public_key) != 32:
            raise ValueError("an X25519 public key is 32 bytes")
        x_esk = X25519PrivateKey.generate()
        shared = x_esk.exchange(X25519PublicKey.from_public_bytes(model_public_key))
        return Ephemeral(alg, model_public_key, x_esk.public_key().public_bytes_raw(), shared)
    raise ValueError(f"unsupported algorithm {alg!r}")


class EphemeralSpare:
    """At most one Ephemeral made ahead for the next request. `take` hands it out once, and only for the
    model key and algorithm it was made for (a rotated key set's key gets a fresh one; the spare is dropped);
    `refill` makes the next one (the proxy calls it while an answer is on its way)."""

    def __init__(self) -> None:
        self._next: Ephemeral | None = None

    def take(self, model_public_key: bytes, alg: str) -> Ephemeral:
        spare, self._next = self._next, None  # never handed out twice
        if spare is None or spare.alg != alg or spare.model_public_key != model_public_key:
            return new_ephemeral(model_public_key, alg)
        return spare

    def refill(self, model_public_key: bytes, alg: str) -> None:
        spare = self._next
        if spare is None or spare.alg != alg or spare.model_public_key != model_public_key:
            self._next = new_ephemeral(model_public_key, alg)


class ClientSession:
    """The client side of one request: seal it to the model's key, open the answer. `ephemeral`: one made
    ahead for this model key and algorithm (EphemeralSpare), used for this request only; else a fresh one."""

    def __init__(
        self,
        model_public_key: bytes,
        model: str,
        *,
        now: int,
        alg: str = ALG_X25519,
        ephemeral: Ephemeral | None = None,
    ) -> None:
        if ephemeral is None:
            ephemeral = new_ephemeral(model_public_key, alg)
        elif ephemeral.alg != alg or ephemeral.model_public_key != model_public_key:
            raise ValueError("the ephemeral key was made for another model key or algorithm")
        self.epk = ephemeral.epk
        self._shared = ephemeral.shared
        self.alg = alg
        self.model_pk = model_public_key
        self.model = model
        self.ts = now
        self.nonce = os.urandom(12)
        self._stream_cipher: AESGCM | None = None
        self._stream_ad: _StreamAd | None = None

    def _ad(self, direction: str, stream: tuple[int, bool] | None = None) -> bytes:
        return _ad(self.model, direction, self.ts, self.epk, self.nonce, stream, alg=self.alg)

    def seal_request(self, plaintext: bytes) -> dict[str, Any]:
        key = _key(self._shared, self.epk, self.model_pk, "request")
        envelope: dict[str, Any] = {
            "teecloud_e2ee": E2EE_VERSION,
            "model": self.model,
            "epk": self.epk.hex(),
            "nonce": self.nonce.hex(),
            "ts": self.ts,
            "ciphertext": AESGCM(key).encrypt(self.nonce, plaintext, self._ad("request")).hex(),
        }
        if self.alg != ALG_X25519:
            envelope["alg"] = self.alg
        return envelope

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
        if self._stream_cipher is None or self._stream_ad is None:
            self._stream_cipher = AESGCM(_key(self._shared, self.epk, self.model_pk, "response-stream"))
            self._stream_ad = _StreamAd(self.model, self.ts, self.epk, self.nonce, self.alg)
        try:
            return self._stream_cipher.decrypt(nonce, ct, self._stream_ad(seq, final)), final
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
            return AESGCM(key).decrypt(nonce, ct, self._ad("response"))
        except InvalidTag:
            raise EnvelopeRejected("the response does not decrypt for this request") from None
