"""The channel between RUNNING threshold KMS nodes (teecloud.kms.peering): a member is admitted only with
its boot-time key (quote at the boot measurement), an allowed KMS build, and a membership proof of THIS
committee for that very key. Each negative test is the attacker's exact request."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.chain import ChainClient, ContractReverted
from teecloud.keys import threshold as th
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.certs import spki_der
from teecloud.keys.ratls import make_ratls_cert
from teecloud.kms import api
from teecloud.kms.audit import AuditLog
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee, finish_kms_boot, kms_dir, start_kms_state
from teecloud.kms.challenge import BootChallenges
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.peering import PeerClient, PeerIdentity, membership_input
from teecloud.kms.rootkeys import LocalRootKeys
from teecloud.kms.server import KmsServer
from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
from teecloud.kms.threshold import ThresholdEvaluator, ThresholdShare, local_joint_feldman
from teecloud.kms.threshold_sign import (
    CA_SHARE_FILE,
    ThresholdSigner,
    open_ca_signer,
    open_signer,
    save_ca_root,
    save_signing_share,
)
from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference
from tests.kms.conftest import World, post_with_cert, stop_servers

T, N = 3, 5


@dataclass
class Member:
    index: int
    tee: SimulatedTdx
    service: KmsService
    server: KmsServer
    identity: PeerIdentity


def allow_build(chain: ChainClient, home: Path, build: str | None = None) -> None:
    tee = SimulatedTdx(home)
    ident = boot_kms_tee(tee, build=build)
    for mr in (ident.mr_aggregated, ident.boot_mr_aggregated):
        with contextlib.suppress(ContractReverted):
            chain.add_kms_mr(mr)
    with contextlib.suppress(ContractReverted):
        chain.add_kms_device(tee.device_id)


def start_member(
    home: Path,
    chain: ChainClient,
    share: ThresholdShare,
    *,
    build: str | None = None,
    name: str = "m",
    app_ca: bool = False,
) -> Member:
    """A threshold node booted as the launcher boots one: peer identity at the boot measurement; with
    `app_ca`, also a place for the group's app CA key and root (tests/kms/test_threshold_net_ca.py)."""
    node_home = home / f"{name}-{share.index}"
    tee = SimulatedTdx(home)
    identity = boot_kms_tee(tee, build=build, finish=False)
    peer = PeerIdentity.at_boot(tee, epoch=share.epoch, index=share.index, share=share.share)
    finish_kms_boot(tee)
    state, _ = start_kms_state(tee, identity, now=int(time.time()), home=node_home)

    def install(key: te.KeyShare) -> ThresholdSigner | None:
        save_signing_share(key, tee, identity, node_home)
        return open_signer(tee, identity, node_home)

    def install_ca(key: te.KeyShare) -> ThresholdSigner | None:
        save_signing_share(key, tee, identity, node_home, file=CA_SHARE_FILE)
        return open_ca_signer(tee, identity, node_home)

    service = KmsService(
        state=state,
        identity=identity,
        tee=tee,
        chain=chain,
        collateral=StaticCollateral(tee.collateral),
        audit=AuditLog(kms_dir(node_home) / "audit.jsonl"),
        config=KmsConfig(dev_mode=True),
        dev_root_der=tee.dev_root_der(),
        block_number=chain.block_number,
        os_image_reference=simulated_os_image_reference,
        root_keys=LocalRootKeys(state),
        challenges=BootChallenges(),
        threshold=ThresholdEvaluator(share),
        peer_identity=peer,
        install_signing_key=install,
        install_ca_key=install_ca if app_ca else None,
        save_ca_root=(lambda cert: save_ca_root(cert, node_home)) if app_ca else None,
    )
    return Member(share.index, tee, service, KmsServer(service).start(), peer)


