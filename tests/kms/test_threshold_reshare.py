"""Resharing between KMS nodes (issue 19): old nodes deal their shares to a new committee (3-of-5 ->
4-of-7) over mutual RA-TLS, only to boot-time evidence of a KMS build KmsAuth allows; the group key and
every derived output stay the same. Replays, other builds, post-boot evidence and a dealer that restarted
mid-round are refused, and a failed round leaves no share and the old committee serving."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from pathlib import Path

import httpx
import pytest

from teecloud.chain import ContractReverted
from teecloud.keys import threshold as th
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee
from teecloud.kms.client import connect_kms
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold import SHARE_FILE, ReshareDealer, ResharePlan, ThresholdShare
from teecloud.kms.threshold_client import join_reshare
from teecloud.tee.simulated import SimulatedTdx
from tests.kms import test_threshold_nodes
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_nodes import Cluster, boot_hello

cluster = test_threshold_nodes.cluster  # the five-node fixture

DEALERS = (1, 2, 3)


def _allow_kms_build(world: World, home: Path) -> None:
    tee = SimulatedTdx(home)
    ident = boot_kms_tee(tee)
    for mr in (ident.mr_aggregated, ident.boot_mr_aggregated):
        with contextlib.suppress(ContractReverted):
            world.chain.add_kms_mr(mr)
    with contextlib.suppress(ContractReverted):
        world.chain.add_kms_device(tee.device_id)


def member_token(plan: ResharePlan, index: int) -> bytes:
    """The one-time token the operator gives new member `index` of the round (a test derives them)."""
    return hashlib.sha256(b"member-token:" + plan.session + bytes([index])).digest()


def _open(cluster: Cluster, plan: ResharePlan) -> None:
    hashes = {str(j): hashlib.sha256(member_token(plan, j)).hexdigest() for j in range(1, plan.n_new + 1)}
    for i in plan.dealers:
        server = cluster.nodes[i].server
        r = httpx.post(
            server.admin_url + "/reshare/open",
            headers={"authorization": f"Bearer {server.admin_token}"},
            json={
                "session": plan.session.hex(),
                "epoch": plan.epoch,
                "old_commitments": [c.hex() for c in plan.old_commitments],
                "dealers": list(plan.dealers),
                "t_new": plan.t_new,
                "n_new": plan.n_new,
                "member_token_hashes": hashes,
            },
        )
        assert r.status_code == 200, r.text


def _join(
    home: Path,
    cluster: Cluster,
    plan: ResharePlan,
    index: int,
    *,
    build: str | None = None,
    boot_time: bool = True,
    token: bytes | None = None,
) -> ThresholdShare:
    """New member `index` joins, with its own token unless `token` names another (an attacker's)."""
    tee = SimulatedTdx(home)
    boot_kms_tee(tee, build=build, finish=not boot_time)
    clients = {
        i: connect_kms(
            cluster.nodes[i].server.url,
            collateral_for=lambda _q, _n: tee.collateral(),
            dev_root_der=tee.dev_root_der(),
            expected_ca_pubkey_der=cluster.nodes[i].root_ca_spki,
        )
        for i in plan.dealers
    }
    mine = member_token(plan, index) if token is None and 1 <= index <= 64 else token
    return join_reshare(plan, index, tee, clients, app_id=KMS_APP_ID, member_token=mine)


def _outputs(shares: dict[int, int], t: int, x: bytes) -> set[bytes]:
    return {
        th.combine(x, [th.partial_evaluate(i, shares[i], x) for i in s], t)
        for s in itertools.combinations(sorted(shares), t)
    }


def test_reshare_3of5_to_4of7_over_attested_channels(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    _allow_kms_build(world, teecloud_home)
    plan = ResharePlan(os.urandom(16), 1, cluster.group.commitments, DEALERS, 4, 7)
    _open(cluster, plan)
    new = {j: _join(teecloud_home, cluster, plan, j) for j in range(1, 8)}
    assert len({s.commitments for s in new.values()}) == 1
    assert next(iter(new.values())).group_public_key == cluster.group.group_public_key  # same key
    x, _ = th.app_contexts(1, b"\x42" * 20, b"\x43" * 20)
    old = {s.index: s.share for s in cluster.shares}
    (before,) = _outputs(old, 3, x)
    assert _outputs({j: s.share for j, s in new.items()}, 4, x) == {before}

    # Replayed: share 3 of this round was handed out already; every dealer refuses it again.
    with pytest.raises(KmsClientError, match="already handed out"):
        _join(teecloud_home, cluster, plan, 3)
    # A build KmsAuth does not allow cannot join; nor can a KMS's post-boot evidence.
    with pytest.raises(KmsClientError, match=r"node 1: .*node 2: .*node 3: "):
        _join(teecloud_home, cluster, plan, 6, build="a KMS build nobody allowed")
    with pytest.raises(KmsClientError, match="boot"):
        _join(teecloud_home, cluster, plan, 7, boot_time=False)
    for i in DEALERS:
        rec = cluster.nodes[i].kms.audit.read()[-1]
        assert rec.decision == "denied" and rec.step == "boot_time"


def test_a_dealer_restarting_mid_round_fails_the_round_cleanly(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    _allow_kms_build(world, teecloud_home)
    provider = cluster.provider()
    app_id, first = boot_hello(teecloud_home, world, provider)
    plan = ResharePlan(os.urandom(16), 1, cluster.group.commitments, DEALERS, 3, 5)
    _open(cluster, plan)
    # Dealer 2 restarts: its dealing (memory only) is gone.
    service = cluster.nodes[2].kms.service
    service.reshare = ReshareDealer(cluster.shares[1])
    with pytest.raises(KmsClientError, match=r"node 2: .*no open reshare round"):
        _join(teecloud_home, cluster, plan, 1)
    # Nothing half-applied: the old committee still serves the same keys.
    _, again = boot_hello(teecloud_home, world, cluster.provider(), app_id=app_id)
    assert again.keys.disk_crypt_key == first.keys.disk_crypt_key


def test_a_reshare_plan_for_another_group_is_refused(teecloud_home: Path, cluster: Cluster) -> None:
    other = th.deal(None, 3, 5).commitments
    server = cluster.nodes[1].server
    r = httpx.post(
        server.admin_url + "/reshare/open",
        headers={"authorization": f"Bearer {server.admin_token}"},
        json={
            "session": "00" * 16,
            "epoch": 1,
            "old_commitments": [c.hex() for c in other],
            "dealers": [1, 2, 3],
            "t_new": 3,
            "n_new": 5,
            "member_token_hashes": {str(j): "11" * 32 for j in range(1, 6)},
        },
    )
    assert r.status_code == 400 and "not this node's group" in r.json()["reason"]
    r = httpx.post(server.admin_url + "/reshare/open", json={})
    assert r.status_code == 401


def test_kms_code_upgrade_is_a_reshare(teecloud_home: Path, world: World, cluster: Cluster) -> None:
    """Build v2 of the KMS, once allowed on chain, joins by resharing at its boot, seals its share to its own
    measurement and serves; the app's keys do not change and no node ever held the whole root."""
    provider = cluster.provider()
    app_id, before = boot_hello(teecloud_home, world, provider)
    v2 = "teecloud-kms v2 (upgrade test)"
    plan = ResharePlan(os.urandom(16), 1, cluster.group.commitments, DEALERS, 3, 5)
    _open(cluster, plan)
    with pytest.raises(KmsClientError):  # not allowed on chain yet: no dealer gives it anything
        _join(teecloud_home, cluster, plan, 1, build=v2)
    tee = SimulatedTdx(teecloud_home)
    ident = boot_kms_tee(tee, build=v2)
    for mr in (ident.mr_aggregated, ident.boot_mr_aggregated):
        with contextlib.suppress(ContractReverted):
            world.chain.add_kms_mr(mr)
    with contextlib.suppress(ContractReverted):
        world.chain.add_kms_device(tee.device_id)
    plan = ResharePlan(os.urandom(16), 1, cluster.group.commitments, DEALERS, 3, 5)
    _open(cluster, plan)
    new_shares = [_join(teecloud_home, cluster, plan, j, build=v2) for j in range(1, 6)]
    assert all(s.group_public_key == cluster.group.group_public_key for s in new_shares)
    new_nodes = {
        s.index: test_threshold_nodes.start_node(teecloud_home, world.chain, s, build=v2, name="kms-v2")
        for s in new_shares
    }
    try:
        assert all(n.kms.service.identity.mr_aggregated == ident.mr_aggregated for n in new_nodes.values())
        for i, n in cluster.nodes.items():  # the old committee retires its shares, then the old build stops
            r = httpx.post(
                n.server.admin_url + "/threshold/retire",
                headers={"authorization": f"Bearer {n.server.admin_token}"},
            )
            assert r.status_code == 200 and r.json()["sealed_copy_erased"], r.text
            assert not (teecloud_home / f"kms-node-{i}" / "kms" / SHARE_FILE).exists()
            assert n.kms.service.threshold is None
        assert cluster.provider().boot_nonce()  # challenges are still issued ...
        with pytest.raises(KmsClientError, match="valid partial"):  # ... but no old node evaluates any more
            boot_hello(teecloud_home, world, cluster.provider(), app_id=app_id)
        stop_servers(n.server for n in cluster.nodes.values())
        v2_cluster = Cluster(
            new_nodes,
            test_threshold_nodes.ThresholdGroup(
                1, 3, new_shares[0].commitments, {i: n.server.url for i, n in new_nodes.items()}
            ),
            cluster.dev_tee,
            new_shares,
        )
        _, after = boot_hello(teecloud_home, world, v2_cluster.provider(), app_id=app_id)
        assert (after.keys.disk_crypt_key, after.keys.env_crypt_key, after.keys.k256_key) == (
            before.keys.disk_crypt_key,
            before.keys.env_crypt_key,
            before.keys.k256_key,
        )
    finally:
        stop_servers(n.server for n in new_nodes.values())
