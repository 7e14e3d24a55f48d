"""Shamir secret-sharing arithmetic over a prime-order field, for the three threshold schemes (ristretto255
VOPRF in keys.threshold, X25519 in keys.threshold_ecdh, secp256k1 ECDSA in keys.threshold_ecdsa): the same
polynomial evaluation and Lagrange coefficients, each scheme with its own group order."""

from __future__ import annotations

from collections.abc import Sequence

from teecloud.keys.errors import KeyUsageError

__all__ = ["lagrange_at_zero", "poly_eval"]


def poly_eval(coeffs: Sequence[int], x: int, order: int) -> int:
    """f(x) mod `order` for f = coeffs[0] + coeffs[1]·x + … (Horner)."""
    acc = 0
    for a in reversed(coeffs):
        acc = (acc * x + a) % order
    return acc


def lagrange_at_zero(xs: Sequence[int], order: int, max_nodes: int) -> dict[int, int]:
    """λ_i = Π_{j≠i} x_j / (x_j − x_i) mod `order`, for interpolation at 0. The share indices must be
    distinct and in 1..max_nodes."""
    if len(set(xs)) != len(xs) or any(not 1 <= x <= max_nodes for x in xs):
        raise KeyUsageError(f"share indices must be distinct, in 1..{max_nodes}")
    out = {}
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * j % order
                den = den * (j - i) % order
        out[i] = num * pow(den, -1, order) % order
    return out
