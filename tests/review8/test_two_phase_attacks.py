"""Review 8: the two-phase commit of env sharings (R7-1's open part, branch r71-anchor) under the attacker's
steps: a coordinator that stops after 1..t-1 commits followed by a second ceremony that skips the
holders; the host replaying a dropped tentative file after the app's sharing exists, or deleting a
confirmed one; and the states where a member keeps a CONFIRMED share of a sharing that is not the app's:
one host deleting its own tentative file at the wrong time (no colluder), and t - 1 colluding dealers
(the residual documented as open). 3-of-5, q = 4, members in this process over real listeners."""

from __future__ import annotations

import random
import secrets

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.threshold_env import EnvKeyBusy, ceremony_quorum
from tests.kms.conftest import World
from tests.kms.test_threshold_env_two_phase import _ask, _env, _partial_ceremony, _stage
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow


def _restart_store(m: Member) -> None:
    """What a restart does to the store: its in-memory copy of the sealed records is gone."""
    store = _env(m).store
    with store._lock:
        store._cache.clear()


def _held(nodes: dict[int, Member], app_id: bytes) -> dict[int, tuple[bytes, bool] | None]:
    """Per member: (the first commitment of its sealed share, confirmed?) or None."""
    out: dict[int, tuple[bytes, bool] | None] = {}
    for i, m in nodes.items():
        rec = _env(m).store.record(1, app_id)
        out[i] = None if rec is None else (rec[0].commitments[0], rec[1])
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_a_second_ceremony_that_skips_the_tentative_holders_is_refused_by_the_quorum(
    world: World, members_3of5: dict[int, Member], k: int
) -> None:
    """Coordinator (member 4) runs A among {1..4}, commits on members 1..k (k < t) and stops; then it runs
    B among the members that hold nothing of A, skipping the holders: with k = 1 that is {2,3,4,5} (a
    quorum: allowed, A's holder drops A as superseded/orphan and recovers B), with k = 2 only {3,4,5}
    (below q = 4: every member refuses the view). Either way no honest member ends with two keys."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name=f"r8-skip-{k}")))
    a = _partial_ceremony(nodes, app_id, [1, 2, 3, 4], list(range(1, k + 1)), [])
    rest = [i for i in range(1, 6) if i > k]
    base: dict[str, object] = {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex()}
    deals = {i: _stage(nodes[i], {**base, "stage": "deal"}) for i in rest}
    assert not any(d.held for d in deals.values())
    view = {str(i): deals[i].commitments for i in rest}
    if len(rest) < ceremony_quorum(3, 5):
        for i in rest:
            with pytest.raises(KmsUsageError, match="at least 4"):
                _stage(nodes[i], {**base, "stage": "view", "view": view})
        assert all(_env(nodes[i]).store.record(1, app_id) is None for i in rest)
        return
    for i in rest:  # the coordinator drives B with these dealings: its own helper again, new session
        _stage(nodes[i], {**base, "stage": "abort"})
    b = _partial_ceremony(nodes, app_id, rest, rest, rest)  # B committed and confirmed on {2..5}
    assert b != a
    keys = {_ask(m, app_id) for m in nodes.values()}  # member 1: A dropped (superseded), B recovered
    assert keys == {tx.x25519_public_key(b).hex()}
    assert _held(nodes, app_id) == {i: (b[0], True) for i in range(1, 6)}


def test_the_host_replaying_a_dropped_tentative_file_gets_it_dropped_again_and_deleting_is_repaired(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """A committed on member 1 only (orphan). The host keeps member 1's sealed A file. The next request
    (member 5) makes B everywhere; member 1 drops A and recovers B. The host writes A's file back over
    member 1's B file and restarts it: member 1 serves neither a partial nor a key from A, drops it again
    and answers B. Then the host deletes member 2's confirmed B file: member 2 recovers B."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r8-replay")))
    a = _partial_ceremony(nodes, app_id, [1, 2, 3, 4], [1], [])
    path1 = _env(nodes[1]).store._path(1, app_id)
    old = path1.read_bytes()
    key_b = _ask(nodes[5], app_id)
    b_key_everywhere = {_ask(m, app_id) for m in nodes.values()}
    assert b_key_everywhere == {key_b} and key_b != tx.x25519_public_key(a).hex()
    path1.write_bytes(old)  # the replay
    _restart_store(nodes[1])
    assert _held(nodes, app_id)[1] == (a[0], False)
    point = tx.x25519_public_key(tx.dkg_local(2, 3)[0].commitments)
    answer = _env(nodes[1]).partial(1, app_id, point)  # settles first: A superseded, B recovered
    assert answer.commitments == [c.hex() for c in _env(nodes[5]).store.get(1, app_id).commitments]  # type: ignore[union-attr]
    assert _ask(nodes[1], app_id) == key_b
    _env(nodes[2]).store._path(1, app_id).unlink()  # the host deletes a confirmed share
    _restart_store(nodes[2])
    assert _ask(nodes[2], app_id) == key_b
    assert {v for v in _held(nodes, app_id).values()} == {
        (_env(nodes[5]).store.get(1, app_id).commitments[0], True)
    }  # type: ignore[union-attr]


def _stranded(nodes: dict[int, Member], app_id: bytes) -> tuple[bytes, ...]:
    """After the scenario: every member's first need, then the state of the app's shares. Returns the
    sharing the members other than 1 answer with (the app's)."""
    for i in (2, 3, 4, 5):
        _ask(nodes[i], app_id)
    share = _env(nodes[2]).store.get(1, app_id)
    assert share is not None
    for i in (3, 4, 5):
        other = _env(nodes[i]).store.get(1, app_id)
        assert other is not None and other.commitments == share.commitments
    return share.commitments