@pytest.fixture
def committee(teecloud_home: Path, world: World) -> Iterator[tuple[dict[int, Member], list[ThresholdShare]]]:
    allow_build(world.chain, teecloud_home)
    shares = local_joint_feldman(T, N, epoch=1)
    members: dict[int, Member] = {}
    try:
        for s in shares[:3]:
            members[s.index] = start_member(teecloud_home, world.chain, s)
        yield members, shares
    finally:
        stop_servers(m.server for m in members.values())


def client(src: Member, dst: Member) -> PeerClient:
    return PeerClient(
        dst.server.url, identity=src.identity, admission=src.service.peering, expected_index=dst.index
    )


def hello(src: Member, dst: Member) -> api.PeerHelloResponse:
    return client(src, dst).peer_call(api.PATH_PEER_HELLO, api.PeerHelloResponse, {})


def forged_post(
    target: Member, key: ec.EllipticCurvePrivateKey, quote_source: object, member: api.PeerMember | None
) -> tuple[int, dict[str, object]]:
    """The attacker's request: its key in an RA-TLS client certificate under the target's temporary CA,
    with the quote `quote_source` gives, and the membership proof it has."""
    now = int(time.time()) - 30
    cert = make_ratls_cert(
        quote_source,  # type: ignore[arg-type]
        key,
        issuer_key=target.service.state.temp_ca_key,
        issuer_cert=target.service.state.temp_ca_cert,
        subject="teecloud KMS peer",
        usage="kms:peer",
        not_before=now,
        not_after=now + 600,
        app_id=KMS_APP_ID,
        server_auth=False,
        client_auth=True,
    )
    body = {"member": member.model_dump() if member is not None else None}
    return post_with_cert(
        target.server.url,
        api.PATH_PEER_HELLO,
        key,
        cert.public_bytes(serialization.Encoding.DER),
        body,
    )


def proof_for(share: ThresholdShare, key: ec.EllipticCurvePrivateKey) -> api.PeerMember:
    p = th.partial_evaluate(
        share.index, share.share, membership_input(share.epoch, share.index, spki_der(key.public_key()))
    )
    return api.PeerMember(epoch=share.epoch, index=share.index, element=p.element.hex(), proof=p.proof.hex())


def test_running_members_admit_each_other_both_ways(
    committee: tuple[dict[int, Member], list[ThresholdShare]],
) -> None:
    members, _ = committee
    answer = hello(members[1], members[2])
    assert answer.index == 1 and answer.member.index == 2
    assert hello(members[3], members[1]).index == 3
    # the server certificate each one checked carries the quote taken at its boot
    rec = [r for r in members[2].service.audit.read(limit=10) if r.endpoint == api.PATH_PEER_HELLO]
    assert rec and rec[-1].decision == "allowed"
    assert "running member 1 admitted" in rec[-1].reason


def test_post_boot_quote_is_refused_even_with_a_valid_membership_proof(
    committee: tuple[dict[int, Member], list[ThresholdShare]],
) -> None:
    """The quote-oracle path: a quote over the attacker's key taken after the node's boot finished (any
    process of a running CVM that can ask for quotes). Even given share 4's proof for that key, the boot-time
    rule refuses it."""
    members, shares = committee
    running = members[3].tee  # a running KMS CVM: its boot has finished
    key = ec.generate_private_key(ec.SECP256R1())
    status, body = forged_post(members[1], key, running, proof_for(shares[3], key))
    assert status == 403 and body["step"] == "boot_time", body


def test_non_member_is_refused(
    teecloud_home: Path, world: World, committee: tuple[dict[int, Member], list[ThresholdShare]]
) -> None:
    """An allowed KMS build, booted properly, holding a share of ANOTHER committee (same t, n, epoch)."""
    members, _ = committee
    other = local_joint_feldman(T, N, epoch=1)[3]
    stranger = start_member(teecloud_home, world.chain, other, name="stranger")
    try:
        with pytest.raises(KmsDenied) as err:
            hello(stranger, members[1])  # and it is refused as a server by every member (below)
        assert err.value.step == "membership"
        with pytest.raises(KmsClientError, match="membership proof does not verify"):
            client(members[1], stranger).peer_call(api.PATH_PEER_HELLO, api.PeerHelloResponse, {})
        # the attacker's exact request, with its own (valid, other-committee) proof
        status, body = post_with_cert_as(stranger, members[1])
        assert status == 403 and body["step"] == "membership", body
    finally:
        stranger.server.stop()


