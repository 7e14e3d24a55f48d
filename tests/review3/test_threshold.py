"""Third review, area 3: threshold KMS committees and resharing (kms.threshold.ReshareDealer, the admin
listener, cli/kms_cmd.py reshare-open/-finish, chain KmsGroup). Real attested channels: the five-node
cluster of tests/kms/test_threshold_nodes.py. Open findings are strict xfails (see test_os_images.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from teecloud.chain import ChainClient, ContractReverted
from teecloud.chain.embedded import DEV_KEYS
from teecloud.chain.kmsgroup import CommitteeMember
from teecloud.keys import threshold as th
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold import ResharePlan
from tests.kms import test_threshold_nodes
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_nodes import Cluster
from tests.kms.test_threshold_reshare import _allow_kms_build, _join, _open, member_token

cluster = test_threshold_nodes.cluster  # the five-node fixture

DEALERS = (1, 2, 3)


@pytest.mark.slow
def test_a_sub_share_goes_only_to_the_new_member_the_round_names(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """FINDING R3-5 (fixed). The operator reshares 3-of-5 to a new committee (a KMS code upgrade, or to move
    the key off a host it no longer trusts). Anyone who can boot *a* KMS of an allowed build on an allowed
    device — the distrusted host itself, or any host of the old build — asks the dealers for share 1 of the
    round first. Fixed: the round names each new member by a one-time token (its sha256 given to the dealers
    at /reshare/open, the token to new node j only): the stranger without it, or with another member's
    token, gets nothing, and the operator's own node 1 still joins."""
    _allow_kms_build(world, teecloud_home)
    plan = ResharePlan(os.urandom(16), 1, cluster.group.commitments, DEALERS, 3, 5)
    _open(cluster, plan)
    for stolen in (b"\0" * 32, member_token(plan, 2)):  # no token of its own / another member's
        with pytest.raises(KmsClientError, match="not the new member"):
            _join(teecloud_home, cluster, plan, 1, token=stolen)
    assert _join(teecloud_home, cluster, plan, 1).group_public_key == cluster.group.group_public_key


@pytest.mark.slow
def test_retire_and_reshare_open_need_the_admin_token(cluster: Cluster) -> None:
    """Erasing a node's share (`reshare-finish --retire`'s POST /threshold/retire) or opening a round:
    without the bearer token, with another node's token, with a prefix of it, on the public listener."""
    node = cluster.nodes[1]
    server = node.server
    other = cluster.nodes[2].server.admin_token
    for headers in (
        {},
        {"authorization": f"Bearer {other}"},
        {"authorization": f"Bearer {server.admin_token[:-1]}"},
        {"authorization": server.admin_token},
        {"authorization": f"bearer {server.admin_token}"},
    ):
        for path in ("/threshold/retire", "/reshare/open", "/dkg/open"):
            r = httpx.post(server.admin_url + path, headers=headers, json={})
            assert r.status_code == 401, (path, headers, r.text)
    with httpx.Client(verify=False) as public:  # the public listener has no such routes
        r = public.post(
            server.url + "/threshold/retire", headers={"authorization": f"Bearer {server.admin_token}"}
        )
        assert r.status_code in (400, 401, 403, 404, 405), r.text
    assert node.kms.service.threshold is not None  # the share is still held and served


