"""Review 10: split views in GJKR's complaint phase over the network (five share-less dealers on real
listeners, five members joining together over mutual RA-TLS, as tests/kms/test_threshold_dkg_gjkr.py).

The boards stand in for a broadcast channel. A dealer whose TEE the attacker controls (one, or t − 1 = 2
colluding) shows different readers different boards:
  * answers: it sends member 4 a sub-share off its commitments, answers member 4's complaint on its board
    but shows the answer only to some readers (the others must disqualify it: "did not answer");
  * confirmations: its board echoes each reader's own confirmation as every member's;
  * statements: it hides member 4's complaint from some readers.
Held: no two members finish with shares of two keys; with the honest dealers' boards every member sees the
mismatch, and the round fails for all (no share made), named. A member whose view was split never holds a
share the others do not agree on."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from teecloud.keys import threshold as th
from teecloud.kms import api
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee
from teecloud.kms.errors import AccessDenied, KmsClientError
from teecloud.kms.server import KmsServer
from teecloud.kms.threshold import DkgPlan, ReshareDealer, ThresholdShare, _Round
from teecloud.kms.threshold_client import join_dkg
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_threshold_dkg import _allow_kms_build
from tests.kms.test_threshold_dkg_gjkr import _clients, _open, _round

N, T = 5, 3


class Equivocator(ReshareDealer):
    """A dealer that sends `bad` members a sub-share off its commitments, and shows its board differently by
    reader: answers only to `shown`; `echo`: every member's confirmation equal to the reader's own;
    `hide`: member 4's statement shown empty to those readers."""

    def __init__(
        self, bad: set[int], shown: set[int], *, echo: bool = False, hide: frozenset[int] = frozenset()
    ) -> None:
        super().__init__(None)
        self.bad, self.shown, self.echo, self.hide = bad, shown, echo, set(hide)

    def _subshare(self, r: _Round, index: int) -> int:
        return int(super()._subshare(r, index) + (7 if index in self.bad else 0)) % th.GROUP_ORDER

    def board(
        self, kms: Any, session: bytes, index: int, board_token: bytes, *a: Any, **k: Any
    ) -> api.DkgBoardResponse:
        real = super().board(kms, session, index, board_token, *a, **k)
        update: dict[str, Any] = {}
        if index not in self.shown:
            update["answers"] = {}
        if self.echo and str(index) in real.confirms:
            update["confirms"] = {j: real.confirms[str(index)] for j in real.complaints}
        if index in self.hide and "4" in real.complaints:
            update["complaints"] = {**real.complaints, "4": []}
        return real.model_copy(update=update)


def _member(home: Path, servers: dict[int, KmsServer], plan: DkgPlan, index: int) -> ThresholdShare:
    tee = SimulatedTdx(home)
    boot_kms_tee(tee, finish=False)
    return join_dkg(plan, index, tee, _clients(home, servers, tee), app_id=KMS_APP_ID, timeout_s=20)


def _run(home: Path, dealers: dict[int, KmsServer]) -> dict[int, Any]:
    plan = DkgPlan(os.urandom(16), 1, tuple(range(1, N + 1)), T, N, complaint_round=True)
    _open(dealers, plan)
    return _round(home, dealers, plan, {j: _member for j in range(1, N + 1)})


def _no_two_keys(results: dict[int, Any]) -> list[int]:
    made = {j: r for j, r in results.items() if isinstance(r, ThresholdShare)}
    assert len({s.commitments for s in made.values()}) <= 1, {
        j: s.commitments[0].hex()[:16] for j, s in made.items()
    }
    return sorted(made)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cheats",
    [
        pytest.param({2: Equivocator({4}, {4, 5})}, id="answers-to-some"),
        pytest.param({2: Equivocator({4}, {4, 5}, echo=True)}, id="answers-to-some-and-echoed-confirms"),
        pytest.param(
            {2: Equivocator({4}, {4, 5}, echo=True), 3: Equivocator(set(), set(), echo=True)},
            id="two-colluding-boards",
        ),
    ],
)
def test_a_dealer_showing_its_answer_to_some_members_splits_nobody(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],
    cheats: dict[int, ReshareDealer],
) -> None:
    """Members 4 and 5 see dealer 2's answer (dealer 2 in QUAL), members 1-3 do not (dealer 2 out): two
    QUALs, two group keys. The honest boards carry every member's true confirmation: the round fails for all
    five, each naming members of the other view; nothing is made."""
    _allow_kms_build(world, teecloud_home)
    for i, cheat in cheats.items():
        dealers[i].service.reshare = cheat
    results = _run(teecloud_home, dealers)
    assert _no_two_keys(results) == []
    for j, r in results.items():
        assert isinstance(r, KmsClientError), (j, r)
        assert "computed another QUAL or group key" in str(r), (j, r)


@pytest.mark.slow
def test_a_board_hiding_a_complaint_from_some_members_splits_nobody(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],
) -> None:
    """Dealer 2 sends member 4 a bad sub-share and answers honestly, but shows members 1 and 2 a board where
    member 4 complained about nothing: those two see the boards disagree and stop; the other three cannot
    get all five confirmations. No share anywhere (the round fails by the board timeout for 3-5)."""
    _allow_kms_build(world, teecloud_home)
    dealers[2].service.reshare = Equivocator({4}, {1, 2, 3, 4, 5}, hide=frozenset({1, 2}))
    results = _run(teecloud_home, dealers)
    assert _no_two_keys(results) == []
    for j in (1, 2):
        assert "boards disagree" in str(results[j]), results[j]
    for j in (3, 4, 5):
        assert isinstance(results[j], KmsClientError), (j, results[j])


class Hanging(ReshareDealer):
    """A dealer whose board never answers (until the test ends): its sub-shares went out normally."""

    def __init__(self) -> None:
        super().__init__(None)
        self.release = threading.Event()

    def board(self, *a: Any, **k: Any) -> api.DkgBoardResponse:
        self.release.wait(60)
        raise AccessDenied("released", step="dkg")


@pytest.mark.slow
def test_a_board_that_hangs_fails_the_round_within_the_client_timeout(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],
) -> None:
    """Dealer 5's board never answers: every member fails, naming node 5, once its read times out (the
    KMS client's 15 s), no share made; nobody waits for the board for ever."""
    _allow_kms_build(world, teecloud_home)
    hanging = Hanging()
    dealers[5].service.reshare = hanging
    try:
        start = time.monotonic()
        results = _run(teecloud_home, dealers)
        took = time.monotonic() - start
    finally:
        hanging.release.set()
    assert _no_two_keys(results) == []
    for j, r in results.items():
        assert isinstance(r, KmsClientError) and "node 5: " in str(r), (j, r)
    assert took < 45, took
