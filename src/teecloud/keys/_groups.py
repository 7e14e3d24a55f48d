"""The prime-order elliptic-curve groups threshold ECDSA runs over (teecloud.keys.threshold_ecdsa), behind
one small interface: the scalar order, base and point multiplication, sums, negation, SEC1 compressed
encoding with point validation, and checking a finished signature with an independent verifier.

    SECP256K1   libsecp256k1 through coincurve (the KMS's k256 signing key: dstack's GetKey chain)
    P256        NIST P-256 (SEC 2 §2.4.2, FIPS 186-4 D.1.2.3) through python-ecdsa (tlsfuzzer's `ecdsa`
                package) for point arithmetic; finished signatures are checked by OpenSSL through
                `cryptography` (the X.509 app CA and root CA)

Points cross this interface as 33-byte SEC1 compressed encodings (SEC 1 v2 §2.3.3) and are validated on
every decode (on the curve; both curves have cofactor 1, so on the curve is in the prime-order group). The
point at infinity is never encoded: a sum or product that reaches it raises ThresholdSignatureError (it
never comes from honest parties). Scalars are Python ints (not constant time). No field arithmetic is
written here: it is the libraries'.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from typing import Protocol

import coincurve
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from ecdsa import NIST256p
from ecdsa.ellipticcurve import INFINITY, PointJacobi

from teecloud.keys.errors import KeyUsageError, MalformedKeyMaterial

__all__ = ["GROUPS", "P256", "SECP256K1", "Group", "ThresholdSignatureError", "group_named"]


class ThresholdSignatureError(MalformedKeyMaterial):
    """A dealing, proof or signature share that does not verify; `party` names the sender when known."""

    def __init__(self, message: str, *, party: int | None = None) -> None:
        super().__init__(message if party is None else f"party {party}: {message}")
        self.party = party


class Group(Protocol):
    """A prime-order curve group as threshold ECDSA uses it (points: 33-byte SEC1 compressed)."""

    name: str
    order: int
    domain: bytes  # the Fiat–Shamir domain separator of proofs over this group
    generator: bytes

    def scalar(self, k: int) -> bytes: ...
    def base_mul(self, k: int) -> bytes: ...
    def mul(self, k: int, p: bytes) -> bytes: ...
    def sum(self, points: Sequence[bytes]) -> bytes: ...
    def neg(self, p: bytes) -> bytes: ...
    def check(self, p: bytes) -> bytes: ...

    def finish_signature(self, r: int, s: int, big_r: bytes, digest: bytes, public_key: bytes) -> bytes:
        """The signature's encoding, after checking it under `public_key` with an independent verifier."""
        ...


def _nonzero(k: int, order: int) -> int:
    k %= order
    if k == 0:
        raise ThresholdSignatureError("a zero scalar (probability 2^-256 unless forced)")
    return k


class _Secp256k1:
    """secp256k1 through coincurve (libsecp256k1)."""

    name = "secp256k1"
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141  # SEC 2 §2.4.1, n
    domain = b"teecloud-tecdsa-secp256k1-v1"

    def __init__(self) -> None:
        self.generator = self.base_mul(1)

    def scalar(self, k: int) -> bytes:
        return (k % self.order).to_bytes(32, "big")

    def base_mul(self, k: int) -> bytes:
        k = _nonzero(k, self.order)
        return bytes(coincurve.PublicKey.from_secret(self.scalar(k)).format(compressed=True))

    def _point(self, p: bytes) -> coincurve.PublicKey:
        if len(p) != 33 or p[0] not in (2, 3):
            raise ThresholdSignatureError("a point is 33 bytes SEC1 compressed")
        try:
            return coincurve.PublicKey(p)
        except Exception as exc:  # coincurve raises ValueError / bare Exception for points not on the curve
            raise ThresholdSignatureError("not a secp256k1 point") from exc

    def check(self, p: bytes) -> bytes:
        return bytes(self._point(p).format(compressed=True))

    def mul(self, k: int, p: bytes) -> bytes:
        k = _nonzero(k, self.order)
        return bytes(self._point(p).multiply(self.scalar(k)).format(compressed=True))

    def sum(self, points: Sequence[bytes]) -> bytes:
        if not points:
            raise KeyUsageError("empty sum")
        if len(points) == 1:
            return self.check(points[0])
        try:
            combined = coincurve.PublicKey.combine_keys([self._point(p) for p in points])
        except ThresholdSignatureError:
            raise
        except Exception as exc:  # the point at infinity: never from honest parties
            raise ThresholdSignatureError("a sum of points is the point at infinity") from exc
        return bytes(combined.format(compressed=True))

    def neg(self, p: bytes) -> bytes:
        self._point(p)
        return bytes([p[0] ^ 1]) + p[1:]  # SEC1: negation flips the y-parity prefix 02 <-> 03

    def finish_signature(self, r: int, s: int, big_r: bytes, digest: bytes, public_key: bytes) -> bytes:
        """65 bytes r‖s‖v, low s, checked by recovering the key with libsecp256k1."""
        rx = int.from_bytes(big_r[1:], "big")
        v = (big_r[0] & 1) | (2 if rx >= self.order else 0)
        if s > self.order // 2:  # low s (BIP 62 / libsecp256k1's normalisation); -s goes with -R
            s, v = self.order - s, v ^ 1
        sig = self.scalar(r) + self.scalar(s) + bytes([v])
        try:
            recovered = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
        except Exception as exc:  # coincurve: bare Exception when nothing recovers
            raise ThresholdSignatureError("the combined signature does not recover") from exc
        if not secrets.compare_digest(recovered.format(compressed=True), public_key):
            raise ThresholdSignatureError("the combined signature does not verify under the group key")
        return sig