@pytest.mark.slow
def test_sub_shares_outside_the_round_are_refused(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """Index 0 (the group secret's own point), an index above n_new, a second request for one index, and a
    session no dealer opened: refused by every dealer, nothing handed out."""
    _allow_kms_build(world, teecloud_home)
    plan = ResharePlan(os.urandom(16), 1, cluster.group.commitments, DEALERS, 3, 5)
    _open(cluster, plan)
    for index in (0, 6, 64):
        with pytest.raises((KmsClientError, ValueError)):
            _join(teecloud_home, cluster, plan, index)
    _join(teecloud_home, cluster, plan, 2)
    with pytest.raises(KmsClientError, match="already handed out"):
        _join(teecloud_home, cluster, plan, 2)
    unopened = ResharePlan(os.urandom(16), 1, cluster.group.commitments, DEALERS, 3, 5)
    with pytest.raises(KmsClientError, match="no open reshare round"):
        _join(teecloud_home, cluster, unopened, 1)


def _members(n: int) -> list[CommitteeMember]:
    return [
        CommitteeMember(i, os.urandom(32), os.urandom(32), f"https://127.0.0.1:{9000 + i}")
        for i in range(1, n + 1)
    ]


def test_only_the_kms_group_owner_changes_the_serving_committee(teecloud_home: Path) -> None:
    """A non-owner records a committee with its own key for a fresh epoch, activates an older committee
    (rollback to shares it kept), takes ownership without being the pending owner; and the owner cannot
    change an epoch's group key by a 'reshare' whose commitments carry another key."""
    chain = ChainClient.embedded(teecloud_home)
    try:
        chain.deploy()
        group = chain.kms_group
        key = os.urandom(32)
        first = group.record_committee(1, 2, [key, os.urandom(32)], _members(3))
        group.activate(first)
        second = group.record_committee(1, 2, [key, os.urandom(32)], _members(3))
        group.activate(second)
        stranger = chain.with_signer(DEV_KEYS[5]).kms_group
        with pytest.raises(ContractReverted, match="not the owner"):
            stranger.activate(first)
        with pytest.raises(ContractReverted, match="not the owner"):
            stranger.record_committee(2, 1, [os.urandom(32)], _members(1))
        with pytest.raises(ContractReverted, match="not the owner"):
            stranger.conn.transact("KmsGroup", group.address, "transfer_ownership", stranger.conn.address)
        with pytest.raises(ContractReverted, match="pending owner"):
            stranger.conn.transact("KmsGroup", group.address, "accept_ownership")
        with pytest.raises(ContractReverted, match="keeps the epoch's group key"):
            group.record_committee(1, 2, [os.urandom(32), os.urandom(32)], _members(3))
        served = group.active(1)
        assert served is not None and served.committee_id == second and group.group_key(1) == key
    finally:
        chain.close()


@pytest.mark.slow
def test_a_joining_node_refuses_a_plan_for_another_group_than_the_chains(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """FINDING R3-8 (low). KmsGroup records the cluster's committee for epoch E. An attacker who can edit the
    reshare plan a new node boots with (`kms up --join-reshare PLAN`) points it at the dealers of *another*
    group of allowed KMS nodes (their URLs, CA keys, old commitments; same epoch number). The joiner checks
    each dealer is an allowed KMS and each sub-share against the plan's commitments, but never compares the
    plan with the chain's serving committee, so it ends with a share of the other group. Safe: the joiner
    refuses a plan whose epoch/old commitments are not KmsGroup.active(epoch)'s."""
    import json
    import secrets

    from teecloud.cli.kms_cmd import _round_joiner
    from teecloud.kms.bootstrap import boot_kms_tee
    from teecloud.kms.threshold import local_joint_feldman
    from teecloud.tee.simulated import SimulatedTdx
    from tests.kms.test_threshold_nodes import start_node

    epoch = secrets.randbelow(2**32) + 2
    real = local_joint_feldman(3, 5, epoch=epoch)
    other = local_joint_feldman(3, 5, epoch=epoch)
    nodes = {s.index: start_node(teecloud_home, world.chain, s, name="other-group") for s in other[:3]}
    try:
        group = world.chain.kms_group
        cid = group.record_committee(epoch, 3, real[0].commitments, _members(5))
        group.activate(cid)
        _allow_kms_build(world, teecloud_home)
        plan = ResharePlan(os.urandom(16), epoch, other[0].commitments, (1, 2, 3), 3, 5)
        dealings = []
        for n in nodes.values():  # the other group's operator opens the round on its nodes
            r = httpx.post(
                n.server.admin_url + "/reshare/open",
                headers={"authorization": f"Bearer {n.server.admin_token}"},
                json={
                    "session": plan.session.hex(),
                    "epoch": epoch,
                    "old_commitments": [c.hex() for c in plan.old_commitments],
                    "dealers": [1, 2, 3],
                    "t_new": 3,
                    "n_new": 5,
                    "member_token_hashes": {
                        str(j): hashlib.sha256(member_token(plan, j)).hexdigest() for j in range(1, 6)
                    },
                },
            )
            assert r.status_code == 200, r.text
            answer = r.json()
            dealings.append(
                th.Dealing(int(answer["dealer"]), tuple(map(bytes.fromhex, answer["commitments"])), {})
            )
        plan_file = teecloud_home / "edited-plan.json"
        plan_file.write_text(
            json.dumps(
                {
                    "kind": "reshare",
                    "session": plan.session.hex(),
                    "epoch": epoch,
                    "old_commitments": [c.hex() for c in other[0].commitments],
                    "t": 3,
                    "n": 5,
                    "dealers": {
                        str(i): {"url": n.server.url, "server_ca_pubkey": n.root_ca_spki.hex()}
                        for i, n in nodes.items()
                    },
                    "new_commitments": [c.hex() for c in th.reshare_commitments(dealings)],
                    "member_tokens": {str(j): member_token(plan, j).hex() for j in range(1, 6)},
                }
            )
        )
        tee = SimulatedTdx(teecloud_home)
        boot_kms_tee(tee, finish=False)  # the new node, while it boots
        join = _round_joiner(plan_file, "reshare", 1, tee, True, None, world.chain)
        with pytest.raises(Exception) as err:
            join(tee, None)
        assert "committee" in str(err.value) or "KmsGroup" in str(err.value), err.value
    finally:
        stop_servers(n.server for n in nodes.values())
