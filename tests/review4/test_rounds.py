"""Review 4, area 3: the sub-share route of networked signing-key and presigning rounds
(kms.threshold_net, POST /prpc/KMS.PeerRoundShares) under kms.peering's rule: can a non-member, another
member, or a replay obtain presignature or signing-key material; are the new fields parsed strictly."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest

from teecloud.kms import api
from teecloud.kms.errors import KmsClientError
from teecloud.kms.peering import PeerClient
from teecloud.kms.threshold import local_joint_feldman
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member, T, start_member
from tests.kms.test_threshold_net_presign import _open_sigkey, admin
from tests.review4._attack import as_member, member_doc, post_as


def _view_hash(m: Member, session: str) -> str:
    rounds = m.service.sign_rounds
    assert rounds is not None
    return rounds._rounds[bytes.fromhex(session)].views["deal"][0]


def _fetch(
    src: Member, dst: Member, session: str, view_hash: str, over: dict[str, object] | None = None
) -> tuple[int, dict[str, object]]:
    key, cert = as_member(src, dst)
    body: dict[str, object] = {
        "session": session,
        "stage": "deal",
        "view_hash": view_hash,
        "member": member_doc(src.identity.member),
        **(over or {}),
    }
    return post_as(dst, key, cert, body, api.PATH_PEER_ROUND)


def test_a_non_member_gets_no_sub_share_and_takes_no_slot(
    teecloud_home: Path, world: World, members: dict[int, Member]
) -> None:
    """An allowed KMS build, booted properly, holding share 2 of ANOTHER committee (same t, n, epoch), asks
    dealer 1 for index 2's sub-share of an open signing-key round, with the right view hash (public)."""
    session = _open_sigkey(members)
    vh = _view_hash(members[2], session)
    other = local_joint_feldman(T, 5, epoch=1)[1]
    stranger = start_member(teecloud_home, world.chain, other, name="stranger")
    try:
        status, body = _fetch(stranger, members[1], session, vh)
        assert status == 403 and body["step"] == "membership" and "shares" not in body, body
    finally:
        stranger.server.stop()
    status, body = _fetch(members[2], members[1], session, vh)  # member 2's slot is untouched
    assert status == 200 and body["dealer"] == 1 and len(body["shares"]) == 1, body


def test_a_member_cannot_take_another_members_sub_shares(members: dict[int, Member]) -> None:
    """Member 3 (admitted, genuine) sends member 2's proof, or its own relabelled as 2: refused; it gets its
    own sub-share only; member 2's slot stays."""
    session = _open_sigkey(members)
    vh = _view_hash(members[3], session)
    relabelled = members[3].identity.member.model_copy(update={"index": 2})
    for member in (members[2].identity.member, relabelled):
        status, body = _fetch(members[3], members[1], session, vh, {"member": member_doc(member)})
        assert status == 403 and body["step"] == "membership", body
    status, mine = _fetch(members[3], members[1], session, vh)
    status2, theirs = _fetch(members[2], members[1], session, vh)
    assert status == 200 and status2 == 200, (mine, theirs)
    assert mine["shares"] != theirs["shares"]


def test_sub_shares_need_a_view_and_stop_with_the_round(members: dict[int, Member]) -> None:
    """Before the dealer has its view (right after open) nothing is served; a finished-and-served or an
    unknown round serves nothing; stage `mul` has no sub-shares."""
    session = secrets.token_hex(16)
    peers = {str(i): m.server.url for i, m in members.items()}
    r = admin(
        members[1],
        "/tround/open",
        {"session": session, "kind": "sigkey", "participants": sorted(members), "peers": peers},
    )
    assert r.status_code == 200, r.text
    status, body = _fetch(members[2], members[1], session, "00" * 32)
    assert status == 403 and body["step"] == "round", body
    status, body = _fetch(members[2], members[1], session, "00" * 32, {"stage": "mul"})
    assert status == 400 and body["step"] == "request", body


@pytest.mark.parametrize(
    "over",
    [
        pytest.param({"session": "zz" * 16}, id="session-not-hex"),
        pytest.param({"view_hash": "é" * 64}, id="view-hash-not-ascii"),
    ],
)
def test_malformed_round_fields_from_a_member_are_a_clear_refusal(
    members: dict[int, Member], over: dict[str, str]
) -> None:
    session = _open_sigkey(members)
    status, body = _fetch(members[2], members[1], session, _view_hash(members[2], session), dict(over))
    assert status in (400, 403) and body.get("step") in ("request", "round"), (status, body)


def test_malformed_session_on_the_admin_listener_is_a_clear_refusal(members: dict[int, Member]) -> None:
    m = members[1]
    r = admin(m, "/tround/view", {"session": "zz" * 16, "stage": "deal", "broadcast": {}})
    assert r.status_code == 400, r.text
    r = admin(
        m,
        "/tround/open",
        {"session": "zz" * 16, "kind": "sigkey", "participants": [1], "peers": {}},
    )
    assert r.status_code == 400, r.text


def test_the_admin_round_api_hands_out_no_secret(members: dict[int, Member]) -> None:
    """The operator (the untrusted relay) sees only what the admin API answers: commitments and hashes. The
    sub-share route refuses its token and a caller without a certificate."""
    session = _open_sigkey(members)
    r = httpx.post(
        members[1].server.url + api.PATH_PEER_ROUND,
        json={"session": session, "stage": "deal", "view_hash": _view_hash(members[1], session)},
        headers={"authorization": f"Bearer {members[1].server.admin_token}"},
        verify=False,
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["step"] == "tls", r.text


def test_a_view_hash_of_another_round_or_a_reflected_call_is_refused(members: dict[int, Member]) -> None:
    """Round A's view hash replayed in round B (both open, same members): refused (the hash chains from the
    session). The host routes member 2's URL back to member 1 itself: member 1 serves nobody as itself, and
    its client refuses the answer of share 1 where it expected share 2."""
    a = _open_sigkey(members)
    b = _open_sigkey(members)
    status, body = _fetch(members[2], members[1], b, _view_hash(members[2], a))
    assert status == 403 and body["step"] == "round" and "differ" in str(body["reason"]), body
    status, body = _fetch(members[1], members[1], a, _view_hash(members[1], a))
    assert status == 403 and body["step"] == "round", body
    reflected = PeerClient(
        members[1].server.url,
        identity=members[1].identity,
        admission=members[1].service.peering,
        expected_index=2,
    )
    with pytest.raises(KmsClientError, match="as share 1, not 2"):
        reflected.peer_call(api.PATH_PEER_HELLO, api.PeerHelloResponse, {})
    status, body = _fetch(members[2], members[1], a, _view_hash(members[2], a))  # slots untouched
    assert status == 200, body
