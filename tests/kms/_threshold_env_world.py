"""The five-member threshold env-secret committee that tests/kms/test_threshold_env.py and the sixth review's
attacks on it (tests/review6) run against: the `members` fixture, the deployer's and a booting CVM's clients
of it, and what the members hold. Also the committee the two-phase commit's tests and reviews 7 and 8 drive
(`members_3of5`): a coordinator's exact PeerEnvDkg messages, stopped wherever a test says (a crash, or an
attacker that stops sending), and members that lie in their `held` answers."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from teecloud.keys import threshold_ecdsa as te
from teecloud.kms import api
from teecloud.kms.client import KmsClient, connect_kms
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider
from teecloud.kms.threshold_env import EnvKeyBusy, EnvKeys
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_net_peering import Member, allow_build, start_member
from tests.kms.test_threshold_nodes import boot_hello

T, N = 3, 5
Sharing = tuple[bytes, ...]


def start_members(
    home: Path,
    world: World,
    t: int,
    n: int,
    into: dict[int, Member],
    *,
    name: str = "",
    presignatures: int = 40,
) -> bytes:
    """n members of one t-of-n committee (epoch 1) put `into` as they start (the caller stops them, also
    after a failure), each with its signing share and `presignatures` presignatures (made in one process
    here; networked: kms.threshold_net), each told the others' URLs. Returns the group's signing key."""
    allow_build(world.chain, home)
    shares = local_joint_feldman(t, n, epoch=1)
    keys = te.dkg_local(t, n)
    out = into
    for s in shares:
        m = start_member(home, world.chain, s, name=name or f"tp{t}of{n}")
        m.service._install_signer(keys[s.index - 1])
        out[s.index] = m
    for _ in range(presignatures):
        for i, p in te.presign_local(keys, list(range(1, n + 1))).items():
            out[i].service.threshold.signer.pool.add([p])  # type: ignore[union-attr]
    urls = {i: m.server.url for i, m in out.items()}
    for m in out.values():
        assert m.service.env_keys is not None
        m.service.env_keys.set_peers(urls)
    return keys[0].group_public_key


@pytest.fixture
def members(teecloud_home: Path, world: World) -> Iterator[tuple[dict[int, Member], bytes]]:
    out: dict[int, Member] = {}
    try:
        group_key = start_members(teecloud_home, world, T, N, out, name="env", presignatures=24)
        yield out, group_key
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


@pytest.fixture
def members_3of5(teecloud_home: Path, world: World) -> Iterator[dict[int, Member]]:
    out: dict[int, Member] = {}
    try:
        start_members(teecloud_home, world, 3, 5, out)
        yield out
    finally:
        stop_servers(m.server for m in out.values())


def env_of(m: Member) -> EnvKeys:
    assert m.service.env_keys is not None
    return m.service.env_keys


def run_stage(m: Member, body: dict[str, object]) -> api.PeerEnvDkgResponse:
    """One PeerEnvDkg stage on member m, as a coordinator's message reaches it."""
    return env_of(m).stage(api.PeerEnvDkgRequest.model_validate(body))


def confirm(m: Member, app_id: bytes) -> api.PeerEnvDkgResponse:
    """A `confirm` to member m (it settles a tentative share, or polls a confirmed one again)."""
    return run_stage(
        m, {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex(), "stage": "confirm"}
    )


def partial_ceremony(
    nodes: dict[int, Member], app_id: bytes, dealers: list[int], commit_on: list[int], confirm_on: list[int]
) -> Sharing:
    """A coordinator's messages of one ceremony among `dealers` (none of which holds a share of the app),
    stopped after its commits to `commit_on` and confirms to `confirm_on` (the rest of the dealers keep
    their pending dealing until it expires, as after a crash: here they are told to abort)."""
    base: dict[str, object] = {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex()}
    deals = {i: run_stage(nodes[i], {**base, "stage": "deal"}) for i in dealers}
    assert not any(a.held for a in deals.values())
    view = {str(i): deals[i].commitments for i in dealers}
    for i in dealers:
        run_stage(nodes[i], {**base, "stage": "view", "view": view})
    urls = {str(i): m.server.url for i, m in nodes.items()}
    done = {i: run_stage(nodes[i], {**base, "stage": "finish", "peers": urls}) for i in dealers}
    agreed = done[dealers[0]].commitments
    for i in commit_on:
        run_stage(nodes[i], {**base, "stage": "commit", "commitments": agreed})
    for i in confirm_on:
        run_stage(nodes[i], {**base, "stage": "confirm"})
    for i in set(dealers) - set(commit_on):  # their open dealing expires (here: at once)
        run_stage(nodes[i], {**base, "stage": "abort"})
    return tuple(bytes.fromhex(c) for c in agreed)


def ask_key(m: Member, app_id: bytes, tries: int = 4) -> str:
    """GetAppEnvEncryptPubKey on one member, as a client retries a 503."""
    for k in range(tries):
        try:
            return m.service.env_encrypt_pubkey(app_id.hex()).public_key
        except EnvKeyBusy:
            if k == tries - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def held_by(nodes: dict[int, Member], app_id: bytes) -> dict[int, tuple[bytes, bool] | None]:
    """Per member: (the first commitment of its sealed share, confirmed?) or None."""
    out: dict[int, tuple[bytes, bool] | None] = {}
    for i, m in nodes.items():
        rec = env_of(m).store.record(1, app_id)
        out[i] = None if rec is None else (rec[0].commitments[0], rec[1])
    return out


def restart_store(m: Member) -> None:
    """What a restart does to the store: its in-memory copy of the sealed records is gone."""
    store = env_of(m).store
    with store._lock:
        store._cache.clear()


def lying_held(m: Member, answer: Callable[[api.PeerEnvDkgRequest], api.PeerEnvDkgResponse | None]) -> None:
    """Member m answers `held` polls with `answer(req)` (its real answer when that is None)."""
    env = env_of(m)
    real = env.stage

    def stage(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        lie = answer(req) if req.stage == "held" else None
        return lie if lie is not None else real(req)

    env.stage = stage  # type: ignore[method-assign]
