"""Review 10: GJKR's complaint phase on one dealer's board (`ReshareDealer.board`, in-process; the board's
RA-TLS admission is `authorize_kms`, tested by the authors, so an admitted caller is made directly here).

Held: t − 1 colluders that complain falsely against an honest dealer get back exactly the sub-shares they
were sent (nothing of an honest member's), generated over every colluding set at 3-of-5 and 4-of-7 and
over complaint sets that name the dealer or not; t or more complaints reveal nothing; a colluder that reads
the board before every statement is in sees no answer (no rushing), and cannot change its statement after
reading; a statement or confirmation for an index whose sub-share was never taken, a confirmation before
the statement, a statement naming a dealer twice or outside the round are refused (step `dkg`)."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from teecloud.keys import threshold as th
from teecloud.kms.authz import AuthorizedKms
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold import DkgPlan, ReshareDealer


def _admitted() -> AuthorizedKms:
    """An admitted KMS boot (what `authorize_kms` hands the board after RA-TLS; not under attack here)."""
    return object.__new__(AuthorizedKms)


def _round(
    t: int, n: int, dealer: int = 1
) -> tuple[ReshareDealer, DkgPlan, dict[int, int], dict[int, bytes]]:
    """An honest dealer's open round with a complaint phase, every member's sub-share taken: (dealer, plan,
    the sub-share each member received, its board token)."""
    d = ReshareDealer(None)
    plan = DkgPlan(os.urandom(16), 1, tuple(range(1, n + 1)), t, n, complaint_round=True)
    d.open_dkg(plan, dealer)
    kms = _admitted()
    got, tokens = {}, {}
    for j in range(1, n + 1):
        page = d.deal_for(kms, plan.session, j)
        got[j] = int.from_bytes(bytes.fromhex(page.subshare), "little")
        tokens[j] = bytes.fromhex(page.board_token)
    return d, plan, got, tokens


@pytest.mark.parametrize(("t", "n"), [(3, 5), (4, 7)])
def test_false_complaints_by_t_minus_1_colluders_reveal_only_their_own_subshares(t: int, n: int) -> None:
    """Every set of at most t − 1 colluders complains against honest dealer 1 (the rest of the members post
    empty statements): the board reveals, to any reader, exactly the colluders' own sub-shares. Any t or more
    complainers: nothing is revealed (the dealer is out of QUAL anyway)."""
    kms = _admitted()
    for size in range(0, n + 1):
        for colluders in itertools.combinations(range(1, n + 1), size):
            d, plan, got, tokens = _round(t, n)
            for j in range(1, n + 1):
                d.board(kms, plan.session, j, tokens[j], [1] if j in colluders else [])
            for reader in range(1, n + 1):
                board = d.board(kms, plan.session, reader, tokens[reader])
                revealed = {
                    int(j): int.from_bytes(bytes.fromhex(v), "little") for j, v in board.answers.items()
                }
                if size <= t - 1:
                    assert revealed == {j: got[j] for j in colluders}
                else:
                    assert revealed == {}


@pytest.mark.parametrize("seed", range(6))
def test_generated_statements_never_reveal_more_than_t_minus_1_values_or_a_non_complainers(seed: int) -> None:
    """Random statements (naming random dealers of the round, dealer 1 among them or not): the answers on
    dealer 1's board are exactly the complainers' sub-shares when at most t − 1 complain, else none."""
    rng = random.Random(seed)
    kms = _admitted()
    for _ in range(10):
        t, n = rng.choice([(2, 3), (3, 5), (4, 7), (5, 9)])
        d, plan, got, tokens = _round(t, n)
        statements = {
            j: sorted(rng.sample(range(1, n + 1), rng.randint(0, min(3, n)))) for j in range(1, n + 1)
        }
        for j, against in statements.items():
            d.board(kms, plan.session, j, tokens[j], against)
        board = d.board(kms, plan.session, 1, tokens[1])
        complainers = sorted(j for j, a in statements.items() if 1 in a)
        revealed = {int(j): int.from_bytes(bytes.fromhex(v), "little") for j, v in board.answers.items()}
        assert revealed == ({j: got[j] for j in complainers} if len(complainers) <= t - 1 else {})
        assert all(
            th.verify_share(d._rounds[plan.session].dealing.commitments, j, v) for j, v in revealed.items()
        )


def test_a_colluder_reading_early_sees_no_answer_and_cannot_change_its_statement() -> None:
    """Colluder 5 reads dealer 1's board before every statement is in: no answers. Once member 4 (honest,
    say it got a bad sub-share) complained and all posted, colluder 5 cannot turn its empty statement into a
    complaint (that would push dealer 1 past t − 1 and hide the answer) nor post a second confirmation."""
    kms = _admitted()
    d, plan, got, tokens = _round(3, 5)
    for j in (1, 2, 3):
        d.board(kms, plan.session, j, tokens[j], [])
    assert d.board(kms, plan.session, 5, tokens[5]).answers == {}
    d.board(kms, plan.session, 5, tokens[5], [])
    assert d.board(kms, plan.session, 5, tokens[5]).answers == {}  # four of five statements
    d.board(kms, plan.session, 4, tokens[4], [1])
    board = d.board(kms, plan.session, 5, tokens[5])
    assert board.answers == {"4": got[4].to_bytes(32, "little").hex()}
    with pytest.raises(AccessDenied, match="another statement") as e:
        d.board(kms, plan.session, 5, tokens[5], [1])
    assert e.value.step == "dkg"
    d.board(kms, plan.session, 5, tokens[5], None, b"\x01" * 32)
    with pytest.raises(AccessDenied, match="another confirmation"):
        d.board(kms, plan.session, 5, tokens[5], None, b"\x02" * 32)
    assert d.board(kms, plan.session, 1, tokens[1]).complaints == {
        "1": [],
        "2": [],
        "3": [],
        "4": [1],
        "5": [],
    }


def test_board_posts_outside_the_rules_are_refused() -> None:
    """A token of another member or index, an index never dealt, a confirmation first, a dealer named twice or
    outside the round: each refused at step `dkg`, and nothing is recorded."""
    kms = _admitted()
    d = ReshareDealer(None)
    plan = DkgPlan(os.urandom(16), 1, (1, 2, 3, 4, 5), 3, 5, complaint_round=True)
    d.open_dkg(plan, 2)
    tokens = {j: bytes.fromhex(d.deal_for(kms, plan.session, j).board_token) for j in (1, 2, 3)}
    bad = [
        (4, tokens[1], [], None),  # index 4's sub-share never taken: no token of its own
        (1, tokens[2], [], None),  # member 2's token for index 1
        (1, os.urandom(32), [], None),
        (1, tokens[1], None, b"\x00" * 32),  # a confirmation before the statement
        (1, tokens[1], [2, 2], None),
        (1, tokens[1], [6], None),
        (64, tokens[1], [], None),
    ]
    for index, token, complaints, confirm in bad:
        with pytest.raises(AccessDenied) as e:
            d.board(kms, plan.session, index, token, complaints, confirm)
        assert e.value.step == "dkg"
    r = d._rounds[plan.session]
    assert r.complaints == {} and r.confirms == {}
