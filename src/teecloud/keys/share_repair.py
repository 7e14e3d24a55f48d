"""Share recovery and resharing of a Feldman-committed Shamir sharing, over any prime-order group behind
keys._groups.Group (edwards25519 for env keys: keys.threshold_ecdh.EDWARDS25519; secp256k1 and P-256 for
the group's signing and CA keys: keys._groups). Pure: no I/O, no clock.

A sharing here is f of degree t−1 over the group's scalar field with public commitments C_k = a_k·G; share
x is f(x), its public image Y_x = Σ_k x^k·C_k (Feldman, FOCS '87).

ENROLLMENT (share recovery: a member r that has no share of an existing sharing gets f(r) from t others
without any of them, or r, learning another's share). The protocol is the enrollment protocol of
Stinson–Wei ("Unconditionally secure proactive secret sharing scheme with combinatorial structures",
SAC 1999), in the form Laing and Stinson give it ("A survey and refinement of repairable threshold schemes",
J. Math. Cryptology 2018, §3.1, the "basic enrollment protocol"), made verifiable with Feldman commitments:

    helpers H (t members holding shares), target r ∉ H
    (1) each helper i ∈ H: σ_i = λ_i(r)·f(i), λ_i(r) = Π_{j∈H, j≠i} (r − j)/(i − j) (Lagrange at r), split
        at random as σ_i = Σ_{j∈H} δ_{i,j}; publish D_{i,j} = δ_{i,j}·G (anyone checks Σ_j D_{i,j} =
        λ_i(r)·Y_i: the split is of helper i's real share) and send δ_{i,j} to helper j privately
    (2) each helper j: checks every δ_{i,j}·G = D_{i,j} (a helper that sent a bad piece is named) and sends
        r the sum τ_j = Σ_i δ_{i,j}
    (3) r: checks τ_j·G = Σ_i D_{i,j} for each j (names j), and f(r) = Σ_j τ_j against Y_r

What one message shows: δ_{i,j} is uniformly random (one of t summands of σ_i), τ_j is a sum of t such
summands, one from each helper; r learns Σ_j τ_j = f(r) and the public D's (λ_i(r)·Y_i is public anyway).
Laing–Stinson §3.1 state what the basic protocol does not hide from coalitions (a helper together with r
learns more than r alone); this implementation inherits exactly that, and the node only runs it for r's own
index (kms.threshold_env).

RESHARING (the same secret to a new committee (t', n'), old shares useless with new ones): Desmedt–Jajodia
("Redistributing secret shares to new access structures", 1997) as Herzberg–Jarecki–Krawczyk–Yung
(CRYPTO '95) use it: t old holders i each Feldman-deal their own share f(i) at degree t'−1 (the dealing's
C_0 must equal Y_i of the old commitments); new member j sums λ_i·f_i(j); the new commitments are
Σ_i λ_i·D_{i,k}, whose C'_0 is the unchanged group key.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from teecloud.keys import _shamir
from teecloud.keys._groups import Group, ThresholdSignatureError
from teecloud.keys.errors import KeyUsageError

__all__ = [
    "MAX_NODES",
    "RepairError",
    "RepairSplit",
    "ReshareDealing",
    "check_split",
    "lagrange_at",
    "public_share",
    "repair_finish",
    "repair_split",
    "repair_sum",
    "reshare_commitments",
    "reshare_deal",
    "reshare_receive",
]

MAX_NODES = 64


class RepairError(ThresholdSignatureError):
    """A split, piece, sum or dealing that does not verify; `party` names the member at fault."""


def _rand(g: Group) -> int:
    return secrets.randbelow(g.order - 1) + 1


def _eq(a: bytes, b: bytes) -> bool:
    return secrets.compare_digest(a, b)


def lagrange_at(xs: Sequence[int], x: int, order: int) -> dict[int, int]:
    """λ_i(x) = Π_{j≠i} (x − j)/(i − j) mod `order`: Σ λ_i(x)·f(i) = f(x) for f of degree < len(xs)."""
    if len(set(xs)) != len(xs) or not xs or any(not 1 <= i <= MAX_NODES for i in xs):
        raise KeyUsageError(f"share indices must be distinct, in 1..{MAX_NODES}")
    if x in xs or not 0 <= x <= MAX_NODES:
        raise KeyUsageError(f"the point {x} is one of the indices or out of 0..{MAX_NODES}")
    if x == 0:
        return _shamir.lagrange_at_zero(xs, order, MAX_NODES)
    out = {}
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (x - j) % order
                den = den * (i - j) % order
        out[i] = num * pow(den, -1, order) % order
    return out


def public_share(g: Group, commitments: Sequence[bytes], x: int) -> bytes:
    """Y_x = Σ_k x^k·C_k: the public image f(x)·G of share x."""
    if not 1 <= x <= MAX_NODES or not commitments:
        raise KeyUsageError("share index out of range or no commitments")
    return g.sum([g.mul(pow(x, k, g.order), c) if k else g.check(c) for k, c in enumerate(commitments)])


def _check_helpers(helpers: Sequence[int], target: int, t: int) -> tuple[int, ...]:
    hs = tuple(sorted(set(helpers)))
    if len(hs) != len(helpers) or len(hs) != t:
        raise KeyUsageError(f"share recovery needs exactly t = {t} distinct helpers")
    if target in hs or not 1 <= target <= MAX_NODES or any(not 1 <= h <= MAX_NODES for h in hs):
        raise KeyUsageError(f"the target {target} is a helper, or an index is out of 1..{MAX_NODES}")
    return hs


# ---------------------------------------------------------------------------------------------- enrollment


@dataclass(frozen=True)
class RepairSplit:
    """Helper `helper`'s step (1) for target `target`: `pieces` (secret: helper j -> δ_{helper,j}) and
    `commitments` (public: helper j -> D_{helper,j} = δ·G)."""

    helper: int
    target: int
    helpers: tuple[int, ...]
    pieces: dict[int, int]
    commitments: dict[int, bytes]


def repair_split(
    g: Group, sharing: Sequence[bytes], helper: int, share: int, helpers: Sequence[int], target: int
) -> RepairSplit:
    """Step (1) on helper `helper` holding `share` of the sharing committed by `sharing`."""
    hs = _check_helpers(helpers, target, len(sharing))
    if helper not in hs:
        raise KeyUsageError(f"member {helper} is not one of the helpers {list(hs)}")
    if not _eq(g.base_mul(share), public_share(g, sharing, helper)):
        raise RepairError("this helper's own share does not match the sharing's commitments", party=helper)
    sigma = lagrange_at(hs, target, g.order)[helper] * share % g.order
    pieces = {j: _rand(g) for j in hs[:-1]}
    last = (sigma - sum(pieces.values())) % g.order
    if last == 0:  # probability 2^-252: a zero piece has no commitment; draw again
        return repair_split(g, sharing, helper, share, helpers, target)
    pieces[hs[-1]] = last
    return RepairSplit(helper, target, hs, pieces, {j: g.base_mul(d) for j, d in pieces.items()})


def check_split(
    g: Group,
    sharing: Sequence[bytes],
    helper: int,
    helpers: Sequence[int],
    target: int,
    commitments: Mapping[int, bytes],
) -> None:
    """Σ_j D_{helper,j} = λ_helper(target)·Y_helper: helper `helper` split λ·(its real share). Raises
    RepairError naming it."""
    hs = _check_helpers(helpers, target, len(sharing))
    if set(commitments) != set(hs):
        raise RepairError("a split needs one commitment per helper", party=helper)
    lam = lagrange_at(hs, target, g.order)[helper]
    try:
        total = g.sum([commitments[j] for j in hs])
        expect = g.mul(lam, public_share(g, sharing, helper))
    except (ThresholdSignatureError, KeyUsageError) as exc:
        raise RepairError(f"the split's commitments are not points: {exc}", party=helper) from exc
    if not _eq(total, expect):
        raise RepairError(
            "the split is not of this helper's share (its commitments do not add up)", party=helper
        )


def repair_sum(g: Group, me: int, pieces: Mapping[int, int], table: Mapping[int, Mapping[int, bytes]]) -> int:
    """Step (2) on helper `me`: each helper i's piece δ_{i,me} checked against D_{i,me} (a helper whose
    piece does not match is named), summed: τ_me."""
    if set(pieces) != set(table):
        raise RepairError("one piece per helper")
    for i in sorted(pieces):
        d = pieces[i]
        if not 0 < d < g.order or not _eq(g.base_mul(d), g.check(table[i][me])):
            raise RepairError(f"the piece for helper {me} does not match its commitment", party=i)
    return sum(pieces.values()) % g.order


def repair_finish(
    g: Group,
    sharing: Sequence[bytes],
    target: int,
    table: Mapping[int, Mapping[int, bytes]],
    sums: Mapping[int, int],
) -> int:
    """Step (3) on the target: every split checked (check_split), every τ_j against Σ_i D_{i,j} (a helper
    whose sum does not match is named), and the result against Y_target. Returns f(target)."""
    hs = tuple(sorted(table))
    _check_helpers(hs, target, len(sharing))
    if set(sums) != set(hs):
        raise RepairError("one sum per helper")
    for i in hs:
        check_split(g, sharing, i, hs, target, table[i])
    for j in hs:
        tau = sums[j]
        if not 0 < tau < g.order or not _eq(g.base_mul(tau), g.sum([table[i][j] for i in hs])):
            raise RepairError("its sum does not match the pieces' commitments", party=j)
    share = sum(sums.values()) % g.order
    if share == 0 or not _eq(g.base_mul(share), public_share(g, sharing, target)):
        raise RepairError(f"the recovered share does not match Y_{target} of the commitments")
    return share


# ---------------------------------------------------------------------------------------------- resharing


@dataclass(frozen=True)
class ReshareDealing:
    """Old holder `dealer`'s Feldman dealing of its own share to a new committee: `commitments` (t_new
    points, commitments[0] = f(dealer)·G) and `subshares` (new index -> value; secret)."""

    dealer: int
    commitments: tuple[bytes, ...]
    subshares: dict[int, int]


def reshare_deal(
    g: Group, sharing: Sequence[bytes], dealer: int, share: int, t_new: int, n_new: int
) -> ReshareDealing:
    """Old holder `dealer` re-deals its share (checked against the old commitments first)."""
    if not 1 <= t_new <= n_new <= MAX_NODES:
        raise KeyUsageError(f"need 1 <= t_new <= n_new <= {MAX_NODES}")
    if not _eq(g.base_mul(share), public_share(g, sharing, dealer)):
        raise RepairError("this dealer's own share does not match the old commitments", party=dealer)
    coeffs = [share] + [_rand(g) for _ in range(t_new - 1)]
    return ReshareDealing(
        dealer,
        tuple(g.base_mul(a) for a in coeffs),
        {j: _shamir.poly_eval(coeffs, j, g.order) for j in range(1, n_new + 1)},
    )


def reshare_commitments(g: Group, dealings: Mapping[int, Sequence[bytes]]) -> tuple[bytes, ...]:
    """The new committee's commitments C'_k = Σ_i λ_i(0)·D_{i,k}; C'_0 is the old group key."""
    lam = _shamir.lagrange_at_zero(sorted(dealings), g.order, MAX_NODES)
    lengths = {len(c) for c in dealings.values()}
    if len(lengths) != 1:
        raise RepairError("reshare dealers disagree on the new threshold")
    t_new = lengths.pop()
    return tuple(g.sum([g.mul(lam[i], dealings[i][k]) for i in sorted(dealings)]) for k in range(t_new))