class _P256:
    """NIST P-256 through python-ecdsa's Jacobian points (arithmetic), cryptography/OpenSSL (verification)."""

    name = "p256"
    order: int = int(NIST256p.order)  # FIPS 186-4 D.1.2.3 n
    domain = b"teecloud-tecdsa-p256-v1"

    def __init__(self) -> None:
        self._g = NIST256p.generator
        self.generator = self.base_mul(1)

    def scalar(self, k: int) -> bytes:
        return (k % self.order).to_bytes(32, "big")

    def _encode(self, p: object) -> bytes:
        if p == INFINITY:
            raise ThresholdSignatureError("a sum or product of points is the point at infinity")
        assert isinstance(p, PointJacobi)
        return bytes(p.to_bytes("compressed"))

    def _point(self, p: bytes) -> PointJacobi:
        if len(p) != 33 or p[0] not in (2, 3):
            raise ThresholdSignatureError("a point is 33 bytes SEC1 compressed")
        return _p256_decode(bytes(p))

    def check(self, p: bytes) -> bytes:
        self._point(p)
        return bytes(p)

    def base_mul(self, k: int) -> bytes:
        return self._encode(self._g * _nonzero(k, self.order))

    def mul(self, k: int, p: bytes) -> bytes:
        return self._encode(self._point(p) * _nonzero(k, self.order))

    def sum(self, points: Sequence[bytes]) -> bytes:
        if not points:
            raise KeyUsageError("empty sum")
        acc = self._point(points[0])
        for p in points[1:]:
            acc = acc + self._point(p)
            if acc == INFINITY:
                # python-ecdsa's INFINITY absorbs later additions, so stop at the first
                raise ThresholdSignatureError("a sum of points is the point at infinity")
        return self._encode(acc)

    def neg(self, p: bytes) -> bytes:
        self._point(p)
        return bytes([p[0] ^ 1]) + p[1:]  # SEC1: negation flips the y-parity prefix 02 <-> 03

    def finish_signature(self, r: int, s: int, big_r: bytes, digest: bytes, public_key: bytes) -> bytes:
        """64 bytes r‖s (both 32-byte big-endian; X.509 wants `encode_dss_signature(r, s)`), checked by
        OpenSSL through `cryptography` as ECDSA over the prehashed digest."""
        del big_r  # ECDSA's (r, s) does not carry R's parity
        pk = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
        try:
            pk.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature as exc:
            raise ThresholdSignatureError(
                "the combined signature does not verify under the group key"
            ) from exc
        return self.scalar(r) + self.scalar(s)


@functools.lru_cache(maxsize=4096)
def _p256_decode(p: bytes) -> PointJacobi:
    """A validated P-256 point (cached: the same commitments are decoded again and again in a round, and
    decoding takes a modular square root; python-ecdsa's operations return new points, never mutate)."""
    try:
        # from_bytes checks the x coordinate is in the field and has a square root (on the curve)
        point = PointJacobi.from_bytes(NIST256p.curve, p, valid_encodings=("compressed",))
    except Exception as exc:  # ecdsa.errors.MalformedPointError and friends
        raise ThresholdSignatureError("not a P-256 point") from exc
    assert isinstance(point, PointJacobi)
    return point


SECP256K1: Group = _Secp256k1()
P256: Group = _P256()
GROUPS: dict[str, Group] = {SECP256K1.name: SECP256K1, P256.name: P256}


def group_named(name: str) -> Group:
    try:
        return GROUPS[name]
    except KeyError:
        raise KeyUsageError(f"no threshold ECDSA group {name[:40]!r} (one of {sorted(GROUPS)})") from None
