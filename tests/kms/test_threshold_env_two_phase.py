"""Review 7, R7-1 (the part that was open): a ceremony committed on fewer than t members must not leave them
a share of a sharing that is not the app's one. The fix is a two-phase commit without the chain
(docs/kms.md "Two-phase commit"): a commit seals the share TENTATIVE; a member serves nothing from it
(no signature, no partial, no recovery help) until its own poll of the members shows t of them, itself
included, hold the same commitments (then it is CONFIRMED); a tentative share that fewer than t members
can hold (an orphan), or that a sharing confirmed by t members superseded, is dropped and the app's sharing
recovered. Here: the sealed store (states, atomic promotion, drop, the host replaying files), the settle
decision under generated polls with up to t - 1 lying members, and the attacker's exact steps against
running members (the coordinator stops after 0, 1, … q commits, or before its confirms; a second
ceremony; a member lying in its `held` answers)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.threshold_env import EnvKeyBusy, EnvKeys, EnvKeyStore, ceremony_quorum
from tests.kms import _threshold_env_world
from tests.kms._threshold_env_world import ask_key, env_of, lying_held, partial_ceremony
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

APP = bytes(range(20))
Sharing = tuple[bytes, ...]
members_3of5 = _threshold_env_world.members_3of5  # the committee fixture (tests/review8 uses it too)


def _store(path: Path, index: int, t: int) -> EnvKeyStore:
    return EnvKeyStore(path, lambda b: b, lambda b: b, index=index, t=t)


# --- the sealed store: states, promotion, drop, the host's replays


def test_a_committed_share_is_sealed_tentative_and_served_only_once_confirmed(tmp_path: Path) -> None:
    share = tx.dkg_local(2, 3)[0]
    store = _store(tmp_path, 1, 2)
    store.put(1, APP, share, tentative=True)
    assert store.get(1, APP) is None  # nothing is served from a tentative share
    assert store.record(1, APP) == (share, False)
    assert _store(tmp_path, 1, 2).record(1, APP) == (share, False)  # sealed so (a restart keeps it)
    with pytest.raises(KmsUsageError, match="never replaced"):
        store.put(1, APP, tx.dkg_local(2, 3)[0])  # no second share beside a tentative one
    with pytest.raises(KmsUsageError, match="to confirm"):
        store.confirm(1, APP, tx.dkg_local(2, 3)[0].commitments)  # only its own commitments
    assert store.confirm(1, APP, share.commitments) == share
    assert store.get(1, APP) == share
    assert _store(tmp_path, 1, 2).get(1, APP) == share
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".sealed")]  # no temp file left


def test_only_a_tentative_share_of_those_commitments_is_dropped_with_its_answer(tmp_path: Path) -> None:
    share, other = tx.dkg_local(2, 3)[0], tx.dkg_local(2, 3)[0]
    store = _store(tmp_path, 1, 2)
    store.put(1, APP, share, tentative=True)
    store._answer_path(1, APP).write_bytes(b"{}")
    with pytest.raises(KmsUsageError, match="to drop"):
        store.drop_tentative(1, APP, other.commitments)
    store.drop_tentative(1, APP, share.commitments)
    assert store.record(1, APP) is None and list(tmp_path.iterdir()) == []
    store.put(1, APP, other)  # a recovered share: sealed confirmed
    with pytest.raises(KmsUsageError, match="to drop"):  # a confirmed share is never dropped
        store.drop_tentative(1, APP, other.commitments)
    assert store.get(1, APP) == other


def test_the_host_replaying_a_tentative_or_v2_file_gets_a_share_settled_again_not_served(
    tmp_path: Path,
) -> None:
    """The host's steps: keep the bytes of the tentative file, wait for the promotion, write them back; or
    write a record of the format sealed before the two-phase commit (v2: no state)."""
    share = tx.dkg_local(2, 3)[0]
    store = _store(tmp_path, 1, 2)
    store.put(1, APP, share, tentative=True)
    old = store._path(1, APP).read_bytes()
    store.confirm(1, APP, share.commitments)
    store._path(1, APP).write_bytes(old)
    assert _store(tmp_path, 1, 2).record(1, APP) == (share, False)  # back to tentative: settled anew
    v2 = {
        "format": "teecloud-env-share-v2",
        "epoch": 1,
        "app_id": APP.hex(),
        "share": __import__("json").loads(tx.share_to_json(share)),
    }
    store._path(1, APP).write_bytes(__import__("json").dumps(v2).encode())
    assert _store(tmp_path, 1, 2).record(1, APP) == (share, False)


# --- the settle decision, from generated polls (up to t - 1 members lying)


def _settler(tmp_path: Path, t: int, n: int) -> EnvKeys:
    store = _store(tmp_path, 1, t)

    def no_call(*_a: object) -> None:
        raise AssertionError("no peer call in a settle decision")

    return EnvKeys(
        index=1,
        t=t,
        n=n,
        epochs=lambda: (1,),
        store=store,
        signer=lambda: None,
        connect=no_call,  # type: ignore[arg-type]
        app_registered=lambda _a: None,
    )


@pytest.mark.parametrize("seed", range(300))
def test_liars_cannot_make_a_member_drop_the_apps_sharing_or_promote_over_it(
    tmp_path: Path, seed: int
) -> None:
    """Member 1 holds a tentative share of sharing C. The truth: C is sealed on the members H_C (1 among
    them), another sharing B on H_B (disjoint; only in states the ceremony can reach); some members are
    down; up to t - 1 liars answer anything.
    Whatever the liars say: C is never dropped while t honest members hold it, never promoted while t
    honest members that answer hold B; without liars and with everyone up, C is settled (promoted when t
    hold it, dropped otherwise)."""
    rng = random.Random(seed)
    n = rng.randint(3, 7)
    t = rng.randint(2, n - 1)
    c_share = tx.dkg_local(t, n)[0]
    c, b, z = c_share.commitments, tx.dkg_local(t, n)[0].commitments, tx.dkg_local(t, n)[0].commitments
    others = list(range(2, n + 1))
    rng.shuffle(others)
    liars = set(others[: rng.randint(0, t - 1)]) if rng.random() < 0.7 else set()
    honest = [i for i in others if i not in liars]
    k_c = rng.randint(0, len(honest))
    h_c = set(honest[:k_c]) | {1}
    h_b = set(honest[k_c : k_c + rng.randint(0, len(honest) - k_c)])
    if len(h_c) > n - ceremony_quorum(t, n):
        # unreachable with B: a sharing committed on an honest member had q dealers, none of them an
        # honest holder of C (each answers `deal` with `held`), so at most n - q <= t - 1 of those exist
        h_b = set()
    b_confirmed = rng.random() < 0.7
    down = {i for i in honest if rng.random() < 0.2}
    claims, confirmed, answered = _poll_answers(
        rng, n, down, liars, h_c, h_b, (c, b, z), b_confirmed, liar_p=0.5, c_p=0.3
    )
    env = _settler(tmp_path, t, n)
    env.store.put(1, APP, c_share, tentative=True)
    try:
        out = env._settle(1, APP, c_share, claims, confirmed, answered)
        outcome = "promoted" if out is not None else "dropped"
    except KmsUsageError:
        outcome = "tentative"
    rec = env.store.record(1, APP)
    assert {"promoted": (c_share, True), "dropped": None, "tentative": (c_share, False)}[outcome] == rec
    honest_b_up = len(h_b - down)
    if len(h_c) >= t:
        assert outcome != "dropped", (seed, n, t, liars, h_c, h_b, down)
    if honest_b_up >= t:
        assert outcome != "promoted", (seed, n, t, liars, h_c, h_b, down)
    if not liars and not down and not h_b:
        assert outcome == ("promoted" if len(h_c) >= t else "dropped")
    if not liars and not down and h_b and b_confirmed and len(h_b) >= t and len(h_c) < t:
        assert outcome == "dropped"  # superseded


@pytest.mark.parametrize("seed", range(300))
def test_liars_cannot_make_a_member_drop_a_confirmed_share_of_the_apps_sharing(
    tmp_path: Path, seed: int
) -> None:
    """R8-2: member 1 holds a CONFIRMED share of sharing C, held (either state) by the honest members H_C
    (1 among them); another sharing B on the honest H_B (disjoint), confirmed or not; some honest members
    down; up to t - 1 liars answer anything (C, B or a third sharing, in either state, or nothing).
    Whatever the liars say: C is never dropped while t honest members hold it. Without liars and with
    everyone up, C is dropped exactly when fewer than t hold it and B is confirmed on t; never without
    another sharing confirmed by t claimants."""
    rng = random.Random(50_000 + seed)
    n = rng.randint(3, 7)
    t = rng.randint(2, n - 1)
    c_share = tx.dkg_local(t, n)[0]
    c, b, z = c_share.commitments, tx.dkg_local(t, n)[0].commitments, tx.dkg_local(t, n)[0].commitments
    others = list(range(2, n + 1))
    rng.shuffle(others)
    liars = set(others[: rng.randint(0, t - 1)]) if rng.random() < 0.7 else set()
    honest = [i for i in others if i not in liars]
    k_c = rng.randint(0, len(honest))
    h_c = set(honest[:k_c]) | {1}
    h_b = set(honest[k_c : k_c + rng.randint(0, len(honest) - k_c)])
    b_confirmed = rng.random() < 0.7
    down = {i for i in honest if rng.random() < 0.2}
    claims, confirmed, answered = _poll_answers(
        rng, n, down, liars, h_c, h_b, (c, b, z), b_confirmed, liar_p=0.7, c_p=0.7
    )
    env = _settler(tmp_path, t, n)
    env.store.put(1, APP, c_share)  # confirmed
    dropped = env._settle_confirmed(1, APP, c_share, claims, confirmed, answered)
    assert env.store.record(1, APP) == (None if dropped else (c_share, True))
    case = (seed, n, t, liars, h_c, h_b, b_confirmed, down)
    if len(h_c) >= t:
        assert not dropped, case
    if not any(c2 != c and len(hs) >= t for c2, hs in confirmed.items()):
        assert not dropped, case
    if not liars and not down:
        assert dropped == (len(h_c) < t and b_confirmed and len(h_b) >= t), case


# --- running members: the attacker's exact steps


def _one_sharing_everywhere(nodes: dict[int, Member], app_id: bytes) -> Sharing:
    records = {i: env_of(m).store.record(1, app_id) for i, m in nodes.items()}
    states = {(r[0].commitments, r[1]) for r in records.values() if r is not None}
    assert len(states) == 1 and None not in records.values(), records
    ((sharing, confirmed),) = states
    assert confirmed
    return sharing


@pytest.mark.slow
@pytest.mark.parametrize("k", range(0, 5))
def test_a_coordinator_stopping_after_k_commits_leaves_one_sharing_after_the_next_request(
    world: World, members_3of5: dict[int, Member], k: int
) -> None:
    """3-of-5 (q = 4): ceremony A among {1..4} committed on members 1..k, no confirm sent (the coordinator
    crashed). Fewer than t: A is dropped wherever it was sealed and one new sharing is made; t or more: A
    is promoted and recovered on the rest, never replaced. Either way every member ends with one confirmed
    share, and all answer one key."""
    nodes = members_3of5
    q = ceremony_quorum(3, 5)
    app_id = world.register(compose_hash(dict(HELLO, name=f"two-phase-k{k}")))
    a = partial_ceremony(nodes, app_id, list(range(1, q + 1)), list(range(1, k + 1)), [])
    for i in range(1, k + 1):  # nothing served from the tentative shares meanwhile
        assert env_of(nodes[i]).store.get(1, app_id) is None
        with pytest.raises(AccessDenied, match="holds no env share"):
            env_of(nodes[i]).sign_shares(1, app_id, int(time.time()), [])
    keys = {ask_key(nodes[5], app_id)}  # the next request, at a member that holds nothing
    keys |= {ask_key(m, app_id) for m in nodes.values()}
    sharing = _one_sharing_everywhere(nodes, app_id)
    assert len(keys) == 1 and keys == {tx.x25519_public_key(sharing).hex()}
    assert (sharing == a) == (k >= 3)


@pytest.mark.slow
def test_a_member_never_serves_partials_or_the_key_from_a_tentative_share(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """A sealed on members 1 and 2 (t - 1) and member 5 down (so neither A nor an orphan is provable: 2
    members answer without it, n - t + 1 = 3 are needed): member 1 answers no partial and no env key
    from A, and keeps it tentative; once member 5 is back, member 1's next need drops it."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="two-phase-no-serve")))
    partial_ceremony(nodes, app_id, [1, 2, 3, 4], [1, 2], [])
    url5 = env_of(nodes[1]).peers.pop(5)
    point = tx.x25519_public_key(tx.dkg_local(2, 3)[0].commitments)
    with pytest.raises(AccessDenied, match="not settled"):
        env_of(nodes[1]).partial(1, app_id, point)
    with pytest.raises(EnvKeyBusy, match="not settled"):
        nodes[1].service.env_encrypt_pubkey(app_id.hex())
    assert env_of(nodes[1]).store.record(1, app_id)[1] is False  # type: ignore[index]
    env_of(nodes[1]).peers[5] = url5
    with pytest.raises(AccessDenied, match="no env share of this app to recover"):
        env_of(nodes[1]).partial(1, app_id, point)  # dropped (an orphan); nothing to recover yet
    assert env_of(nodes[1]).store.record(1, app_id) is None


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_generated_crash_points_and_a_lying_member_never_leave_two_served_keys(
    world: World, members_3of5: dict[int, Member], seed: int
) -> None:
    """Generated: which members got `commit` and `confirm` of ceremony A, and t - 1 = 2 liars answering
    `held` polls with A's commitments, another sharing's, or nothing, (tentative or not) at random. Then
    requests at every honest member. Whatever happens: an honest member answers only from a confirmed
    share, and all honest members that answer give the same key."""
    rng = random.Random(seed)
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name=f"two-phase-gen{seed}")))
    dealers = sorted(rng.sample(range(1, 6), 4))
    commit_on = sorted(rng.sample(dealers, rng.randint(0, 4)))
    confirm_on = sorted(rng.sample(commit_on, rng.randint(0, len(commit_on))))
    a = partial_ceremony(nodes, app_id, dealers, commit_on, confirm_on)
    liars = sorted(rng.sample(range(1, 6), 2))
    fake = tx.dkg_local(3, 5)[0].commitments
    for i in liars:
        lying_held(
            nodes[i],
            lambda req, i=i: (
                api.PeerEnvDkgResponse(
                    index=i,
                    stage="held",
                    held=True,
                    commitments=[c.hex() for c in rng.choice([a, fake])],
                    tentative=rng.random() < 0.5,
                )
                if rng.random() < 0.8
                else api.PeerEnvDkgResponse(index=i, stage="held")
            ),
        )
    honest = [i for i in range(1, 6) if i not in liars]
    keys: dict[int, str] = {}
    for i in honest:
        try:
            keys[i] = ask_key(nodes[i], app_id, tries=2)
        except (EnvKeyBusy, KmsUsageError, AccessDenied):
            continue
    for i in keys:  # answered only from its own confirmed share of that key
        share = env_of(nodes[i]).store.get(1, app_id)
        assert share is not None and tx.x25519_public_key(share.commitments).hex() == keys[i]
    assert len(set(keys.values())) <= 1, (seed, dealers, commit_on, confirm_on, liars, keys)


