"""GJKR's complaint phase in a rotation (issue 19, "Rotation", "Bad input and faults"): `kms rotate`'s round
is rolling — the members restart one at a time, so each posts its statement at one boot (serving its older
epochs meanwhile) and decides QUAL at its next, when every statement is on the dealers' boards. Five
dealers on real listeners; five epoch-1 members booted through the launcher with `kms up --join-dkg`'s
joiner and the plan `open_rotation` writes. A dealer's bad sub-share is complained against and answered, or
its dealer disqualified, every member ending with the same group (what `rotation_commitments` hands
`kms rotate-finish`); with fewer than t qualified the round fails at every member, nothing of epoch 2 is
sealed or left pending, and epoch 1 serves."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from teecloud.chain import ChainClient
from teecloud.cli.kms_cmd import _round_joiner, endpoint_doc
from teecloud.keys import threshold as th
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee
from teecloud.kms.errors import KmsClientError, KmsUsageError
from teecloud.kms.launcher import KmsLaunch, launch_kms
from teecloud.kms.rotation import RotationPlan, open_rotation, rotation_commitments
from teecloud.kms.server import KmsServer
from teecloud.kms.service import StaticCollateral
from teecloud.kms.threshold import (
    PENDING_DKG_FILE,
    DkgPlan,
    ReshareDealer,
    load_shares,
    local_joint_feldman,
    save_share,
)
from teecloud.kms.threshold_client import PendingDkg, finish_dkg, post_dkg_statement
from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for
from tests.kms.conftest import SIM_OS, World
from tests.kms.test_threshold_dkg import _allow_kms_build, dealers  # noqa: F401 (fixture)
from tests.kms.test_threshold_dkg_gjkr import CheatingDealer, _clients

pytestmark = pytest.mark.slow

N, T = 5, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A chain of this module's own (no epoch 2 recorded: a member's joiner checks that)."""
    d = tmp_path_factory.mktemp("rotate-gjkr-chain")
    chain = ChainClient.embedded(d)
    chain.deploy()
    chain.add_os_image(os_image_hash_for(SIM_OS))
    yield World(chain, d)
    chain.close()


