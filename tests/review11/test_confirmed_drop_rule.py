"""Review 11: r8-fix2 (R8-2) — the rule that drops a member's CONFIRMED env share
(`EnvKeys._settle_confirmed`: n − t + 1 answers without it and exactly one other sharing with t confirmed
claimants), against t − 1 colluders that answer the `held` poll as they like and a network (or host) that
drops any set of answers.

Held (exhaustive at 2-of-3, 3-of-5, 2-of-5, 3-of-6 and 4-of-7): while the polling member and the other
honest members holding its sharing are t, no choice of the colluders' answers (nothing, the live sharing,
a sharing X or Y claimed confirmed or tentative, or silence), no set of dropped answers and no state of the
honest non-holders (nothing, X tentative or confirmed) drops it. A replayed `held` answer (another app's,
round's or epoch's commitments) is one of these claims: the poll travels inside the RA-TLS channel, so only
a member can put one there. The flip side (by reading, the residual of R7-1 the docs name): a sharing with
fewer than t honest holders can be dropped by the colluders' claims, by design."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from teecloud.kms.threshold_env import EnvKeys

S, X, Y = (bytes([1]) * 32,), (bytes([2]) * 32,), (bytes([3]) * 32,)
# a member's answer to `held`: None = not answered (dropped or silent), () = holds nothing,
# (sharing, confirmed?) = claims it
_ANSWERS: list[Any] = [None, (), (S, True), (X, True), (X, False), (Y, True)]
_HONEST_NON_HOLDER: list[Any] = [(), (X, True), (X, False)]


class _Store:
    def __init__(self) -> None:
        self.dropped: list[Any] = []

    def drop_superseded(self, epoch: int, app_id: bytes, commitments: Any) -> None:
        self.dropped.append(commitments)


def _env(t: int, n: int) -> tuple[EnvKeys, _Store]:
    env = object.__new__(EnvKeys)
    env.index, env.t, env.n = 1, t, n
    store = _Store()
    env.store = store  # type: ignore[assignment]
    return env, store


def _poll(answers: dict[int, Any]) -> tuple[dict[Any, list[int]], dict[Any, list[int]], int]:
    """What `_poll` makes of these answers (claims, confirmed claimants, how many answered)."""
    claims: dict[Any, list[int]] = {}
    confirmed: dict[Any, list[int]] = {}
    answered = 0
    for i, a in sorted(answers.items()):
        if a is None:
            continue
        answered += 1
        if a:
            claims.setdefault(a[0], []).append(i)
            if a[1]:
                confirmed.setdefault(a[0], []).append(i)
    return claims, confirmed, answered


@pytest.mark.parametrize(("t", "n"), [(2, 3), (3, 5), (2, 5), (3, 6), (4, 7)])
def test_t_minus_1_colluders_and_dropped_answers_never_drop_a_sharing_t_honest_members_hold(
    t: int, n: int
) -> None:
    others = list(range(2, n + 1))
    colluders = others[-(t - 1) :]
    honest = [i for i in others if i not in colluders]
    states = 0
    for holders_n in range(t - 1, len(honest) + 1):  # honest holders besides member 1: at least t - 1
        holders, non_holders = honest[:holders_n], honest[holders_n:]
        for non in itertools.product(_HONEST_NON_HOLDER, repeat=len(non_holders)):
            for lies in itertools.product(_ANSWERS, repeat=len(colluders)):
                for dropped in itertools.product((False, True), repeat=len(honest)):
                    answers: dict[int, Any] = {i: (S, True) for i in holders}
                    answers.update(dict(zip(non_holders, non, strict=True)))
                    answers.update(dict(zip(colluders, lies, strict=True)))
                    for i, gone in zip(honest, dropped, strict=True):
                        if gone:
                            answers[i] = None
                    env, store = _env(t, n)
                    claims, confirmed, answered = _poll(answers)
                    mine = SimpleNamespace(commitments=S)
                    kept = not env._settle_confirmed(1, b"\x00" * 20, mine, claims, confirmed, answered)  # type: ignore[arg-type]
                    assert kept and store.dropped == [], (t, n, answers)
                    states += 1
    assert states > 0


def test_control_a_sharing_without_t_honest_holders_is_dropped_for_the_confirmed_one() -> None:
    """The rule does fire (so the test above could fail): 3-of-5, member 1 alone holds S; members 2, 3 hold
    X confirmed, colluders 4, 5 claim X confirmed."""
    env, store = _env(3, 5)
    answers = {2: (X, True), 3: (X, True), 4: (X, True), 5: (X, True)}
    claims, confirmed, answered = _poll(answers)
    mine = SimpleNamespace(commitments=S)
    assert env._settle_confirmed(1, b"\x00" * 20, mine, claims, confirmed, answered)  # type: ignore[arg-type]
    assert store.dropped == [S]