def post_with_cert_as(src: Member, dst: Member) -> tuple[int, dict[str, object]]:
    return forged_post(dst, src.identity.key, src.identity.evidence, src.identity.member)


def test_membership_proof_of_another_key_is_refused(
    teecloud_home: Path, committee: tuple[dict[int, Member], list[ThresholdShare]]
) -> None:
    """A boot-time key of an allowed build (an attacker who booted the KMS image itself) replaying member 2's
    proof, which names member 2's key: refused. Without a proof: refused."""
    members, _ = committee
    attacker_tee = SimulatedTdx(teecloud_home)
    boot_kms_tee(attacker_tee, finish=False)
    ident = PeerIdentity.at_boot(attacker_tee, epoch=1, index=2, share=12345)  # a share it does not hold
    status, body = forged_post(members[1], ident.key, ident.evidence, members[2].identity.member)
    assert status == 403 and body["step"] == "membership", body
    status, body = forged_post(members[1], ident.key, ident.evidence, ident.member)
    assert status == 403 and body["step"] == "membership", body
    status, body = forged_post(members[1], ident.key, ident.evidence, None)
    assert status == 403 and body["step"] == "membership", body


def test_not_allowed_measurement_is_refused(
    teecloud_home: Path, world: World, committee: tuple[dict[int, Member], list[ThresholdShare]]
) -> None:
    """A KMS build KmsAuth does not allow, holding a genuine share of this committee (e.g. an old build
    whose allowance was removed): refused at the chain step, in both directions."""
    members, shares = committee
    rogue = start_member(teecloud_home, world.chain, shares[3], build="rogue-build", name="rogue")
    try:
        status, body = post_with_cert_as(rogue, members[1])
        assert status == 403 and body["step"] == "chain", body
        with pytest.raises(KmsClientError, match="refused"):
            client(members[1], rogue).peer_call(api.PATH_PEER_HELLO, api.PeerHelloResponse, {})
    finally:
        rogue.server.stop()


def test_retired_node_admits_nobody(committee: tuple[dict[int, Member], list[ThresholdShare]]) -> None:
    members, _ = committee
    members[2].service.threshold = None  # what retire_share does to the process's copy
    status, body = post_with_cert_as(members[1], members[2])
    assert status == 403 and body["step"] == "mode", body


def test_generated_mutations_of_a_membership_proof_are_refused(
    committee: tuple[dict[int, Member], list[ThresholdShare]],
) -> None:
    """Member 2's genuine boot-time key and certificate, with its membership proof mutated: one byte of the
    element or of the proof flipped (every position class), or the index / epoch changed."""
    members, _ = committee
    src, dst = members[2], members[1]
    genuine = src.identity.member
    status, body = forged_post(dst, src.identity.key, src.identity.evidence, genuine)
    assert status == 200, body
    rng = random.Random(19)
    mutants: list[api.PeerMember] = []
    for field_name, length in (("element", 32), ("proof", 64)):
        raw = bytearray(bytes.fromhex(getattr(genuine, field_name)))
        for pos in sorted({0, length - 1, *rng.sample(range(length), 10)}):
            m = bytearray(raw)
            m[pos] ^= 1 << rng.randrange(8)
            mutants.append(genuine.model_copy(update={field_name: m.hex()}))
    mutants += [genuine.model_copy(update={"index": i}) for i in (1, 3, 4, 5)]
    mutants += [genuine.model_copy(update={"epoch": e}) for e in (0, 2)]
    for mutant in mutants:
        status, body = forged_post(dst, src.identity.key, src.identity.evidence, mutant)
        assert status == 403 and body["step"] == "membership", (mutant, body)
