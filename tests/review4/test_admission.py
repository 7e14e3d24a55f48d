"""Review 4, area 1: who is admitted as a running member (kms.peering.PeerAdmission.admit): the quote-oracle
path, key bindings replayed from another node, index / epoch / committee confusion, a build removed from
KmsAuth, a retired node. Each test is the attacker's exact request against running members and asserts the
SAFE outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.chain.kmsgroup import CommitteeMember
from teecloud.keys import threshold as th
from teecloud.keys.certs import spki_der
from teecloud.kms import api
from teecloud.kms.bootstrap import boot_kms_tee
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.peering import PeerClient, PeerIdentity, membership_input
from teecloud.kms.threshold import ThresholdShare, local_joint_feldman
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World, boot_app, finish_boot
from tests.kms.test_threshold_net_peering import (
    Member,
    T,
    allow_build,
    hello,
    proof_for,
    start_member,
)
from tests.review4._attack import ReplayedQuote, as_member, client_cert_der, member_doc, post_as

Committee = tuple[dict[int, Member], list[ThresholdShare]]


def hello_body(member: api.PeerMember | None) -> dict[str, object]:
    return {"member": member_doc(member)}


# --------------------------------------------------------------------------------- the quote-oracle path


def test_quote_oracle_of_a_tenant_app_after_its_boot_is_refused(
    teecloud_home: Path, committee: Committee
) -> None:
    """A tenant app's agent quotes any report_data (dstack GetQuote). The attacker asks it for a quote over
    its key and even holds a genuine proof for that key (as if it had share 3): refused at boot time."""
    members, shares = committee
    app = SimulatedTdx(teecloud_home)
    boot_app(app, b"\x11" * 20, b"\x22" * 32, b"\x33" * 20)
    finish_boot(app)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = client_cert_der(members[1], key, app, app_id=b"\x11" * 20)
    status, body = post_as(members[1], key, cert, hello_body(proof_for(shares[2], key)))
    assert status == 403 and body["step"] == "boot_time", body


def test_quote_of_a_tenant_app_at_its_boot_measurement_is_not_a_kms(
    teecloud_home: Path, committee: Committee
) -> None:
    """The same app quoted AT its boot measurement (RTMR3 is exactly its boot grammar): boot-time evidence,
    but of an app, not of a KMS build KmsAuth allows: refused at the chain step, before membership."""
    members, shares = committee
    app = SimulatedTdx(teecloud_home)
    boot_app(app, b"\x11" * 20, b"\x22" * 32, b"\x33" * 20)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = client_cert_der(members[1], key, app, app_id=b"\x11" * 20)
    status, body = post_as(members[1], key, cert, hello_body(proof_for(shares[2], key)))
    assert status == 403 and body["step"] == "chain", body


def test_running_kms_cvm_as_quote_oracle_is_refused_on_every_peer_route(committee: Committee) -> None:
    """Any code in a running member's CVM that can ask for quotes (post-boot RTMR3) over the attacker's key,
    with a genuine proof for that key: refused on PeerHello and on PeerRoundShares."""
    members, shares = committee
    key = ec.generate_private_key(ec.SECP256R1())
    cert = client_cert_der(members[1], key, members[2].tee)
    member = member_doc(proof_for(shares[2], key))
    for path, body in (
        (api.PATH_PEER_HELLO, {"member": member}),
        (
            api.PATH_PEER_ROUND,
            {"session": "ab" * 16, "stage": "deal", "view_hash": "00" * 32, "member": member},
        ),
    ):
        status, answer = post_as(members[1], key, cert, body, path)
        assert status == 403 and answer["step"] == "boot_time", (path, answer)


# ------------------------------------------------------------------------ key bindings from another node


def test_another_members_boot_quote_under_the_attackers_key_is_refused(committee: Committee) -> None:
    """Member 2's boot-time quote (public: it is in member 2's server certificate) and its proof, put in a
    certificate for the attacker's key: the quote's report_data binds member 2's key, not this one."""
    members, _ = committee
    ev = members[2].identity.evidence
    key = ec.generate_private_key(ec.SECP256R1())
    cert = client_cert_der(members[1], key, ReplayedQuote(ev.boot_quote, ev.boot_event_log))
    status, body = post_as(members[1], key, cert, hello_body(members[2].identity.member))
    assert status == 403 and body["step"] == "ratls_cert_verified", body


