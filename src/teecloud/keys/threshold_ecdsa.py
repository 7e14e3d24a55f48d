"""Threshold ECDSA over secp256k1 for an honest majority (pure functions and message types; no I/O).

The protocol is Gennaro, Jarecki, Krawczyk, Rabin, "Robust Threshold DSS Signatures" (EUROCRYPT '96;
Information and Computation 164, 2001), §4 "DSS-Thresh-Sig", carried over from DSS to ECDSA on secp256k1
and split into an offline presignature phase and an online signing phase:

  * Key: the signing key x is Shamir-shared at degree t-1 (shares at x = 1..n) with Feldman commitments
    (Feldman, FOCS '87); the group public key X = x·G is commitments[0]. `dkg_local` is Pedersen's
    Joint-Feldman among n dealers (the keys.threshold module's DKG, over this curve's scalar field).
  * Presignature (offline; participants P with |P| >= 2t-1, GJKR's "n >= 2t+1" for degree t-1 shares):
      (1) every i in P deals Feldman sharings of random k^(i), a^(i) (degree t-1, to all n share holders)
          and of zero z^(i) (degree 2t-2: GJKR's Joint-ZVSS, to P); receivers check every sub-share
          against its dealer's commitments and name a dealer whose sub-share does not verify.
          k = Σ k^(i), a = Σ a^(i); R = k·G = Σ C_0 of the k^(i) sharings (GJKR: r = g^k, DSS r = R.x).
      (2) GJKR's inversion (their §4, after Bar-Ilan–Beaver): every j in P publishes w_j = k_j·a_j + z_j,
          a point on a degree 2t-2 polynomial whose value at 0 is μ = k·a; anyone interpolates μ from P.
          Then k^-1 = μ^-1·a, so (k^-1)_j = μ^-1·a_j is a degree t-1 sharing of k^-1.
      (3) The product k^-1·x is computed by degree reduction (Gennaro, Rabin, Rabin, PODC '98, the
          "resharing" step GJKR use for the second multiplication): every j in P Feldman-shares
          p_j = (k^-1)_j·x_j at degree t-1; σ_m = Σ_j λ_j^P·p_j(m) is a degree t-1 sharing of k^-1·x.
    GJKR detect a wrong w_j with error-correcting codes (which needs n >= 4t+1 for the basic variant);
    here every published value carries a Chaum–Pedersen proof (CRYPTO '92) of equal discrete logarithms
    against the public shares the Feldman commitments fix, so a wrong w_j or p_j is detected and its
    sender named with only 2t-1 participants (these proofs are non-interactive by Fiat–Shamir, SHA-256
    over the session, the sender and every point).
  * Signing (online; any t holders of the presignature): s_m = (k^-1)_m·e + σ_m·r, a degree t-1 sharing
    of s = k^-1(e + r·x). Each s_m is checked in the exponent against public shares
    (s_m·G == e·(k^-1)_m·G + r·σ_m·G), so a wrong share names its sender; any t valid ones interpolate to
    s. The output is an ordinary 65-byte recoverable signature r‖s‖v (low s, v in {0, 1}) over the digest.
    A presignature is used for at most one digest (a reused k reveals x): the holder must erase it first.

What t-1 holders learn: nothing about x or k beyond the public values (GJKR Thm 4.2 for the ECDSA
analogue, with Feldman commitments revealing x·G, k·G, a·G and k^-1·G, k^-1·x·G; GJKR prove DSS secure
with g^a public). Joint-Feldman lets a rushing participant abort after seeing R and so choose among
several R (GJKR, J. Cryptology 2007, §3): an abort here names the participant, which the caller excludes.
Scalars are Python ints mod N (not constant time); points are SEC1 compressed bytes.

The same code runs over two curves (teecloud.keys._groups): secp256k1 through coincurve (libsecp256k1), the
default everywhere and byte-for-byte what it was, and NIST P-256 through python-ecdsa (`curve="p256"` on
the key share; every later value carries its key's curve), whose signatures are X.509's ecdsa-with-SHA256
(the group's root CA and the app CAs it signs, teecloud.keys.threshold_certs).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from teecloud.keys import _shamir
from teecloud.keys._groups import P256, SECP256K1, Group, ThresholdSignatureError, group_named
from teecloud.keys.errors import KeyUsageError

__all__ = [
    "GENERATOR",
    "MAX_NODES",
    "ORDER",
    "P256",
    "SECP256K1",
    "Dealing",
    "Group",
    "KeyShare",
    "MulMessage",
    "PresignDealing",
    "PresignPublic",
    "Presignature",
    "ReduceDealing",
    "SignatureShare",
    "ThresholdSignatureError",
    "combine_signature",
    "dkg_local",
    "dkg_receive",
    "feldman_deal",
    "group_named",
    "lagrange_at_zero",
    "presign_finish",
    "presign_local",
    "presign_multiply",
    "presign_reduce",
    "presign_round1",
    "public_share",
    "sign_local",
    "sign_share",
    "verify_signature_share",
]

ORDER = SECP256K1.order  # SEC 2 §2.4.1, secp256k1 n (the default group's; P256.order for P-256)
MAX_NODES = 64


# ------------------------------------------------------------------------------------------ group ops


def _eq(a: bytes, b: bytes) -> bool:
    return secrets.compare_digest(a, b)


GENERATOR = SECP256K1.generator


def _poly_eval(coeffs: Sequence[int], x: int, g: Group) -> int:
    return _shamir.poly_eval(coeffs, x, g.order)


def _rand(g: Group) -> int:
    return secrets.randbelow(g.order - 1) + 1


def _check_params(t: int, n: int) -> None:
    if not 1 <= t <= n <= MAX_NODES:
        raise KeyUsageError(f"need 1 <= t <= n <= {MAX_NODES}, got t={t}, n={n}")


def lagrange_at_zero(xs: Sequence[int], *, group: Group = SECP256K1) -> dict[int, int]:
    """λ_i = Π_{j≠i} x_j / (x_j − x_i) mod N, for interpolation at 0."""
    if not xs:
        raise KeyUsageError(f"share indices must be distinct, in 1..{MAX_NODES}")
    return _shamir.lagrange_at_zero(xs, group.order, MAX_NODES)


# --------------------------------------------------------------------------------------- Feldman VSS


@dataclass(frozen=True)
class Dealing:
    """A Feldman sharing: public `commitments` (C_j = a_j·G; for a zero-sharing C_0 is omitted, so
    commitments[0] is C_1) and secret `shares` (recipient -> f(recipient))."""

    dealer: int
    commitments: tuple[bytes, ...]
    shares: dict[int, int]
    zero: bool = False


def feldman_deal(
    secret: int | None,
    degree: int,
    recipients: Sequence[int],
    *,
    dealer: int,
    zero: bool = False,
    group: Group = SECP256K1,
) -> Dealing:
    """Feldman VSS of `secret` (random when None; 0 when `zero`) with a degree-`degree` polynomial."""
    g = group
    if zero:
        a0 = 0
    else:
        a0 = secret if secret is not None else _rand(g)
        if not 0 < a0 < g.order:
            raise KeyUsageError("secret out of range")
    coeffs = [a0] + [_rand(g) for _ in range(degree)]
    shown = coeffs[1:] if zero else coeffs
    return Dealing(
        dealer, tuple(g.base_mul(a) for a in shown), {x: _poly_eval(coeffs, x, g) for x in recipients}, zero
    )


def public_share(
    commitments: Sequence[bytes], x: int, *, zero: bool = False, group: Group = SECP256K1
) -> bytes:
    """Σ_j x^j·C_j (j from 1 for a zero-sharing): the public image f(x)·G of share x."""
    if not 1 <= x <= MAX_NODES or not commitments:
        raise KeyUsageError("share index out of range or no commitments")
    g = group
    first = 1 if zero else 0
    return g.sum([g.mul(pow(x, j + first, g.order), c) for j, c in enumerate(commitments)])


def _verify_sub_share(
    d_commitments: Sequence[bytes], x: int, share: int, g: Group, *, zero: bool = False
) -> bool:
    if not 0 < share < g.order:
        return False
    try:
        return _eq(g.base_mul(share), public_share(d_commitments, x, zero=zero, group=g))
    except ThresholdSignatureError:
        return False


def _sum_commitments(
    vectors: Sequence[Sequence[bytes]], g: Group, weights: Sequence[int] | None = None
) -> tuple[bytes, ...]:
    length = len(vectors[0])
    if any(len(v) != length for v in vectors):
        raise ThresholdSignatureError("dealings disagree on the degree")
    w = weights if weights is not None else [1] * len(vectors)
    return tuple(g.sum([g.mul(wi, v[j]) for wi, v in zip(w, vectors, strict=True)]) for j in range(length))


# ------------------------------------------------------------------------- Chaum–Pedersen DLEQ proofs


def _hash_scalar(g: Group, *parts: bytes) -> int:
    h = hashlib.sha256()
    for p in (g.domain, *parts):
        h.update(len(p).to_bytes(4, "big") + p)
    return int.from_bytes(h.digest(), "big") % g.order


def _dleq_prove(g: Group, label: bytes, w: int, g1: bytes, h1: bytes, g2: bytes, h2: bytes) -> bytes:
    """Chaum–Pedersen (CRYPTO '92) with Fiat–Shamir: log_g1(h1) == log_g2(h2) == w. Proof c ‖ z."""
    r = _rand(g)
    t1, t2 = g.mul(r, g1), g.mul(r, g2)
    c = _hash_scalar(g, label, g1, h1, g2, h2, t1, t2)
    return g.scalar(c) + g.scalar(r + c * w)


def _dleq_verify(g: Group, label: bytes, g1: bytes, h1: bytes, g2: bytes, h2: bytes, proof: bytes) -> bool:
    if len(proof) != 64:
        return False
    c, z = int.from_bytes(proof[:32], "big"), int.from_bytes(proof[32:], "big")
    if not (0 < c < g.order and 0 < z < g.order):
        return False
    try:
        t1 = g.sum([g.mul(z, g1), g.neg(g.mul(c, h1))])
        t2 = g.sum([g.mul(z, g2), g.neg(g.mul(c, h2))])
    except ThresholdSignatureError:
        return False
    return _eq(g.scalar(_hash_scalar(g, label, g1, h1, g2, h2, t1, t2)), g.scalar(c))


def _label(session: bytes, step: bytes, party: int) -> bytes:
    return session + b"/" + step + b"/" + party.to_bytes(2, "big")


# ----------------------------------------------------------------------------------------- key shares


@dataclass(frozen=True)
class KeyShare:
    """Share holder `index`'s share x_index of the signing key and the group's Feldman commitments, over
    the group named `curve` ("secp256k1" or "p256")."""

    index: int
    t: int
    n: int
    share: int
    commitments: tuple[bytes, ...]
    curve: str = SECP256K1.name

    def __post_init__(self) -> None:
        _check_params(self.t, self.n)
        g = group_named(self.curve)
        if not 1 <= self.index <= self.n or len(self.commitments) != self.t:
            raise KeyUsageError("key share: index out of 1..n or not t commitments")
        if not _verify_sub_share(self.commitments, self.index, self.share, g):
            raise ThresholdSignatureError(
                "key share does not match the group's commitments", party=self.index
            )

    @property
    def group(self) -> Group:
        return group_named(self.curve)

    @property
    def group_public_key(self) -> bytes:
        return self.commitments[0]


def dkg_local(t: int, n: int, *, group: Group = SECP256K1) -> list[KeyShare]:
    """Joint-Feldman among n dealers in one process (dev, tests, bench: the caller sees every share)."""
    _check_params(t, n)
    g = group
    holders = list(range(1, n + 1))
    dealings = [feldman_deal(None, t - 1, holders, dealer=d, group=g) for d in holders]
    pub = _sum_commitments([d.commitments for d in dealings], g)
    return [KeyShare(j, t, n, sum(d.shares[j] for d in dealings) % g.order, pub, g.name) for j in holders]


def dkg_receive(
    me: int,
    t: int,
    n: int,
    commitments: Mapping[int, Sequence[bytes]],
    shares: Mapping[int, int],
    *,
    group: Group = SECP256K1,
) -> KeyShare:
    """Receiver `me` of a Joint-Feldman DKG with dealers `commitments` (each degree t-1): every sub-share is
    checked against its dealer's commitments (a failing dealer is named); the key share is the sum, the
    group commitments the sums of the dealers'."""
    _check_params(t, n)
    g = group
    if not commitments or set(commitments) != set(shares):
        raise ThresholdSignatureError("DKG: every dealer needs commitments and a sub-share")
    for d in sorted(commitments):
        if len(commitments[d]) != t:
            raise ThresholdSignatureError("DKG: commitments of the wrong degree", party=d)
        if not _verify_sub_share(commitments[d], me, shares[d], g):
            raise ThresholdSignatureError(
                f"DKG: the sub-share for {me} does not match the commitments", party=d
            )
    pub = _sum_commitments([commitments[d] for d in sorted(commitments)], g)
    return KeyShare(me, t, n, sum(shares.values()) % g.order, pub, g.name)


# ---------------------------------------------------------------------------------------- presigning


@dataclass(frozen=True)
class PresignDealing:
    """Round 1 of participant `dealer`: sharings of k^(i), a^(i) (degree t-1, to all n) and of zero
    (degree 2t-2, to the participants). Commitments are broadcast; shares[j] goes to j only."""

    dealer: int
    k: Dealing
    a: Dealing
    z: Dealing

    def commitments(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]:
        return self.k.commitments, self.a.commitments, self.z.commitments

    def shares_for(self, j: int) -> tuple[int, int, int | None]:
        return self.k.shares[j], self.a.shares[j], self.z.shares.get(j)


@dataclass(frozen=True)
class MulMessage:
    """Round 2 of participant `index`: w = k_j·a_j + z_j, proved against K_j, A_j, Z_j (broadcast)."""

    index: int
    w: int
    proof: bytes


@dataclass(frozen=True)
class ReduceDealing:
    """Round 3 of participant `dealer`: a Feldman sharing of p_j = (k^-1)_j·x_j (degree t-1, to all n)
    and the proof that commitments[0] = p_j·G has the same log base X_j as (k^-1)_j·G has base G."""

    dealing: Dealing
    proof: bytes


@dataclass(frozen=True)
class _Round1State:
    index: int
    k: int
    a: int
    z: int | None
    public: PresignPublic


@dataclass(frozen=True)
class PresignPublic:
    """What everyone agrees on after round 1: the session, t, n, the participants and the summed
    commitments of k, a and z (so every share's public image is computable)."""

    session: bytes
    t: int
    n: int
    participants: tuple[int, ...]
    k_commitments: tuple[bytes, ...]
    a_commitments: tuple[bytes, ...]
    z_commitments: tuple[bytes, ...]
    curve: str = SECP256K1.name

    @property
    def big_r(self) -> bytes:
        return self.k_commitments[0]

    @property
    def group(self) -> Group:
        return group_named(self.curve)


@dataclass(frozen=True)
class Presignature:
    """Share holder `index`'s part of one presignature: R, its shares of k^-1 and of k^-1·x, and the public
    commitments of both sharings (to check anyone's signature share). Use once, then erase."""

    index: int
    t: int
    session: bytes
    big_r: bytes
    group_public_key: bytes
    kinv_share: int | None  # None for a holder that received no round-1 sub-shares
    sigma_share: int
    kinv_commitments: tuple[bytes, ...]
    sigma_commitments: tuple[bytes, ...]
    curve: str = SECP256K1.name

    @property
    def group(self) -> Group:
        return group_named(self.curve)


def _check_participants(t: int, n: int, participants: Sequence[int]) -> tuple[int, ...]:
    _check_params(t, n)
    p = tuple(sorted(set(participants)))
    if len(p) != len(participants) or any(not 1 <= i <= n for i in p):
        raise KeyUsageError("participants must be distinct share indices in 1..n")
    if len(p) != 2 * t - 1:
        # Exactly 2t-1 (degree doubling needs at least that many): with more, two disjoint sets of t holders
        # could each sign a different digest with the same presignature (the same k), which reveals the
        # signing key; among 2t-1 any two sets of t share a holder, and a holder signs one digest per
        # presignature, ever (review 5, R5-1, docs/threat-model.md).
        raise KeyUsageError(f"a presignature needs exactly 2t-1 = {2 * t - 1} participants, got {len(p)}")
    return p


def presign_round1(session: bytes, key: KeyShare, participants: Sequence[int]) -> PresignDealing:
    """(1) This participant's dealings of k^(i), a^(i) and a zero-sharing."""
    if len(session) != 16:
        raise KeyUsageError("a presign session is 16 bytes")
    p = _check_participants(key.t, key.n, participants)
    if key.index not in p:
        raise KeyUsageError(f"share holder {key.index} is not a participant")
    holders = list(range(1, key.n + 1))
    g = key.group
    return PresignDealing(
        key.index,
        feldman_deal(None, key.t - 1, holders, dealer=key.index, group=g),
        feldman_deal(None, key.t - 1, holders, dealer=key.index, group=g),
        feldman_deal(None, 2 * key.t - 2, p, dealer=key.index, zero=True, group=g),
    )


def _receive_round1(
    session: bytes,
    t: int,
    n: int,
    participants: Sequence[int],
    me: int,
    commitments: Mapping[int, tuple[tuple[bytes, ...], tuple[bytes, ...], tuple[bytes, ...]]],
    my_shares: Mapping[int, tuple[int, int, int | None]],
    g: Group,
) -> _Round1State:
    p = _check_participants(t, n, participants)
    missing = [i for i in p if i not in commitments or i not in my_shares]
    if missing:
        raise ThresholdSignatureError("round 1: no dealing", party=missing[0])
    k = a = z = 0
    for i in p:
        ck, ca, cz = commitments[i]
        sk, sa, sz = my_shares[i]
        if len(ck) != t or len(ca) != t or len(cz) != 2 * t - 2:
            raise ThresholdSignatureError("round 1: commitments of the wrong degree", party=i)
        ok = _verify_sub_share(ck, me, sk, g) and _verify_sub_share(ca, me, sa, g)
        if me in p:
            ok = ok and sz is not None and (t == 1 or _verify_sub_share(cz, me, sz, g, zero=True))
        if not ok:
            raise ThresholdSignatureError(
                f"round 1: the sub-share for {me} does not match the commitments", party=i
            )
        k, a = (k + sk) % g.order, (a + sa) % g.order
        z = (z + (sz or 0)) % g.order
    czs = [commitments[i][2] for i in p]
    public = PresignPublic(
        session,
        t,
        n,
        p,
        _sum_commitments([commitments[i][0] for i in p], g),
        _sum_commitments([commitments[i][1] for i in p], g),
        _sum_commitments(czs, g) if t > 1 else (),
        g.name,
    )
    return _Round1State(me, k, a, z if me in p else None, public)


def presign_multiply(
    session: bytes, key: KeyShare, participants: Sequence[int], dealings: Sequence[PresignDealing]
) -> tuple[_Round1State, MulMessage | None]:
    """(1 check, 2) Verify the sub-shares received for this holder (naming a bad dealer) and, for a
    participant, publish w_j = k_j·a_j + z_j with its proof. `dealings` stand for the broadcast
    commitments plus this holder's own sub-shares (in a networked run only those reach it)."""
    g = key.group
    commitments = {d.dealer: d.commitments() for d in dealings}
    mine = {d.dealer: d.shares_for(key.index) for d in dealings}
    state = _receive_round1(session, key.t, key.n, participants, key.index, commitments, mine, g)
    if state.z is None:
        return state, None
    w = (state.k * state.a + state.z) % g.order
    pub = state.public
    big_k = public_share(pub.k_commitments, key.index, group=g)
    big_a = public_share(pub.a_commitments, key.index, group=g)
    target = _w_minus_z(pub, key.index, w)
    proof = _dleq_prove(g, _label(session, b"mul", key.index), state.k, g.generator, big_k, big_a, target)
    return state, MulMessage(key.index, w, proof)


def _w_minus_z(pub: PresignPublic, j: int, w: int) -> bytes:
    """W_j − Z_j = k_j·A_j for an honest j (Z_j the public image of j's zero-share)."""
    g = pub.group
    if pub.t == 1:
        return g.base_mul(w)
    return g.sum([g.base_mul(w), g.neg(public_share(pub.z_commitments, j, zero=True, group=g))])


def _mu(pub: PresignPublic, muls: Sequence[MulMessage]) -> int:
    g = pub.group
    by = {m.index: m for m in muls}
    missing = [j for j in pub.participants if j not in by]
    if missing:
        raise ThresholdSignatureError("round 2: no multiplication message", party=missing[0])
    for j in pub.participants:
        m = by[j]
        big_k = public_share(pub.k_commitments, j, group=g)
        big_a = public_share(pub.a_commitments, j, group=g)
        try:
            target = _w_minus_z(pub, j, m.w)
        except ThresholdSignatureError:
            target = b""
        if not target or not _dleq_verify(
            g, _label(pub.session, b"mul", j), g.generator, big_k, big_a, target, m.proof
        ):
            raise ThresholdSignatureError("round 2: w is not k_j·a_j + z_j (proof fails)", party=j)
    lam = lagrange_at_zero(pub.participants, group=g)
    mu = sum(lam[j] * by[j].w for j in pub.participants) % g.order
    if mu == 0:
        raise ThresholdSignatureError("round 2: k·a = 0 (restart the presignature)")
    return mu


def _same_curve(key: KeyShare, state: _Round1State) -> Group:
    if key.curve != state.public.curve:
        raise KeyUsageError(f"a {key.curve} key share with a {state.public.curve} presigning state")
    return key.group


def presign_reduce(key: KeyShare, state: _Round1State, muls: Sequence[MulMessage]) -> ReduceDealing:
    """(2 check, 3) Check every participant's w (naming a liar), get μ = k·a, then share
    p_j = (k^-1)_j·x_j at degree t-1 with the proof that it is (k^-1)_j times x_j."""
    g = _same_curve(key, state)
    pub = state.public
    if key.index not in pub.participants:
        raise KeyUsageError("only participants deal in round 3")
    mu_inv = pow(_mu(pub, muls), -1, g.order)
    kinv = mu_inv * state.a % g.order
    p = kinv * key.share % g.order
    dealing = feldman_deal(p, key.t - 1, list(range(1, key.n + 1)), dealer=key.index, group=g)
    big_kinv = g.base_mul(kinv)
    big_x = public_share(key.commitments, key.index, group=g)
    proof = _dleq_prove(
        g,
        _label(pub.session, b"reduce", key.index),
        kinv,
        g.generator,
        big_kinv,
        big_x,
        dealing.commitments[0],
    )
    return ReduceDealing(dealing, proof)


def presign_finish(
    key: KeyShare,
    state: _Round1State,
    muls: Sequence[MulMessage],
    reduces: Sequence[ReduceDealing],
) -> Presignature:
    """(3 check) Check every participant's reduce dealing (proof and this holder's sub-share; naming a
    liar) and assemble this holder's presignature. Any share holder may run it, participant or not."""
    g = _same_curve(key, state)
    pub = state.public
    mu_inv = pow(_mu(pub, muls), -1, g.order)
    kinv_commitments = tuple(g.mul(mu_inv, c) for c in pub.a_commitments)
    by = {r.dealing.dealer: r for r in reduces}
    missing = [j for j in pub.participants if j not in by]
    if missing:
        raise ThresholdSignatureError("round 3: no reduce dealing", party=missing[0])
    for j in pub.participants:
        r = by[j]
        c = r.dealing.commitments
        if len(c) != key.t:
            raise ThresholdSignatureError("round 3: commitments of the wrong degree", party=j)
        big_kinv_j = public_share(kinv_commitments, j, group=g)
        big_x = public_share(key.commitments, j, group=g)
        if not _dleq_verify(
            g, _label(pub.session, b"reduce", j), g.generator, big_kinv_j, big_x, c[0], r.proof
        ):
            raise ThresholdSignatureError(
                "round 3: the reshared value is not (k^-1)_j·x_j (proof fails)", party=j
            )
        if not _verify_sub_share(c, key.index, r.dealing.shares.get(key.index, 0), g):
            raise ThresholdSignatureError(f"round 3: the sub-share for {key.index} does not match", party=j)
    lam = lagrange_at_zero(pub.participants, group=g)
    sigma = sum(lam[j] * by[j].dealing.shares[key.index] for j in pub.participants) % g.order
    sigma_commitments = _sum_commitments(
        [by[j].dealing.commitments for j in pub.participants], g, [lam[j] for j in pub.participants]
    )
    return Presignature(
        key.index,
        key.t,
        pub.session,
        pub.big_r,
        key.group_public_key,
        mu_inv * state.a % g.order,
        sigma,
        kinv_commitments,
        sigma_commitments,
        g.name,
    )


# ------------------------------------------------------------------------------------------- signing


@dataclass(frozen=True)
class SignatureShare:
    index: int
    s: int


def _r_of(big_r: bytes, g: Group) -> int:
    r = int.from_bytes(big_r[1:], "big") % g.order
    if r == 0:
        raise ThresholdSignatureError("R.x = 0 mod n (discard the presignature)")
    return r


def _digest_scalar(digest: bytes, g: Group) -> int:
    if len(digest) != 32:
        raise KeyUsageError(f"a digest is 32 bytes, got {len(digest)}")
    return int.from_bytes(digest, "big") % g.order  # SEC 1 §4.1.3 step 5 for a 256-bit curve


def sign_share(presig: Presignature, digest: bytes) -> SignatureShare:
    """s_m = (k^-1)_m·e + σ_m·r (linear: any t of these interpolate to s)."""
    if presig.kinv_share is None:
        raise KeyUsageError("this presignature has no k^-1 share here")
    g = presig.group
    e, r = _digest_scalar(digest, g), _r_of(presig.big_r, g)
    return SignatureShare(presig.index, (presig.kinv_share * e + presig.sigma_share * r) % g.order)


def verify_signature_share(presig: Presignature, digest: bytes, share: SignatureShare) -> bool:
    """s_m·G == e·(k^-1)_m·G + r·σ_m·G, from the presignature's public commitments."""
    g = presig.group
    if not 1 <= share.index <= MAX_NODES or not 0 < share.s < g.order:
        return False
    e, r = _digest_scalar(digest, g), _r_of(presig.big_r, g)
    try:
        terms = [g.mul(r, public_share(presig.sigma_commitments, share.index, group=g))]
        if e:
            terms.append(g.mul(e, public_share(presig.kinv_commitments, share.index, group=g)))
        return _eq(g.base_mul(share.s), g.sum(terms))
    except ThresholdSignatureError:
        return False


def combine_signature(
    presig: Presignature, digest: bytes, shares: Sequence[SignatureShare], *, check_shares: bool = True
) -> bytes:
    """Any t valid shares -> the signature, checked under the group key by an independent verifier:
    secp256k1, 65 bytes r‖s‖v (low s, recoverable); P-256, 64 bytes r‖s. A share that does not verify
    raises ThresholdSignatureError naming its sender (drop it and ask another holder).

    `check_shares=False` (optimistic combination): the shares are not checked one by one first; the
    result's check under the group key still decides, and a wrong share makes it fail (unnamed): then
    check each share (verify_signature_share) to name the sender. The share checks only serve blame, and
    cost t times more than the combination (P-256 in Python: ≈1 ms each)."""
    g = presig.group
    chosen: dict[int, SignatureShare] = {}
    for sh in shares:
        if check_shares and not verify_signature_share(presig, digest, sh):
            raise ThresholdSignatureError("signature share does not verify", party=sh.index)
        if not 1 <= sh.index <= MAX_NODES or not 0 < sh.s < g.order:
            raise ThresholdSignatureError("signature share out of range", party=sh.index)
        chosen[sh.index] = sh
    if len(chosen) < presig.t:
        raise ThresholdSignatureError(f"{len(chosen)} valid signature shares, {presig.t} needed")
    use = sorted(chosen)[: presig.t]
    lam = lagrange_at_zero(use, group=g)
    s = sum(lam[i] * chosen[i].s for i in use) % g.order
    if s == 0:
        raise ThresholdSignatureError("s = 0 (discard the presignature)")
    return g.finish_signature(_r_of(presig.big_r, g), s, presig.big_r, digest, presig.group_public_key)


# ------------------------------------------------------------------------ in-process drivers (tests, dev)

Tamper = Callable[[str, int, object], object]


def presign_local(
    keys: Sequence[KeyShare],
    participants: Sequence[int],
    *,
    session: bytes | None = None,
    tamper: Tamper | None = None,
) -> dict[int, Presignature]:
    """All rounds of one presignature with the messages passed in this process. `tamper(round, sender,
    message)` may replace a message (tests: a participant that lies). Returns the participants' parts only:
    a holder outside the 2t-1 participants gets none, so no two disjoint sets of t can use one presignature
    (R5-1)."""
    sess = session if session is not None else secrets.token_bytes(16)
    by = {k.index: k for k in keys}

    def send(step: str, sender: int, msg: object) -> object:
        return tamper(step, sender, msg) if tamper is not None else msg

    dealings = [
        cast(PresignDealing, send("deal", i, presign_round1(sess, by[i], participants)))
        for i in sorted(participants)
    ]
    states, muls = {}, []
    for j in sorted(by):
        state, mul = presign_multiply(sess, by[j], participants, dealings)
        states[j] = state
        if mul is not None:
            muls.append(cast(MulMessage, send("mul", j, mul)))
    reduces = [
        cast(ReduceDealing, send("reduce", j, presign_reduce(by[j], states[j], muls)))
        for j in sorted(participants)
    ]
    return {j: presign_finish(by[j], states[j], muls, reduces) for j in sorted(participants)}


def sign_local(presigs: Mapping[int, Presignature], signers: Sequence[int], digest: bytes) -> bytes:
    """Signature shares from `signers` and their combination (tests, bench)."""
    any_presig = presigs[signers[0]]
    return combine_signature(any_presig, digest, [sign_share(presigs[i], digest) for i in signers])
