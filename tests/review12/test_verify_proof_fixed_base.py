"""Review 12: keys.threshold.verify_proof computes s·G by fixed-base multiplication when A is the
generator. The attack: find any input — a valid proof, a tampered one, s or c at or past the group order,
s = 0, the identity, a non-canonical or invalid encoding of A, B, C or D, A not the generator — on which
the new code and the old (s·A by variable-base multiplication, main before faa5623) disagree, in verdict
or in the exception raised."""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence

import pytest

from teecloud.keys import threshold as th

L = th.GROUP_ORDER


def _old_verify_proof(a: bytes, b: bytes, c: Sequence[bytes], d: Sequence[bytes], proof: bytes) -> bool:
    """verify_proof as it was on main (a093191), verbatim but for the names' module prefix."""
    if len(proof) != 2 * th.NS:
        return False
    try:
        ch, s = th._de_scalar(proof[: th.NS]), th._de_scalar(proof[th.NS :])
        m, z = th._composites(b, c, d, None)
        t2 = th._add(th._mul(s, a), th._mul(ch, b))
        t3 = th._add(th._mul(s, m), th._mul(ch, z))
    except th.ThresholdError:
        return False
    return secrets.compare_digest(th._ser_scalar(th._challenge(b, m, z, t2, t3)), proof[: th.NS])


def _outcome(f: Callable[..., bool], *args: object) -> object:
    try:
        return f(*args)
    except Exception as exc:  # the comparison is of exactly this
        return type(exc)


def _verdict(f: Callable[..., bool], *args: object) -> bool:
    """Accepted or not: the old code's ValueError (libsodium refusing an element; review 12 made the new
    code return False there) is a rejection too."""
    got = _outcome(f, *args)
    return got is True


def _le(k: int) -> bytes:
    return k.to_bytes(32, "little")


def _point() -> bytes:
    return th._mul_base(secrets.randbelow(L - 1) + 1)


def _cases(rng: random.Random) -> list[tuple[bytes, bytes, list[bytes], list[bytes], bytes]]:
    g = th.GENERATOR
    cases = []
    for _ in range(40):
        k = rng.randrange(1, L)
        n = rng.randrange(1, 4)
        c = [_point() for _ in range(n)]
        d = [th._mul(k, ci) for ci in c]
        # A = G (the changed path) and A a random point (the unchanged one)
        for a in (g, _point()):
            b = th._mul(k, a)
            proof = th.generate_proof(k, a, b, c, d)
            ch, s = int.from_bytes(proof[:32], "little"), int.from_bytes(proof[32:], "little")
            cases += [
                (a, b, c, d, proof),  # valid
                (a, b, c, d, proof[:32] + _le((s + 1) % L)),  # s tampered
                (a, b, c, d, _le((ch + 1) % L) + proof[32:]),  # c tampered
                (a, b, c, d, proof[:32] + _le(0)),  # s = 0
                (a, b, c, d, _le(0) + proof[32:]),  # c = 0
                (a, b, c, d, proof[:32] + _le(s + L) if s + L < 2**256 else proof),  # s non-canonical
                (a, b, c, d, proof[:32] + _le(L)),  # s = L
                (a, b, c, d, proof[:32] + (b"\xff" * 32)),  # s = 2^256 - 1
                (a, b, c, d, _le(ch + L) + proof[32:] if ch + L < 2**256 else proof),
                (a, _point(), c, d, proof),  # B not k·A
                (a, b, c, [_point(), *d[1:]], proof),  # D not k·C
                (a, b, c, d, proof[:-1]),  # short
                (a, b, c, d, proof + b"\x00"),  # long
            ]
    # A's encodings around the generator: flipped bits (invalid or another point), the identity,
    # a high-bit (non-canonical) G, and B / C / D the identity or invalid
    k = rng.randrange(1, L)
    c = [_point()]
    d = [th._mul(k, c[0])]
    b = th._mul_base(k)
    proof = th.generate_proof(k, g, b, c, d)
    identity, bad = bytes(32), b"\xff" * 32
    for i in range(32):
        for bit in (0, 7):
            mod = bytearray(g)
            mod[i] ^= 1 << bit
            cases.append((bytes(mod), b, c, d, proof))
    cases += [
        (identity, b, c, d, proof),
        (bad, b, c, d, proof),
        (g[:31] + bytes([g[31] | 0x80]), b, c, d, proof),
        (g, identity, c, d, proof),
        (g, bad, c, d, proof),
        (g, b, [identity], d, proof),
        (g, b, c, [identity], proof),
        (g, b, [bad], d, proof),
        (g, b, c, [bad], proof),
        (g, b, c, [*d, d[0]], proof),  # C and D of different lengths
        (g, g, [g], [g], th.generate_proof(1, g, g, [g], [g])),  # k = 1: every element the generator
    ]
    return cases


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fixed_base_verify_proof_agrees_with_the_old_code_on_every_input(seed: int) -> None:
    rng = random.Random(seed)
    valid = 0
    for case in _cases(rng):
        new, old = _outcome(th.verify_proof, *case), _outcome(_old_verify_proof, *case)
        assert new in (True, False), (case, new)  # a bool, never an exception
        assert new == _verdict(_old_verify_proof, *case), (case, new, old)
        assert old in (new, ValueError), (case, new, old)  # same verdict, or the old raise now False
        valid += new is True
    assert valid >= 80  # the valid proofs did verify (the comparison is not all-False)


def test_a_proof_with_a_non_generator_a_does_not_verify_as_if_a_were_g() -> None:
    """A proof made for A = G does not verify when A is another point, and vice versa: the fast path is
    taken only for A's exact (canonical, unique) generator encoding."""
    k = secrets.randbelow(L - 1) + 1
    c = [_point()]
    d = [th._mul(k, c[0])]
    proof = th.generate_proof(k, th.GENERATOR, th._mul_base(k), c, d)
    other = _point()
    assert th.verify_proof(th.GENERATOR, th._mul_base(k), c, d, proof)
    assert not th.verify_proof(other, th._mul_base(k), c, d, proof)
    assert not th.verify_proof(other, th._mul(k, other), c, d, proof)


def test_malformed_elements_never_raise_out_of_verify_proof() -> None:
    """verify_proof is a bool of hostile bytes (a node's partial): an invalid or identity element in A, B,
    C or D must give False, never an exception (pre-existing on main as on the branch)."""
    k = secrets.randbelow(L - 1) + 1
    c = [_point()]
    d = [th._mul(k, c[0])]
    b = th._mul_base(k)
    proof = th.generate_proof(k, th.GENERATOR, b, c, d)
    for args in (
        (bytes(32), b, c, d),
        (th.GENERATOR, bytes(32), c, d),
        (th.GENERATOR, b, [bytes(32)], d),
        (th.GENERATOR, b, c, [bytes(32)]),
        (th.GENERATOR, b, c, [b"\xff" * 32]),
    ):
        assert _outcome(th.verify_proof, *args, proof) is False, args
