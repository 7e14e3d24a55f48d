"""Review 5, R4-3's fix (91790b5): what reaches a server before its membership is proven, and what the
unproven server leaves behind in the client. The host routes member 2's URL to a stranger (a KMS of the
allowed build holding a share of another committee: steps 1-3 pass), then back to member 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from teecloud.kms import api
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.peering import PeerClient
from teecloud.kms.threshold import ThresholdShare, local_joint_feldman
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member, T, start_member

Committee = tuple[dict[int, Member], list[ThresholdShare]]
ROUND = {"session": "ab" * 16, "stage": "deal", "view_hash": "00" * 32}


def _peer_requests(m: Member) -> list[str]:
    return [r.endpoint for r in m.service.audit.read(limit=50) if r.endpoint.startswith("/prpc/KMS.Peer")]


def _stranger_call(
    teecloud_home: Path, world: World, members: dict[int, Member]
) -> tuple[Member, PeerClient]:
    stranger = start_member(teecloud_home, world.chain, local_joint_feldman(T, 5, epoch=1)[1], name="str5")
    call = PeerClient(
        stranger.server.url,
        identity=members[1].identity,
        admission=members[1].service.peering,
        expected_index=2,
    )
    try:
        for _ in range(2):
            with pytest.raises((KmsClientError, KmsDenied)):
                call.peer_call(api.PATH_PEER_ROUND, api.PeerRoundResponse, ROUND)
    except BaseException:
        stranger.server.stop()
        raise
    return stranger, call


@pytest.mark.slow
def test_a_stranger_gets_the_hello_only_also_on_a_second_try(
    teecloud_home: Path, world: World, committee: Committee
) -> None:
    """Held: the stranger sees the CA GET (unaudited, public) and PeerHellos only, never the round request,
    on the first call and on a retry of the same client."""
    members, _ = committee
    stranger, _ = _stranger_call(teecloud_home, world, members)
    try:
        seen = _peer_requests(stranger)
        assert api.PATH_PEER_ROUND not in seen and api.PATH_PEER_HELLO in seen, seen
    finally:
        stranger.server.stop()


@pytest.mark.slow
def test_the_client_works_again_once_the_url_leads_back_to_the_member(
    teecloud_home: Path, world: World, committee: Committee
) -> None:
    """After the stranger, the host routes the URL back to member 2. Safe: the same client (the service
    keeps one per (index, URL)) reaches member 2 at once. Before the fix (R5-5) it failed while the
    stranger's temporary CA stayed cached (TEMP_CA_CACHE_S, 300 s): no path re-pinned (_prove sent on the
    stranger's unproven pin: "not the server that was checked"), and a client certificate issued under it
    was dropped by member 2's handshake. Now a failed proof drops the pin and the temporary CA."""
    members, _ = committee
    stranger, call = _stranger_call(teecloud_home, world, members)
    try:
        call.url = members[2].server.url
        try:
            answer = call.peer_call(api.PATH_PEER_HELLO, api.PeerHelloResponse, {})
        except (KmsClientError, KmsDenied) as exc:
            pytest.fail(f"member 2 unreachable after the stranger: {exc}")
        assert answer.member is not None and answer.member.index == 2
    finally:
        stranger.server.stop()
