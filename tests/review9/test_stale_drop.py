"""Review 9: R8-3's stale rule (a tentative share sealed more than CEREMONY_WINDOW_S ago whose OTHER possible
holders, claimants plus silent members, are fewer than t is dropped) against a host that sets mtimes and a
member that is silent.

FINDING R9-3 (low; the test passes since r8-fix2's R8-2 recheck, merged on r9-fix): the rule counts the
possible holders without the member that decides, so it drops
a share whose possible holders are exactly t (this member, t - 2 claimants and one silent member). When the
silent member is the coordinator that already CONFIRMED the sharing (its own poll saw t holders), the other
holders drop their shares once the window has passed (or at once, when their hosts backdate the files), the
next request makes the app's sharing without it, and the coordinator, back, keeps a confirmed share of a
sharing nobody else holds for ever: R8-2's state from a crash or a partition, no host deletion needed.
Nothing leaks and no second key is served (the signers sign only the key of a share they hold confirmed:
an attempt to have member 3 serve A's key alone was refused, "this member holds no env share").

Held: a forward-dated file (the host delays the stale rule for ever on its member) does not keep R8-3's
block: once the other tentative holder drops its share, the forward-dated one is an orphan and is dropped
by the count rule; its member then holds the app's one sharing."""

from __future__ import annotations

import os
import time

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import KmsUsageError
from tests.kms._threshold_env_world import env_of as _env
from tests.kms._threshold_env_world import partial_ceremony as _partial_ceremony
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow


def _silent_for(m: Member, app_id: bytes) -> None:
    """Member m answers every PeerEnvDkg message of this app with an error (down, or its host blocking it)."""
    env = _env(m)
    real = env.stage

    def silent(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.app_id == app_id.hex():
            raise KmsUsageError(f"member {env.index}: (silent for this app)")
        return real(req)

    env.stage = silent  # type: ignore[method-assign]


def _set_mtime(m: Member, app_id: bytes, when: float) -> None:
    os.utime(_env(m).store._path(1, app_id), (when, when))


def test_a_coordinator_that_confirmed_and_was_silent_holds_the_apps_sharing_once_back(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """The attacker's steps (a crash or partition after the coordinator's own promotion, or member 3's host
    blocking it): member 3 coordinates A among {1, 2, 3, 4}, commits on 1, 2 and itself, and confirms
    itself (its poll sees three holders); then member 3 is silent for this app. The hosts of members 1 and 2
    set their files' mtime 200 s back (the same as waiting out the window); a client asks member 1 for the
    app's env key (members 1 and 2 drop A as stale: one claimant and one silent member, though A has t
    possible holders; B is made among {1, 2, 4, 5}). Member 3 comes back and a client asks it. Safe: member
    3 ends with the app's one sharing (B), not a confirmed share of A that nobody else holds."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r9-stale-confirmed-holder")))
    a = _partial_ceremony(nodes, app_id, [3, 1, 2, 4], [1, 2, 3], [3])
    rec3 = _env(nodes[3]).store.record(1, app_id)
    assert rec3 is not None and rec3[1] and rec3[0].commitments == a  # A is confirmed on member 3
    env3 = _env(nodes[3])
    real3 = env3.stage
    _silent_for(nodes[3], app_id)
    then = time.time() - 200
    for i in (1, 2):
        _set_mtime(nodes[i], app_id, then)
    b_key = nodes[1].service.env_encrypt_pubkey(app_id.hex()).public_key  # the stale drop, then B
    rec1 = _env(nodes[1]).store.record(1, app_id)
    assert rec1 is not None and rec1[1] and rec1[0].commitments != a
    assert tx.x25519_public_key(rec1[0].commitments).hex() == b_key
    env3.stage = real3  # type: ignore[method-assign]
    for _ in range(3):
        try:
            nodes[3].service.env_encrypt_pubkey(app_id.hex())
            break
        except KmsUsageError:  # EnvKeyBusy included
            time.sleep(0.2)
    rec3 = _env(nodes[3]).store.record(1, app_id)
    assert rec3 is not None and rec3[0].commitments == rec1[0].commitments, (
        f"member 3 keeps {'a confirmed' if rec3 and rec3[1] else 'a'} share of A, a sharing nobody else holds"
    )


def test_a_forward_dated_tentative_share_does_not_keep_the_app_blocked(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """R8-3's steps (member 5 coordinates A among {1, 2, 3, 5}, commits on 1 and 2 only, then is silent for
    the app), and the host of member 1 sets its file's mtime a year ahead (never stale), member 2's is
    backdated (stale). A client asks member 3, then member 1. Held: member 2 drops A (stale), member 1's is
    then an orphan (three members answer without it) and dropped; members 1..4 hold one confirmed sharing
    that is not A and answer its key."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r9-forward-dated")))
    a = _partial_ceremony(nodes, app_id, [1, 2, 3, 5], [1, 2], [])
    _silent_for(nodes[5], app_id)
    _set_mtime(nodes[1], app_id, time.time() + 365 * 86400)
    _set_mtime(nodes[2], app_id, time.time() - 200)
    keys: set[str] = set()
    for m in (nodes[3], nodes[1]):
        for k in range(4):
            try:
                keys.add(m.service.env_encrypt_pubkey(app_id.hex()).public_key)
                break
            except KmsUsageError:
                if k == 3:
                    raise
                time.sleep(0.2)
    assert len(keys) == 1
    for i in (1, 2, 3, 4):
        rec = _env(nodes[i]).store.record(1, app_id)
        assert rec is not None and rec[1] and rec[0].commitments != a
        assert tx.x25519_public_key(rec[0].commitments).hex() in keys
