"""Networked signing key and presignatures (teecloud.kms.threshold_net): five running members (each its own
service, listener, data directory, simulated TEE and sealed shares) make the group's secp256k1 signing key
and a batch of presignatures over kms.peering's channel, driven through their admin listeners; any three
then sign, and the signature verifies under the group key. Faults: a replayed sub-share request, an
equivocating relay, a lying member (named), a member that restarts mid-round."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import coincurve
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teecloud.keys import threshold_ecdsa as te
from teecloud.kms import api
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_net import (
    AdminEndpoint,
    RoundFailed,
    run_presign_round,
    run_signing_key_dkg,
)
from tests.kms.conftest import World, post_with_cert, stop_servers
from tests.kms.test_threshold_net_peering import Member, allow_build, start_member

T, N = 3, 5


@pytest.fixture
def members(teecloud_home: Path, world: World) -> Iterator[dict[int, Member]]:
    allow_build(world.chain, teecloud_home)
    shares = local_joint_feldman(T, N, epoch=1)
    out: dict[int, Member] = {}
    try:
        for s in shares:
            out[s.index] = start_member(teecloud_home, world.chain, s, name="net")
        yield out
    finally:
        stop_servers(m.server for m in out.values())


def endpoints(members: dict[int, Member]) -> dict[int, AdminEndpoint]:
    return {
        i: AdminEndpoint(m.server.admin_url, m.server.admin_token, m.server.url) for i, m in members.items()
    }


def admin(m: Member, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        m.server.admin_url + path,
        json=body,
        headers={"authorization": f"Bearer {m.server.admin_token}"},
        timeout=60,
    )


def sign_with(members: dict[int, Member], signers: list[int], session: bytes, digest: bytes) -> bytes:
    presig = members[signers[0]].service.threshold.signer.pool.public(session)  # type: ignore[union-attr]
    shares = [
        members[i].service.threshold.signer.pool.sign(session, digest)  # type: ignore[union-attr]
        for i in signers
    ]
    return te.combine_signature(presig, digest, shares)


@pytest.mark.slow
def test_signing_key_and_presignatures_between_running_nodes(members: dict[int, Member]) -> None:
    eps = endpoints(members)
    group_key = run_signing_key_dkg(eps)
    for m in members.values():
        signer = m.service.threshold.signer  # type: ignore[union-attr]
        assert signer is not None and signer.group_public_key == group_key
    # a second signing-key DKG on the same members is refused (a new key is a new epoch)
    with pytest.raises(RoundFailed, match="already holds a signing share"):
        run_signing_key_dkg(eps)
    rs = run_presign_round(eps, 4, 3)
    assert len(rs) == 4 and len(set(rs)) == 4
    pools = [set(m.service.threshold.signer.pool.unused()) for m in members.values()]  # type: ignore[union-attr]
    assert all(p == pools[0] for p in pools) and len(pools[0]) == 4
    digest = hashlib.sha256(b"dstack-kms-issued test").digest()
    for signers, session in zip(([1, 2, 3], [3, 4, 5], [1, 3, 5]), sorted(pools[0]), strict=False):
        sig = sign_with(members, signers, session, digest)
        pub = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
        assert pub.format(compressed=True) == group_key
    # two of the members alone cannot sign
    last = sorted(pools[0])[3]
    with pytest.raises(te.ThresholdSignatureError, match="2 valid signature shares, 3 needed"):
        sign_with(members, [2, 4], last, digest)
    # the presignature pools are sealed: a restarted member's pool still holds the same sessions
    signer1 = members[1].service.threshold.signer  # type: ignore[union-attr]
    assert signer1 is not None
    assert set(signer1.pool.unused()) == pools[0] - {sorted(pools[0])[0], sorted(pools[0])[2]}


def _open_sigkey(members: dict[int, Member]) -> str:
    session = secrets.token_hex(16)
    peers = {str(i): m.server.url for i, m in members.items()}
    publics = {}
    for i, m in members.items():
        r = admin(
            m,
            "/tround/open",
            {"session": session, "kind": "sigkey", "participants": sorted(members), "peers": peers},
        )
        assert r.status_code == 200, r.text
        publics[str(i)] = r.json()["values"]
    for m in members.values():
        r = admin(m, "/tround/view", {"session": session, "stage": "deal", "broadcast": publics})
        assert r.status_code == 200, r.text
    return session


def _fetch_as(src: Member, dst: Member, session: str, view_hash: str) -> tuple[int, dict[str, object]]:
    """Member `src`'s exact sub-share request to `dst` (its boot-time key under dst's temporary CA)."""
    _, cert_pem = src.identity.client_cert(
        dst.service.state.temp_ca_cert, dst.service.state.temp_ca_key, now=int(dst.service.clock())
    )
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    return post_with_cert(
        dst.server.url,
        api.PATH_PEER_ROUND,
        src.identity.key,
        der,
        {
            "session": session,
            "stage": "deal",
            "view_hash": view_hash,
            "member": src.identity.member.model_dump(),
        },
    )


def test_a_replayed_sub_share_request_and_an_equivocating_relay_are_refused(
    members: dict[int, Member],
) -> None:
    session = _open_sigkey(members)
    view = admin(members[2], "/tround/view", {"session": session, "stage": "deal", "broadcast": {}})
    assert view.status_code == 400  # a stage's view is given once
    sub = members[2].service.sign_rounds
    assert sub is not None
    view_hash = sub._rounds[bytes.fromhex(session)].views["deal"][0]  # what member 2 was relayed
    status, body = _fetch_as(members[2], members[1], session, view_hash)
    assert status == 200 and body["dealer"] == 1 and len(body["shares"]) == 1, body
    # the same request again (a replay, by the member itself or by anyone holding its TLS session)
    status, body = _fetch_as(members[2], members[1], session, view_hash)
    assert status == 403 and body["step"] == "round" and "replay" in body["reason"], body
    # member 3 asks with the hash of a different broadcast (what an equivocating relay would cause)
    status, body = _fetch_as(members[3], members[1], session, "00" * 32)
    assert status == 403 and "differ" in body["reason"], body
    # a round that does not exist (a stale session)
    status, body = _fetch_as(members[3], members[1], secrets.token_hex(16), view_hash)
    assert status == 403 and "no open round" in body["reason"], body


def test_a_relay_that_alters_a_members_own_values_is_caught(members: dict[int, Member]) -> None:
    session = secrets.token_hex(16)
    peers = {str(i): m.server.url for i, m in members.items()}
    publics = {}
    for i, m in members.items():
        r = admin(
            m,
            "/tround/open",
            {"session": session, "kind": "sigkey", "participants": sorted(members), "peers": peers},
        )
        publics[str(i)] = r.json()["values"]
    forged = dict(publics)
    forged["1"] = publics["2"]
    r = admin(members[1], "/tround/view", {"session": session, "stage": "deal", "broadcast": forged})
    assert r.status_code == 400 and "alters this member's own values" in r.json()["reason"]


@pytest.mark.slow
def test_a_lying_member_is_named_and_nothing_is_added(members: dict[int, Member]) -> None:
    eps = endpoints(members)
    run_signing_key_dkg(eps)
    session = secrets.token_hex(16)
    peers = {str(i): m.server.url for i, m in members.items()}
    values = {}
    for i, m in members.items():
        r = admin(
            m,
            "/tround/open",
            {
                "session": session,
                "kind": "presign",
                "count": 1,
                "participants": sorted(members),
                "peers": peers,
            },
        )
        assert r.status_code == 200, r.text
        values[str(i)] = r.json()["values"]
    for m in members.values():
        assert (
            admin(m, "/tround/view", {"session": session, "stage": "deal", "broadcast": values}).status_code
            == 200
        )
    muls = {}
    for i, m in members.items():
        r = admin(m, "/tround/advance", {"session": session, "stage": "deal"})
        assert r.status_code == 200, r.text
        muls[str(i)] = r.json()["values"]
    # member 4 lies about w (the relay is honest: member 4's own view has its own lie)
    w = int(muls["4"][0]["w"], 16)
    muls["4"][0]["w"] = f"{(w + 1) % te.ORDER:064x}"
    for i, m in members.items():
        if i == 4:
            continue
        assert (
            admin(m, "/tround/view", {"session": session, "stage": "mul", "broadcast": muls}).status_code
            == 200
        )
        r = admin(m, "/tround/advance", {"session": session, "stage": "mul"})
        assert r.status_code == 400 and r.json()["reason"].startswith("member 4:"), r.text
    # had the relay made that change (member 4 honest), member 4 refuses its view: the relay is caught
    r = admin(members[4], "/tround/view", {"session": session, "stage": "mul", "broadcast": muls})
    assert r.status_code == 400 and "alters this member's own values" in r.json()["reason"], r.text
    for m in members.values():
        assert m.service.threshold.signer.pool.unused() == []  # type: ignore[union-attr]


def test_a_member_restarting_mid_round_fails_it_cleanly(members: dict[int, Member]) -> None:
    """A member that lost its round (restart: rounds live in memory only) is named by the others and
    nothing is sealed anywhere."""
    session = _open_sigkey(members)
    members[3].service.sign_rounds._rounds.clear()  # type: ignore[union-attr]  # what a restart leaves
    r = admin(members[1], "/tround/advance", {"session": session, "stage": "deal"})
    assert r.status_code == 400 and r.json()["reason"].startswith("member 3:"), r.text
    assert "no open round" in r.json()["reason"]
    assert members[1].service.threshold.signer is None  # type: ignore[union-attr]


def test_presign_needs_a_signing_key_and_the_key_needs_every_member(members: dict[int, Member]) -> None:
    peers = {str(i): members[i].server.url for i in (1, 2, 3)}
    body = {"session": secrets.token_hex(16), "kind": "presign", "participants": [1, 2, 3], "peers": peers}
    r = admin(members[1], "/tround/open", body)
    assert r.status_code == 400 and "no signing share" in r.json()["reason"]
    r = admin(members[1], "/tround/open", {**body, "kind": "sigkey"})
    assert r.status_code == 400 and "all n members" in r.json()["reason"]
