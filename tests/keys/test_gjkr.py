"""GJKR's complaint phase (keys.threshold.gjkr_answers / gjkr_qualify): Gennaro, Jarecki, Krawczyk, Rabin,
J. Cryptology 2007, Fig. 2 steps 1(b)-(c), 2, 3, as pure functions — every receiver decides the same QUAL
from the same complaints and answers, the key is the sum over QUAL, and a dealer is disqualified for too
many complaints or a missing or wrong answer."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from teecloud.keys import threshold as th

T, N = 3, 5


def _secret_of(shares: dict[int, int]) -> int:
    lam = th.lagrange_at_zero(sorted(shares)[:T])
    return sum(lam[i] * shares[i] for i in sorted(shares)[:T]) % th.GROUP_ORDER


def _run(
    dealings: list[th.Dealing],
    *,
    sent: Callable[[int, int], int] | None = None,
    extra_complaints: dict[int, list[int]] | None = None,
    answer: Callable[[th.Dealing, list[int]], dict[int, int]] | None = None,
) -> dict[int, th.DkgOutcome]:
    """One round with every message passed in memory: `sent(dealer, receiver)` what each dealer sends,
    `extra_complaints` false complaints, `answer(dealing, complainers)` each dealer's answer."""
    received = {
        r: {d.dealer: (sent(d.dealer, r) if sent else d.shares[r]) for d in dealings} for r in range(1, N + 1)
    }
    complaints: dict[int, list[int]] = {}
    for r in range(1, N + 1):
        _, mine = th.joint_feldman(dealings, r, received[r])
        complaints[r] = sorted(set(mine) | set((extra_complaints or {}).get(r, [])))
    answers = {
        d.dealer: (answer or (lambda dd, js: th.gjkr_answers(dd, js, T)))(
            d, [j for j, a in complaints.items() if d.dealer in a]
        )
        for d in dealings
    }
    return {r: th.gjkr_qualify(dealings, r, received[r], complaints, answers, T) for r in range(1, N + 1)}


def _agree(outcomes: dict[int, th.DkgOutcome], dealings: list[th.Dealing]) -> th.DkgOutcome:
    first = outcomes[1]
    assert all((o.qual, o.commitments) == (first.qual, first.commitments) for o in outcomes.values())
    for r, o in outcomes.items():
        assert th.verify_share(o.commitments, r, o.share)
    # the key is the sum over QUAL: C_0 = Σ_{i∈QUAL} C_{i,0}, and any t shares interpolate to its secret
    by = {d.dealer: d for d in dealings}
    assert first.commitments == th.sum_commitments([by[i] for i in first.qual])
    shares = {r: o.share for r, o in outcomes.items()}
    for subset in itertools.combinations(range(1, N + 1), T):
        assert th._mul_base(_secret_of({i: shares[i] for i in subset})) == first.commitments[0]
    return first


def _dealings() -> list[th.Dealing]:
    return [th.deal(None, T, N, dealer=d) for d in range(1, N + 1)]


def test_honest_round_qualifies_everyone() -> None:
    dealings = _dealings()
    out = _agree(_run(dealings), dealings)
    assert out.qual == (1, 2, 3, 4, 5) and out.disqualified == {}


def test_a_bad_subshare_answered_correctly_keeps_the_dealer_and_the_receiver_takes_the_answer() -> None:
    dealings = _dealings()
    outcomes = _run(dealings, sent=lambda i, r: dealings[i - 1].shares[r] + (7 if (i, r) == (2, 4) else 0))
    out = _agree(outcomes, dealings)
    assert out.qual == (1, 2, 3, 4, 5)
    # receiver 4's share is the honest sum: it took dealer 2's revealed value
    assert outcomes[4].share == sum(d.shares[4] for d in dealings) % th.GROUP_ORDER


@pytest.mark.parametrize("how", ["silent", "wrong", "other receiver's value"])
def test_a_dealer_answering_wrongly_or_not_at_all_is_disqualified(how: str) -> None:
    dealings = _dealings()

    def answer(d: th.Dealing, js: list[int]) -> dict[int, int]:
        honest = th.gjkr_answers(d, js, T)
        if d.dealer != 3:
            return honest
        if how == "silent":
            return {}
        if how == "wrong":
            return {j: v + 1 for j, v in honest.items()}
        return {j: d.shares[1] for j in honest}

    outcomes = _run(
        dealings, sent=lambda i, r: dealings[i - 1].shares[r] + (i == 3 and r == 5), answer=answer
    )
    out = _agree(outcomes, dealings)
    assert out.qual == (1, 2, 4, 5) and 3 in out.disqualified
    assert out.commitments[0] != th.sum_commitments(dealings)[0]  # the key excludes dealer 3


