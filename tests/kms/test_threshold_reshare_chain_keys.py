"""A reshare's new member checks the carried group keys against the chain (issue 19): the signing key's
and the CA key's C_0 must be the keys KmsGroup records for the epoch, read at the finality depth before any
dealer is asked. Dealers that all agree on another key pass every commitments check (they re-deal their own
sharing consistently); only the chain tells the new member it is not the group's. The attacker's steps:
dealers carrying another signing key / CA key, a chain that records no key, a chain that cannot be read or
is too short for the depth; each fails the join naming the dealers, and the launcher seals nothing."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from teecloud.chain import ChainClient
from teecloud.chain.connection import ChainConnection
from teecloud.chain.errors import ChainUnreachable
from teecloud.chain.kmsgroup import CommitteeMember, KmsGroup
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys._groups import P256
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee, kms_dir
from teecloud.kms.client import KmsClient, connect_kms
from teecloud.kms.errors import KmsClientError
from teecloud.kms.launcher import KmsLaunch, launch_kms
from teecloud.kms.threshold import ReshareDealer, ResharePlan, load_shares
from teecloud.kms.threshold_carry import CarriedShares, RecordedKeys, check_carried_keys
from teecloud.kms.threshold_client import join_reshare
from teecloud.kms.threshold_sign import CA_SHARE_FILE, SIGNING_SHARE_FILE, PresignaturePool, ThresholdSigner
from teecloud.peer import StaticCollateral
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_threshold_env import members
from tests.kms.test_threshold_net_peering import Member, allow_build

pytestmark = pytest.mark.slow

__all__ = ["members"]

DEALERS = (1, 3, 5)


@pytest.fixture
def group_chain(tmp_path: Path) -> Iterator[ChainClient]:
    """A chain of its own for KmsGroup (the shared one authorizes KMS builds for every test)."""
    chain = ChainClient.embedded(tmp_path / "group-chain")
    chain.deploy()
    yield chain
    chain.close()


def record_committee(chain: ChainClient, nodes: dict[int, Member]) -> KmsGroup:
    """Epoch 1's committee (the members' root commitments) recorded and active; no keys yet."""
    ev = nodes[1].service.threshold
    assert ev is not None
    members = [CommitteeMember(i, bytes([i]) * 32, bytes(32), m.server.url) for i, m in sorted(nodes.items())]
    kms_group = chain.kms_group
    kms_group.activate(kms_group.record_committee(1, len(ev.commitments), ev.commitments, members))
    return kms_group


class _GoesDown:
    """A transport that fails every request once `down` (an RPC endpoint that went away)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.down = inner, False

    def request(self, method: str, params: list[Any]) -> Any:
        if self.down:
            raise ChainUnreachable(f"the RPC endpoint went away ({method})")
        return self.inner.request(method, params)


class _Asked:
    """A dealer's client that records each page asked (to show a chain failure asks no dealer)."""

    def __init__(self, client: KmsClient) -> None:
        self.client, self.offsets = client, list[int]()

    def attested_call(self, tee: object, path: str, model: type, *, body: dict[str, Any], **kw: Any) -> Any:
        self.offsets.append(body["offset"])
        return self.client.attested_call(tee, path, model, body=body, **kw)  # type: ignore[arg-type]


class _Round:
    """One reshare round of epoch 1 opened on DEALERS (3-of-5 -> 3-of-4), each dealer carrying what its
    service holds; a new member joins it at its boot."""

    def __init__(self, home: Path, nodes: dict[int, Member]) -> None:
        ev = nodes[1].service.threshold
        assert ev is not None
        self.home, self.nodes = home, nodes
        self.plan = ResharePlan(os.urandom(16), 1, ev.commitments, DEALERS, 3, 4)
        self.tokens = {j: hashlib.sha256(self.plan.session + bytes([j])).digest() for j in range(1, 5)}
        for i in DEALERS:
            svc = nodes[i].service
            assert svc.threshold is not None
            svc.reshare = ReshareDealer(svc.threshold._share, carry=svc.carry_for_reshare)
            svc.reshare.open(self.plan, {j: hashlib.sha256(t).digest() for j, t in self.tokens.items()})

    def clients(self, tee: SimulatedTdx) -> dict[int, _Asked]:
        return {
            i: _Asked(
                connect_kms(
                    self.nodes[i].server.url,
                    collateral_for=lambda _q, _n: tee.collateral(),
                    dev_root_der=tee.dev_root_der(),
                    expected_ca_pubkey_der=self.nodes[i].service.keys.ca_public_key_der,
                )
            )
            for i in DEALERS
        }

    def join(
        self, j: int, kms_group: Any, *, finality_depth: int = 0
    ) -> tuple[CarriedShares, dict[int, _Asked]]:
        """Member j joins (a new node at its boot); -> what it was handed and the dealers' clients."""
        tee = SimulatedTdx(self.home)
        boot_kms_tee(tee, finish=False)
        clients = self.clients(tee)
        out = CarriedShares()
        try:
            join_reshare(
                self.plan,
                j,
                tee,
                clients,  # type: ignore[arg-type]
                app_id=KMS_APP_ID,
                member_token=self.tokens[j],
                carried_out=out,
                kms_group=kms_group,
                finality_depth=finality_depth,
            )
        except KmsClientError:
            assert out.env == {} and out.signing_key is None and out.ca_key is None  # nothing handed over
            raise
        return out, clients


