"""Review 8: the two-phase commit of env sharings (R7-1's open part, branch r71-anchor) under the attacker's
steps: a coordinator that stops after 1..t-1 commits followed by a second ceremony that skips the
holders; the host replaying a dropped tentative file after the app's sharing exists, or deleting a
confirmed one; and the states where a member keeps a CONFIRMED share of a sharing that is not the app's:
one host deleting its own tentative file at the wrong time (no colluder), and t - 1 colluding dealers
(the residual documented as open). 3-of-5, q = 4, members in this process over real listeners."""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.threshold_env import EnvKeyBusy, ceremony_quorum
from tests.kms._threshold_env_world import (
    ask_key,
    confirm,
    env_of,
    held_by,
    lying_held,
    partial_ceremony,
    restart_store,
    run_stage,
)
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow
Sharing = tuple[bytes, ...]


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
    a = partial_ceremony(nodes, app_id, [1, 2, 3, 4], list(range(1, k + 1)), [])
    rest = [i for i in range(1, 6) if i > k]
    base: dict[str, object] = {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex()}
    deals = {i: run_stage(nodes[i], {**base, "stage": "deal"}) for i in rest}
    assert not any(d.held for d in deals.values())
    view = {str(i): deals[i].commitments for i in rest}
    if len(rest) < ceremony_quorum(3, 5):
        for i in rest:
            with pytest.raises(KmsUsageError, match="at least 4"):
                run_stage(nodes[i], {**base, "stage": "view", "view": view})
        assert all(env_of(nodes[i]).store.record(1, app_id) is None for i in rest)
        return
    for i in rest:  # the coordinator drives B with these dealings: its own helper again, new session
        run_stage(nodes[i], {**base, "stage": "abort"})
    b = partial_ceremony(nodes, app_id, rest, rest, rest)  # B committed and confirmed on {2..5}
    assert b != a
    keys = {ask_key(m, app_id) for m in nodes.values()}  # member 1: A dropped (superseded), B recovered
    assert keys == {tx.x25519_public_key(b).hex()}
    assert held_by(nodes, app_id) == {i: (b[0], True) for i in range(1, 6)}