def test_a_members_proof_presented_by_another_member_is_refused(committee: Committee) -> None:
    """Node 3 (a genuine member) presents node 2's proof, and its own proof relabelled as index 2: both name
    another key or another share; its own proof admits it as 3, never as 2."""
    members, _ = committee
    key, cert = as_member(members[3], members[1])
    status, body = post_as(members[1], key, cert, hello_body(members[2].identity.member))
    assert status == 403 and body["step"] == "membership", body
    relabelled = members[3].identity.member.model_copy(update={"index": 2})
    status, body = post_as(members[1], key, cert, hello_body(relabelled))
    assert status == 403 and body["step"] == "membership", body
    status, body = post_as(members[1], key, cert, hello_body(members[3].identity.member))
    assert status == 200 and body["index"] == 3, body


def test_a_member_answering_at_another_members_address_is_refused(committee: Committee) -> None:
    """The host routes member 2's URL to member 3 (a genuine member): the caller expecting share 2 refuses."""
    members, _ = committee
    wrong = PeerClient(
        members[3].server.url,
        identity=members[1].identity,
        admission=members[1].service.peering,
        expected_index=2,
    )
    with pytest.raises(KmsClientError, match="as share 3, not 2"):
        wrong.peer_call(api.PATH_PEER_HELLO, api.PeerHelloResponse, {})


# ------------------------------------------------------------------------ epoch and committee confusion


def _reshare(old: list[ThresholdShare], t_new: int, n_new: int) -> list[ThresholdShare]:
    """A reshare of the same key to a new committee, same epoch (what kms.threshold's rounds produce)."""
    dealers = old[:T]
    dealings = [th.reshare_deal(s.index, s.share, t_new, n_new) for s in dealers]
    commitments = th.reshare_commitments(dealings)
    assert commitments[0] == old[0].commitments[0]  # the same group key
    out = []
    for j in range(1, n_new + 1):
        share, complaints = th.reshare_receive(
            old[0].commitments, dealings, j, {d.dealer: d.shares[j] for d in dealings}
        )
        assert not complaints
        out.append(ThresholdShare(old[0].epoch, j, t_new, n_new, share, commitments))
    return out


def test_old_committee_after_a_reshare_is_not_admitted_by_the_new_one(
    teecloud_home: Path, world: World, committee: Committee
) -> None:
    """After a reshare (same key, same epoch, new commitments), old member 2 — still running, same index —
    talks to new member 1, and new member 2 to old member 1: refused both ways, on both routes."""
    members, shares = committee
    new = _reshare(shares, T, 5)
    new1 = start_member(teecloud_home, world.chain, new[0], name="new")
    new2 = start_member(teecloud_home, world.chain, new[1], name="new")
    try:
        assert hello(new2, new1).index == 2  # the new committee works
        for src, dst in ((members[2], new1), (new2, members[1])):
            key, cert = as_member(src, dst)
            status, body = post_as(dst, key, cert, hello_body(src.identity.member))
            assert status == 403 and body["step"] == "membership", body
            with pytest.raises(KmsDenied):
                hello(src, dst)
    finally:
        new1.server.stop()
        new2.server.stop()


def test_a_proof_of_another_epoch_is_refused(committee: Committee) -> None:
    """Share 2 (genuine holder's key) vouching for its key under epoch 2, presented with epoch 1 and 2."""
    members, shares = committee
    key = members[2].identity.key
    spki_proof = th.partial_evaluate(
        2, shares[1].share, _membership_input(2, 2, members[2].identity.key.public_key())
    )
    cert = client_cert_der(members[1], key, members[2].identity.evidence)
    for epoch in (1, 2):
        forged = api.PeerMember(
            epoch=epoch, index=2, element=spki_proof.element.hex(), proof=spki_proof.proof.hex()
        )
        status, body = post_as(members[1], key, cert, hello_body(forged))
        assert status == 403 and body["step"] == "membership", (epoch, body)


def _membership_input(epoch: int, index: int, pub: ec.EllipticCurvePublicKey) -> bytes:
    return membership_input(epoch, index, spki_der(pub))


# ------------------------------------------------------------------------ KmsAuth removal, retirement


def test_a_build_removed_from_kmsauth_is_refused_at_the_next_call(teecloud_home: Path, world: World) -> None:
    """Two members of a build KmsAuth allows talk; the owner removes the build's boot-time measurement; the
    very next call is refused (the chain gate caches for one block only)."""
    build = "review4-removed"
    allow_build(world.chain, teecloud_home, build)
    shares = local_joint_feldman(T, 5, epoch=7)
    a = start_member(teecloud_home, world.chain, shares[0], build=build, name="rm")
    b = start_member(teecloud_home, world.chain, shares[1], build=build, name="rm")
    try:
        assert hello(b, a).index == 2
        boot_mr = boot_kms_tee(SimulatedTdx(teecloud_home), build=build).boot_mr_aggregated
        world.chain.kms._send("remove_kms_aggregated_mr", boot_mr)
        key, cert = as_member(b, a)
        status, body = post_as(a, key, cert, hello_body(b.identity.member))
        assert status == 403 and body["step"] == "chain", body
        with pytest.raises(KmsClientError, match="refused"):
            hello(a, b)
    finally:
        a.server.stop()
        b.server.stop()


