"""GJKR's complaint phase in the networked DKG (issue 19, "Key ceremony"; Gennaro, Jarecki, Krawczyk,
Rabin, J. Cryptology 2007, Fig. 2 steps 1(b)-(c), 2, 3): five share-less dealers on real listeners, five
members joining together at their boot over mutual RA-TLS. A complained-against dealer answers on its
board; a dealer that answers wrongly or not at all, or draws more than t-1 complaints, is left out of
QUAL and the round still succeeds; fewer than t qualified dealers fail the round for everyone."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from teecloud.keys import threshold as th
from teecloud.kms import api
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee
from teecloud.kms.client import KmsClient, connect_kms
from teecloud.kms.errors import AccessDenied, KmsClientError
from teecloud.kms.launcher import KmsLaunch, launch_kms
from teecloud.kms.server import KmsServer
from teecloud.kms.service import StaticCollateral
from teecloud.kms.threshold import (
    DkgPlan,
    ReshareDealer,
    ThresholdShare,
    _Round,
    load_shares,
    local_joint_feldman,
    save_share,
)
from teecloud.kms.threshold_client import _collect, _complaint_phase, join_dkg
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_threshold_dkg import _allow_kms_build, dealers  # noqa: F401 (fixture)

N, T = 5, 3


class CheatingDealer(ReshareDealer):
    """A dealer whose TEE an attacker controls: it sends `bad` members a sub-share off its commitments and
    answers complaints `how` ("honest", "silent", "wrong")."""

    def __init__(self, bad: set[int], how: str = "honest") -> None:
        super().__init__(None)
        self.bad, self.how = bad, how

    def _subshare(self, r: _Round, index: int) -> int:
        return (super()._subshare(r, index) + (5 if index in self.bad else 0)) % th.GROUP_ORDER

    def _answers(self, r: _Round, complainers: list[int]) -> dict[int, int]:
        honest = super()._answers(r, complainers)
        if self.how == "silent":
            return {}
        if self.how == "wrong":
            return {j: (v + 1) % th.GROUP_ORDER for j, v in honest.items()}
        return honest


def _open(servers: dict[int, KmsServer], plan: DkgPlan) -> dict[int, tuple[bytes, ...]]:
    opened = {}
    for i, server in servers.items():
        r = httpx.post(
            server.admin_url + "/dkg/open",
            headers={"authorization": f"Bearer {server.admin_token}"},
            json={
                "session": plan.session.hex(),
                "epoch": plan.epoch,
                "dealer": i,
                "dealers": list(plan.dealers),
                "t": plan.t_new,
                "n": plan.n_new,
                "complaint_round": plan.complaint_round,
            },
        )
        assert r.status_code == 200, r.text
        opened[i] = tuple(bytes.fromhex(c) for c in r.json()["commitments"])
    return opened


def _clients(home: Path, servers: dict[int, KmsServer], tee: SimulatedTdx) -> dict[int, KmsClient]:
    return {
        i: connect_kms(
            s.url,
            collateral_for=lambda _q, _n: tee.collateral(),
            dev_root_der=tee.dev_root_der(),
            expected_ca_pubkey_der=s.service.keys.ca_public_key_der,
        )
        for i, s in servers.items()
    }


def _member(home: Path, servers: dict[int, KmsServer], plan: DkgPlan, index: int) -> ThresholdShare:
    tee = SimulatedTdx(home)
    boot_kms_tee(tee, finish=False)  # at its boot
    return join_dkg(plan, index, tee, _clients(home, servers, tee), app_id=KMS_APP_ID, timeout_s=60)


def _false_accuser(
    against: list[int],
) -> Callable[[Path, dict[int, KmsServer], DkgPlan, int], ThresholdShare]:
    """A member that complains against `against` although their sub-shares verify."""

    def run(home: Path, servers: dict[int, KmsServer], plan: DkgPlan, index: int) -> ThresholdShare:
        tee = SimulatedTdx(home)
        boot_kms_tee(tee, finish=False)
        clients = _clients(home, servers, tee)
        tokens: dict[int, bytes] = {}
        dealings = _collect(
            plan.session, plan.dealers, index, tee, clients, T, KMS_APP_ID, None, None, tokens
        )
        out = _complaint_phase(
            plan, index, tee, clients, dealings, tokens, against, app_id=KMS_APP_ID, timeout_s=60
        )
        return ThresholdShare(plan.epoch, index, T, N, out.share, out.commitments)

    return run


def _round(
    home: Path,
    servers: dict[int, KmsServer],
    plan: DkgPlan,
    members: dict[int, Callable[[Path, dict[int, KmsServer], DkgPlan, int], Any]] | None = None,
) -> dict[int, Any]:
    """Every member joins at once (their boots overlap, as `teecloud up` starts them)."""
    run = {j: (members or {}).get(j, _member) for j in range(1, N + 1)}
    with ThreadPoolExecutor(max_workers=N) as pool:
        futures = {j: pool.submit(run[j], home, servers, plan, j) for j in run}
    out: dict[int, Any] = {}
    for j, f in futures.items():
        try:
            out[j] = f.result()
        except Exception as exc:
            out[j] = exc
    return out


def _assert_one_key(results: dict[int, ThresholdShare | BaseException], qual_c0: list[bytes]) -> None:
    shares = {}
    for j, r in results.items():
        assert isinstance(r, ThresholdShare), f"member {j}: {r!r}"
        shares[j] = r
    assert len({s.commitments for s in shares.values()}) == 1
    group = shares[1].commitments
    total = qual_c0[0]
    for c in qual_c0[1:]:
        total = th._add(total, c)
    assert group[0] == total  # the group key is the sum over QUAL of the dealers' C_0
    for j, s in shares.items():
        assert th.verify_share(group, j, s.share)
    x, _ = th.app_contexts(1, b"\x42" * 20, b"\x43" * 20)
    outs = {
        th.combine(x, [th.partial_evaluate(i, shares[i].share, x) for i in subset], T)
        for subset in itertools.combinations(range(1, N + 1), T)
    }
    assert len(outs) == 1


def _statements(server: KmsServer, plan: DkgPlan) -> dict[int, tuple[int, ...]]:
    """The statements a dealer's board holds for the round."""
    dealer = server.service.reshare
    assert dealer is not None
    return dict(dealer._rounds[plan.session].complaints)


