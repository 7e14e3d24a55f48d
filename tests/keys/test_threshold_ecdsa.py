"""teecloud.keys.threshold_ecdsa: GJKR-style threshold ECDSA on secp256k1, refereed by independent
verifiers (libsecp256k1 through coincurve, OpenSSL through `cryptography`, eth_keys through dstack-sdk's
env-key helper, and the GetKey chain check), any t sign, t-1 cannot, and a liar in any round is named."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import time

import coincurve
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from dstack_sdk.verify_env_encrypt_public_key import verify_env_encrypt_public_key

from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.appkeys import env_encrypt_pubkey_digest
from teecloud.keys.errors import KeyUsageError
from teecloud.keys.sigchain import (
    derive_get_key,
    k256_public_key,
    kms_issued_digest,
    purpose_digest,
    sign_k256_recoverable,
    verify_key_signature_chain,
)

DIGEST = hashlib.sha256(b"teecloud threshold ecdsa").digest()


_CURVES = {"secp256k1": (te.SECP256K1, ec.SECP256K1()), "p256": (te.P256, ec.SECP256R1())}


def _verifies(key: te.KeyShare, digest: bytes, sig: bytes) -> bool:
    """OpenSSL (`cryptography`) as the referee: ordinary ECDSA-SHA256 under the group key (r || s; a trailing
    recovery byte, secp256k1's, is not part of it)."""
    pk = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[key.group.name][1], key.group_public_key)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
    try:
        pk.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


@pytest.fixture(scope="module")
def keys_3_of_5() -> list[te.KeyShare]:
    return te.dkg_local(3, 5)


@pytest.fixture(scope="module")
def presigs(keys_3_of_5: list[te.KeyShare]) -> dict[int, te.Presignature]:
    return te.presign_local(keys_3_of_5, [1, 2, 3, 4, 5])


def test_every_t_subset_signs_and_independent_verifiers_accept(keys_3_of_5, presigs) -> None:
    group_pk = keys_3_of_5[0].group_public_key
    for signers in itertools.combinations(range(1, 6), 3):
        sig = te.sign_local(presigs, list(signers), DIGEST)
        assert len(sig) == 65 and sig[64] in (0, 1)
        assert int.from_bytes(sig[32:64], "big") <= te.ORDER // 2  # low s
        recovered = coincurve.PublicKey.from_signature_and_message(sig, DIGEST, hasher=None)
        assert recovered.format(compressed=True) == group_pk
        assert _verifies(keys_3_of_5[0], DIGEST, sig)
        assert not _verifies(keys_3_of_5[0], hashlib.sha256(b"other").digest(), sig)


def test_fresh_presignatures_give_distinct_r(keys_3_of_5) -> None:
    rs = {te.presign_local(keys_3_of_5, [1, 2, 3, 4, 5])[1].big_r for _ in range(3)}
    assert len(rs) == 3


def test_only_the_2t_minus_1_participants_hold_a_presignature() -> None:
    keys = te.dkg_local(3, 7)
    ps = te.presign_local(keys, [1, 2, 3, 4, 5])  # 2t-1 = 5 multiply; 6 and 7 were offline
    # 6 and 7 hold none: otherwise {1, 2, 3} and {4, 6, 7} could each sign a different digest with the same
    # k, which reveals the key (review 5, R5-1); any two sets of 3 among 5 share a holder
    assert sorted(ps) == [1, 2, 3, 4, 5]
    with pytest.raises(KeyUsageError, match="exactly 2t-1 = 5"):
        te.presign_local(keys, [1, 2, 3, 4, 5, 6])
    sig = te.sign_local(ps, [3, 4, 5], DIGEST)
    assert (
        coincurve.PublicKey.from_signature_and_message(sig, DIGEST, hasher=None).format()
        == keys[0].group_public_key
    )


def test_presign_needs_2t_minus_1_participants(keys_3_of_5) -> None:
    with pytest.raises(KeyUsageError, match="exactly 2t-1 = 5"):
        te.presign_local(keys_3_of_5, [1, 2, 3, 4])
    with pytest.raises(KeyUsageError, match="distinct"):
        te.presign_round1(b"s" * 16, keys_3_of_5[0], [1, 1, 2, 3, 4])