def test_a_retired_member_neither_admits_nor_calls(committee: Committee) -> None:
    """retire_share: the node admits nobody (PeerHello, PeerRoundShares) and its own client refuses to
    call anyone (its committee is gone), so it takes part in no round."""
    members, _ = committee
    members[2].service.retire_share()
    key, cert = as_member(members[1], members[2])
    for path, body in (
        (api.PATH_PEER_HELLO, hello_body(members[1].identity.member)),
        (
            api.PATH_PEER_ROUND,
            {
                "session": "ab" * 16,
                "stage": "deal",
                "view_hash": "00" * 32,
                "member": member_doc(members[1].identity.member),
            },
        ),
    ):
        status, answer = post_as(members[2], key, cert, body, path)
        assert status == 403 and answer["step"] == "mode", (path, answer)
    with pytest.raises(KmsClientError, match="serves no committee"):
        hello(members[2], members[1])


def test_an_attacker_booted_kms_with_a_guessed_share_is_refused(
    teecloud_home: Path, committee: Committee
) -> None:
    """The attacker boots the allowed KMS image itself (boot-time quote over its own key, no instance id:
    the same measurement as every member) and makes proofs with guessed shares for each index."""
    members, _ = committee
    tee = SimulatedTdx(teecloud_home)
    boot_kms_tee(tee, finish=False)
    for index in range(1, 6):
        ident = PeerIdentity.at_boot(tee, epoch=1, index=index, share=index * 7919 + 1)
        cert = client_cert_der(members[1], ident.key, ident.evidence)
        status, body = post_as(members[1], ident.key, cert, hello_body(ident.member))
        assert status == 403 and body["step"] == "membership", (index, body)


def test_audit_names_the_refusal_without_secrets(committee: Committee) -> None:
    """A refused peer is audited with its step; no proof or key material is written to the audit log."""
    members, _ = committee
    key, cert = as_member(members[3], members[1])
    post_as(members[1], key, cert, hello_body(members[2].identity.member))
    recs = [r for r in members[1].service.audit.read(limit=20) if r.endpoint == api.PATH_PEER_HELLO]
    assert recs and recs[-1].decision == "denied" and recs[-1].step == "membership"
    text = json.dumps([r.model_dump() for r in recs])
    assert members[2].identity.member.element not in text and members[2].identity.member.proof not in text


def test_a_committee_superseded_on_chain_is_not_admitted(teecloud_home: Path, world: World) -> None:
    """The owner records and activates committee A (epoch 4242), then a reshare's committee B (same key) —
    A's nodes are no longer the committee KmsGroup says serves the epoch. A's members 1 and 2, still running
    (not yet retired), talk to each other: safe is a refusal (they could still make presignatures)."""
    allow_build(world.chain, teecloud_home)
    epoch = 4242
    old = local_joint_feldman(T, 5, epoch=epoch)
    a1 = start_member(teecloud_home, world.chain, old[0], name="sup")
    a2 = start_member(teecloud_home, world.chain, old[1], name="sup")
    try:
        group = world.chain.kms_group

        def record(shares: list[ThresholdShare]) -> int:
            ms = [
                CommitteeMember(
                    s.index, a1.service.identity.mr_aggregated, a1.tee.device_id, f"https://n{s.index}"
                )
                for s in shares
            ]
            return group.record_committee(epoch, T, shares[0].commitments, ms)

        group.activate(record(old))
        assert hello(a2, a1).index == 2  # the active committee talks
        group.activate(record(_reshare(old, T, 5)))
        active = group.active(epoch)
        assert active is not None and active.commitments != old[0].commitments
        with pytest.raises((KmsDenied, KmsClientError), match="superseded"):
            hello(a2, a1)  # the caller refuses first (its own committee is superseded)
        key, cert = as_member(a2, a1)  # and the server refuses a2's genuine request
        status, body = post_as(a1, key, cert, hello_body(a2.identity.member))
        assert status == 403 and body["step"] == "membership" and "superseded" in str(body["reason"]), body
    finally:
        a1.server.stop()
        a2.server.stop()