class Rotation:
    def __init__(self, home: Path, world: World, servers: dict[int, KmsServer]) -> None:
        self.home, self.world, self.servers = home, world, servers
        _allow_kms_build(world, home)
        tee = SimulatedTdx(home)
        identity = boot_kms_tee(tee)
        self.e1 = local_joint_feldman(T, N, epoch=1)
        for s in self.e1:
            save_share(s, tee, identity, self.member_home(s.index))

    def member_home(self, j: int) -> Path:
        return self.home / f"member-{j}"

    def open(self) -> tuple[RotationPlan, Path]:
        def admin_post(i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
            r = httpx.post(
                self.servers[i].admin_url + path,
                headers={"authorization": f"Bearer {self.servers[i].admin_token}"},
                json=body,
                timeout=30,
            )
            assert r.status_code == 200, r.text
            answer: dict[str, Any] = r.json()
            return answer

        eps = {
            i: {"url": s.url, "server_ca_pubkey": s.service.keys.ca_public_key_der.hex()}
            for i, s in self.servers.items()
        }
        plan = open_rotation(
            2,
            T,
            N,
            eps,
            admin_post,
            group_key_on_chain=lambda e: self.e1[0].commitments[0] if e == 1 else None,
        )
        assert plan.complaint_round  # `kms rotate`'s default
        file = self.home / "rotate.json"
        file.write_text(json.dumps(plan.to_json()))
        return plan, file

    def boot(self, j: int, plan_file: Path) -> dict[str, Any]:
        """Member j restarted on the plan (through the launcher, which seals only what a join returns);
        its endpoint file's content, then it stops again."""
        tee = SimulatedTdx(self.home)
        join = _round_joiner(plan_file, "dkg", j, tee, True, None, self.world.chain, home=self.member_home(j))
        running = launch_kms(
            KmsLaunch(
                tee=tee,
                chain=self.world.chain,
                collateral=StaticCollateral(tee.collateral),
                dev=True,
                home=self.member_home(j),
                threshold=True,
                join=join,
            )
        )
        try:
            return endpoint_doc(running, tee, dev=True, threshold_node=j)
        finally:
            running.stop()

    def pending(self, j: int) -> bool:
        return (self.member_home(j) / "kms" / PENDING_DKG_FILE).exists()

    def rolling(self, plan_file: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        first = [self.boot(j, plan_file) for j in range(1, N + 1)]
        for j, ep in enumerate(first, 1):  # statement posted; epoch 1 serves; nothing of epoch 2 sealed
            assert ep["join_error"].startswith("RoundPending: statement posted"), ep
            assert list(ep["epochs"]) == ["1"] and self.pending(j)
        second = [self.boot(j, plan_file) for j in range(1, N + 1)]
        for j in range(1, N + 1):
            assert not self.pending(j)
        return first, second


@pytest.fixture
def rotation(teecloud_home: Path, world: World, dealers: dict[int, KmsServer]) -> Rotation:  # noqa: F811
    return Rotation(teecloud_home, world, dealers)


def _dealing(server: KmsServer) -> th.Dealing:
    dealer = server.service.reshare
    assert dealer is not None
    (r,) = dealer._rounds.values()
    return r.dealing


def _one_group(plan: RotationPlan, second: list[dict[str, Any]]) -> tuple[bytes, ...]:
    for ep in second:
        assert sorted(ep["epochs"]) == ["1", "2"] and not ep["join_error"], ep
    commitments, why = rotation_commitments(plan, dict(enumerate(second, 1)))
    assert commitments is not None, why
    return commitments


def test_a_bad_subshare_in_a_rotation_is_complained_against_and_answered(
    rotation: Rotation,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    dealers[2].service.reshare = CheatingDealer({4}, "honest")
    plan, file = rotation.open()
    first, second = rotation.rolling(file)
    assert "complaints against dealers [2]" in first[3]["join_error"]
    assert all(
        "complaints against dealers none" in ep["join_error"] for j, ep in enumerate(first, 1) if j != 4
    )
    # answered: every dealer stays in QUAL; the group is the plan's (the sum over all five)
    assert _one_group(plan, second) == plan.commitments
    tee = SimulatedTdx(rotation.home)
    identity = boot_kms_tee(tee)
    shares = {j: load_shares(tee, identity, rotation.member_home(j))[2] for j in range(1, N + 1)}
    honest = [_dealing(s) for s in dealers.values()]
    assert shares[4].share == sum(d.shares[4] for d in honest) % th.GROUP_ORDER  # took dealer 2's answer
    for j, s in shares.items():
        assert s.commitments == plan.commitments and th.verify_share(s.commitments, j, s.share)


def test_a_dealer_that_does_not_answer_is_disqualified_and_every_member_agrees(
    rotation: Rotation,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    dealers[2].service.reshare = CheatingDealer({4, 5}, "silent")
    plan, file = rotation.open()
    _, second = rotation.rolling(file)
    group = _one_group(plan, second)
    qual = [_dealing(dealers[i]) for i in (1, 3, 4, 5)]
    assert group == th.sum_commitments(qual) != plan.commitments  # Σ over QUAL, dealer 2 left out
    # any t of the new shares give one output under the QUAL group key
    tee = SimulatedTdx(rotation.home)
    identity = boot_kms_tee(tee)
    shares = {j: load_shares(tee, identity, rotation.member_home(j))[2].share for j in range(1, N + 1)}
    x, _ = th.app_contexts(2, b"\x42" * 20, b"\x43" * 20)
    assert th.combine(x, [th.partial_evaluate(j, shares[j], x) for j in (1, 2, 3)], T) == th.combine(
        x, [th.partial_evaluate(j, shares[j], x) for j in (3, 4, 5)], T
    )


def test_fewer_than_t_qualified_fails_the_rotation_at_every_member_and_epoch_1_serves(
    rotation: Rotation,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    for i in (1, 2, 3):
        dealers[i].service.reshare = CheatingDealer({1, 2, 3}, "honest")
    plan, file = rotation.open()
    _, second = rotation.rolling(file)
    tee = SimulatedTdx(rotation.home)
    identity = boot_kms_tee(tee)
    for j, ep in enumerate(second, 1):
        assert "only 2 qualified dealers, 3 needed" in ep["join_error"], ep
        assert list(ep["epochs"]) == ["1"]  # the old epoch serves
        assert sorted(load_shares(tee, identity, rotation.member_home(j))) == [1]  # nothing of epoch 2
    commitments, why = rotation_commitments(plan, dict(enumerate(second, 1)))
    assert commitments is None and len(why) == N and all("does not serve epoch 2" in w for w in why)


def test_a_second_pass_before_every_statement_is_in_fails_named(
    rotation: Rotation,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """Member 1 finishing while members 2..5 have not posted: the boards are not complete by its deadline
    (short here), and the round fails naming every dealer; a pending state of another round is refused."""
    plan, _ = rotation.open()
    dkg = DkgPlan(plan.session, plan.epoch, tuple(sorted(plan.dealers)), T, N, complaint_round=True)
    tee = SimulatedTdx(rotation.home)
    boot_kms_tee(tee, finish=False)
    clients = _clients(rotation.home, dealers, tee)
    pending = post_dkg_statement(dkg, 1, tee, clients, app_id=KMS_APP_ID, member_token=plan.member_tokens[1])
    assert PendingDkg.from_json_bytes(pending.to_json_bytes()) == pending
    with pytest.raises(KmsClientError, match=r"not complete in time|by the call's deadline") as failed:
        finish_dkg(dkg, 1, tee, clients, pending, app_id=KMS_APP_ID, timeout_s=1.5)
    assert all(f"node {i}: " in str(failed.value) for i in range(1, N + 1))
    other = DkgPlan(os.urandom(16), 2, dkg.dealers, T, N, complaint_round=True)
    with pytest.raises(KmsUsageError, match="another round"):
        finish_dkg(other, 1, tee, clients, pending, app_id=KMS_APP_ID, timeout_s=1.5)
    with pytest.raises(KmsUsageError, match="complaint phase"):
        post_dkg_statement(
            DkgPlan(plan.session, 2, dkg.dealers, T, N), 1, tee, clients, app_id=KMS_APP_ID, timeout_s=1.5
        )


def test_a_dealer_restarting_between_the_passes_fails_the_rotation_cleanly(
    rotation: Rotation,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """Dealer 5 restarts after every member posted its statement (its round, in memory only, is gone): each
    member's second pass fails naming node 5, seals nothing of epoch 2, drops its pending state and serves
    epoch 1."""
    _, file = rotation.open()
    for j in range(1, N + 1):
        assert rotation.boot(j, file)["join_error"].startswith("RoundPending: ")
    dealers[5].service.reshare = ReshareDealer(None)  # a restarted dealer: no round
    tee = SimulatedTdx(rotation.home)
    identity = boot_kms_tee(tee)
    for j in range(1, N + 1):
        ep = rotation.boot(j, file)
        assert "node 5: " in ep["join_error"] and "no open DKG round" in ep["join_error"], ep
        assert list(ep["epochs"]) == ["1"] and not rotation.pending(j)
        assert sorted(load_shares(tee, identity, rotation.member_home(j))) == [1]
