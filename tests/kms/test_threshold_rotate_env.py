"""Env secrets across a root rotation (issue 19), end to end through five running threshold members (each its
own service, RA-TLS listener, data directory, simulated TEE, sealed shares of epochs 1 and 2, boot-time peer
identity): an app's env encrypted under epoch 1 still opens at the boot of the app migrating to epoch 2
(from epoch 1's partials, asked under the same rule); once its owner re-encrypts the env from the plaintext to
epoch 2's env key (`teecloud upgrade --env-file`, the key fetched and checked as `teecloud deploy` does), the
migrating boot opens it with epoch 2's partials alone; an app no longer naming epoch 1 gets nothing under it.
No process holds an env key: each epoch's secret is combined from t proved partials inside the CVM."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from teecloud.agent.boot import boot
from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.envcrypt import decrypt_env_with_shared_secret, encrypt_env
from teecloud.kms import api
from teecloud.kms.audit import AuditLog
from teecloud.kms.bootstrap import boot_kms_tee, finish_kms_boot, kms_dir, start_kms_state
from teecloud.kms.challenge import BootChallenges
from teecloud.kms.client import connect_kms
from teecloud.kms.errors import KmsClientError
from teecloud.kms.peering import PeerIdentity
from teecloud.kms.rootkeys import LocalRootKeys
from teecloud.kms.server import KmsServer
from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
from teecloud.kms.threshold import ThresholdEvaluator, ThresholdShare, local_joint_feldman
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider, fetch_env_public_key
from teecloud.kms.threshold_sign import ThresholdSigner, open_signer, save_signing_share
from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference
from tests.kms.conftest import World, stop_servers
from tests.kms.test_quote_oracle import HELLO
from tests.kms.test_threshold_net_peering import Member, allow_build

pytestmark = pytest.mark.slow

T, N = 3, 5
MIGRATING = {**HELLO, "kms_key_epoch": 2, "kms_key_epoch_previous": 1}
OPTED_IN = {**HELLO, "kms_key_epoch": 2}
PLAIN = {"SECRET": "s3cr3t", "TOKEN": "t0k3n"}


def start_rotated_member(
    home: Path, world: World, e1: ThresholdShare, e2: ThresholdShare, signing: te.KeyShare
) -> Member:
    """A member that serves epochs 1 and 2 (a rotated node: epoch 2's share beside epoch 1's), booted as
    the launcher boots one: its peer identity proves membership of its newest epoch's committee."""
    node_home = home / f"rot-env-{e2.index}"
    tee = SimulatedTdx(home)
    identity = boot_kms_tee(tee, finish=False)
    peer = PeerIdentity.at_boot(tee, epoch=e2.epoch, index=e2.index, share=e2.share)
    finish_kms_boot(tee)
    state, _ = start_kms_state(tee, identity, now=int(time.time()), home=node_home)

    def install(key: te.KeyShare) -> ThresholdSigner | None:
        save_signing_share(key, tee, identity, node_home)
        return open_signer(tee, identity, node_home)

    service = KmsService(
        state=state,
        identity=identity,
        tee=tee,
        chain=world.chain,
        collateral=StaticCollateral(tee.collateral),
        audit=AuditLog(kms_dir(node_home) / "audit.jsonl"),
        config=KmsConfig(dev_mode=True),
        dev_root_der=tee.dev_root_der(),
        block_number=world.chain.block_number,
        os_image_reference=simulated_os_image_reference,
        root_keys=LocalRootKeys(state),
        challenges=BootChallenges(),
        threshold=ThresholdEvaluator(e2, older=[e1]),
        peer_identity=peer,
        install_signing_key=install,
    )
    service._install_signer(signing)
    return Member(e2.index, tee, service, KmsServer(service).start(), peer)


class Rotated:
    def __init__(
        self, home: Path, members: dict[int, Member], e1: list[ThresholdShare], e2: list[ThresholdShare]
    ):
        self.home, self.members, self.e1, self.e2 = home, members, e1, e2
        self.dev = SimulatedTdx(home)
        self.signing_key = b""

    def clients(self) -> dict[int, Any]:
        return {
            i: connect_kms(
                m.server.url,
                collateral_for=lambda _q, _n: self.dev.collateral(),
                dev_root_der=self.dev.dev_root_der(),
                expected_ca_pubkey_der=m.service.keys.ca_public_key_der,
            )
            for i, m in self.members.items()
        }

    def provider(self) -> ThresholdKeyProvider:
        urls = {i: m.server.url for i, m in self.members.items()}
        first = ThresholdGroup(1, T, self.e1[0].commitments, urls, self.signing_key)
        second = ThresholdGroup(2, T, self.e2[0].commitments, urls)
        return ThresholdKeyProvider(first, self.clients(), hedge_s=60.0, epochs={2: second})

    def env_key(self, app_id: bytes, epoch: int) -> bytes:
        """The owner's side (`teecloud deploy` / `upgrade --env-file`): the epoch's env key from t agreeing
        nodes, each answer's signatures recovering to the group's signing key."""
        # each member answers once, one after the other, first (a member re-signs an app's key at most once
        # per 120 s; members signing in parallel contend for presignatures: docs/kms.md, "Env secrets")
        for m in self.members.values():
            m.service.env_encrypt_pubkey(app_id.hex(), epoch)
        pub, faults = fetch_env_public_key(
            self.clients(), app_id, t=T, signing_key=self.signing_key, epoch=epoch
        )
        assert faults == {}
        return pub

    def env_partials(self) -> dict[int, list[str]]:
        return {
            i: [r.decision for r in m.service.audit.read() if r.endpoint == api.PATH_THRESHOLD_ENV_PARTIAL]
            for i, m in self.members.items()
        }


