"""Review 9, R9-1 and R9-2: who a failed env-key ceremony try leaves out of the next one.

R9-1: a withholder that names the one member it withheld from (each names the other in one round) must not
get both left out when that leaves fewer than q dealers; t - 1 colluders doing so must not block a committee
with q honest members up. Driven as `_ceremony_run` drives `EnvKeys._leave_out` (one `left_out`/`accused`
per request, one call per failed try, at most n + 1 tries), against generated liar strategies.

R9-2: a member whose `view` answer carries another view hash, or whose `finish` answer carries other
commitments, fails its stage (`_Withheld`), so the next try leaves it out (was: a KmsUsageError that left
nobody out)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import SimpleNamespace

import pytest

from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.threshold_env import EnvKeys, _Withheld, ceremony_quorum


def _leave_out(me: int, n: int, accused_now: Mapping[int, int], left_out: dict[int, str], acc: dict) -> None:  # type: ignore[type-arg]
    """One failed finish round where each member of `accused_now` answered naming that dealer."""
    failed = {i: f"names dealer {d}" for i, d in accused_now.items()}
    EnvKeys._leave_out(
        SimpleNamespace(index=me, n=n), _Withheld("finish", failed, accused_now), left_out, acc
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(("t", "n"), [(3, 5), (2, 5)])
def test_a_mutual_accusation_leaves_one_of_the_two_out_and_the_liars_next_move_swaps(t: int, n: int) -> None:
    """Every coordinator, liar and victim at n - q = 1: the pair naming each other leaves one out (q remain).
    Then the liar's next move, whichever was left out: naming another member (each names the other
    again), or withholding silently from another member (who names it), leaves the liar alone out."""
    q = ceremony_quorum(t, n)
    for me in range(1, n + 1):
        for liar in [i for i in range(1, n + 1) if i != me]:
            for victim in [v for v in range(1, n + 1) if v not in (me, liar)]:
                for silent in (False, True):
                    left_out: dict[int, str] = {}
                    acc: dict[int, set[int]] = {}
                    _leave_out(me, n, {victim: liar, liar: victim}, left_out, acc)
                    assert len(left_out) == 1 and set(left_out) <= {liar, victim}, (me, liar, victim)
                    assert n - len(left_out) >= q
                    if liar in left_out:
                        continue
                    other = min(i for i in range(1, n + 1) if i not in (me, liar, victim))
                    _leave_out(me, n, {other: liar} if silent else {other: liar, liar: other}, left_out, acc)
                    assert set(left_out) == {liar}, (me, liar, victim, silent, left_out)


def test_the_coordinator_named_twice_by_different_withholders_is_never_left_out() -> None:
    """At 3-of-7 colluders 6 and 7 withhold from the coordinator in turn: it names 6, then 7. Its own word
    counts (it knows its stage): both are left out, the coordinator never (a repeat accuser used to be)."""
    left_out: dict[int, str] = {}
    acc: dict[int, set[int]] = {}
    _leave_out(1, 7, {1: 6}, left_out, acc)
    assert set(left_out) == {6}
    _leave_out(1, 7, {1: 7, 7: 1}, left_out, acc)
    assert set(left_out) == {6, 7}


def _request(rng: random.Random, t: int, n: int, liars: set[int], me: int) -> tuple[bool, int]:
    """One request against `liars` that act in every try they are dealt in (a try nobody fails makes the key):
    each withholds its sub-share from some honest dealers (each victim names the lowest dealer that
    withheld from it, as `_finish` fetches in order) and answers its own finish naming a dealer of its
    choice, another liar, nobody (fails), or nothing (finishes, caught by its victims). Returns whether a
    try ran with no liar, and the largest number of honest members ever left out."""
    q = ceremony_quorum(t, n)
    left_out: dict[int, str] = {}
    acc: dict[int, set[int]] = {}
    worst = 0
    for _ in range(n + 1):
        dealing = [i for i in range(1, n + 1) if i not in left_out]
        if len(dealing) < q:
            return False, worst
        acting = sorted(liars & set(dealing))
        if not acting:
            return True, worst
        honest = [i for i in dealing if i not in liars and i != me]
        names: dict[int, int] = {}
        failed_alone: dict[int, str] = {}
        withheld_from: dict[int, list[int]] = {}
        for liar in acting:
            victims = rng.sample(honest, k=min(len(honest), rng.choice([0, 1, 1, 2])))
            for v in victims:
                withheld_from.setdefault(v, []).append(liar)
            move = rng.choice(["victim", "victim", "other", "liar", "fail", "quiet"])
            if move == "victim" and victims:
                names[liar] = victims[0]
            elif move in ("other", "victim") and honest:
                names[liar] = rng.choice(honest)
            elif move == "liar" and len(acting) > 1:
                names[liar] = rng.choice([x for x in acting if x != liar])
            elif move == "fail" or not victims:
                failed_alone[liar] = "the ceremony fails here"
        for v, by in withheld_from.items():
            names[v] = min(by)
        failed = {**failed_alone, **{i: f"names dealer {d}" for i, d in names.items()}}
        EnvKeys._leave_out(SimpleNamespace(index=me, n=n), _Withheld("finish", failed, names), left_out, acc)  # type: ignore[arg-type]
        assert me not in left_out
        worst = max(worst, len(set(left_out) - liars))
    return False, worst


@pytest.mark.parametrize(
    ("t", "n", "k"), [(3, 5, 1), (2, 5, 1), (3, 7, 2), (4, 7, 2), (5, 9, 3), (3, 6, 2), (4, 9, 3)]
)
def test_generated_liar_strategies_never_leave_fewer_than_q_honest_and_the_key_is_made(
    t: int, n: int, k: int
) -> None:
    """k = n - q liars (at most t - 1: with more, fewer than q honest members exist), 300 generated requests
    each: the members left out never leave fewer than q dealing while some liar is dealt in (honest ones out
    never outnumber the liars), and within the request's n + 1 tries a try runs with no liar (the key)."""
    q = ceremony_quorum(t, n)
    assert k == n - q and k <= t - 1
    rng = random.Random(f"r9-1 {t} {n}")
    for _ in range(300):
        liars = set(rng.sample(range(1, n + 1), k))
        me = rng.choice([i for i in range(1, n + 1) if i not in liars])
        made, worst = _request(rng, t, n, liars, me)
        assert made, (liars, me)
        assert worst <= k


