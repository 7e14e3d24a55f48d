"""Dealerless key generation among KMS nodes (issue 19): five share-less nodes each deal a random secret
(Joint-Feldman); five new nodes, at their boot, fetch their sub-shares over mutual RA-TLS (boot-time
evidence of a KMS build KmsAuth allows) and sum them. No process ever holds the group secret; the new
nodes then serve key releases. A dealer that restarts mid-round fails the round for everyone."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from teecloud.chain import ContractReverted
from teecloud.keys import threshold as th
from teecloud.kms.audit import AuditLog
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee, kms_dir, start_kms_state
from teecloud.kms.challenge import BootChallenges
from teecloud.kms.client import connect_kms
from teecloud.kms.errors import AccessDenied, KmsClientError
from teecloud.kms.server import KmsServer
from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
from teecloud.kms.threshold import DkgPlan, ReshareDealer, ThresholdShare
from teecloud.kms.threshold_client import ThresholdGroup, join_dkg
from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference
from tests.kms import test_threshold_nodes
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_nodes import Cluster, boot_hello

N, T = 5, 3


@pytest.fixture
def dealers(teecloud_home: Path, world: World) -> Iterator[dict[int, KmsServer]]:
    """Five fresh threshold nodes with no share yet (each its own service, directory, identity)."""
    servers: dict[int, KmsServer] = {}
    try:
        for i in range(1, N + 1):
            home = teecloud_home / f"dkg-dealer-{i}"
            tee = SimulatedTdx(teecloud_home)
            identity = boot_kms_tee(tee)
            state, _ = start_kms_state(tee, identity, now=int(time.time()), home=home)
            service = KmsService(
                state=state,
                identity=identity,
                tee=tee,
                chain=world.chain,
                collateral=StaticCollateral(tee.collateral),
                audit=AuditLog(kms_dir(home) / "audit.jsonl"),
                config=KmsConfig(dev_mode=True),
                dev_root_der=tee.dev_root_der(),
                block_number=world.chain.block_number,
                os_image_reference=simulated_os_image_reference,
                challenges=BootChallenges(),
                reshare=ReshareDealer(None),
            )
            servers[i] = KmsServer(service).start()
        yield servers
    finally:
        stop_servers(servers.values())


def _allow_kms_build(world: World, home: Path) -> None:
    tee = SimulatedTdx(home)
    ident = boot_kms_tee(tee)
    for mr in (ident.mr_aggregated, ident.boot_mr_aggregated):
        with contextlib.suppress(ContractReverted):
            world.chain.add_kms_mr(mr)
    with contextlib.suppress(ContractReverted):
        world.chain.add_kms_device(tee.device_id)


def _open(servers: dict[int, KmsServer], plan: DkgPlan) -> None:
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
            },
        )
        assert r.status_code == 200, r.text


def _join(home: Path, servers: dict[int, KmsServer], plan: DkgPlan, index: int) -> ThresholdShare:
    tee = SimulatedTdx(home)
    boot_kms_tee(tee, finish=False)  # at its boot: dealers release sub-shares to boot-time evidence only
    clients = {
        i: connect_kms(
            s.url,
            collateral_for=lambda _q, _n: tee.collateral(),
            dev_root_der=tee.dev_root_der(),
            expected_ca_pubkey_der=s.service.keys.ca_public_key_der,
        )
        for i, s in servers.items()
    }
    return join_dkg(plan, index, tee, clients, app_id=KMS_APP_ID)


def test_dkg_among_attested_nodes_then_the_new_nodes_serve(
    teecloud_home: Path, world: World, dealers: dict[int, KmsServer]
) -> None:
    _allow_kms_build(world, teecloud_home)
    plan = DkgPlan(os.urandom(16), 1, tuple(range(1, N + 1)), T, N)
    _open(dealers, plan)
    shares = [_join(teecloud_home, dealers, plan, j) for j in range(1, N + 1)]
    assert len({s.commitments for s in shares}) == 1
    x, _ = th.app_contexts(1, b"\x42" * 20, b"\x43" * 20)
    outs = {
        th.combine(x, [th.partial_evaluate(i, shares[i - 1].share, x) for i in subset], T)
        for subset in itertools.combinations(range(1, N + 1), T)
    }
    assert len(outs) == 1  # any 3 of the 5 new shares: one key
    # A share-less dealer never serves keys of its own.
    with pytest.raises(AccessDenied, match="threshold KMS node"):
        dealers[1].service.get_app_key(b"x")
    # The new nodes serve a real guest boot.
    nodes = {
        s.index: test_threshold_nodes.start_node(teecloud_home, world.chain, s, name="dkg-node")
        for s in shares
    }
    try:
        group = ThresholdGroup(1, T, shares[0].commitments, {i: n.server.url for i, n in nodes.items()})
        cluster = Cluster(nodes, group, SimulatedTdx(teecloud_home), shares)
        _, state = boot_hello(teecloud_home, world, cluster.provider())
        assert state.keys.key_provider_info["id"] == shares[0].group_public_key.hex()
    finally:
        stop_servers(n.server for n in nodes.values())


def test_a_dealer_restarting_mid_dkg_fails_the_round(
    teecloud_home: Path, world: World, dealers: dict[int, KmsServer]
) -> None:
    _allow_kms_build(world, teecloud_home)
    plan = DkgPlan(os.urandom(16), 1, tuple(range(1, N + 1)), T, N)
    _open(dealers, plan)
    dealers[4].service.reshare = ReshareDealer(None)  # restarted: its dealing is gone
    with pytest.raises(KmsClientError, match=r"node 4: .*no open reshare round"):
        _join(teecloud_home, dealers, plan, 1)
    with pytest.raises(KmsClientError, match="already handed out"):  # and the round cannot be replayed
        _join(teecloud_home, dealers, plan, 1)