def _member_1_serves_only_the_apps_sharing(
    nodes: dict[int, Member], app_id: bytes, app: tuple[bytes, ...]
) -> None:
    point = tx.x25519_public_key(tx.dkg_local(2, 3)[0].commitments)
    try:
        answer = _env(nodes[1]).partial(1, app_id, point)
    except (AccessDenied, KmsUsageError):
        answer = None
    served = None if answer is None else tuple(bytes.fromhex(c) for c in answer.commitments)
    assert served in (None, app), "member 1 answers partials from a sharing that is not the app's"
    mine = _env(nodes[1]).store.record(1, app_id)
    assert mine is None or mine[0].commitments == app, "member 1 keeps a confirmed share of a dead sharing"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="R8-2 open: a confirmed share is never dropped, so a member that promoted a sharing which then "
    "lost a holder keeps it beside the app's new sharing for ever (partials from it, no env key)",
)
def test_one_hosts_deletion_does_not_leave_a_member_a_confirmed_share_of_a_dead_sharing(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """No colluder. The coordinator (member 4) of ceremony A among {1..4} commits on members 1, 2, 3 (t)
    and crashes before its own commit and every confirm. Member 1's first need promotes A (3 holders).
    Member 3's host deletes its tentative A file (or its disk is lost) before member 3 settles. Member 2's
    first need: A has 2 holders, 3 members answer without it: an orphan, dropped. The next request makes
    B among {2..5}. Member 1 keeps A, confirmed, for ever."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r8-dead-sharing")))
    a = _partial_ceremony(nodes, app_id, [1, 2, 3, 4], [1, 2, 3], [])
    _stage(
        nodes[1], {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex(), "stage": "confirm"}
    )
    assert _held(nodes, app_id)[1] == (a[0], True)
    _env(nodes[3]).store._path(1, app_id).unlink()
    _restart_store(nodes[3])
    app = _stranded(nodes, app_id)
    assert app != a
    _member_1_serves_only_the_apps_sharing(nodes, app_id, app)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="R7-1's residual, still open (docs/kms.md 'Two-phase commit'): t - 1 colluding dealers lift an "
    "orphan to t claimants; its honest holder promotes it and keeps it beside the app's sharing",
)
def test_t_minus_1_colluding_dealers_cannot_leave_an_honest_member_a_share_that_is_not_the_apps(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """Colluders 4 and 5 (t - 1 = 2). Member 4 coordinates A among {1,2,4,5}, commits on 1 (honest) and
    on 4 and 5 themselves, and stops. Member 1's first need: 3 claimants (itself, 4, 5): promoted. The
    colluders then drop their own A shares and deal honestly in the next request's ceremony B among
    {2..5}. Member 1 holds a confirmed share of A, which nobody else holds any more."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r8-colluders")))
    a = _partial_ceremony(nodes, app_id, [1, 2, 4, 5], [1, 4, 5], [])
    _stage(
        nodes[1], {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex(), "stage": "confirm"}
    )
    assert _held(nodes, app_id)[1] == (a[0], True)
    for i in (4, 5):  # the colluders forget A
        _env(nodes[i]).store.drop_tentative(1, app_id, a)
    app = _stranded(nodes, app_id)
    assert app != a
    _member_1_serves_only_the_apps_sharing(nodes, app_id, app)


@pytest.mark.parametrize("seed", range(4))
def test_generated_crash_points_and_host_replays_never_give_two_served_keys(
    world: World, members_3of5: dict[int, Member], seed: int
) -> None:
    """Generated around the steps above (no liar): which members got `commit` and `confirm` of ceremony A,
    a first request at a random member, then the host writes a committed member's earlier sealed bytes
    back (its tentative A) and restarts it, at one or two members; then requests at every member. Held:
    every member that answers a key answers it from its own confirmed share, and all answer the same key."""
    rng = random.Random(1000 + seed)
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name=f"r8-replay-gen{seed}")))
    dealers = sorted(rng.sample(range(1, 6), 4))
    commit_on = sorted(rng.sample(dealers, rng.randint(1, 4)))
    confirm_on = sorted(rng.sample(commit_on, rng.randint(0, len(commit_on))))
    _partial_ceremony(nodes, app_id, dealers, commit_on, [])
    kept = {i: _env(nodes[i]).store._path(1, app_id).read_bytes() for i in commit_on}  # the host's copies
    for i in confirm_on:
        _stage(
            nodes[i],
            {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex(), "stage": "confirm"},
        )
    try:
        _ask(nodes[rng.randint(1, 5)], app_id, tries=2)
    except (EnvKeyBusy, KmsUsageError, AccessDenied):
        pass
    for i in rng.sample(sorted(kept), min(len(kept), rng.randint(1, 2))):
        _env(nodes[i]).store._path(1, app_id).write_bytes(kept[i])
        _restart_store(nodes[i])
    keys: dict[int, str] = {}
    for i in range(1, 6):
        try:
            keys[i] = _ask(nodes[i], app_id, tries=2)
        except (EnvKeyBusy, KmsUsageError, AccessDenied):
            continue
    for i, key in keys.items():
        share = _env(nodes[i]).store.get(1, app_id)
        assert share is not None and tx.x25519_public_key(share.commitments).hex() == key
    assert len(set(keys.values())) <= 1, (seed, dealers, commit_on, confirm_on, keys)
    assert keys, (seed, dealers, commit_on, confirm_on)  # with everyone honest and up, the app has its key