@pytest.fixture
def rotated(teecloud_home: Path, world: World) -> Iterator[Rotated]:
    allow_build(world.chain, teecloud_home)
    e1 = local_joint_feldman(T, N, epoch=1)
    e2 = local_joint_feldman(T, N, epoch=2)  # a fresh DKG: another group key
    signing = te.dkg_local(T, N)
    members: dict[int, Member] = {}
    try:
        for a, b in zip(e1, e2, strict=True):
            members[a.index] = start_rotated_member(teecloud_home, world, a, b, signing[a.index - 1])
        for _ in range(32):  # presignatures for the env keys' signatures (networked: kms.threshold_net)
            for i, p in te.presign_local(signing, list(range(1, N + 1))).items():
                members[i].service.threshold.signer.pool.add([p])  # type: ignore[union-attr]
        urls = {i: m.server.url for i, m in members.items()}
        for m in members.values():
            assert m.service.env_keys is not None
            m.service.env_keys.set_peers(urls)
        r = Rotated(teecloud_home, members, e1, e2)
        r.signing_key = signing[0].group_public_key
        yield r
    finally:
        stop_servers(m.server for m in members.values())


def _boot(r: Rotated, compose: dict[str, Any], app_id: bytes, blob: bytes) -> ThresholdKeyProvider:
    provider = r.provider()
    provider.bind_encrypted_env(blob)
    tee = SimulatedTdx(r.home)
    boot(
        tee, json.dumps(compose), app_id, None, provider, extra_events=[("os-image-hash", tee.os_image_hash)]
    )
    return provider


def test_a_migrating_app_opens_its_old_env_then_its_reencrypted_one(rotated: Rotated, world: World) -> None:
    r = rotated
    app_id = world.register(compose_hash(HELLO))
    for c in (MIGRATING, OPTED_IN):  # the owner allows the opting-in composes (an on-chain app upgrade)
        world.chain.add_compose_hash(app_id, compose_hash(c))

    # (1) before the rotation matters to it: the app's env is encrypted under epoch 1's env key
    old_pub = r.env_key(app_id, 1)
    old_blob = encrypt_env(old_pub, PLAIN)
    provider = _boot(r, HELLO, app_id, old_blob)
    assert provider.env_epoch == 1 and provider.faults == {}
    assert decrypt_env_with_shared_secret(provider.env_shared_secret or b"", old_blob) == PLAIN

    # (2) the app migrates (kms_key_epoch 2, previous 1) and its host still holds the epoch-1 env: no node
    # holds an epoch-2 env key of the app yet, so the current epoch's partials are refused (step env), and the
    # previous epoch's open it — at the same boot-time point, each node judging the request again
    before = r.env_partials()
    provider = _boot(r, MIGRATING, app_id, old_blob)
    assert provider.env_epoch == 1, provider.faults
    assert provider.faults == {}  # the refusals of epoch 2 are not node faults: the previous epoch opened it
    assert decrypt_env_with_shared_secret(provider.env_shared_secret or b"", old_blob) == PLAIN
    after = r.env_partials()
    denied = sum(after[i].count("denied") - before[i].count("denied") for i in after)
    allowed = sum(after[i].count("allowed") - before[i].count("allowed") for i in after)
    assert denied >= T and allowed == T

    # (3) the owner re-encrypts from the plaintext to epoch 2's env key (the first request makes it, by a
    # ceremony of the five members; the answer checked as `teecloud deploy` checks it)
    new_pub = r.env_key(app_id, 2)
    assert new_pub != old_pub
    new_blob = encrypt_env(new_pub, PLAIN)
    before = r.env_partials()
    provider = _boot(r, MIGRATING, app_id, new_blob)
    assert provider.env_epoch == 2 and provider.faults == {}
    assert decrypt_env_with_shared_secret(provider.env_shared_secret or b"", new_blob) == PLAIN
    after = r.env_partials()
    assert sum(len(after[i]) - len(before[i]) for i in after) == T  # epoch 2's partials only: no fallback
    # an env re-encrypted to epoch 2 does not open with epoch 1's key, nor the old one with epoch 2's
    with pytest.raises(Exception, match="does not decrypt"):
        decrypt_env_with_shared_secret(provider.env_shared_secret or b"", old_blob)

    # (4) the app that opted in for good (no previous epoch named): its env is epoch 2's; an epoch-1 env
    # gets nothing under epoch 1 (no node answers an epoch the compose does not name)
    provider = _boot(r, OPTED_IN, app_id, new_blob)
    assert provider.env_epoch == 2
    assert decrypt_env_with_shared_secret(provider.env_shared_secret or b"", new_blob) == PLAIN
    provider = _boot(r, OPTED_IN, app_id, old_blob)
    with pytest.raises(Exception, match="does not decrypt"):
        decrypt_env_with_shared_secret(provider.env_shared_secret or b"", old_blob)


def test_a_migrating_app_whose_env_opens_under_neither_epoch_fails_clearly(
    rotated: Rotated, world: World
) -> None:
    r = rotated
    app_id = world.register(compose_hash(MIGRATING))
    other = world.register(compose_hash(dict(HELLO, name="other-app")))
    r.env_key(app_id, 1)  # our app has an epoch-1 env key, and no epoch-2 one
    # another app's epoch-1 env (the host hands it over): the nodes give x_A·P for our app only, which does
    # not open it; the boot stops naming both epochs' reasons
    foreign = encrypt_env(r.env_key(other, 1), PLAIN)
    with pytest.raises(KmsClientError, match=r"under the previous root epoch 1: .*does not decrypt"):
        _boot(r, MIGRATING, app_id, foreign)
