"""Review 4, area 4: the calling side (kms.peering.PeerClient): what reaches a server before its membership
is proven, and how long a running member's channel lasts."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teecloud.keys.ratls import OID_EVENT_LOG, OID_QUOTE
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsClientError, KmsDenied
from teecloud.kms.peering import PeerClient
from teecloud.kms.threshold import ThresholdShare, local_joint_feldman
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member, T, start_member

Committee = tuple[dict[int, Member], list[ThresholdShare]]


def test_nothing_reaches_a_server_before_its_membership_is_proven(
    teecloud_home: Path, world: World, committee: Committee
) -> None:
    """The host routes member 2's URL to a KMS of the allowed build that holds a share of ANOTHER committee
    (steps 1-3 pass: boot-time key, allowed build). Member 1 calls it as member 2: the call fails — but the
    stranger's service already handled member 1's request. Safe: no request before step 4."""
    members, _ = committee
    other = local_joint_feldman(T, 5, epoch=1)[1]
    stranger = start_member(teecloud_home, world.chain, other, name="stranger")
    try:
        call = PeerClient(
            stranger.server.url,
            identity=members[1].identity,
            admission=members[1].service.peering,
            expected_index=2,
        )
        with pytest.raises((KmsClientError, KmsDenied)):
            call.peer_call(
                api.PATH_PEER_ROUND,
                api.PeerRoundResponse,
                {"session": "ab" * 16, "stage": "deal", "view_hash": "00" * 32},
            )
        seen = [r for r in stranger.service.audit.read(limit=20) if r.endpoint == api.PATH_PEER_ROUND]
        assert seen == [], [(r.decision, r.step, r.reason) for r in seen]
    finally:
        stranger.server.stop()


def test_membership_is_proven_on_each_new_pin_before_any_other_request(committee: Committee) -> None:
    """R4-3's fix: member 1's first call to member 2 is preceded by a PeerHello on the pinned certificate;
    a new pin (the server's certificate changed) is proven again before the next request."""
    members, _ = committee
    call = PeerClient(
        members[2].server.url,
        identity=members[1].identity,
        admission=members[1].service.peering,
        expected_index=2,
    )
    body = {"session": "ab" * 16, "stage": "deal", "view_hash": "00" * 32}

    def endpoints() -> list[str]:
        return [
            r.endpoint
            for r in members[2].service.audit.read(limit=50)
            if r.endpoint in (api.PATH_PEER_HELLO, api.PATH_PEER_ROUND)
        ]

    before = len(endpoints())
    with pytest.raises(KmsDenied, match="no open round"):  # reached member 2, which refused at `round`
        call.peer_call(api.PATH_PEER_ROUND, api.PeerRoundResponse, body)
    assert endpoints()[before:] == [api.PATH_PEER_HELLO, api.PATH_PEER_ROUND]
    with pytest.raises(KmsDenied, match="no open round"):  # same pin: no second proof
        call.peer_call(api.PATH_PEER_ROUND, api.PeerRoundResponse, body)
    assert endpoints()[before:] == [api.PATH_PEER_HELLO, api.PATH_PEER_ROUND, api.PATH_PEER_ROUND]
    call._proven = b"another certificate"  # as after a re-pin: proven again first
    with pytest.raises(KmsDenied, match="no open round"):
        call.peer_call(api.PATH_PEER_ROUND, api.PeerRoundResponse, body)
    assert endpoints()[before + 3 :] == [api.PATH_PEER_HELLO, api.PATH_PEER_ROUND]


def _server_cert_der(m: Member) -> bytes:
    pem = m.server.identity.cert_pem
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def test_a_member_is_admitted_on_its_server_certificate_today(committee: Committee) -> None:
    members, _ = committee
    node = members[1].service.peering.admit(_server_cert_der(members[2]), members[2].identity.member)
    assert node.index == 2


def test_a_running_members_channel_outlives_its_first_week(committee: Committee) -> None:
    """Eight days after boot (no restart), member 1 checks member 2's server certificate as PeerClient
    does. Safe (docs/kms.md: running nodes talk for days; the peers' lifetime cap is 366 days): admitted.
    R4-5's fix: member 2's listener reissued it (same boot-time key and quote) once half its week passed
    (its renewal timer's check, run here at day 4 and day 8 of its clock)."""
    members, _ = committee
    m2 = members[2]
    first = _server_cert_der(m2)
    booted = time.time()
    assert not m2.server.renew_identity_if_due()  # not due yet
    for day in (4, 8):
        m2.service.clock = lambda d=day: booted + d * 24 * 3600  # type: ignore[misc]
        assert m2.server.renew_identity_if_due()
    renewed = _server_cert_der(m2)
    assert renewed != first
    old_cert, new_cert = x509.load_der_x509_certificate(first), x509.load_der_x509_certificate(renewed)
    assert new_cert.public_key() == old_cert.public_key()  # the boot-time key, not a new one
    for oid in (OID_QUOTE, OID_EVENT_LOG):  # the same boot-time quote and event log
        value = new_cert.extensions.get_extension_for_oid(oid).value
        assert value == old_cert.extensions.get_extension_for_oid(oid).value
    # the listener serves the reissued certificate on new handshakes
    host, port = m2.server.host, m2.server.port
    served = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, port)))
    assert served == renewed
    later = booted + 8 * 24 * 3600 + 60
    members[1].service.node_peers.clock = lambda: later
    try:
        node = members[1].service.peering.admit(renewed, m2.identity.member)
    except AccessDenied as exc:
        pytest.fail(f"refused at {exc.step}: {exc.reason}")
    assert node.index == 2
    with pytest.raises(AccessDenied) as refused:  # the first week's certificate is not
        members[1].service.peering.admit(first, m2.identity.member)
    assert refused.value.step == "cert_fresh"
