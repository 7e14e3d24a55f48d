"""Review 5, R4-5's fix (01f11f6): the server certificate reissued from the same boot-time key and quote.
Attacks: a renewal that serves a post-boot quote or a new key (a KMS that is not a threshold member: its
key and quote are not boot-time ones), and one that comes early (the host sets the clock)."""

from __future__ import annotations

import ssl
import time

from cryptography import x509

from teecloud.keys.ratls import parse_ratls_cert
from teecloud.kms.server import SERVER_CERT_VALIDITY_S, KmsServer
from teecloud.kms.threshold import ThresholdShare
from tests.kms.test_threshold_net_peering import Member

Committee = tuple[dict[int, Member], list[ThresholdShare]]


def _served(server: KmsServer) -> x509.Certificate:
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((server.host, server.port)))
    return x509.load_der_x509_certificate(der)


def test_a_kms_that_is_no_threshold_member_never_reissues(server: KmsServer) -> None:
    """Held: no peer identity, no renewal (a reissue would take a fresh key and a post-boot quote)."""
    first = _served(server)
    booted = time.time()
    server.service.clock = lambda: booted + 8 * 24 * 3600  # type: ignore[method-assign]
    assert not server.renew_identity_if_due()
    assert _served(server) == first


def test_a_members_renewal_keeps_the_boot_time_key_and_quote_and_is_never_early(committee: Committee) -> None:
    """Held: not before half the week; then the same key, the boot-time quote (the one in the member's
    PeerIdentity, bound to that key), a validity of at most the week from the renewal time."""
    members, _ = committee
    m = members[3]
    first = _served(m.server)
    booted = time.time()
    m.service.clock = lambda: booted + SERVER_CERT_VALIDITY_S / 2 - 120  # type: ignore[method-assign]
    assert not m.server.renew_identity_if_due()
    at = booted + SERVER_CERT_VALIDITY_S / 2 + 60
    m.service.clock = lambda: at  # type: ignore[method-assign]
    assert m.server.renew_identity_if_due()
    renewed = _served(m.server)
    assert renewed.serial_number != first.serial_number
    assert renewed.public_key() == first.public_key() == m.identity.key.public_key()
    assert parse_ratls_cert(renewed).quote == m.identity.evidence.boot_quote
    not_after = renewed.not_valid_after_utc.timestamp()
    assert not_after <= at + SERVER_CERT_VALIDITY_S
    assert not m.server.renew_identity_if_due()  # not again before another half week
