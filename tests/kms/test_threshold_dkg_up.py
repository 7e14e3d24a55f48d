"""`teecloud up`'s first DKG (issue 19, "Key ceremony"): members authenticate with per-member tokens (each
node's plan holds its own token only, as `kms rotate`'s rounds do), and the group record — the local
group.json and the committee on chain — is the commitments the nodes ended with, the sums over GJKR's QUAL,
not the sum over every dealer. Five dealers on real listeners, five members booted through the launcher
with `kms up --join-dkg`'s joiner and plan files written by devstack.open_first_dkg."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from teecloud.chain import ChainClient
from teecloud.cli.kms_cmd import _round_joiner, endpoint_doc
from teecloud.devstack import LocalCloud, first_dkg_group, open_first_dkg
from teecloud.keys import threshold as th
from teecloud.kms import api
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee
from teecloud.kms.errors import KmsDenied
from teecloud.kms.launcher import KmsLaunch, RunningKms, launch_kms
from teecloud.kms.server import KmsServer
from teecloud.kms.service import StaticCollateral
from teecloud.node.errors import NodeError
from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for
from tests.kms.conftest import SIM_OS, World
from tests.kms.test_threshold_dkg import _allow_kms_build, dealers  # noqa: F401 (fixture)
from tests.kms.test_threshold_dkg_gjkr import CheatingDealer, _clients

N, T = 5, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A chain of this module's own: its test records epoch 1 on KmsGroup, as `teecloud up` does."""
    d = tmp_path_factory.mktemp("dkg-up-chain")
    chain = ChainClient.embedded(d)
    chain.deploy()
    chain.add_os_image(os_image_hash_for(SIM_OS))
    yield World(chain, d)
    chain.close()