def _ca_keys(nodes: dict[int, Member]) -> list[te.KeyShare]:
    """The group's CA key (P-256), a share on each member (made by a networked round in production)."""
    keys = te.dkg_local(3, 5, group=P256)
    for m in nodes.values():
        m.service.ca_signer = ThresholdSigner(keys[m.index - 1], PresignaturePool())
    return keys


def test_the_carried_keys_are_taken_only_when_the_chain_records_them(
    teecloud_home: Path,
    world: World,
    members: tuple[dict[int, Member], bytes],
    group_chain: ChainClient,
) -> None:
    nodes, signing_key = members
    allow_build(world.chain, teecloud_home)
    ca_key = _ca_keys(nodes)[0].group_public_key
    kms_group = record_committee(group_chain, nodes)

    # a chain record missing: the committee is recorded, its signing key not yet
    with pytest.raises(KmsClientError) as exc:
        _Round(teecloud_home, nodes).join(1, kms_group)
    said = str(exc.value)
    assert f"dealers [1, 3, 5] carried {signing_key.hex()} as the group's signing key (secp256k1)" in said
    assert "of epoch 1, but KmsGroup records none" in said
    kms_group.record_signing_key(1, signing_key)
    # the signing key recorded, the CA key not
    with pytest.raises(
        KmsClientError, match=rf"carried {ca_key.hex()} as the group's CA key \(P-256\) .*records none"
    ):
        _Round(teecloud_home, nodes).join(1, kms_group)
    kms_group.record_ca(1, ca_key, hashlib.sha256(b"the root's DER").digest())

    # both recorded: the join takes both keys (the same public keys as before)
    got, clients = _Round(teecloud_home, nodes).join(2, kms_group)
    assert got.signing_key is not None and got.signing_key.group_public_key == signing_key
    assert got.ca_key is not None and got.ca_key.group_public_key == ca_key
    assert got.signing_key.t == 3 and got.signing_key.n == 4
    assert all(c.offsets == [0] for c in clients.values())

    # a chain that cannot be read fails closed, before any dealer hands out its one-time pages
    link = _GoesDown(group_chain.transport)
    unreachable = ChainConnection(link)
    link.down = True  # the RPC endpoint goes away after the connection was made
    rnd = _Round(teecloud_home, nodes)
    tee = SimulatedTdx(teecloud_home)
    boot_kms_tee(tee, finish=False)
    asked = rnd.clients(tee)
    for bad, why in (
        (KmsGroup(unreachable, kms_group.address), "cannot read epoch 1's .* from KmsGroup: .*went away"),
        (KmsGroup(group_chain, "0x" + "11" * 20), "cannot read epoch 1's signing and CA keys from KmsGroup"),
        (kms_group, "fewer than the finality depth"),  # the chain is shorter than the depth
    ):
        out = CarriedShares()
        with pytest.raises(KmsClientError, match=why):
            join_reshare(
                rnd.plan,
                3,
                tee,
                asked,  # type: ignore[arg-type]
                app_id=KMS_APP_ID,
                member_token=rnd.tokens[3],
                carried_out=out,
                kms_group=bad,
                finality_depth=1000 if bad is kms_group else 0,
            )
        assert out.signing_key is None and out.ca_key is None
    assert all(c.offsets == [] for c in asked.values())  # no dealer was asked
    # a caller that carries keys without a chain to check them against is a programming error
    with pytest.raises(ValueError, match="pass kms_group"):
        join_reshare(rnd.plan, 3, tee, asked, app_id=KMS_APP_ID, carried_out=CarriedShares())  # type: ignore[arg-type]
    # the round is still whole for member 3 (nothing was consumed)
    got3 = rnd.join(3, kms_group)[0]
    assert got3.signing_key is not None and got3.signing_key.group_public_key == signing_key

    # dealers that all agree on another CA key: every commitments check passes, the chain's does not
    other_ca = _ca_keys(nodes)[0].group_public_key
    with pytest.raises(
        KmsClientError,
        match=rf"dealers \[1, 3, 5\] carried {other_ca.hex()} as the group's CA key \(P-256\) of epoch 1, "
        rf"but KmsGroup records {ca_key.hex()}",
    ):
        _Round(teecloud_home, nodes).join(1, kms_group)


