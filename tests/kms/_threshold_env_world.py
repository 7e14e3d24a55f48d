"""The five-member threshold env-secret committee that tests/kms/test_threshold_env.py and the sixth review's
attacks on it (tests/review6) run against: the `members` fixture, the deployer's and a booting CVM's clients
of it, and what the members hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from teecloud.keys import threshold_ecdsa as te
from teecloud.kms import api
from teecloud.kms.client import KmsClient, connect_kms
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_net_peering import Member, allow_build, start_member
from tests.kms.test_threshold_nodes import boot_hello

T, N = 3, 5


@pytest.fixture
def members(teecloud_home: Path, world: World) -> Iterator[tuple[dict[int, Member], bytes]]:
    allow_build(world.chain, teecloud_home)
    shares = local_joint_feldman(T, N, epoch=1)
    keys = te.dkg_local(T, N)
    out: dict[int, Member] = {}
    try:
        for s in shares:
            m = start_member(teecloud_home, world.chain, s, name="env")
            m.service._install_signer(keys[s.index - 1])
            out[s.index] = m
        for _ in range(24):  # presignatures (made in one process here; networked: kms.threshold_net)
            for i, p in te.presign_local(keys, list(range(1, N + 1))).items():
                out[i].service.threshold.signer.pool.add([p])  # type: ignore[union-attr]
        urls = {i: m.server.url for i, m in out.items()}
        for m in out.values():
            assert m.service.env_keys is not None
            m.service.env_keys.set_peers(urls)
        yield out, keys[0].group_public_key
    finally:
        stop_servers(m.server for m in out.values())


def kms_clients(members: dict[int, Member], dev: SimulatedTdx) -> dict[int, KmsClient]:
    """One RA-TLS client per member, each expecting that member's CA key (what a deployer or a CVM holds)."""
    return {
        i: connect_kms(
            m.server.url,
            collateral_for=lambda _q, _n: dev.collateral(),
            dev_root_der=dev.dev_root_der(),
            expected_ca_pubkey_der=m.service.keys.ca_public_key_der,
        )
        for i, m in members.items()
    }


def provider_for(members: dict[int, Member], signing_key: bytes, dev: SimulatedTdx) -> ThresholdKeyProvider:
    ev = members[1].service.threshold
    assert ev is not None
    group = ThresholdGroup(1, T, ev.commitments, {i: m.server.url for i, m in members.items()}, signing_key)
    return ThresholdKeyProvider(group, kms_clients(members, dev), hedge_s=60.0)


def boot_with_env(
    teecloud_home: Path,
    world: World,
    members: dict[int, Member],
    signing_key: bytes,
    dev: SimulatedTdx,
    blob: bytes,
    *,
    app_id: bytes,
) -> ThresholdKeyProvider:
    """Boot app `app_id`'s hello CVM with the encrypted env `blob`; its key provider holds the outcome."""
    provider = provider_for(members, signing_key, dev)
    provider.bind_encrypted_env(blob)
    boot_hello(teecloud_home, world, provider, app_id=app_id)
    return provider


def env_files(members: dict[int, Member]) -> dict[int, list[str]]:
    return {
        i: sorted(p.name for p in m.service.env_keys.store.dir.glob("*.sealed"))  # type: ignore[union-attr]
        for i, m in members.items()
    }


def pubkey(m: Member, app_id: bytes) -> api.EnvEncryptPubKeyResponse:
    return m.service.env_encrypt_pubkey(app_id.hex())
