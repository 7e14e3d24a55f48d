"""Review 4, area 5: one share, two running processes. The rule admits a member by what it holds (share i,
a boot-time key of an allowed build); the host can boot the same node twice from copies of its disk (the
KMS measurement has no per-boot value, and sealing binds to the measurement only). Both copies are admitted
as member i, and each holds its own in-memory copy of the sealed presignature pool, so "one message per
presignature, ever" holds per process, not per share: t copied nodes sign two messages with one
presignature, which gives away the group's signing key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import coincurve

from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest
from teecloud.kms import authz
from teecloud.kms.bootstrap import boot_kms_tee
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold import ThresholdShare
from teecloud.kms.threshold_sign import ThresholdSigner, open_signer, save_signing_share
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member, hello, start_member
from tests.kms.test_threshold_net_presign import _fetch_as, _open_sigkey

Committee = tuple[dict[int, Member], list[ThresholdShare]]
APP_ID = bytes.fromhex("5a" * 20)


def test_two_running_copies_of_one_member_are_both_admitted(
    teecloud_home: Path, world: World, committee: Committee
) -> None:
    """What the channel decides today (documents the enabling fact of R4-4): a second boot of share 2 is
    admitted as member 2 while the first still runs; they are told apart only by their keys."""
    members, shares = committee
    copy = start_member(teecloud_home, world.chain, shares[1], name="copy")
    try:
        assert hello(members[2], members[1]).index == 2
        assert hello(copy, members[1]).index == 2
        assert copy.identity.member != members[2].identity.member
        assert hello(members[1], copy).member.index == 2
    finally:
        copy.server.stop()


def _app(app_id: bytes) -> authz.AuthorizedApp:
    peer = SimpleNamespace(boot_info=SimpleNamespace(app_id=app_id))
    return authz.AuthorizedApp(peer, None, "review4", authz._SEAL)  # type: ignore[arg-type]


def test_copies_of_t_nodes_never_sign_two_messages_with_one_presignature(teecloud_home: Path) -> None:
    keys = te.dkg_local(3, 5)
    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    for k in keys:
        save_signing_share(k, tee, identity, teecloud_home / f"node-{k.index}")

    def boot(i: int) -> ThresholdSigner:  # one process of node i, from its (sealed) data directory
        signer = open_signer(tee, identity, teecloud_home / f"node-{i}")
        assert signer is not None
        return signer

    copies: dict[str, dict[int, ThresholdSigner]] = {"a": {i: boot(i) for i in range(1, 6)}}
    for i, p in te.presign_local(keys, [1, 2, 3, 4, 5]).items():  # a batch, sealed into each pool
        copies["a"][i].pool.add([p])
    copies["b"] = {i: boot(i) for i in range(1, 6)}  # the host boots a copy of each disk
    assert all(not c.pool.unused() for c in copies["b"].values())  # (fix: pools live in memory only)
    session = copies["a"][1].pool.unused()[0]
    pub_a = k256_public_key(hashlib.sha256(b"app key A").digest())
    pub_b = k256_public_key(hashlib.sha256(b"app key B").digest())
    shares_a = {i: copies["a"][i].sign_app_key(_app(APP_ID), pub_a, session) for i in (1, 2, 3)}
    shares_b = {}
    refused = 0
    for i in (1, 2, 3):
        try:
            shares_b[i] = copies["b"][i].sign_app_key(_app(APP_ID), pub_b, session)
        except AccessDenied:
            refused += 1
    if refused == 0:  # what the attacker then does with two messages under one R: the group's key
        e_a = int.from_bytes(kms_issued_digest(APP_ID, pub_a), "big") % te.ORDER
        e_b = int.from_bytes(kms_issued_digest(APP_ID, pub_b), "big") % te.ORDER
        lam = te.lagrange_at_zero([1, 2, 3])
        s_a = sum(lam[i] * shares_a[i].s for i in (1, 2, 3)) % te.ORDER
        s_b = sum(lam[i] * shares_b[i].s for i in (1, 2, 3)) % te.ORDER
        kinv = (s_a - s_b) * pow(e_a - e_b, -1, te.ORDER) % te.ORDER
        r = int.from_bytes(copies["a"][1].pool.public(session).big_r[1:], "big") % te.ORDER
        x = (s_a * pow(kinv, -1, te.ORDER) - e_a) * pow(r, -1, te.ORDER) % te.ORDER
        leaked = coincurve.PrivateKey(x.to_bytes(32, "big")).public_key.format(compressed=True)
        assert leaked != keys[0].group_public_key, "the group's signing key was recovered"
    assert refused == 3


def test_a_copy_of_a_member_gets_nothing_of_a_round_its_twin_takes_part_in(
    teecloud_home: Path, world: World, members: dict[int, Member]
) -> None:
    """R4-4, within a round: a dealer hands out member i's sub-shares to one boot-time key only; a second
    process of share 2 (admitted as member 2, another key) is refused at every stage, before and after."""
    session = _open_sigkey(members)
    vh = rounds_of(members[1])._rounds[bytes.fromhex(session)].views["deal"][0]
    evaluator = members[2].service.threshold
    assert evaluator is not None
    copy = start_member(teecloud_home, world.chain, evaluator._share, name="copy")
    try:
        assert hello(copy, members[1]).index == 2  # the channel admits it (documented above)
        status, body = _fetch_as(members[2], members[1], session, vh)
        assert status == 200 and body["dealer"] == 1, body
        status, body = _fetch_as(copy, members[1], session, vh)
        assert status == 403 and body["step"] == "round" and "another process" in str(body["reason"]), body
        assert "shares" not in body
        vh3 = rounds_of(members[3])._rounds[bytes.fromhex(session)].views["deal"][0]
        status, body = _fetch_as(copy, members[3], session, vh3)  # the copy first, at dealer 3
        assert status == 200, body
        status, body = _fetch_as(members[2], members[3], session, vh3)  # then its twin is refused there
        assert status == 403 and "another process" in str(body["reason"]), body
    finally:
        copy.server.stop()


def rounds_of(m: Member) -> Any:
    assert m.service.sign_rounds is not None
    return m.service.sign_rounds