def test_dealers_agreeing_on_another_signing_key_fail_the_boot_and_nothing_is_sealed(
    teecloud_home: Path,
    world: World,
    members: tuple[dict[int, Member], bytes],
    group_chain: ChainClient,
) -> None:
    """Through the launcher (as `kms up --join-reshare` starts a node): the join fails at boot with the
    dealers named, and the new home holds no root share, no signing or CA share, no env share."""
    nodes, signing_key = members
    allow_build(world.chain, teecloud_home)
    ca_key = _ca_keys(nodes)[0].group_public_key
    kms_group = record_committee(group_chain, nodes)
    kms_group.record_signing_key(1, signing_key)
    kms_group.record_ca(1, ca_key, hashlib.sha256(b"the root's DER").digest())
    other = te.dkg_local(3, 5)  # the dealers' own signing key, all of them in agreement
    for i in DEALERS:
        ev = nodes[i].service.threshold
        assert ev is not None
        ev.signer = ThresholdSigner(other[i - 1], PresignaturePool())
    rnd = _Round(teecloud_home, nodes)
    home = teecloud_home / "new-member"
    carried = CarriedShares()
    tee = SimulatedTdx(teecloud_home)

    def join(tee_: Any, _identity: Any) -> Any:
        return join_reshare(
            rnd.plan,
            2,
            tee_,
            rnd.clients(tee),  # type: ignore[arg-type]
            app_id=KMS_APP_ID,
            member_token=rnd.tokens[2],
            carried_out=carried,
            kms_group=kms_group,
        )

    spec = KmsLaunch(
        tee=tee,
        chain=world.chain,
        collateral=StaticCollateral(tee.collateral),
        dev=True,
        home=home,
        threshold=True,
        join=join,
        join_carried=carried,
    )
    with pytest.raises(KmsClientError) as exc:
        launch_kms(spec)
    assert (
        f"dealers [1, 3, 5] carried {other[0].group_public_key.hex()} as the group's signing key (secp256k1) "
        f"of epoch 1, but KmsGroup records {signing_key.hex()}"
    ) in exc.value.diagnostics()
    identity = boot_kms_tee(SimulatedTdx(teecloud_home))
    assert load_shares(tee, identity, home) == {}
    kd = kms_dir(home)
    assert not (kd / SIGNING_SHARE_FILE).exists() and not (kd / CA_SHARE_FILE).exists()
    assert not list(kd.rglob("*.sealed")) if kd.exists() else True
    assert carried.signing_key is None and carried.ca_key is None and carried.env == {}


def test_generated_mutations_of_a_recorded_key_are_refused() -> None:
    """The check itself, without a network: every one-byte change of either recorded key, a key recorded
    where none is carried, and none recorded where one is carried, each fail naming the dealers."""
    sig = te.dkg_local(2, 3)[0]
    ca = te.dkg_local(2, 3, group=P256)[0]
    carried = CarriedShares(signing_key=sig, ca_key=ca)
    exact = RecordedKeys(sig.group_public_key, ca.group_public_key)
    check_carried_keys(carried, exact, epoch=4, dealers=(3, 1))  # the honest case passes
    for pos in range(33):
        for field in ("signing_key", "ca_key"):
            good = getattr(exact, field)
            bad = good[:pos] + bytes([good[pos] ^ (1 << (pos % 8))]) + good[pos + 1 :]
            recorded = RecordedKeys(**{**exact.__dict__, field: bad})
            with pytest.raises(KmsClientError, match=r"dealers \[1, 3\] carried .* of epoch 4"):
                check_carried_keys(carried, recorded, epoch=4, dealers=(3, 1))
    for changed, why in (
        (CarriedShares(signing_key=None, ca_key=ca), "carried none as the group's signing key"),
        (CarriedShares(signing_key=sig, ca_key=None), "carried none as the group's CA key"),
    ):
        with pytest.raises(KmsClientError, match=why):
            check_carried_keys(changed, exact, epoch=4, dealers=(1, 3))
    with pytest.raises(KmsClientError, match="KmsGroup records none"):
        check_carried_keys(carried, RecordedKeys(sig.group_public_key, None), epoch=4, dealers=(1,))
    check_carried_keys(
        CarriedShares(), RecordedKeys(None, None), epoch=4, dealers=(1,)
    )  # nothing either side
