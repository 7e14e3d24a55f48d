"""teecloud.keys.threshold: RFC 9497 VOPRF (ristretto255-SHA512) against the RFC's own vectors, and the
t-of-n construction on top of it (Shamir/Feldman, Lagrange in the exponent, per-partial DLEQ checks)."""

from __future__ import annotations

import itertools

import pytest

from teecloud.keys import threshold as th
from teecloud.keys.errors import KeyUsageError


def _h(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


# RFC 9497 appendix A.1.2 (ristretto255-SHA512, VOPRF mode), test vectors 1 and 2 (batch size 1).
SEED = _h("a3" * 32)
KEY_INFO = _h("74657374206b6579")
SK_SM = _h("e6f73f344b79b379f1a0dd37e07ff62e38d9f71345ce62ae3a9bc60b04ccd909")
PK_SM = _h("c803e2cc6b05fc15064549b5920659ca4a77b2cca6f04f6b357009335476ad4e")
BLIND = _h("64d37aed22a27f5191de1c1d69fadb899d8862b58eb4220029e036ec4c1f6706")
PROOF_R = _h("222a5e897cf59db8145db8d16e597e8facb80ae7d4e26d9881aa6f61d645fc0e")
VECTORS = [
    (
        _h("00"),
        _h("863f330cc1a1259ed5a5998a23acfd37fb4351a793a5b3c090b642ddc439b945"),
        _h("aa8fa048764d5623868679402ff6108d2521884fa138cd7f9c7669a9a014267e"),
        _h(
            "ddef93772692e535d1a53903db24367355cc2cc78de93b3be5a8ffcc6985dd06"
            "6d4346421d17bf5117a2a1ff0fcb2a759f58a539dfbe857a40bce4cf49ec600d"
        ),
        _h(
            "b58cfbe118e0cb94d79b5fd6a6dafb98764dff49c14e1770b566e42402da1a7d"
            "a4d8527693914139caee5bd03903af43a491351d23b430948dd50cde10d32b3c"
        ),
    ),
    (
        _h("5a" * 17),
        _h("cc0b2a350101881d8a4cba4c80241d74fb7dcbfde4a61fde2f91443c2bf9ef0c"),
        _h("60a59a57208d48aca71e9e850d22674b611f752bed48b36f7a91b372bd7ad468"),
        _h(
            "401a0da6264f8cf45bb2f5264bc31e109155600babb3cd4e5af7d181a2c9dc0a"
            "67154fabf031fd936051dec80b0b6ae29c9503493dde7393b722eafdf5a50b02"
        ),
        _h(
            "8a9a2f3c7f085b65933594309041fc1898d42d0858e59f90814ae90571a6df60"
            "356f4610bf816f27afdd84f47719e480906d27ecd994985890e5f539e7ea74b6"
        ),
    ),
]


def _le(b: bytes) -> int:
    return int.from_bytes(b, "little")


def test_derive_key_pair_matches_rfc9497() -> None:
    sk, pk = th.derive_key_pair(SEED, KEY_INFO)
    assert sk.to_bytes(32, "little") == SK_SM and pk == PK_SM


@pytest.mark.parametrize(("input_", "blinded", "evaluated", "proof", "output"), VECTORS)
def test_voprf_matches_rfc9497_vectors(
    input_: bytes, blinded: bytes, evaluated: bytes, proof: bytes, output: bytes
) -> None:
    sk = _le(SK_SM)
    assert th.blind(input_, _le(BLIND)) == blinded
    ev, pr = th.blind_evaluate(sk, PK_SM, blinded, r=_le(PROOF_R))
    assert ev == evaluated and pr == proof
    assert th.verify_proof(th.GENERATOR, PK_SM, [blinded], [evaluated], proof)
    assert th.finalize(input_, th.unblind(_le(BLIND), evaluated)) == output


@pytest.mark.parametrize(("input_", "blinded", "evaluated", "proof", "output"), VECTORS)
def test_threshold_output_equals_the_rfc_output_for_every_t_subset(
    input_: bytes, blinded: bytes, evaluated: bytes, proof: bytes, output: bytes
) -> None:
    """The RFC's skSm, shared 3-of-5: every 3 nodes give the RFC's Output (the blind cancels in VOPRF)."""
    dealing = th.deal(_le(SK_SM), 3, 5)
    assert dealing.commitments[0] == PK_SM
    partials = {i: th.partial_evaluate(i, dealing.shares[i], input_) for i in range(1, 6)}
    for i, p in partials.items():
        assert th.verify_partial(th.public_share(dealing.commitments, i), input_, p)
    for subset in itertools.combinations(range(1, 6), 3):
        assert th.combine(input_, [partials[i] for i in subset], 3) == output


def test_fewer_than_t_partials_give_nothing_usable() -> None:
    dealing = th.deal(None, 3, 5)
    ctx = b"app context"
    partials = [th.partial_evaluate(i, dealing.shares[i], ctx) for i in (1, 2, 3)]
    full = th.combine(ctx, partials, 3)
    with pytest.raises(th.ThresholdError):
        th.combine(ctx, partials[:2], 3)
    # interpolating two partials as if t were 2 gives a different, useless value
    assert th.combine(ctx, partials[:2], 2) != full
    assert th.combine(ctx, partials[1:], 2) != th.combine(ctx, partials[:2], 2)


def test_a_wrong_partial_or_proof_is_detected() -> None:
    dealing = th.deal(None, 2, 3)
    ctx = b"ctx"
    y1 = th.public_share(dealing.commitments, 1)
    good = th.partial_evaluate(1, dealing.shares[1], ctx)
    assert th.verify_partial(y1, ctx, good)
    # node 1 evaluates with node 2's share, or on another input, or forges the proof
    assert not th.verify_partial(y1, ctx, th.partial_evaluate(1, dealing.shares[2], ctx))
    assert not th.verify_partial(y1, ctx, th.partial_evaluate(1, dealing.shares[1], b"other"))
    assert not th.verify_partial(y1, ctx, th.Partial(1, good.element, bytes(64)))
    bad_z = th.partial_evaluate(2, dealing.shares[2], ctx).element
    assert not th.verify_partial(y1, ctx, th.Partial(1, bad_z, good.proof))
    assert not th.verify_partial(y1, ctx, th.Partial(1, bytes(32), good.proof))


def test_joint_feldman_dkg_and_complaints() -> None:
    t, n = 3, 5
    dealings = [th.deal(None, t, n, dealer=d) for d in range(1, n + 1)]
    group = th.sum_commitments(dealings)
    shares = {}
    for r in range(1, n + 1):
        total, complaints = th.joint_feldman(dealings, r, {d.dealer: d.shares[r] for d in dealings})
        assert complaints == []
        shares[r] = total
        assert th.verify_share(group, r, total)
    ctx = b"dkg"
    outs = {
        th.combine(ctx, [th.partial_evaluate(i, shares[i], ctx) for i in s], t)
        for s in itertools.combinations(range(1, n + 1), t)
    }
    assert len(outs) == 1
    # a dealer that sends receiver 2 a share off its commitments is complained about
    cheat = dealings[0]
    _, complaints = th.joint_feldman(
        dealings, 2, {d.dealer: (d.shares[2] + (1 if d is cheat else 0)) for d in dealings}
    )
    assert complaints == [cheat.dealer]


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(KeyUsageError):
        th.deal(None, 4, 3)
    with pytest.raises(KeyUsageError):
        th.partial_evaluate(1, 5, b"")
    with pytest.raises(KeyUsageError):
        th.lagrange_at_zero([1, 1])
    with pytest.raises(th.ThresholdError):
        th.Partial.from_json({"index": 1, "element": "zz", "proof": ""})


def _outputs(shares: dict[int, int], t: int, ctx: bytes) -> set[bytes]:
    return {
        th.combine(ctx, [th.partial_evaluate(i, shares[i], ctx) for i in s], t)
        for s in itertools.combinations(sorted(shares), t)
    }


def _reshare(
    commitments: tuple[bytes, ...], shares: dict[int, int], old: list[int], t_new: int, n_new: int
) -> tuple[tuple[bytes, ...], dict[int, int]]:
    dealings = [th.reshare_deal(i, shares[i], t_new, n_new) for i in old]
    new = {}
    for j in range(1, n_new + 1):
        s, complaints = th.reshare_receive(
            commitments, dealings, j, {d.dealer: d.shares[j] for d in dealings}
        )
        assert complaints == []
        new[j] = s
    new_commitments = th.reshare_commitments(dealings)
    assert all(th.verify_share(new_commitments, j, s) for j, s in new.items())
    return new_commitments, new


def test_reshare_3of5_to_4of7_and_back_keeps_every_output() -> None:
    ctx = b"app context"
    d = th.deal(None, 3, 5)
    (before,) = _outputs(d.shares, 3, ctx)
    c47, s47 = _reshare(d.commitments, d.shares, [1, 3, 5], 4, 7)
    assert c47[0] == d.commitments[0]  # same group public key
    assert _outputs(s47, 4, ctx) == {before}
    c35, s35 = _reshare(c47, s47, [2, 4, 6, 7], 3, 5)
    assert c35[0] == d.commitments[0] and _outputs(s35, 3, ctx) == {before}
    # an old share does not combine with new ones: nothing usable from mixing committees
    mixed = [th.partial_evaluate(1, d.shares[1], ctx)] + [th.partial_evaluate(i, s35[i], ctx) for i in (2, 3)]
    assert th.combine(ctx, mixed, 3) != before
    # and the old share's partial fails the new committee's proof check
    assert not th.verify_partial(th.public_share(c35, 1), ctx, mixed[0])


def test_reshare_refuses_a_dealer_that_does_not_deal_its_old_share() -> None:
    d = th.deal(None, 2, 3)
    honest = th.reshare_deal(1, d.shares[1], 2, 3)
    forged = th.reshare_deal(2, 424242, 2, 3)  # not node 2's share: its C_0 is not Y_2
    _, complaints = th.reshare_receive(
        d.commitments, [honest, forged], 1, {1: honest.shares[1], 2: forged.shares[1]}
    )
    assert complaints == [2]
    with pytest.raises(th.ThresholdError):
        th.reshare_receive(d.commitments, [honest], 1, {1: honest.shares[1]})


def test_rotation_a_new_epoch_changes_keys_and_the_old_epoch_stays_derivable() -> None:
    app, inst = b"\x11" * 20, b"\x22" * 20
    e1 = th.deal(None, 2, 3)
    e2 = th.deal(None, 2, 3)
    x1, _ = th.app_contexts(1, app, inst)
    x2, _ = th.app_contexts(2, app, inst)
    assert x1 != x2
    out1 = _outputs(e1.shares, 2, x1)
    assert out1 != _outputs(e2.shares, 2, x2)
    assert _outputs(e1.shares, 2, x1) == out1  # the old epoch's shares still derive the old keys