def test_the_host_replaying_a_dropped_tentative_file_gets_it_dropped_again_and_deleting_is_repaired(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """A committed on member 1 only (orphan). The host keeps member 1's sealed A file. The next request
    (member 5) makes B everywhere; member 1 drops A and recovers B. The host writes A's file back over
    member 1's B file and restarts it: member 1 serves neither a partial nor a key from A, drops it again
    and answers B. Then the host deletes member 2's confirmed B file: member 2 recovers B."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r8-replay")))
    a = partial_ceremony(nodes, app_id, [1, 2, 3, 4], [1], [])
    path1 = env_of(nodes[1]).store._path(1, app_id)
    old = path1.read_bytes()
    key_b = ask_key(nodes[5], app_id)
    b_key_everywhere = {ask_key(m, app_id) for m in nodes.values()}
    assert b_key_everywhere == {key_b} and key_b != tx.x25519_public_key(a).hex()
    path1.write_bytes(old)  # the replay
    restart_store(nodes[1])
    assert held_by(nodes, app_id)[1] == (a[0], False)
    point = tx.x25519_public_key(tx.dkg_local(2, 3)[0].commitments)
    answer = env_of(nodes[1]).partial(1, app_id, point)  # settles first: A superseded, B recovered
    assert answer.commitments == [c.hex() for c in env_of(nodes[5]).store.get(1, app_id).commitments]  # type: ignore[union-attr]
    assert ask_key(nodes[1], app_id) == key_b
    env_of(nodes[2]).store._path(1, app_id).unlink()  # the host deletes a confirmed share
    restart_store(nodes[2])
    assert ask_key(nodes[2], app_id) == key_b
    assert {v for v in held_by(nodes, app_id).values()} == {
        (env_of(nodes[5]).store.get(1, app_id).commitments[0], True)
    }  # type: ignore[union-attr]


def _stranded(nodes: dict[int, Member], app_id: bytes) -> tuple[bytes, ...]:
    """After the scenario: every member's first need, then the state of the app's shares. Returns the
    sharing the members other than 1 answer with (the app's)."""
    for i in (2, 3, 4, 5):
        ask_key(nodes[i], app_id)
    share = env_of(nodes[2]).store.get(1, app_id)
    assert share is not None
    for i in (3, 4, 5):
        other = env_of(nodes[i]).store.get(1, app_id)
        assert other is not None and other.commitments == share.commitments
    return share.commitments


def _member_1_serves_only_the_apps_sharing(
    nodes: dict[int, Member], app_id: bytes, app: tuple[bytes, ...]
) -> None:
    point = tx.x25519_public_key(tx.dkg_local(2, 3)[0].commitments)
    try:
        answer = env_of(nodes[1]).partial(1, app_id, point)
    except (AccessDenied, KmsUsageError):
        answer = None
    served = None if answer is None else tuple(bytes.fromhex(c) for c in answer.commitments)
    assert served in (None, app), "member 1 answers partials from a sharing that is not the app's"
    mine = env_of(nodes[1]).store.record(1, app_id)
    assert mine is None or mine[0].commitments == app, "member 1 keeps a confirmed share of a dead sharing"


def _promoted_then_stranded(
    nodes: dict[int, Member],
    app_id: bytes,
    dealers: list[int],
    commit_on: list[int],
    forget: list[int],
    lie: Callable[[Sharing], None] | None = None,
) -> tuple[Sharing, Sharing, bytes]:
    """The common steps: ceremony A among `dealers` committed on `commit_on` (member 1 among them), no
    confirm from its coordinator; member 1's first need promotes A (t claimants); the members `forget`
    then lose their A file (a host's deletion, or colluders letting go of A); then every other member's
    first need. `lie(A)`, right after the ceremony, sets up what colluders answer. Returns A, the sharing
    members 2..5 answer with (the app's), and member 1's sealed bytes of A as confirmed (what its host can
    write back later)."""
    a = partial_ceremony(nodes, app_id, dealers, commit_on, [])
    if lie is not None:
        lie(a)
    confirm(nodes[1], app_id)
    assert held_by(nodes, app_id)[1] == (a[0], True)
    kept = env_of(nodes[1]).store._path(1, app_id).read_bytes()
    for i in forget:
        env_of(nodes[i]).store._path(1, app_id).unlink()
        restart_store(nodes[i])
    app = _stranded(nodes, app_id)
    assert app != a
    return a, app, kept


def test_one_hosts_deletion_does_not_leave_a_member_a_confirmed_share_of_a_dead_sharing(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """R8-2, no colluder. The coordinator (member 4) of ceremony A among {1..4} commits on members 1, 2, 3
    (t) and crashes before its own commit and every confirm. Member 1's first need promotes A (3 holders).
    Member 3's host deletes its tentative A file (or its disk is lost) before member 3 settles. Member 2's
    first need: A has 2 holders, 3 members answer without it: an orphan, dropped. The next request makes
    B among {2..5}, whose coordinator then has its claimant, member 1, poll again: A is superseded (4
    members answer without it, B has 4 confirmed claimants), dropped, B recovered."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r8-dead-sharing")))
    _, app, _ = _promoted_then_stranded(nodes, app_id, [1, 2, 3, 4], [1, 2, 3], [3])
    _member_1_serves_only_the_apps_sharing(nodes, app_id, app)
    assert env_of(nodes[1]).store.get(1, app_id) is not None  # recovered, not only dropped
    assert ask_key(nodes[1], app_id) == tx.x25519_public_key(app).hex()


def test_the_host_replaying_a_dropped_confirmed_file_gets_it_dropped_again_at_the_next_failed_signature(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """R8-2's drop of a confirmed share, against its own host: the host of member 1 kept the bytes of its
    confirmed A file and writes them back after A was dropped and B recovered, then restarts member 1 (the
    store cannot tell: the file is genuine). Member 1's next env-key request fails its signature round (its
    peers sign only B's key), polls, drops A again and answers B; the other members never move."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r8-dead-sharing-replay")))
    a, app, kept = _promoted_then_stranded(nodes, app_id, [1, 2, 3, 4], [1, 2, 3], [3])
    key = tx.x25519_public_key(app).hex()
    env_of(nodes[1]).store._path(1, app_id).write_bytes(kept)
    restart_store(nodes[1])
    assert held_by(nodes, app_id)[1] == (a[0], True)  # the replayed state, genuine bytes
    assert ask_key(nodes[1], app_id) == key
    assert held_by(nodes, app_id) == {i: (app[0], True) for i in range(1, 6)}
    assert {ask_key(nodes[i], app_id) for i in range(2, 6)} == {key}


def test_t_minus_1_colluding_dealers_that_let_go_of_their_sharing_leave_no_honest_member_a_share_of_it(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """R7-1's residual, the part R8-2's fix closes. Colluders 4 and 5 (t - 1 = 2). Member 4 coordinates A
    among {1,2,4,5}, commits on 1 (honest) and on 4 and 5 themselves, and stops. Member 1's first need: 3
    claimants (itself, 4, 5): promoted. The colluders then drop their own A shares and deal honestly in the
    next request's ceremony B among {2..5}: member 1, polled again, finds A superseded and recovers B."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r8-colluders")))
    _, app, _ = _promoted_then_stranded(nodes, app_id, [1, 2, 4, 5], [1, 4, 5], [4, 5])
    _member_1_serves_only_the_apps_sharing(nodes, app_id, app)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="R7-1's residual, still open (docs/kms.md 'Two-phase commit'): colluders that keep claiming the "
    "dead sharing to its honest holder's polls keep it there (only an on-chain anchor closes this)",
)
def test_t_minus_1_colluders_that_keep_claiming_their_sharing_cannot_leave_an_honest_member_a_share_of_it(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """As above, but colluders 4 and 5 go on answering member 1's `held` polls (only member 1's) with A,
    confirmed: member 1 sees 3 claimants of A and 2 members without it (n - t + 1 = 3 needed), so it keeps
    A beside the app's sharing B."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r8-colluders-claiming")))

    def claim_to_member_1(a: Sharing) -> None:
        for i in (4, 5):
            lying_held(
                nodes[i],
                lambda req, i=i: (
                    api.PeerEnvDkgResponse(
                        index=i, stage="held", held=True, commitments=[c.hex() for c in a], tentative=False
                    )
                    if req.member is not None and req.member.index == 1
                    else None
                ),
            )

    _, app, _ = _promoted_then_stranded(nodes, app_id, [1, 2, 4, 5], [1, 4, 5], [4, 5], claim_to_member_1)
    _member_1_serves_only_the_apps_sharing(nodes, app_id, app)


@pytest.mark.parametrize("lie", ["another sharing", "nothing"])
@pytest.mark.parametrize("member_2_down", [False, True])
def test_the_apps_confirmed_sharing_is_never_dropped_whatever_t_minus_1_colluders_answer(
    world: World, members_3of5: dict[int, Member], lie: str, member_2_down: bool
) -> None:
    """R8-2's negative: the app's sharing is confirmed on every member. Colluders 4 and 5 (t - 1) answer
    every `held` poll with another sharing, confirmed, or with nothing, and send member 1 `confirm` (as a
    ceremony's coordinator would) to make it poll again; member 2 is up, or down for member 1. Member 1
    keeps the app's share and answers its key: at most n - t = 2 members answer without it (3 needed).
    A second `confirm` within RECHECK_S makes member 1 poll nobody (a colluder cannot make it loop)."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name=f"r8-keep-{lie[:7]}-{member_2_down}")))
    key = ask_key(nodes[1], app_id)
    assert {ask_key(m, app_id) for m in nodes.values()} == {key}
    app = held_by(nodes, app_id)
    fake = [c.hex() for c in tx.dkg_local(3, 5)[0].commitments]
    polled: list[int] = []

    def answer(i: int) -> api.PeerEnvDkgResponse:
        polled.append(i)
        if lie == "nothing":
            return api.PeerEnvDkgResponse(index=i, stage="held")
        return api.PeerEnvDkgResponse(index=i, stage="held", held=True, commitments=fake, tentative=False)

    for i in (4, 5):
        lying_held(nodes[i], lambda _req, i=i: answer(i))
    if member_2_down:
        env_of(nodes[1]).peers.pop(2)
    assert confirm(nodes[1], app_id).held
    assert sorted(polled) == [4, 5]  # member 1 did poll again
    assert held_by(nodes, app_id) == app
    assert env_of(nodes[1]).recheck(1, app_id) is None and sorted(polled) == [4, 5]  # RECHECK_S: no poll
    env_of(nodes[1])._rechecked.clear()  # as after RECHECK_S
    assert env_of(nodes[1]).recheck(1, app_id) is None and sorted(polled) == [4, 4, 5, 5]
    assert held_by(nodes, app_id) == app
    assert ask_key(nodes[1], app_id) == key


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
    partial_ceremony(nodes, app_id, dealers, commit_on, [])
    kept = {i: env_of(nodes[i]).store._path(1, app_id).read_bytes() for i in commit_on}  # the host's copies
    for i in confirm_on:
        run_stage(
            nodes[i],
            {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex(), "stage": "confirm"},
        )
    try:
        ask_key(nodes[rng.randint(1, 5)], app_id, tries=2)
    except (EnvKeyBusy, KmsUsageError, AccessDenied):
        pass
    for i in rng.sample(sorted(kept), min(len(kept), rng.randint(1, 2))):
        env_of(nodes[i]).store._path(1, app_id).write_bytes(kept[i])
        restart_store(nodes[i])
    keys: dict[int, str] = {}
    for i in range(1, 6):
        try:
            keys[i] = ask_key(nodes[i], app_id, tries=2)
        except (EnvKeyBusy, KmsUsageError, AccessDenied):
            continue
    for i, key in keys.items():
        share = env_of(nodes[i]).store.get(1, app_id)
        assert share is not None and tx.x25519_public_key(share.commitments).hex() == key
    assert len(set(keys.values())) <= 1, (seed, dealers, commit_on, confirm_on, keys)
    assert keys, (seed, dealers, commit_on, confirm_on)  # with everyone honest and up, the app has its key
