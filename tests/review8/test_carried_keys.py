"""Review 8, carried keys (branch t19-carried): a reshare's new member takes the carried signing and CA key
sharings only when their group keys are the ones KmsGroup records for the round's epoch
(`recorded_keys`, read at the finality depth, then `check_carried_keys`). Attacks beyond the authors'
one-byte mutations: dealers in agreement that swap the two keys between their slots, that carry another
epoch's (genuine, recorded) keys, or a key of the right epoch in one slot and another epoch's in the other;
a KmsGroup that fails at each of its three reads, or answers a record of another shape. Held: each refused
with the dealers named or the chain named; the genuine case passes."""

from __future__ import annotations

from typing import Any

import pytest

from teecloud.chain.errors import ChainError, ChainStateError
from teecloud.chain.kmsgroup import GroupCa
from teecloud.keys import threshold_ecdsa as te
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold_carry import CarriedShares, RecordedKeys, check_carried_keys
from teecloud.kms.threshold_client import recorded_keys


def _keys() -> tuple[te.KeyShare, te.KeyShare]:
    return te.dkg_local(2, 3)[0], te.dkg_local(2, 3, group=te.P256)[0]


def test_dealers_swapping_slots_or_carrying_another_epochs_keys_are_refused() -> None:
    sig3, ca3 = _keys()  # epoch 3's genuine keys (recorded for epoch 3)
    sig4, ca4 = _keys()  # epoch 4's, the round's epoch
    recorded4 = RecordedKeys(sig4.group_public_key, ca4.group_public_key)
    check_carried_keys(CarriedShares(signing_key=sig4, ca_key=ca4), recorded4, epoch=4, dealers=(1, 2))
    for carried in (
        CarriedShares(signing_key=ca4, ca_key=sig4),  # the two keys swapped between their slots
        CarriedShares(signing_key=sig3, ca_key=ca3),  # another epoch's genuine keys
        CarriedShares(signing_key=sig4, ca_key=ca3),
        CarriedShares(signing_key=sig3, ca_key=ca4),
        CarriedShares(signing_key=sig4, ca_key=sig4),  # the signing key in both slots
    ):
        with pytest.raises(KmsClientError, match=r"dealers \[1, 2\] carried .* of epoch 4, but KmsGroup"):
            check_carried_keys(carried, recorded4, epoch=4, dealers=(2, 1))


class _Group:
    """A KmsGroup stand-in that fails at one read, or answers given records."""

    def __init__(self, fail: str = "", signing: bytes | None = None, ca: GroupCa | None = None) -> None:
        self.fail, self.signing, self.ca = fail, signing, ca
        self.asked: list[tuple[str, Any]] = []

    def final_block(self, depth: int) -> str:
        if self.fail == "final_block":
            raise ChainStateError("the chain is 2 blocks long, fewer than the finality depth 6")
        return f"block-{depth}"

    def signing_key(self, epoch: int, *, at: Any = None) -> bytes | None:
        self.asked.append(("signing_key", at))
        if self.fail == "signing_key":
            raise ChainStateError("KmsGroup's signing key is not a 33-byte compressed point")
        return self.signing

    def group_ca(self, epoch: int, *, at: Any = None) -> GroupCa | None:
        self.asked.append(("group_ca", at))
        if self.fail == "group_ca":
            raise ChainError("the RPC endpoint went away")
        return self.ca


def test_an_unreadable_kmsgroup_fails_the_join_and_reads_are_at_the_final_block() -> None:
    sig, ca = _keys()
    for fail in ("final_block", "signing_key", "group_ca"):
        with pytest.raises(
            KmsClientError, match=r"cannot read epoch 4's signing and CA keys .* refusing to join"
        ):
            recorded_keys(_Group(fail, sig.group_public_key), 4, finality_depth=6)
    g = _Group("", sig.group_public_key, GroupCa(ca.group_public_key, b"\x01" * 32))
    assert recorded_keys(g, 4, finality_depth=6) == RecordedKeys(sig.group_public_key, ca.group_public_key)
    assert g.asked == [("signing_key", "block-6"), ("group_ca", "block-6")]  # both at the final block
    # a record missing (no CA recorded): a carried CA key is refused, not taken on the dealers' word
    missing = recorded_keys(_Group("", sig.group_public_key, None), 4, finality_depth=0)
    with pytest.raises(KmsClientError, match=r"carried .* CA key .* KmsGroup records none"):
        check_carried_keys(CarriedShares(signing_key=sig, ca_key=ca), missing, epoch=4, dealers=(1,))