def test_key_share_that_does_not_match_commitments_is_refused(keys_3_of_5) -> None:
    k = keys_3_of_5[1]
    with pytest.raises(te.ThresholdSignatureError, match="party 2"):
        te.KeyShare(k.index, k.t, k.n, (k.share + 1) % te.ORDER, k.commitments)


def test_dstack_chain_and_env_signature_verify_under_the_group_key(keys_3_of_5) -> None:
    """The two KMS signatures dstack-sdk users check: the GetKey chain's [1] and signature_v1."""
    group_pk = keys_3_of_5[0].group_public_key
    app_id = bytes.fromhex("11" * 20)
    app_k256 = hashlib.sha256(b"app k256 key").digest()
    app_pub = k256_public_key(app_k256)
    ps = te.presign_local(keys_3_of_5, [1, 2, 3, 4, 5])
    kms_sig = te.sign_local(ps, [1, 3, 5], kms_issued_digest(app_id, app_pub))
    derived = derive_get_key(app_k256, "wallet/eth")
    chain = [sign_k256_recoverable(app_k256, purpose_digest("ethereum", derived.public_key)), kms_sig]
    assert (
        verify_key_signature_chain(
            app_id=app_id,
            public_key=derived.public_key,
            purpose="ethereum",
            signature_chain=chain,
            kms_root_public_key=group_pk,
        )
        == app_pub
    )
    env_pub, now = bytes(range(32)), int(time.time())
    ps = te.presign_local(keys_3_of_5, [1, 2, 3, 4, 5])
    sig_v1 = te.sign_local(ps, [2, 4, 5], env_encrypt_pubkey_digest(app_id, env_pub, now))
    assert verify_env_encrypt_public_key(env_pub, sig_v1, "0x" + app_id.hex(), now) == "0x" + group_pk.hex()


def test_optimistic_combination_is_the_same_signature_and_fails_closed_on_a_wrong_share(
    keys_3_of_5, presigs
) -> None:
    """check_shares=False skips the per-share checks, not the result's: t right shares give the same
    signature as the checked combination; any wrong share (every position, random offsets) makes it fail,
    and the checked combination then names the sender."""
    rng = random.Random(11)
    good = [te.sign_share(presigs[i], DIGEST) for i in (1, 2, 3)]
    checked = te.combine_signature(presigs[1], DIGEST, good)
    assert te.combine_signature(presigs[1], DIGEST, good, check_shares=False) == checked
    for k in range(3):
        for _ in range(5):
            shares = list(good)
            shares[k] = te.SignatureShare(good[k].index, (good[k].s + rng.randrange(1, te.ORDER)) % te.ORDER)
            with pytest.raises(te.ThresholdSignatureError):
                te.combine_signature(presigs[1], DIGEST, shares, check_shares=False)
            with pytest.raises(te.ThresholdSignatureError) as err:
                te.combine_signature(presigs[1], DIGEST, shares)
            assert err.value.party == good[k].index
    with pytest.raises(te.ThresholdSignatureError):  # out of range is refused unchecked too
        te.combine_signature(presigs[1], DIGEST, [*good[:2], te.SignatureShare(3, 0)], check_shares=False)


def test_malformed_messages_are_hostile_input_not_crashes(keys_3_of_5) -> None:
    """Generated mutations of round-2 proofs and points: always a named ThresholdSignatureError."""
    rng = random.Random(11)
    for _ in range(6):
        victim = rng.choice([1, 2, 3, 4, 5])
        junk = bytes(rng.randrange(256) for _ in range(rng.choice([0, 31, 64, 65])))

        def tamper(round_: str, sender: int, msg: object, victim: int = victim, junk: bytes = junk) -> object:
            if round_ == "mul" and sender == victim:
                assert isinstance(msg, te.MulMessage)
                return dataclasses.replace(msg, proof=junk)
            return msg

        with pytest.raises(te.ThresholdSignatureError) as err:
            te.presign_local(keys_3_of_5, [1, 2, 3, 4, 5], tamper=tamper)
        assert err.value.party == victim


# ---------------------------------- on both curves (P-256 alone: tests/keys/test_threshold_ecdsa_p256.py)


@pytest.fixture(scope="module", params=sorted(_CURVES))
def curve_keys(request: pytest.FixtureRequest) -> list[te.KeyShare]:
    """A 3-of-5 key on each group the threshold signer supports."""
    return te.dkg_local(3, 5, group=_CURVES[request.param][0])


