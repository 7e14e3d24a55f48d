"""The one RA-TLS peer verifier: presets, every refusal with its step, the typed peer, the bounded cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys.ratls import event_log_json, make_ratls_cert
from teecloud.peer import PeerPolicy, PeerRejected, PeerVerifier, StaticCollateral
from teecloud.tee.simulated import SimulatedTdx

APP_ID = bytes(range(20))
COMPOSE = bytes(range(32))
INSTANCE = bytes(range(1, 21))


def booted(home: Path, **kw: object) -> SimulatedTdx:
    tee = SimulatedTdx(home, **kw)  # type: ignore[arg-type]
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", APP_ID),
        ("compose-hash", COMPOSE),
        ("instance-id", INSTANCE),
        ("boot-mr-done", b""),
        ("os-image-hash", tee.os_image_hash),
    ]:
        tee.emit_event(name, payload)
    return tee


def cert(
    tee: SimulatedTdx, *, lifetime: int = 600, app_id: bytes | None = APP_ID, nb: int | None = None
) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    start = int(time.time()) - 30 if nb is None else nb
    c = make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject="peer",
        usage="app:kms-client",
        not_before=start,
        not_after=start + lifetime,
        app_id=app_id,
        client_auth=True,
    )
    return c.public_bytes(serialization.Encoding.DER)


def verifier(tee: SimulatedTdx, policy: PeerPolicy | None = None, **kw: object) -> PeerVerifier:
    return PeerVerifier(
        policy or PeerPolicy.dev(tee.dev_root_der()),
        StaticCollateral(tee.collateral),
        **kw,  # type: ignore[arg-type]
    )


def rejected(v: PeerVerifier, der: bytes | None) -> PeerRejected:
    with pytest.raises(PeerRejected) as err:
        v.verify_cert(der)
    return err.value


def test_dev_preset_gives_a_typed_peer(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    peer = verifier(tee).verify_cert(cert(tee))
    assert (peer.app_id, peer.compose_hash, peer.instance_id) == (APP_ID, COMPOSE, INSTANCE)
    assert peer.os_image_hash == tee.os_image_hash and peer.simulated
    assert peer.boot_info.tcb_status == "UpToDate" and peer.usage == "app:kms-client"


def test_production_preset_refuses_simulated_evidence(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    err = rejected(verifier(tee, PeerPolicy.production()), cert(tee))
    assert "simulated" in err.reason.lower() or "development root" in err.reason.lower()


def test_presets_refuse_contradictions() -> None:
    with pytest.raises(ValueError):
        PeerPolicy.production(dev_root_der=b"x")
    with pytest.raises(ValueError):
        PeerPolicy.dev(b"")
    assert not PeerPolicy().attestation_policy().allow_simulated
    assert PeerPolicy.dev(b"root").attestation_policy().allow_simulated


def test_debug_td_and_low_tcb_are_refused(teecloud_home: Path) -> None:
    debug = booted(teecloud_home, debug=True)
    assert "debug" in rejected(verifier(debug), cert(debug)).reason
    old = booted(teecloud_home, tcb="OutOfDate")
    err = rejected(verifier(old), cert(old))
    assert "tcb" in err.step.lower() and "OutOfDate" in err.reason
    # a floor that admits OutOfDate accepts it: the floor is the peer policy's, not a constant
    floor = PeerPolicy.dev(old.dev_root_der(), accepted_tcb_statuses=("UpToDate", "OutOfDate"))
    assert verifier(old, floor).verify_cert(cert(old)).boot_info.tcb_status == "OutOfDate"


def test_certificate_freshness(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    v = verifier(tee)
    assert rejected(v, cert(tee, lifetime=7200)).step == "cert_fresh"
    assert rejected(v, cert(tee, nb=int(time.time()) - 1000, lifetime=100)).step == "cert_fresh"
    assert rejected(v, None).step == "tls"
    assert rejected(v, b"\x30\x03junk").step == "parsed"


def test_app_id_extension_must_be_the_measured_one(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    err = rejected(verifier(tee), cert(tee, app_id=b"\xee" * 20))
    assert ("app_id" in err.reason and "differs" in err.reason) or "app-id" in err.reason, err.reason


def test_collateral_failure_fails_closed(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)

    def down() -> bytes:
        raise ConnectionError("pccs down")

    v = PeerVerifier(PeerPolicy.dev(tee.dev_root_der()), StaticCollateral(down))
    err = rejected(v, cert(tee))
    assert err.step == "collateral_ok" and "pccs down" in err.reason


def test_cache_is_bounded_and_never_outlives_the_certificate(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    now = [time.time()]
    v = verifier(tee, clock=lambda: now[0], cache_entries=3)
    ders = [cert(tee, lifetime=120) for _ in range(5)]
    for d in ders:
        v.verify_cert(d)
    assert len(v._cache) == 3
    now[0] += 200  # past not_after: the cached result is not reused
    assert rejected(v, ders[-1]).step == "cert_fresh"


def test_verify_quote_path(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    v = verifier(tee)
    peer = v.verify_quote(tee.quote(b"\x01" * 64), event_log_json(tee.event_log()))
    assert peer.app_id == APP_ID and peer.evidence.report_data[:64] == b"\x01" * 64
    with pytest.raises(PeerRejected):
        verifier(tee, PeerPolicy.production()).verify_quote(tee.quote(b""), event_log_json(tee.event_log()))
