"""Review 11: t19-dkg — member tokens in `teecloud up`'s first DKG (before: any admitted KMS boot could take
an index first, review 10's note) and the board tokens that follow from them.

Held (the dealer's side, `ReshareDealer`, in-process; the RA-TLS admission is the authors'): a first-DKG
round opened with member token hashes hands share j's sub-share and board token only to the caller that
presents token j — no token, another member's token, a token of another round, one byte changed, are each
refused (step `reshare`) and take nothing (the rightful member still gets its share after them); a share
is handed out once; a board post for index j needs the board token handed out with share j (another
member's, or one of another round, refused at step `dkg`)."""

from __future__ import annotations

import hashlib
import os

import pytest

from teecloud.kms.authz import AuthorizedKms
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold import DkgPlan, ReshareDealer

T, N = 3, 5


def _admitted() -> AuthorizedKms:
    return object.__new__(AuthorizedKms)


def _opened(dealer: int = 1) -> tuple[ReshareDealer, DkgPlan, dict[int, bytes]]:
    d = ReshareDealer(None)
    plan = DkgPlan(os.urandom(16), 1, tuple(range(1, N + 1)), T, N, complaint_round=True)
    tokens = {j: os.urandom(32) for j in range(1, N + 1)}
    d.open_dkg(plan, dealer, {j: hashlib.sha256(tok).digest() for j, tok in tokens.items()})
    return d, plan, tokens


def test_a_share_goes_only_to_the_member_holding_its_token() -> None:
    d, plan, tokens = _opened()
    _, other_plan, other_tokens = _opened()
    kms = _admitted()
    flipped = bytes([tokens[1][0] ^ 1]) + tokens[1][1:]
    for wrong in (None, b"", tokens[2], other_tokens[1], flipped, tokens[1] + b"\x00"):
        with pytest.raises(AccessDenied) as exc:
            d.deal_for(kms, plan.session, 1, wrong)
        assert exc.value.step == "reshare"
    page = d.deal_for(kms, plan.session, 1, tokens[1])  # nothing was taken by the attempts above
    assert page.subshare and page.board_token
    with pytest.raises(AccessDenied, match="already handed out"):
        d.deal_for(kms, plan.session, 1, tokens[1])
    with pytest.raises(AccessDenied):  # another round's session with this round's token
        d.deal_for(kms, other_plan.session, 2, tokens[2])


def test_a_board_post_needs_the_board_token_of_that_share() -> None:
    d, plan, tokens = _opened()
    d2, plan2, tokens2 = _opened()
    kms = _admitted()
    board = {j: bytes.fromhex(d.deal_for(kms, plan.session, j, tokens[j]).board_token) for j in (1, 2)}
    other = bytes.fromhex(d2.deal_for(kms, plan2.session, 1, tokens2[1]).board_token)
    for index, token in ((1, board[2]), (1, other), (3, board[1]), (1, tokens[1]), (1, b"")):
        with pytest.raises(AccessDenied) as exc:
            d.board(kms, plan.session, index, token, [2])
        assert exc.value.step == "dkg"
    seen = d.board(kms, plan.session, 1, board[1], [])
    assert seen.complaints == {"1": []}