def _poll_answers(
    rng: random.Random,
    n: int,
    down: set[int],
    liars: set[int],
    h_c: set[int],
    h_b: set[int],
    sharings: tuple[Sharing, Sharing, Sharing],
    b_confirmed: bool,
    *,
    liar_p: float,
    c_p: float,
) -> tuple[dict[Sharing, list[int]], dict[Sharing, list[int]], int]:
    """Member 1's poll of members 2..n (those not down): liars claim any of (c, b, z) or nothing, confirmed
    with probability liar_p; holders of c claim it, confirmed with probability c_p; holders of b claim it,
    confirmed as b is. -> (claims, confirmed claims, members that answered)."""
    c, b, z = sharings
    claims: dict[Sharing, list[int]] = {}
    confirmed: dict[Sharing, list[int]] = {}
    answered = 0
    for i in sorted(set(range(2, n + 1)) - down):
        answered += 1
        if i in liars:
            what = rng.choice([c, b, z, None])
            conf = rng.random() < liar_p
        elif i in h_c:
            what, conf = c, rng.random() < c_p
        elif i in h_b:
            what, conf = b, b_confirmed
        else:
            what, conf = None, False
        if what is not None:
            claims.setdefault(what, []).append(i)
            if conf:
                confirmed.setdefault(what, []).append(i)
    return claims, confirmed, answered