def _plan() -> DkgPlan:
    return DkgPlan(os.urandom(16), 1, tuple(range(1, N + 1)), T, N, complaint_round=True)


@pytest.mark.slow
def test_a_bad_subshare_answered_correctly_the_round_succeeds(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    _allow_kms_build(world, teecloud_home)
    dealers[2].service.reshare = CheatingDealer({4}, "honest")
    plan = _plan()
    opened = _open(dealers, plan)
    results = _round(teecloud_home, dealers, plan)
    _assert_one_key(results, [opened[i][0] for i in range(1, N + 1)])
    # member 4 complained against dealer 2 on every board, dealer 2 answered, and member 4 took the answer
    for server in dealers.values():
        assert _statements(server, plan) == {1: (), 2: (), 3: (), 4: (2,), 5: ()}
    honest = {i: s.service.reshare._rounds[plan.session].dealing for i, s in dealers.items()}  # type: ignore[union-attr]
    member4 = results[4]
    assert isinstance(member4, ThresholdShare)
    assert member4.share == sum(d.shares[4] for d in honest.values()) % th.GROUP_ORDER
    # the complaint and the answer are on the boards (and audited as board posts)
    recs = [r for r in dealers[2].service.audit.read() if r.endpoint == api.PATH_DKG_BOARD]
    assert recs and all(r.decision == "allowed" for r in recs)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["silent", "wrong"])
def test_a_dealer_answering_wrongly_or_not_at_all_is_left_out(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
    how: str,
) -> None:
    _allow_kms_build(world, teecloud_home)
    dealers[3].service.reshare = CheatingDealer({5}, how)
    plan = _plan()
    opened = _open(dealers, plan)
    results = _round(teecloud_home, dealers, plan)
    assert _statements(dealers[1], plan) == {1: (), 2: (), 3: (), 4: (), 5: (3,)}
    _assert_one_key(results, [opened[i][0] for i in (1, 2, 4, 5)])