def reshare_receive(
    g: Group,
    sharing: Sequence[bytes],
    receiver: int,
    dealings: Mapping[int, Sequence[bytes]],
    subshares: Mapping[int, int],
) -> tuple[int, tuple[bytes, ...]]:
    """New member `receiver`: exactly t_old dealings, each of an old share (C_0 = Y_i of the old
    commitments) and its sub-share matching it (a bad dealer is named). Returns (new share, new
    commitments); the new commitments keep the old group key."""
    if len(dealings) != len(sharing) or set(dealings) != set(subshares):
        raise RepairError(f"a reshare needs exactly t_old = {len(sharing)} dealings, one sub-share each")
    for i in sorted(dealings):
        c = dealings[i]
        try:
            ok_c0 = bool(c) and _eq(g.check(c[0]), public_share(g, sharing, i))
            y = public_share(g, c, receiver)
        except (ThresholdSignatureError, KeyUsageError) as exc:
            raise RepairError(f"its dealing is malformed: {exc}", party=i) from exc
        if not ok_c0:
            raise RepairError("its dealing is not of its old share (C_0 != Y_i)", party=i)
        s = subshares[i]
        if not 0 < s < g.order or not _eq(g.base_mul(s), y):
            raise RepairError(f"the sub-share for {receiver} does not match its dealing", party=i)
    lam = _shamir.lagrange_at_zero(sorted(dealings), g.order, MAX_NODES)
    share = sum(lam[i] * subshares[i] for i in dealings) % g.order
    new = reshare_commitments(g, dealings)
    if not _eq(new[0], g.check(sharing[0])):
        raise RepairError("the reshared commitments change the group key")
    return share, new