class _Stages:
    """`EnvKeys._ceremony_stages`'s view of the members: canned answers per stage (member 5 lies)."""

    def __init__(self, lie: str) -> None:
        self.index, self.t, self.n, self.peers, self.lie = 1, 3, 5, {}, lie
        self.dealing = tx.dkg_local(3, 5)[0].commitments
        self.asked: list[str] = []

    def _each(
        self, body: dict[str, object], members: list[int]
    ) -> tuple[dict[int, api.PeerEnvDkgResponse], dict]:  # type: ignore[type-arg]
        stage = str(body["stage"])
        self.asked.append(stage)
        out = {}
        for i in members:
            a = api.PeerEnvDkgResponse(index=i, stage=stage)
            a.view_hash = "00" * 32 if (stage, i) == ("view", 5) and self.lie == "view" else "11" * 32
            a.commitments = [c.hex() for c in self.dealing]
            if (stage, i) == ("finish", 5) and self.lie == "finish":
                a.commitments = [c.hex() for c in tx.dkg_local(3, 5)[0].commitments]
            out[i] = a
        return out, {}


@pytest.mark.parametrize("lie", ["view", "finish"])
def test_a_stage_answered_with_other_values_is_that_members_failure(lie: str) -> None:
    """R9-2: member 5 answers `view` with another view hash, or `finish` with other commitments: the stage
    raises _Withheld naming member 5 alone (so `_leave_out` leaves it out), before any commit."""
    me = _Stages(lie)
    deals = {i: api.PeerEnvDkgResponse(index=i, stage="deal") for i in range(1, 6)}
    base: dict[str, object] = {"session": "ab" * 16, "epoch": 1, "app_id": "cd" * 32}
    with pytest.raises(_Withheld) as err:
        EnvKeys._ceremony_stages(me, base, deals, [1, 2, 3, 4, 5])  # type: ignore[arg-type]
    assert err.value.stage == lie and set(err.value.failed) == {5} and not err.value.accused
    assert "commit" not in me.asked
    left_out: dict[int, str] = {}
    EnvKeys._leave_out(SimpleNamespace(index=1, n=5), err.value, left_out, {})  # type: ignore[arg-type]
    assert set(left_out) == {5}


def test_the_cover_search_is_bounded_and_always_covers_every_accusation() -> None:
    """64 members, 31 liars each naming a different honest member per try for 64 tries (far beyond what the
    search explores): the search stops at its branch bound, and the set it returns (greedy then) still holds
    an end of every accusation and never the coordinator; small cases stay exact (the liars, not more)."""
    import time

    from teecloud.kms.threshold_env import _smallest_cover

    rng = random.Random(64)
    liars = set(range(34, 65))
    accused: dict[int, set[int]] = {}
    for _ in range(64):
        for liar in liars:
            accused.setdefault(rng.randint(2, 33), set()).add(liar)
    started = time.monotonic()
    cover = _smallest_cover(accused, 1, 63)
    assert time.monotonic() - started < 30
    assert 1 not in cover
    assert all(a in cover or d in cover for d, who in accused.items() for a in who)
    assert _smallest_cover({2: {6}, 3: {6}, 4: {7}, 5: {7}}, 1, 6) == {6, 7}
    assert _smallest_cover({1: {6}, 6: {6}, 2: {7}}, 1, 6) == {6, 2}