def _open(home: Path, servers: dict[int, KmsServer]) -> dict[int, Path]:
    def admin_post(i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(
            servers[i].admin_url + path,
            headers={"authorization": f"Bearer {servers[i].admin_token}"},
            json=body,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        answer: dict[str, Any] = r.json()
        return answer

    eps = {
        i: {"url": s.url, "server_ca_pubkey": s.service.keys.ca_public_key_der.hex()}
        for i, s in servers.items()
    }
    return open_first_dkg(
        eps, admin_post, t=T, n=N, plan_file_of=lambda j: home / f"member-{j}" / "plan.json"
    )


@pytest.mark.slow
def test_up_records_the_qual_group_the_nodes_hold_when_a_dealer_is_disqualified(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """Dealer 2 sends members 4 and 5 sub-shares off its commitments and does not answer their complaints:
    GJKR leaves it out of QUAL. The nodes' group is then Σ_{QUAL} C, not Σ over every dealer; the record
    `up` writes (group.json and KmsGroup's committee) is the nodes' group."""
    _allow_kms_build(world, teecloud_home)
    dealers[2].service.reshare = CheatingDealer({4, 5}, "silent")
    plans = _open(teecloud_home, dealers)
    # each plan holds its member's token only, readable by its owner only
    for j, file in plans.items():
        doc = json.loads(file.read_text())
        assert list(doc["member_tokens"]) == [str(j)] and doc["complaint_round"] is True
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    opened = {
        i: s.service.reshare._rounds[next(iter(s.service.reshare._rounds))].dealing
        for i, s in dealers.items()
    }  # type: ignore[union-attr]

    def member(j: int) -> tuple[RunningKms, dict[str, Any]]:
        tee = SimulatedTdx(teecloud_home)
        join = _round_joiner(plans[j], "dkg", j, tee, True, None, world.chain)
        running = launch_kms(
            KmsLaunch(
                tee=tee,
                chain=world.chain,
                collateral=StaticCollateral(tee.collateral),
                dev=True,
                home=teecloud_home / f"member-{j}",
                threshold=True,
                join=join,
            )
        )
        return running, endpoint_doc(running, tee, dev=True, threshold_node=j)

    with ThreadPoolExecutor(max_workers=N) as pool:
        futures = {j: pool.submit(member, j) for j in range(1, N + 1)}
    nodes = {j: f.result() for j, f in futures.items()}
    try:
        held = {j: r.service.threshold.commitments for j, (r, _) in nodes.items()}  # type: ignore[union-attr]
        assert len(set(held.values())) == 1
        group = held[1]
        qual = [opened[i] for i in (1, 3, 4, 5)]
        assert group == th.sum_commitments(qual)  # Σ over QUAL: dealer 2 left out
        assert group != th.sum_commitments(list(opened.values()))  # what `up` recorded before
        record = first_dkg_group({j: doc for j, (_, doc) in nodes.items()}, t=T, n=N)
        assert (record.epoch, record.t, record.n, record.commitments) == (1, T, N, group)
        committee = LocalCloud._record_committee(
            world.chain, record, {j: doc for j, (_, doc) in nodes.items()}
        )
        assert committee.commitments == group and committee.group_public_key == group[0]
    finally:
        for running, _ in nodes.values():
            running.stop()


def test_the_record_needs_every_node_to_state_the_same_commitments() -> None:
    a = [bytes([2]) + bytes([k]) * 32 for k in range(T)]
    b = [bytes([3]) + bytes([k]) * 32 for k in range(T)]
    docs: dict[int, dict[str, Any]] = {
        j: {"commitments": {"1": [c.hex() for c in a]}} for j in range(1, N + 1)
    }
    assert first_dkg_group(docs, t=T, n=N).commitments == tuple(a)
    docs[4] = {"commitments": {"1": [c.hex() for c in b]}}
    with pytest.raises(NodeError, match="different group commitments"):
        first_dkg_group(docs, t=T, n=N)
    for broken in ({}, {"commitments": {}}, {"commitments": {"1": ["zz"]}}, {"commitments": None}):
        docs[4] = broken
        with pytest.raises(NodeError, match="node 4 states no epoch-1 commitments"):
            first_dkg_group(docs, t=T, n=N)
    docs[4] = {"commitments": {"1": [c.hex() for c in a[:2]]}}
    with pytest.raises(NodeError):
        first_dkg_group(docs, t=T, n=N)


@pytest.mark.slow
def test_a_subshare_request_without_or_with_another_members_token_is_refused(
    teecloud_home: Path,
    world: World,
    dealers: dict[int, KmsServer],  # noqa: F811
) -> None:
    """An allowed KMS boot that asks `up`'s dealers for share 1 without member 1's token, or with member 2's,
    gets a 4xx with the reason and no sub-share; the page is not used up: member 1 still gets it."""
    _allow_kms_build(world, teecloud_home)
    plans = _open(teecloud_home, dealers)
    docs = {j: json.loads(plans[j].read_text()) for j in plans}
    session = docs[1]["session"]
    tee = SimulatedTdx(teecloud_home)
    boot_kms_tee(tee, finish=False)
    clients = _clients(teecloud_home, dealers, tee)

    def ask(token: str | None) -> api.ReshareDealResponse:
        body = api.ReshareDealRequest(session=session, index=1, member_token=token, offset=0).model_dump()
        return clients[3].attested_call(
            tee,
            api.PATH_RESHARE_DEAL,
            api.ReshareDealResponse,
            body=body,
            usage="kms:reshare",
            app_id=KMS_APP_ID,
        )

    for token in (None, docs[2]["member_tokens"]["2"], "00" * 32):
        with pytest.raises(KmsDenied) as denied:
            ask(token)
        assert denied.value.step == "reshare" and "no or another member token" in denied.value.reason
    recs = [r for r in dealers[3].service.audit.read() if r.endpoint == api.PATH_RESHARE_DEAL]
    assert len(recs) == 3 and all(r.decision == "denied" for r in recs)
    answer = ask(docs[1]["member_tokens"]["1"])
    assert answer.dealer == 3 and answer.subshare and answer.board_token