def test_a_false_complaint_is_cleared_by_the_honest_answer() -> None:
    dealings = _dealings()
    outcomes = _run(dealings, extra_complaints={1: [4]})
    out = _agree(outcomes, dealings)
    assert out.qual == (1, 2, 3, 4, 5)
    assert out.commitments == th.sum_commitments(dealings)


def test_more_than_t_minus_1_complaints_disqualify_and_reveal_nothing() -> None:
    dealings = _dealings()
    outcomes = _run(dealings, sent=lambda i, r: dealings[i - 1].shares[r] + (i == 1 and r <= T))
    out = _agree(outcomes, dealings)
    assert out.qual == (2, 3, 4, 5) and "more than t-1" in out.disqualified[1]
    # an honest dealer with t complaints (false ones) reveals nothing: t values would give its secret
    assert th.gjkr_answers(dealings[1], [1, 2, 3], T) == {}
    assert th.gjkr_answers(dealings[1], [1, 2], T) == {1: dealings[1].shares[1], 2: dealings[1].shares[2]}


def test_fewer_than_t_qualified_fails() -> None:
    dealings = _dealings()
    with pytest.raises(th.ThresholdError, match="only 2 qualified dealers, 3 needed"):
        _run(dealings, sent=lambda i, r: dealings[i - 1].shares[r] + (i <= 3 and r <= T))


def test_a_complaint_naming_a_dealer_outside_the_round_is_refused() -> None:
    dealings = _dealings()
    with pytest.raises(th.ThresholdError, match="not in the round"):
        th.gjkr_qualify(dealings, 1, {d.dealer: d.shares[1] for d in dealings}, {2: [9]}, {}, T)


def test_a_bad_subshare_not_complained_about_is_an_error() -> None:
    dealings = _dealings()
    received = {d.dealer: d.shares[1] for d in dealings}
    received[2] += 1
    with pytest.raises(th.ThresholdError, match="dealer 2 does not verify"):
        th.gjkr_qualify(dealings, 1, received, {}, {}, T)


def test_generated_mutations_of_an_answer_disqualify_its_dealer() -> None:
    """Every mutation of a revealed sub-share (bit flips across the 32 bytes, random values, 0, L, the
    complainer's neighbour's value) fails the commitments: the dealer is disqualified, never kept."""
    dealings = _dealings()
    d2 = dealings[1]
    honest = d2.shares[4]
    rng = random.Random(19)
    mutants = [honest ^ (1 << b) for b in range(256)]
    mutants += [rng.randrange(th.GROUP_ORDER) for _ in range(32)]
    mutants += [0, th.GROUP_ORDER, honest + th.GROUP_ORDER, d2.shares[3], d2.shares[5]]
    received = {d.dealer: d.shares[1] for d in dealings}
    for m in mutants:
        if m == honest:
            continue
        out = th.gjkr_qualify(dealings, 1, received, {4: [2]}, {2: {4: m}}, T)
        assert 2 in out.disqualified and 2 not in out.qual, m
    out = th.gjkr_qualify(dealings, 1, received, {4: [2]}, {2: {4: honest}}, T)
    assert out.qual == (1, 2, 3, 4, 5)


def test_generated_mutations_of_the_complaints_give_one_decision_for_everyone() -> None:
    """Random complaint sets (false complaints from every subset) with honest answers: every receiver
    decides the same QUAL, and it is everyone unless a dealer drew more than t-1 complaints."""
    dealings = _dealings()
    rng = random.Random(7)
    for _ in range(20):
        extra = {r: rng.sample(range(1, N + 1), rng.randrange(0, 3)) for r in range(1, N + 1)}
        counts = {i: sum(i in a for a in extra.values()) for i in range(1, N + 1)}
        expected = tuple(i for i in range(1, N + 1) if counts[i] <= T - 1)
        if len(expected) < T:
            with pytest.raises(th.ThresholdError):
                _run(dealings, extra_complaints=extra)
            continue
        out = _agree(_run(dealings, extra_complaints=extra), dealings)
        assert out.qual == expected
