"""Threshold X25519 for env secrets: t of n nodes compute an app's env-decryption Diffie–Hellman value
without any node holding the key, in dstack's encrypted-env format unchanged (pure; no I/O).

Construction:
  * Curve25519 in its Edwards form (RFC 7748 §4.1 birational map u = (1+y)/(1−y)); the env key is a
    scalar x mod L (the prime-order subgroup's order) Shamir-shared at degree t−1 with Feldman commitments
    C_j = a_j·B (Feldman, FOCS '87). The app's X25519 public key is the Montgomery u of X = x·B = C_0, so
    anyone with the commitments computes it before the app boots; dstack-sdk's `encrypt_env_vars` and
    `teecloud deploy --env` encrypt to it as to any X25519 key.
  * An encrypted env starts with the sender's ephemeral key u_E = X25519(e, 9) = u(clamp(e)·B). Node i maps
    u_E to the Edwards point P with that u (sign bit 0: x·(−P) = −(x·P) has the same u, so the choice does
    not matter), refuses a point off the prime-order subgroup, and returns D_i = x_i·P with a Chaum–Pedersen
    proof (CRYPTO '92; Fiat–Shamir with SHA-512) that log_B(Y_i) = log_P(D_i), Y_i = Σ i^j·C_j. The client
    checks each proof, names a node whose proof fails, and interpolates any t: Σ λ_i·D_i = x·P, whose u is
    X25519(e, u_X) — the AES-256-GCM key of dstack's format (keys.envcrypt).
  * One sharing per app, made by its own dealerless DKG (Joint-Feldman: `deal` by each member,
    `dkg_receive` to check and sum; among running nodes by teecloud.kms.threshold_env; `dkg_local` in one
    process for tests and the bench): the app keys must be unrelated. A public tweak of one group key
    (x + h(app) or x·h(app)) would let an app whose boot asks for x_A·P on a host-supplied P (the host
    chooses the env blob) compute another app's x_B·P from the answer, i.e. decrypt another app's env.
What a single node's D_i gives: x_i·P, a share; with t−1 of them nothing about x·P (Shamir), under DDH.
Group operations: libsodium's edwards25519 functions (noclamp scalar multiplication, point validation on
the main subgroup) through pysodium's binding of Debian's libsodium.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import pysodium

from teecloud.keys import _shamir
from teecloud.keys.errors import KeyUsageError, MalformedKeyMaterial

__all__ = [
    "EDWARDS25519",
    "ORDER",
    "EcdhPartial",
    "EnvKeyShare",
    "ThresholdEcdhError",
    "combine",
    "deal",
    "dkg_local",
    "dkg_receive",
    "ephemeral_point",
    "partial_decrypt",
    "public_share",
    "share_from_json",
    "share_to_json",
    "strict_ephemeral_point",
    "verify_partial",
    "x25519_public_key",
]

ORDER = 2**252 + 27742317777372353535851937790883648493  # RFC 7748 §4.1: the order L of the base point
_P = 2**255 - 19
_DOMAIN = b"teecloud-tecdh-x25519-v1"
MAX_NODES = 64
_lib = pysodium.sodium


class ThresholdEcdhError(MalformedKeyMaterial):
    """A point, partial or proof that does not verify; `party` names the node when known."""

    def __init__(self, message: str, *, party: int | None = None) -> None:
        super().__init__(message if party is None else f"node {party}: {message}")
        self.party = party


def _scalar(k: int) -> bytes:
    return (k % ORDER).to_bytes(32, "little")


def _valid(p: bytes) -> bool:
    return len(p) == 32 and _lib.crypto_core_ed25519_is_valid_point(p) == 1


def _mul(k: int, p: bytes) -> bytes:
    out = ctypes.create_string_buffer(32)
    if _lib.crypto_scalarmult_ed25519_noclamp(out, _scalar(k), p) != 0:
        raise ThresholdEcdhError("scalar multiplication gave the identity or a bad point")
    return out.raw


def _mul_base(k: int) -> bytes:
    out = ctypes.create_string_buffer(32)
    if _lib.crypto_scalarmult_ed25519_base_noclamp(out, _scalar(k)) != 0:
        raise ThresholdEcdhError("a zero scalar")
    return out.raw


def _add(a: bytes, b: bytes) -> bytes:
    out = ctypes.create_string_buffer(32)
    if _lib.crypto_core_ed25519_add(out, a, b) != 0:
        raise ThresholdEcdhError("not points")
    return out.raw


def _sub(a: bytes, b: bytes) -> bytes:
    out = ctypes.create_string_buffer(32)
    if _lib.crypto_core_ed25519_sub(out, a, b) != 0:
        raise ThresholdEcdhError("not points")
    return out.raw


def _sum(points: Sequence[bytes]) -> bytes:
    total = points[0]
    for p in points[1:]:
        total = _add(total, p)
    return total


def _to_u(p: bytes) -> bytes:
    """RFC 7748 §4.1: Edwards y -> Montgomery u = (1+y)/(1−y) (libsodium's pk_to_curve25519)."""
    out = ctypes.create_string_buffer(32)
    if _lib.crypto_sign_ed25519_pk_to_curve25519(out, p) != 0:
        raise ThresholdEcdhError("not a point of the prime-order subgroup")
    return out.raw


BASE = _mul_base(1)


def _rand() -> int:
    return secrets.randbelow(ORDER - 1) + 1


def _poly_eval(coeffs: Sequence[int], x: int) -> int:
    return _shamir.poly_eval(coeffs, x, ORDER)


def lagrange_at_zero(xs: Sequence[int]) -> dict[int, int]:
    if not xs:
        raise KeyUsageError(f"share indices must be distinct, in 1..{MAX_NODES}")
    return _shamir.lagrange_at_zero(xs, ORDER, MAX_NODES)


def public_share(commitments: Sequence[bytes], x: int) -> bytes:
    """Y_x = Σ_j x^j·C_j = x-th share times B, from the Feldman commitments alone. Memoized (a pure
    function of its arguments): a client checks the partials of one app's env key, under the same
    commitments, at every boot of that app, and each partial twice (its proof, then in `combine`)."""
    if not 1 <= x <= MAX_NODES or not commitments:
        raise ThresholdEcdhError("bad commitments or share index")
    return _public_share(tuple(bytes(c) for c in commitments), x)


@functools.lru_cache(maxsize=1024)
def _public_share(commitments: tuple[bytes, ...], x: int) -> bytes:
    if not all(_valid(c) for c in commitments):
        raise ThresholdEcdhError("bad commitments or share index")
    return _sum([_mul(pow(x, j, ORDER), c) if j else c for j, c in enumerate(commitments)])


@dataclass(frozen=True)
class EnvKeyShare:
    """Node `index`'s share of one app's env key and that app's Feldman commitments (C_0 = x·B)."""

    index: int
    t: int
    share: int
    commitments: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if (
            not 1 <= self.t <= MAX_NODES
            or len(self.commitments) != self.t
            or not 1 <= self.index <= MAX_NODES
        ):
            raise KeyUsageError("env key share: bad t, index or commitments")
        if not 0 < self.share < ORDER or _mul_base(self.share) != public_share(self.commitments, self.index):
            raise ThresholdEcdhError("env key share does not match its commitments", party=self.index)


def x25519_public_key(commitments: Sequence[bytes]) -> bytes:
    """The app's X25519 env public key (32 bytes): the Montgomery u of C_0."""
    return _to_u(commitments[0])


def dkg_local(t: int, n: int) -> list[EnvKeyShare]:
    """Joint-Feldman among n dealers in one process (dev, tests, bench: the caller sees every share)."""
    if not 1 <= t <= n <= MAX_NODES:
        raise KeyUsageError(f"need 1 <= t <= n <= {MAX_NODES}")
    polys = [[_rand() for _ in range(t)] for _ in range(n)]
    commitments = tuple(_sum([_mul_base(p[j]) for p in polys]) for j in range(t))
    return [
        EnvKeyShare(i, t, sum(_poly_eval(p, i) for p in polys) % ORDER, commitments) for i in range(1, n + 1)
    ]


def deal(t: int, n: int) -> tuple[tuple[bytes, ...], dict[int, int]]:
    """One dealer's Feldman dealing of a fresh random secret (Joint-Feldman, Pedersen '91): its commitments
    (t points) and the sub-share of each member 1..n."""
    if not 1 <= t <= n <= MAX_NODES:
        raise KeyUsageError(f"need 1 <= t <= n <= {MAX_NODES}")
    poly = [_rand() for _ in range(t)]
    return tuple(_mul_base(a) for a in poly), {i: _poly_eval(poly, i) for i in range(1, n + 1)}


def dkg_receive(
    index: int, t: int, commitments: dict[int, Sequence[bytes]], shares: dict[int, int]
) -> EnvKeyShare:
    """Member `index`'s share of a Joint-Feldman DKG: each dealer's sub-share checked against that dealer's
    commitments (a bad dealer is named), summed; the group commitments are the dealers' sums."""
    if set(commitments) != set(shares) or not commitments:
        raise ThresholdEcdhError("one sub-share per dealer")
    for d in sorted(commitments):
        c = commitments[d]
        if len(c) != t or not all(_valid(p) for p in c):
            raise ThresholdEcdhError(f"{len(c)} commitments or not points, {t} expected", party=d)
        s = shares[d]
        if not 0 <= s < ORDER or _mul_base(s) != public_share(c, index):
            raise ThresholdEcdhError("the sub-share does not match the dealer's commitments", party=d)
    group = tuple(_sum([commitments[d][j] for d in sorted(commitments)]) for j in range(t))
    return EnvKeyShare(index, t, sum(shares.values()) % ORDER, group)


def share_to_json(share: EnvKeyShare) -> bytes:
    doc = {
        "index": share.index,
        "t": share.t,
        "share": _scalar(share.share).hex(),
        "commitments": [c.hex() for c in share.commitments],
    }
    return json.dumps(doc, sort_keys=True).encode()


def share_from_json(data: bytes) -> EnvKeyShare:
    """The inverse of share_to_json; the share is checked against its commitments (EnvKeyShare)."""
    try:
        doc = json.loads(data)
        return EnvKeyShare(
            index=int(doc["index"]),
            t=int(doc["t"]),
            share=int.from_bytes(bytes.fromhex(doc["share"]), "little"),
            commitments=tuple(bytes.fromhex(c) for c in doc["commitments"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ThresholdEcdhError(f"env key share record malformed: {exc}") from exc


def strict_ephemeral_point(key: bytes) -> bytes:
    """ephemeral_point for a node's request: exactly 32 bytes, the top bit clear (a canonical u < p)."""
    if len(key) != 32:
        raise ThresholdEcdhError("the ephemeral key is 32 bytes")
    if key[31] & 0x80:
        raise ThresholdEcdhError("the ephemeral key is not canonical (top bit set)")
    return ephemeral_point(key)


def ephemeral_point(blob: bytes) -> bytes:
    """The Edwards point (sign 0) whose u is the encrypted env's ephemeral X25519 key (its first 32
    bytes); refuses a u that is not on the curve's prime-order subgroup (twist, small order)."""
    if len(blob) < 32:
        raise ThresholdEcdhError("an encrypted env starts with a 32-byte X25519 key")
    u = int.from_bytes(blob[:32], "little") & ((1 << 255) - 1)  # RFC 7748 §5: mask the top bit
    if u >= _P or (u + 1) % _P == 0:
        raise ThresholdEcdhError("the ephemeral key is not a canonical point")
    y = (u - 1) * pow(u + 1, -1, _P) % _P
    point = y.to_bytes(32, "little")
    if not _valid(point):
        raise ThresholdEcdhError("the ephemeral key is not a point of the prime-order subgroup")
    return point


def _challenge(label: bytes, *points: bytes) -> int:
    h = hashlib.sha512()
    for p in (_DOMAIN, label, *points):
        h.update(len(p).to_bytes(4, "big") + p)
    return int.from_bytes(h.digest(), "little") % ORDER


@dataclass(frozen=True)
class EcdhPartial:
    """Node `index`'s D_i = x_i·P and its proof c ‖ z (64 bytes)."""

    index: int
    element: bytes
    proof: bytes


def _label(app_id: bytes, index: int) -> bytes:
    return len(app_id).to_bytes(2, "big") + app_id + index.to_bytes(2, "big")


def partial_decrypt(share: EnvKeyShare, app_id: bytes, point: bytes) -> EcdhPartial:
    """Node side (after its own key-release rule passed for `app_id`): D_i = x_i·P with the proof."""
    if not _valid(point):
        raise ThresholdEcdhError("not a point of the prime-order subgroup")
    d = _mul(share.share, point)
    y_i = _mul_base(share.share)
    r = _rand()
    t1, t2 = _mul_base(r), _mul(r, point)
    c = _challenge(_label(app_id, share.index), BASE, y_i, point, d, t1, t2)
    return EcdhPartial(share.index, d, _scalar(c) + _scalar(r + c * share.share))


def verify_partial(commitments: Sequence[bytes], app_id: bytes, point: bytes, partial: EcdhPartial) -> bool:
    """Chaum–Pedersen check of D_i against Y_i = public_share(commitments, i)."""
    if len(partial.proof) != 64 or not _valid(partial.element) or not _valid(point):
        return False
    c, z = int.from_bytes(partial.proof[:32], "little"), int.from_bytes(partial.proof[32:], "little")
    if not (0 < c < ORDER and 0 < z < ORDER):
        return False
    try:
        y_i = public_share(commitments, partial.index)
        t1 = _sub(_mul_base(z), _mul(c, y_i))
        t2 = _sub(_mul(z, point), _mul(c, partial.element))
    except (ThresholdEcdhError, KeyUsageError):
        return False
    expect = _challenge(_label(app_id, partial.index), BASE, y_i, point, partial.element, t1, t2)
    return secrets.compare_digest(_scalar(expect), _scalar(c))


def combine(
    commitments: Sequence[bytes], app_id: bytes, point: bytes, partials: Sequence[EcdhPartial]
) -> bytes:
    """Any t partials whose proofs verify -> the 32-byte X25519 shared secret of the encrypted env.
    A partial whose proof fails raises ThresholdEcdhError naming its node."""
    t = len(commitments)
    chosen: dict[int, EcdhPartial] = {}
    for p in partials:
        if not verify_partial(commitments, app_id, point, p):
            raise ThresholdEcdhError("the ECDH partial's proof does not verify", party=p.index)
        chosen[p.index] = p
    if len(chosen) < t:
        raise ThresholdEcdhError(f"{len(chosen)} valid ECDH partials, {t} needed")
    use = sorted(chosen)[:t]
    lam = lagrange_at_zero(use)
    return _to_u(_sum([_mul(lam[i], chosen[i].element) for i in use]))


class _Edwards25519:
    """edwards25519's prime-order group behind keys._groups.Group's interface (keys.share_repair runs the
    same share recovery and resharing over it as over the ECDSA groups). Points: libsodium's 32-byte
    encoding, validated on the main subgroup; scalars little-endian (this module's wire form)."""

    name = "edwards25519"
    order = ORDER
    domain = b"teecloud-share-repair-edwards25519-v1"
    generator = BASE

    def scalar(self, k: int) -> bytes:
        return _scalar(k)

    def base_mul(self, k: int) -> bytes:
        return _mul_base(k)

    def mul(self, k: int, p: bytes) -> bytes:
        return _mul(k, self.check(p))

    def sum(self, points: Sequence[bytes]) -> bytes:
        if not points:
            raise KeyUsageError("empty sum")
        return _sum([self.check(p) for p in points])

    def neg(self, p: bytes) -> bytes:
        self.check(p)
        return p[:31] + bytes([p[31] ^ 0x80])  # RFC 8032 §5.1.2: the top bit is the sign of x

    def check(self, p: bytes) -> bytes:
        if not _valid(p):
            raise ThresholdEcdhError("not a point of the prime-order subgroup")
        return p

    def finish_signature(self, r: int, s: int, big_r: bytes, digest: bytes, public_key: bytes) -> bytes:
        raise KeyUsageError("edwards25519 here carries env-key shares, not signatures")


EDWARDS25519 = _Edwards25519()
