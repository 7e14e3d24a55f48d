"""Review 7, R7-1: two env sharings — two group-signed env public keys — for ONE app, made by a
coordinator that simply does not ask the members that hold the first sharing. The old quorum
(min(n, max(t+1, n//2+1))) stopped two CONCURRENT ceremonies only: a ceremony's members check their own
store, so when t + q <= n (2-of-5: q = 3; 3-of-7: q = 4) a usable sharing (t holders) and a fresh quorum of
non-holders fitted side by side. Fixed in part: ceremony_quorum(t, n) is now also >= n - t + 1, so every
quorum meets every t holders and the non-holders of a usable sharing are too few for a second one (the
attacker's steps below, for whatever the quorum is). The steps are exactly the PeerEnvDkg messages a
coordinating member sends (the members' own `stage` handler, with real member-to-member sub-share fetches
under kms.peering's rule); a crash of an honest coordinator between its commits gives the same first half."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dstack_sdk.verify_env_encrypt_public_key import verify_env_encrypt_public_key

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdsa as te
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_env import EnvKeyStore, ceremony_quorum
from tests.kms._threshold_env_world import env_of, partial_ceremony
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_net_peering import Member, allow_build, start_member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow

T2, N = 2, 5


@pytest.fixture
def members_2of5(teecloud_home: Path, world: World) -> Iterator[dict[int, Member]]:
    allow_build(world.chain, teecloud_home)
    shares = local_joint_feldman(T2, N, epoch=1)
    keys = te.dkg_local(T2, N)
    out: dict[int, Member] = {}
    try:
        for s in shares:
            m = start_member(teecloud_home, world.chain, s, name="r7-2of5")
            m.service._install_signer(keys[s.index - 1])
            out[s.index] = m
        for trio in ((1, 2, 3), (3, 4, 5)):  # 2t-1 participants each; more than ENV_RESERVED (boots')
            for _ in range(12):
                for i, p in te.presign_local(keys, list(trio)).items():
                    out[i].service.threshold.signer.pool.add([p])  # type: ignore[union-attr]
        urls = {i: m.server.url for i, m in out.items()}
        for m in out.values():
            assert m.service.env_keys is not None
            m.service.env_keys.set_peers(urls)
        yield out
    finally:
        stop_servers(m.server for m in out.values())


def test_one_app_never_gets_two_usable_env_sharings(world: World, members_2of5: dict[int, Member]) -> None:
    nodes = members_2of5
    q = ceremony_quorum(T2, N)
    assert q == 4  # 2-of-5: n - t + 1 (it was 3 before R7-1's fix, and t + q <= n)
    app_id = world.register(compose_hash(dict(HELLO, name="review7-second-sharing")))
    # ceremony A among the first q members {1..q}, sealed on 1 and 2 (t of them: usable), not on the rest
    partial_ceremony(nodes, app_id, list(range(1, q + 1)), [1, 2], [1, 2])
    # ceremony B among every non-holder {3, 4, 5}; nobody asks 1 or 2
    try:
        partial_ceremony(nodes, app_id, [3, 4, 5], [3, 4, 5], [3, 4, 5])
    except Exception as exc:  # a refusal is the safe outcome: here, each member's quorum check
        assert f"at least {q} of the {N} members" in str(exc)
        return
    held = {i: env_of(m).store.get(1, app_id) for i, m in nodes.items()}
    sharings = {s.commitments for s in held.values() if s is not None}
    # each side signs its own key with the group's signing key: two genuine answers for one app
    a = nodes[1].service.env_encrypt_pubkey(app_id.hex())
    b = nodes[4].service.env_encrypt_pubkey(app_id.hex())
    signer = nodes[1].service.threshold.signer  # type: ignore[union-attr]
    assert signer is not None
    for ans in (a, b):  # dstack's own verifier: both are genuine answers under the group's signing key
        got = verify_env_encrypt_public_key(
            bytes.fromhex(ans.public_key), bytes.fromhex(ans.signature_v1), "0x" + app_id.hex(), ans.timestamp
        )
        assert got == "0x" + signer.group_public_key.hex()
    assert len(sharings) == 1 and a.public_key == b.public_key, (
        f"{len(sharings)} sharings; node 1 answers {a.public_key[:16]}…, node 4 answers {b.public_key[:16]}…"
    )


def test_a_partly_committed_sharing_leaves_no_stale_share_beside_the_apps_one(
    world: World, members_2of5: dict[int, Member]
) -> None:
    nodes = members_2of5
    q = ceremony_quorum(T2, N)
    app_id = world.register(compose_hash(dict(HELLO, name="review7-partial-sharing")))
    # ceremony A among {1..q}, sealed on member 1 only (fewer than t: the coordinator stopped there, before
    # any confirm; with its confirm, member 1 would find A an orphan at once and drop it)
    partial_ceremony(nodes, app_id, list(range(1, q + 1)), [1], [])
    one = env_of(nodes[1]).store.record(1, app_id)
    assert one is not None and one[1] is False  # sealed tentative: 1 < t members hold it, never promoted
    a_commitments = one[0].commitments
    with pytest.raises(AccessDenied, match="holds no env share"):  # never signs for a tentative share
        env_of(nodes[1]).sign_shares(1, app_id, int(time.time()), [])
    # ceremony B among the n - 1 >= q members that hold nothing; nobody asks 1
    partial_ceremony(nodes, app_id, [2, 3, 4, 5], [2, 3, 4, 5], [2, 3, 4, 5])
    b_share = env_of(nodes[2]).store.get(1, app_id)
    assert b_share is not None and b_share.commitments != a_commitments  # B confirmed on 2..5
    # member 1's first need (its GetAppEnvEncryptPubKey): it polls, drops A (superseded), recovers B
    answers = {i: nodes[i].service.env_encrypt_pubkey(app_id.hex()).public_key for i in (1, 4)}
    records = {i: env_of(m).store.record(1, app_id) for i, m in nodes.items()}
    sharings = {(r[0].commitments, r[1]) for r in records.values() if r is not None}
    assert sharings == {(b_share.commitments, True)}, f"{len(sharings)} sharings stored"
    assert len(set(answers.values())) == 1, f"answers {answers}"
    # the stale share is gone from member 1's directory too (not only unused): one sealed file, B's
    files = sorted(p.name for p in env_of(nodes[1]).store.dir.glob("1-*.sealed"))
    assert files == [f"1-{app_id.hex()}.sealed"]
    store = env_of(nodes[1]).store
    reopened = EnvKeyStore(store.dir, store._seal, store._unseal, index=1, t=T2).record(1, app_id)
    assert reopened is not None and (reopened[0].commitments, reopened[1]) == (b_share.commitments, True)