@pytest.mark.slow
def test_a_false_complaint_is_cleared_by_the_honest_answer(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    _allow_kms_build(world, teecloud_home)
    plan = _plan()
    opened = _open(dealers, plan)
    results = _round(teecloud_home, dealers, plan, {1: _false_accuser([4])})
    assert _statements(dealers[5], plan) == {1: (4,), 2: (), 3: (), 4: (), 5: ()}
    _assert_one_key(results, [opened[i][0] for i in range(1, N + 1)])


@pytest.mark.slow
def test_more_than_t_minus_1_complaints_disqualify(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    _allow_kms_build(world, teecloud_home)
    dealers[1].service.reshare = CheatingDealer({1, 2, 3}, "honest")
    plan = _plan()
    opened = _open(dealers, plan)
    results = _round(teecloud_home, dealers, plan)
    assert _statements(dealers[4], plan) == {1: (1,), 2: (1,), 3: (1,), 4: (), 5: ()}
    _assert_one_key(results, [opened[i][0] for i in (2, 3, 4, 5)])


@pytest.mark.slow
def test_fewer_than_t_qualified_fails_the_round_for_everyone(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    _allow_kms_build(world, teecloud_home)
    for i in (1, 2, 3):
        dealers[i].service.reshare = CheatingDealer({1, 2, 3}, "honest")
    plan = _plan()
    _open(dealers, plan)
    results = _round(teecloud_home, dealers, plan)
    for j, r in results.items():
        assert isinstance(r, KmsClientError), f"member {j} made a share: {r!r}"
        assert "only 2 qualified dealers, 3 needed" in str(r)


@pytest.mark.slow
def test_a_statement_from_another_round_or_a_second_statement_is_refused(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """The attacker's steps: a member of round A replays its statement (with A's board token) into round B
    on the same dealers; posts a second, other statement in A; posts as another member (no token of its
    own); posts to a round without a complaint phase. Each is refused (step dkg); the boards keep the first
    statement only."""
    _allow_kms_build(world, teecloud_home)
    plan_a, plan_b = _plan(), _plan()
    _open(dealers, plan_a)
    _open(dealers, plan_b)
    plain = DkgPlan(os.urandom(16), 1, tuple(range(1, N + 1)), T, N)
    _open(dealers, plain)
    tee = SimulatedTdx(teecloud_home)
    boot_kms_tee(tee, finish=False)
    clients = _clients(teecloud_home, dealers, tee)
    tokens_a: dict[int, bytes] = {}
    _collect(plan_a.session, plan_a.dealers, 1, tee, clients, T, KMS_APP_ID, None, None, tokens_a)

    def post(session: bytes, index: int, token: bytes, **extra: object) -> api.DkgBoardResponse:
        body = {"session": session.hex(), "index": index, "board_token": token.hex(), **extra}
        return clients[2].attested_call(
            tee, api.PATH_DKG_BOARD, api.DkgBoardResponse, body=body, usage="kms:reshare", app_id=KMS_APP_ID
        )

    board = post(plan_a.session, 1, tokens_a[2], complaints=[3])
    assert board.complaints == {"1": [3]} and board.answers == {}  # no answers before every statement
    with pytest.raises(KmsClientError, match="board token"):  # replayed into round B
        post(plan_b.session, 1, tokens_a[2], complaints=[3])
    with pytest.raises(KmsClientError, match="already posted another statement"):
        post(plan_a.session, 1, tokens_a[2], complaints=[])
    with pytest.raises(KmsClientError, match="board token"):  # as member 2, with member 1's token
        post(plan_a.session, 2, tokens_a[2], complaints=[1])
    with pytest.raises(KmsClientError, match="board token"):  # another dealer's token
        post(plan_a.session, 1, tokens_a[3], complaints=[3])
    with pytest.raises(KmsClientError, match="no complaint phase"):
        post(plain.session, 1, tokens_a[2], complaints=[])
    with pytest.raises(KmsClientError, match="board token"):
        post(plan_b.session, 1, tokens_a[2], confirm="00" * 32)
    assert post(plan_a.session, 1, tokens_a[2]).complaints == {"1": [3]}  # still the first statement
    denied = [r for r in dealers[2].service.audit.read() if r.decision == "denied"]
    assert [r.step for r in denied] == ["dkg"] * 6


@pytest.mark.parametrize(
    "mutate",
    [
        {"index": "1"},
        {"index": 0},
        {"index": 65},
        {"index": True},
        {"session": "AB" * 16},
        {"session": "ab" * 15},
        {"board_token": "zz" * 32},
        {"board_token": "ab" * 31},
        {"complaints": ["1"]},
        {"complaints": [0]},
        {"complaints": [65]},
        {"complaints": list(range(1, 66))},
        {"confirm": "AB" * 32},
        {"confirm": 1},
        {"extra": 1},
    ],
)
def test_generated_mutations_of_a_board_request_are_refused(mutate: dict[str, object]) -> None:
    """The board's request parses strictly (no strings for integers, no upper-case or short hex, no
    unknown field, bounded lists): FastAPI answers 400/422 before any handler runs."""
    good = {"session": "ab" * 16, "index": 1, "board_token": "cd" * 32, "complaints": [2]}
    api.DkgBoardRequest.model_validate(good)
    with pytest.raises(ValueError):
        api.DkgBoardRequest.model_validate({**good, **mutate})


@pytest.mark.slow
def test_a_member_whose_plan_has_no_complaint_phase_gets_no_board_token(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """Dealers opened without a complaint phase hand out no board token; a member expecting one fails the
    round, naming every dealer, before it posts anything."""
    _allow_kms_build(world, teecloud_home)
    plain = DkgPlan(os.urandom(16), 1, tuple(range(1, N + 1)), T, N)
    _open(dealers, plain)
    expecting = DkgPlan(plain.session, 1, plain.dealers, T, N, complaint_round=True)
    with pytest.raises(KmsClientError, match=r"node 1: .*no board token"):
        _member(teecloud_home, dealers, expecting, 1)


class ForgetfulDealer(ReshareDealer):
    """A dealer that handed out its sub-shares, then restarted: its board knows no round."""

    def board(self, kms: object, session: bytes, *args: object, **kwargs: object) -> api.DkgBoardResponse:
        raise AccessDenied("no open DKG round with this session here (restarted)", step="dkg")


@pytest.mark.slow
def test_a_dealer_whose_board_is_gone_fails_the_round_for_everyone(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """Without dealer 5's board the members cannot know they decide alike: the round fails for every
    member, naming dealer 5, and no share is made."""
    _allow_kms_build(world, teecloud_home)
    dealers[5].service.reshare = ForgetfulDealer(None)
    plan = _plan()
    _open(dealers, plan)
    results = _round(teecloud_home, dealers, plan)
    for j, r in results.items():
        assert isinstance(r, KmsClientError), f"member {j} made a share: {r!r}"
        assert "node 5: " in str(r) and "restarted" in str(r)


@pytest.mark.slow
def test_fewer_than_t_qualified_at_a_rotation_seals_nothing_and_the_old_epoch_serves(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """Member 1 is a running node of epoch 1 restarted into an epoch-2 round (through the launcher, which
    seals only what a join returns); three dealers cheat three members each, so two qualify of the three
    needed: the join fails with the reason, nothing of epoch 2 is sealed and epoch 1 keeps serving."""
    _allow_kms_build(world, teecloud_home)
    for i in (1, 2, 3):
        dealers[i].service.reshare = CheatingDealer({1, 2, 3}, "honest")
    plan = DkgPlan(os.urandom(16), 2, tuple(range(1, N + 1)), T, N, complaint_round=True)
    _open(dealers, plan)
    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    home = teecloud_home / "member-1"
    save_share(local_joint_feldman(T, N, epoch=1)[0], tee, identity, home)

    def join(tee_: SimulatedTdx, _identity: object) -> ThresholdShare:
        clients = _clients(teecloud_home, dealers, tee_)
        return join_dkg(plan, 1, tee_, clients, app_id=KMS_APP_ID, timeout_s=60)

    def launch_member_1(_home: Path, _servers: object, _plan: object, _index: int) -> Any:
        return launch_kms(
            KmsLaunch(
                tee=SimulatedTdx(teecloud_home),
                chain=world.chain,
                collateral=StaticCollateral(tee.collateral),
                dev=True,
                home=home,
                threshold=True,
                join=join,
            )
        )

    results = _round(teecloud_home, dealers, plan, {1: launch_member_1})
    running = results[1]
    assert not isinstance(running, BaseException), running
    try:
        assert "only 2 qualified dealers, 3 needed" in running.join_error
        assert running.service.threshold is not None and running.service.threshold.epochs == (1,)
    finally:
        running.stop()
    assert sorted(load_shares(tee, identity, home)) == [1]  # nothing of epoch 2 sealed
    for j in (2, 3, 4, 5):
        assert isinstance(results[j], KmsClientError) and "only 2 qualified" in str(results[j])