@pytest.fixture(scope="module")
def curve_presigs(curve_keys: list[te.KeyShare]) -> dict[int, te.Presignature]:
    return te.presign_local(curve_keys, [1, 2, 3, 4, 5])


@pytest.mark.parametrize("name", sorted(_CURVES))
def test_single_node_group_is_ordinary_ecdsa(name: str) -> None:
    keys = te.dkg_local(1, 1, group=_CURVES[name][0])
    sig = te.sign_local(te.presign_local(keys, [1]), [1], DIGEST)
    assert _verifies(keys[0], DIGEST, sig)


def test_t_minus_1_cannot_sign(curve_presigs) -> None:
    presigs = curve_presigs
    shares = [te.sign_share(presigs[i], DIGEST) for i in (2, 4)]
    with pytest.raises(te.ThresholdSignatureError, match="2 valid signature shares, 3 needed"):
        te.combine_signature(presigs[2], DIGEST, shares)
    # forcing the interpolation with t-1 shares gives something that verifies under no key of the group
    weak = dataclasses.replace(presigs[2], t=2)
    with pytest.raises(te.ThresholdSignatureError, match="does not verify under the group key"):
        te.combine_signature(weak, DIGEST, shares)


def test_wrong_signature_share_is_named_and_the_others_still_sign(curve_keys, curve_presigs) -> None:
    presigs, order = curve_presigs, curve_keys[0].group.order
    rng = random.Random(7)
    for liar in range(1, 6):
        good = [te.sign_share(presigs[i], DIGEST) for i in range(1, 6) if i != liar]
        bad = te.SignatureShare(
            liar, (te.sign_share(presigs[liar], DIGEST).s + rng.randrange(1, order)) % order
        )
        with pytest.raises(te.ThresholdSignatureError) as err:
            te.combine_signature(presigs[1], DIGEST, [*good[:2], bad])
        assert err.value.party == liar
        assert _verifies(curve_keys[0], DIGEST, te.combine_signature(presigs[1], DIGEST, good[:3]))


_STEPS = ("deal-k", "deal-a", "deal-z", "mul-w", "mul-proof", "reduce-share", "reduce-commit", "reduce-proof")


def _corrupt(step: str, victim: int, rng: random.Random, group: te.Group):  # type: ignore[no-untyped-def]
    n = group.order
    bump = rng.randrange(1, n)

    def tamper(round_: str, sender: int, msg: object) -> object:
        if sender != victim:
            return msg
        if round_ == "deal" and step.startswith("deal-"):
            assert isinstance(msg, te.PresignDealing)
            field = step[-1]
            d: te.Dealing = getattr(msg, field)
            target = next(j for j in sorted(d.shares) if j != victim)
            shares = {**d.shares, target: (d.shares[target] + bump) % n}
            return dataclasses.replace(msg, **{field: dataclasses.replace(d, shares=shares)})
        if round_ == "mul" and step.startswith("mul-"):
            assert isinstance(msg, te.MulMessage)
            if step == "mul-w":
                return dataclasses.replace(msg, w=(msg.w + bump) % n)
            return dataclasses.replace(msg, proof=msg.proof[:32] + bump.to_bytes(32, "big"))
        if round_ == "reduce" and step.startswith("reduce-"):
            assert isinstance(msg, te.ReduceDealing)
            d = msg.dealing
            if step == "reduce-share":
                shares = {j: (s + bump) % n if j != victim else s for j, s in d.shares.items()}
                return dataclasses.replace(msg, dealing=dataclasses.replace(d, shares=shares))
            if step == "reduce-commit":
                # a consistent sharing of a different value: the sub-shares verify, the proof cannot
                other = te.feldman_deal(
                    None, len(d.commitments) - 1, sorted(d.shares), dealer=d.dealer, group=group
                )
                return dataclasses.replace(msg, dealing=other)
            return dataclasses.replace(msg, proof=bytes(64))
        return msg

    return tamper


@pytest.mark.parametrize("step", _STEPS)
def test_a_lying_participant_is_named_in_every_round(curve_keys, step: str) -> None:
    rng = random.Random(step)
    victim = rng.choice([1, 2, 3, 4, 5])
    with pytest.raises(te.ThresholdSignatureError) as err:
        te.presign_local(curve_keys, [1, 2, 3, 4, 5], tamper=_corrupt(step, victim, rng, curve_keys[0].group))
    assert err.value.party == victim, err.value
