"""Points and proofs of the threshold X25519 env path (teecloud.keys.threshold_ecdh), attacked in the
library (fast): the point a node accepts, the sign choice of the lift, and the Chaum–Pedersen proof a CVM
accepts — another point, another node's public share, another sharing, non-canonical scalars, identity and
small-order elements, and each transcript input changed alone (generated mutations)."""

from __future__ import annotations

import random

import pytest

from teecloud.keys import threshold_ecdh as tx
from teecloud.keys.envcrypt import decrypt_env_with_shared_secret, encrypt_env

P = 2**255 - 19
L = tx.ORDER
T, N = 3, 5
APP = b"\x0a" * 20
# Curve25519's small-order u-coordinates (0, 1, the two of order 8, p−1) and their non-canonical u + p forms
SMALL_ORDER_U = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
]
# the eight small-order (torsion) points of edwards25519, as libsodium's blocklist lists them (canonical)
TORSION = [
    bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000000"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("0000000000000000000000000000000000000000000000000000000000000080"),
    bytes.fromhex("0000000000000000000000000000000000000000000000000000000000000000"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
]


@pytest.fixture(scope="module")
def sharing() -> list[tx.EnvKeyShare]:
    return tx.dkg_local(T, N)


def test_a_node_accepts_only_canonical_prime_order_points() -> None:
    for u in SMALL_ORDER_U:
        key = (u % (1 << 256)).to_bytes(32, "little")
        with pytest.raises(tx.ThresholdEcdhError):
            tx.strict_ephemeral_point(key)
    # generated: 400 random 32-byte keys; whatever is accepted is a valid prime-order point; the top bit
    # (half), the twist (half the rest) and the non-prime-order curve points (7/8 of the rest) are refused
    rng = random.Random(606)
    accepted = 0
    for _ in range(400):
        key = bytes(rng.getrandbits(8) for _ in range(32))
        try:
            point = tx.strict_ephemeral_point(key)
        except tx.ThresholdEcdhError:
            continue
        accepted += 1
        assert key[31] & 0x80 == 0 and tx._valid(point)
        assert tx._to_u(point) == key  # the lift maps back to the very u the sender used
    assert 0 < accepted < 40
    # and every genuine X25519 public key (a deployer's ephemeral key) is accepted
    for k in range(20):
        blob = encrypt_env(tx.x25519_public_key(tx.dkg_local(1, 1)[0].commitments), {"K": str(k)})
        assert tx._to_u(tx.strict_ephemeral_point(blob[:32])) == blob[:32]


def test_the_sign_of_the_lift_does_not_matter(sharing: list[tx.EnvKeyShare]) -> None:
    """±P have the same u; x·(−P) = −(x·P) has the same u: a node or a CVM lifting with the other sign
    still decrypts, so the sign choice is not an attack surface."""
    pub = tx.x25519_public_key(sharing[0].commitments)
    blob = encrypt_env(pub, {"K": "v"})
    point = tx.ephemeral_point(blob)
    neg = bytes(point[:31]) + bytes([point[31] ^ 0x80])
    assert tx._valid(neg) and neg != point
    for p in (point, neg):
        parts = [tx.partial_decrypt(s, APP, p) for s in sharing[:T]]
        secret = tx.combine(sharing[0].commitments, APP, p, parts)
        assert decrypt_env_with_shared_secret(secret, blob) == {"K": "v"}


def test_a_proof_does_not_carry_over(sharing: list[tx.EnvKeyShare]) -> None:
    c = sharing[0].commitments
    blob = encrypt_env(tx.x25519_public_key(c), {"K": "v"})
    point = tx.ephemeral_point(blob)
    other_point = tx.ephemeral_point(encrypt_env(tx.x25519_public_key(c), {"K": "w"}))
    good = tx.partial_decrypt(sharing[1], APP, point)  # node 2
    assert tx.verify_partial(c, APP, point, good)
    other_sharing = tx.dkg_local(T, N)
    cases = {
        "another point": (c, APP, other_point, good),
        "another node's public share (index 3)": (c, APP, point, tx.EcdhPartial(3, good.element, good.proof)),
        "another sharing's commitments": (other_sharing[0].commitments, APP, point, good),
        "another app": (c, b"\x0b" * 20, point, good),
        "a 19-byte app id prefix": (c, APP[:19], point, good),
    }
    for what, (cc, app, p, part) in cases.items():
        assert not tx.verify_partial(cc, app, p, part), what
    # the right element with a proof made for another point by the same node
    for_other = tx.partial_decrypt(sharing[1], APP, other_point)
    assert not tx.verify_partial(c, APP, point, tx.EcdhPartial(2, good.element, for_other.proof))
    # D_i of the right node for the right point, proved by another node: no
    by3 = tx.partial_decrypt(sharing[2], APP, point)
    assert not tx.verify_partial(c, APP, point, tx.EcdhPartial(2, good.element, by3.proof))


def test_non_canonical_scalars_and_degenerate_elements_are_refused(sharing: list[tx.EnvKeyShare]) -> None:
    c = sharing[0].commitments
    point = tx.ephemeral_point(encrypt_env(tx.x25519_public_key(c), {"K": "v"}))
    good = tx.partial_decrypt(sharing[0], APP, point)
    cc = int.from_bytes(good.proof[:32], "little")
    z = int.from_bytes(good.proof[32:], "little")

    def proof(a: int, b: int) -> bytes:
        return a.to_bytes(32, "little") + b.to_bytes(32, "little")

    # the same values plus L (non-canonical, same residue) and zeros: refused
    for pr in (proof(cc + L, z), proof(cc, z + L), proof(0, z), proof(cc, 0), good.proof[:63]):
        assert not tx.verify_partial(c, APP, point, tx.EcdhPartial(1, good.element, pr))
    # identity / small-order elements, and the point a node is asked for being one: refused
    for bad in TORSION:
        assert not tx.verify_partial(c, APP, point, tx.EcdhPartial(1, bad, good.proof))
        assert not tx.verify_partial(c, APP, bad, good)
        with pytest.raises(tx.ThresholdEcdhError):
            tx.partial_decrypt(sharing[0], APP, bad)
    # the element plus a torsion point (same prime-order part): refused (libsodium's subgroup check)
    shifted = tx._add(good.element, TORSION[4])
    assert not tx.verify_partial(c, APP, point, tx.EcdhPartial(1, shifted, good.proof))
    # generated: every single-bit flip of the element and of the proof
    for k in range(256):
        el = bytearray(good.element)
        el[k // 8] ^= 1 << (k % 8)
        assert not tx.verify_partial(c, APP, point, tx.EcdhPartial(1, bytes(el), good.proof)), k
    for k in range(512):
        pr = bytearray(good.proof)
        pr[k // 8] ^= 1 << (k % 8)
        assert not tx.verify_partial(c, APP, point, tx.EcdhPartial(1, good.element, bytes(pr))), k


def test_the_fiat_shamir_transcript_binds_every_input(sharing: list[tx.EnvKeyShare]) -> None:
    """Recompute the challenge as verify_partial does, changing ONE input at a time: each changes c (so a
    proof made for one transcript cannot be reused for a statement that differs in any input)."""
    c = sharing[0].commitments
    point = tx.ephemeral_point(encrypt_env(tx.x25519_public_key(c), {"K": "v"}))
    part = tx.partial_decrypt(sharing[0], APP, point)
    y1 = tx.public_share(c, 1)
    cc = int.from_bytes(part.proof[:32], "little")
    z = int.from_bytes(part.proof[32:], "little")
    t1 = tx._sub(tx._mul_base(z), tx._mul(cc, y1))
    t2 = tx._sub(tx._mul(z, point), tx._mul(cc, part.element))
    inputs = [tx.BASE, y1, point, part.element, t1, t2]
    base = tx._challenge(tx._label(APP, 1), *inputs)
    assert base == cc
    other = tx._mul_base(7)
    for k in range(len(inputs)):
        changed = list(inputs)
        changed[k] = other
        assert tx._challenge(tx._label(APP, 1), *changed) != base, k
    assert tx._challenge(tx._label(APP, 2), *inputs) != base
    assert tx._challenge(tx._label(b"\x0b" * 20, 1), *inputs) != base
    # length-prefixed: moving bytes between the app id and the index does not collide
    assert tx._label(APP + b"\x00", 1) != tx._label(APP, 1)


def test_the_dkg_receive_step_refuses_degenerate_dealings() -> None:
    dealings = {d: tx.deal(T, N) for d in range(1, N + 1)}
    commitments = {d: c for d, (c, _) in dealings.items()}
    subs = {d: s[3] for d, (_, s) in dealings.items()}
    assert tx.dkg_receive(3, T, commitments, subs).index == 3
    cases = {
        "identity commitment": ({**commitments, 2: (TORSION[0], *commitments[2][1:])}, subs),
        "small-order commitment": ({**commitments, 2: (*commitments[2][:2], TORSION[4])}, subs),
        "a dealer with t-1 commitments": ({**commitments, 4: commitments[4][:2]}, subs),
        "a dealer without its sub-share": (commitments, {d: s for d, s in subs.items() if d != 5}),
        "a sub-share of zero": (commitments, {**subs, 1: 0}),
        "a sub-share of L + s": (commitments, {**subs, 1: subs[1] + L}),
        "another member's sub-share": (commitments, {**subs, 1: dealings[1][1][2]}),
    }
    for what, (cm, ss) in cases.items():
        with pytest.raises(tx.ThresholdEcdhError):
            tx.dkg_receive(3, T, cm, ss)
        assert what
