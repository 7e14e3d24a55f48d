"""keys.share_repair: share recovery (Stinson–Wei enrollment, Feldman-checked) and resharing (Desmedt–Jajodia)
over edwards25519 (env keys), secp256k1 (the group's signing key) and P-256 (the group's CA key).

Reshare 3-of-5 -> 4-of-7 -> 3-of-5 carries an app's env sharing (an env encrypted before decrypts after,
same public key), the signing key (a threshold signature after verifies under the same key, coincurve as
referee through the group's finish_signature) and the CA key; old and new shares do not mix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import coincurve
import pytest

from teecloud.keys import share_repair as sr
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys._groups import P256, SECP256K1, Group
from teecloud.keys.envcrypt import decrypt_env_with_shared_secret, encrypt_env
from teecloud.keys.errors import KeyUsageError

GROUPS: list[Group] = [tx.EDWARDS25519, SECP256K1, P256]
APP = b"\x42" * 20


def _sharing(g: Group, t: int, n: int) -> tuple[tuple[bytes, ...], dict[int, int]]:
    if g is tx.EDWARDS25519:
        shares = tx.dkg_local(t, n)
        return shares[0].commitments, {s.index: s.share for s in shares}
    keys = te.dkg_local(t, n, group=g)
    return keys[0].commitments, {k.index: k.share for k in keys}


def _enroll(
    g: Group, sharing: Sequence[bytes], shares: Mapping[int, int], helpers: Sequence[int], target: int
) -> tuple[int, dict[int, sr.RepairSplit], dict[int, int]]:
    splits = {i: sr.repair_split(g, sharing, i, shares[i], helpers, target) for i in helpers}
    table = {i: s.commitments for i, s in splits.items()}
    sums = {j: sr.repair_sum(g, j, {i: splits[i].pieces[j] for i in helpers}, table) for j in helpers}
    return sr.repair_finish(g, sharing, target, table, sums), splits, sums


@pytest.mark.parametrize("g", GROUPS, ids=lambda g: g.name)
def test_enrollment_recovers_exactly_the_missing_share_and_no_message_is_a_share(g: Group) -> None:
    sharing, shares = _sharing(g, 3, 5)
    for helpers, target in (((1, 2, 5), 4), ((2, 3, 4), 1), ((3, 4, 5), 2)):
        got, splits, sums = _enroll(g, sharing, shares, helpers, target)
        assert got == shares[target]
        # what the target receives (the sums) and what helpers exchange (the pieces) are none of the shares
        # nor any helper's Lagrange-weighted share: each is blinded by the other helpers' random summands
        lam = sr.lagrange_at(helpers, target, g.order)
        secret_values = set(shares.values()) | {lam[i] * shares[i] % g.order for i in helpers}
        assert not secret_values & set(sums.values())
        assert not secret_values & {d for s in splits.values() for d in s.pieces.values()}
        # a second run gives other messages, the same share
        again, _, sums2 = _enroll(g, sharing, shares, helpers, target)
        assert again == got and set(sums2.values()) != set(sums.values())


@pytest.mark.parametrize("g", GROUPS, ids=lambda g: g.name)
def test_enrollment_names_the_helper_that_cheats(g: Group) -> None:
    sharing, shares = _sharing(g, 3, 5)
    helpers, target = (1, 2, 5), 4
    splits = {i: sr.repair_split(g, sharing, i, shares[i], helpers, target) for i in helpers}
    table = {i: dict(s.commitments) for i, s in splits.items()}
    # helper 2 sends helper 5 a piece that does not match its commitment
    pieces = {i: splits[i].pieces[5] for i in helpers}
    pieces[2] = (pieces[2] + 1) % g.order
    with pytest.raises(sr.RepairError, match="party 2"):
        sr.repair_sum(g, 5, pieces, table)
    # helper 5 sends the target a wrong sum
    sums = {j: sr.repair_sum(g, j, {i: splits[i].pieces[j] for i in helpers}, table) for j in helpers}
    bad = dict(sums)
    bad[5] = (bad[5] + 1) % g.order
    with pytest.raises(sr.RepairError, match="party 5"):
        sr.repair_finish(g, sharing, target, table, bad)
    # helper 1 splits a share that is not its own (consistently: pieces match its commitments)
    with pytest.raises(sr.RepairError, match="party 1"):
        sr.repair_split(g, sharing, 1, (shares[1] + 1) % g.order, helpers, target)
    forged = sr.repair_split(g, sharing, 2, shares[2], helpers, target)  # helper 2's split, shown as 1's
    table[1] = forged.commitments
    with pytest.raises(sr.RepairError, match="party 1"):
        sr.repair_finish(g, sharing, target, table, sums)
    # parameters: a target among the helpers, or other than t helpers
    with pytest.raises(KeyUsageError):
        sr.repair_split(g, sharing, 1, shares[1], (1, 2, 4), 4)
    with pytest.raises(KeyUsageError):
        sr.repair_split(g, sharing, 1, shares[1], (1, 2), 4)


def _reshare(
    g: Group,
    sharing: Sequence[bytes],
    shares: Mapping[int, int],
    dealers: Sequence[int],
    t_new: int,
    n_new: int,
) -> tuple[tuple[bytes, ...], dict[int, int]]:
    dealings = {i: sr.reshare_deal(g, sharing, i, shares[i], t_new, n_new) for i in dealers}
    commitments = {i: d.commitments for i, d in dealings.items()}
    out: dict[int, int] = {}
    new: tuple[bytes, ...] = ()
    for j in range(1, n_new + 1):
        out[j], new = sr.reshare_receive(
            g, sharing, j, commitments, {i: d.subshares[j] for i, d in dealings.items()}
        )
    return new, out


def test_reshare_3_of_5_to_4_of_7_and_back_keeps_env_signing_and_ca_keys() -> None:
    # an app's env sharing: the env encrypted before decrypts after, from 4 new partials, then 3
    env = tx.dkg_local(3, 5)
    blob = encrypt_env(tx.x25519_public_key(env[0].commitments), {"SECRET": "before the reshare"})
    point = tx.ephemeral_point(blob)
    g = tx.EDWARDS25519
    c47, s47 = _reshare(g, env[0].commitments, {s.index: s.share for s in env}, (1, 3, 5), 4, 7)
    new47 = [tx.EnvKeyShare(j, 4, s, c47) for j, s in s47.items()]  # each checks against c47
    assert tx.x25519_public_key(c47) == tx.x25519_public_key(env[0].commitments)
    shared = tx.combine(c47, APP, point, [tx.partial_decrypt(s, APP, point) for s in new47[2:6]])
    assert decrypt_env_with_shared_secret(shared, blob) == {"SECRET": "before the reshare"}
    c35, s35 = _reshare(g, c47, s47, (2, 4, 6, 7), 3, 5)
    new35 = [tx.EnvKeyShare(j, 3, s, c35) for j, s in s35.items()]
    shared = tx.combine(c35, APP, point, [tx.partial_decrypt(s, APP, point) for s in new35[:3]])
    assert decrypt_env_with_shared_secret(shared, blob) == {"SECRET": "before the reshare"}
    # 3 new shares are not enough at t=4
    with pytest.raises(tx.ThresholdEcdhError, match="3 valid ECDH partials, 4 needed"):
        tx.combine(c47, APP, point, [tx.partial_decrypt(s, APP, point) for s in new47[:3]])

    # old and new do not mix: an old share fails the new commitments' check, its partial does not verify
    # under them, and interpolating t-1 new shares with an old one gives another secret than C_0's
    with pytest.raises(tx.ThresholdEcdhError, match="does not match its commitments"):
        tx.EnvKeyShare(1, 4, env[0].share, c47)
    old_partial = tx.partial_decrypt(env[0], APP, point)
    assert not tx.verify_partial(c47, APP, point, old_partial)
    with pytest.raises(tx.ThresholdEcdhError, match="node 1"):
        tx.combine(c47, APP, point, [old_partial, *(tx.partial_decrypt(s, APP, point) for s in new47[1:4])])
    mixed = {1: env[0].share, **{s.index: s.share for s in new47[1:4]}}
    lam = sr.lagrange_at(sorted(mixed), 0, g.order)
    assert g.base_mul(sum(lam[i] * v for i, v in mixed.items()) % g.order) != c47[0]

    # the group's signing key (secp256k1) and CA key (P-256): same public key, a threshold signature after
    # each reshare verifies under it; an old key share does not check against the new commitments
    for group in (SECP256K1, P256):
        keys = te.dkg_local(3, 5, group=group)
        c, s = _reshare(group, keys[0].commitments, {k.index: k.share for k in keys}, (2, 3, 4), 4, 7)
        k47 = [te.KeyShare(j, 4, 7, v, c, group.name) for j, v in s.items()]
        c, s = _reshare(group, c, s, (1, 2, 3, 7), 3, 5)
        k35 = [te.KeyShare(j, 3, 5, v, c, group.name) for j, v in s.items()]
        for ks in (k47, k35):
            assert ks[0].group_public_key == keys[0].group_public_key
            presigs = te.presign_local(ks, [k.index for k in ks][: 2 * ks[0].t - 1])
            digest = bytes(range(32))
            sig = te.sign_local(presigs, sorted(presigs)[: ks[0].t], digest)
            if group is SECP256K1:
                rec = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
                assert rec.format(compressed=True) == keys[0].group_public_key
        with pytest.raises(te.ThresholdSignatureError, match="does not match"):
            te.KeyShare(1, 4, 7, keys[0].share, k47[0].commitments, group.name)


def test_a_reshare_dealing_of_another_share_or_a_bad_sub_share_is_named() -> None:
    g = SECP256K1
    sharing, shares = _sharing(g, 3, 5)
    dealings = {i: sr.reshare_deal(g, sharing, i, shares[i], 4, 7) for i in (1, 2, 3)}
    commitments = {i: d.commitments for i, d in dealings.items()}
    subs = {i: d.subshares[5] for i, d in dealings.items()}
    sr.reshare_receive(g, sharing, 5, commitments, subs)
    with pytest.raises(sr.RepairError, match="party 2"):
        sr.reshare_receive(g, sharing, 5, commitments, {**subs, 2: (subs[2] + 1) % g.order})
    liar = sr.ReshareDealing(3, te.feldman_deal(None, 3, [5], dealer=3).commitments, {})
    with pytest.raises(sr.RepairError, match=r"party 3: .*C_0 != Y_i"):
        sr.reshare_receive(g, sharing, 5, {**commitments, 3: liar.commitments}, subs)
    with pytest.raises(sr.RepairError, match="exactly t_old = 3"):
        sr.reshare_receive(g, sharing, 5, {1: commitments[1], 2: commitments[2]}, {1: subs[1], 2: subs[2]})
    with pytest.raises(sr.RepairError, match="party 4"):
        sr.reshare_deal(g, sharing, 4, shares[3], 4, 7)
