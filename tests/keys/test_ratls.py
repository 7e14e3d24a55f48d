import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation.errors import EventLogMismatch, Expired, VerificationError
from teecloud.keys import ratls
from teecloud.keys.certs import issue_cert, spki_der
from teecloud.keys.errors import MalformedKeyMaterial, RaTlsCertInvalid
from teecloud.keys.ratls import (
    OID_EVENT_LOG,
    OID_QUOTE,
    generate_ratls_identity,
    make_ratls_cert,
    parse_ratls_cert,
    ratls_report_data,
    verify_ratls_cert,
)
from teecloud.tee.simulated import SimulatedTdx

APP = b"\xab" * 20


@pytest.fixture
def tee(teecloud_home):
    t = SimulatedTdx(teecloud_home)
    t.emit_event("system-preparing", b"")
    t.emit_event("app-id", APP)
    t.emit_event("compose-hash", b"\x01" * 32)
    t.emit_event("instance-id", b"\x02" * 20)
    t.emit_event("boot-mr-done", b"")
    return t


@pytest.fixture
def now():
    return int(time.time())


def _sim_policy():
    import dataclasses

    from teecloud.attestation.policy import Policy

    return dataclasses.replace(Policy.default(), allow_simulated=True)


def _kw(tee, now):
    return dict(
        collateral=tee.collateral(now=now), now=now + 5, dev_root_der=tee.dev_root_der(), policy=_sim_policy()
    )


def test_default_policy_refuses_simulated_evidence(tee, now):
    # production settings reject what the simulator produces, even with its dev root named
    _, cert_pem = generate_ratls_identity(tee, usage="x", app_id=APP, now=now)
    kw = _kw(tee, now)
    del kw["policy"]
    with pytest.raises(VerificationError, match="simulated"):
        verify_ratls_cert(cert_pem, **kw)


@pytest.fixture
def verifier():
    return "default"


def test_identity_round_trip(tee, now, verifier):
    key_pem, cert_pem = generate_ratls_identity(tee, usage="kms:rpc", app_id=APP, now=now)
    claims = parse_ratls_cert(cert_pem)
    assert claims.usage == "kms:rpc" and claims.app_id == APP
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert claims.public_key_der == spki_der(key.public_key())
    assert json.loads(claims.event_log)[-1]["event"] == "boot-mr-done"
    ev = verify_ratls_cert(cert_pem, **_kw(tee, now), expected_usage="kms:rpc")
    assert ev.report_data == ratls_report_data(claims.public_key_der)
    assert ev.simulated and ev.app_info is not None and ev.app_info.app_id == APP
    assert ev.app_info.compose_hash == b"\x01" * 32
    # DER works as well as PEM
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    verify_ratls_cert(der, **_kw(tee, now))


def test_extension_values_are_der_octet_strings(tee, now):
    _, cert_pem = generate_ratls_identity(tee, usage="x", app_id=None, now=now)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    raw = cert.extensions.get_extension_for_oid(OID_QUOTE).value.value
    assert raw[0] == 0x04 and raw[-len(parse_ratls_cert(cert).quote) :] == parse_ratls_cert(cert).quote


def test_quote_copied_onto_another_key_is_rejected(tee, now, verifier):
    _, cert_pem = generate_ratls_identity(tee, usage="x", app_id=APP, now=now)
    victim = x509.load_pem_x509_certificate(cert_pem.encode())
    stolen = [
        x509.UnrecognizedExtension(o, victim.extensions.get_extension_for_oid(o).value.value)
        for o in (OID_QUOTE, OID_EVENT_LOG)
    ]
    attacker = ec.generate_private_key(ec.SECP256R1())
    forged = issue_cert(
        attacker.public_key(),
        issuer_key=attacker,
        issuer_name=None,
        subject_cn="evil",
        not_before=now,
        not_after=now + 3600,
        extra_extensions=stolen,
    )
    with pytest.raises(RaTlsCertInvalid, match="report_data does not bind"):
        verify_ratls_cert(forged, **_kw(tee, now))


def test_untrusted_dev_root_rejected(tee, now, verifier):
    _, cert_pem = generate_ratls_identity(tee, usage="x", app_id=APP, now=now)
    kw = _kw(tee, now)
    kw["dev_root_der"] = None
    with pytest.raises(VerificationError):
        verify_ratls_cert(cert_pem, **kw)


def test_expired_certificate_rejected(tee, now):
    _, cert_pem = generate_ratls_identity(tee, usage="x", app_id=APP, now=now, validity_s=60)
    kw = _kw(tee, now)
    kw["now"] = now + 120
    with pytest.raises(Expired):
        verify_ratls_cert(cert_pem, **kw)


def test_tampered_event_log_rejected(tee, now, verifier):
    key = ec.generate_private_key(ec.SECP256R1())
    good = make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject="s",
        usage="x",
        not_before=now,
        not_after=now + 3600,
    )
    log = json.loads(parse_ratls_cert(good).event_log)
    log = [e for e in log if e["event"] != "instance-id"]  # drop one event
    quote = parse_ratls_cert(good).quote
    forged = issue_cert(
        key.public_key(),
        issuer_key=key,
        issuer_name=None,
        subject_cn="s",
        not_before=now,
        not_after=now + 3600,
        extra_extensions=[ratls._ext(OID_QUOTE, quote), ratls._ext(OID_EVENT_LOG, json.dumps(log).encode())],
    )
    with pytest.raises(EventLogMismatch):
        verify_ratls_cert(forged, **_kw(tee, now))


def test_app_id_extension_must_match_measured_app_id(tee, now, verifier):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject="s",
        usage="x",
        not_before=now,
        not_after=now + 3600,
        app_id=b"\xcd" * 20,
    )
    with pytest.raises(RaTlsCertInvalid, match="app_id"):
        verify_ratls_cert(cert, **_kw(tee, now))


def test_wrong_usage_rejected(tee, now):
    _, cert_pem = generate_ratls_identity(tee, usage="app:tls", app_id=APP, now=now)
    with pytest.raises(RaTlsCertInvalid, match="usage"):
        verify_ratls_cert(cert_pem, **_kw(tee, now), expected_usage="kms:rpc")


def test_debug_td_rejected(teecloud_home, now, verifier):
    tee = SimulatedTdx(teecloud_home, debug=True)
    _, cert_pem = generate_ratls_identity(tee, usage="x", app_id=None, now=now)
    with pytest.raises(VerificationError, match=r"(?i)debug"):
        verify_ratls_cert(cert_pem, **_kw(tee, now))


def test_plain_certificate_and_garbage(tee, now):
    key = ec.generate_private_key(ec.SECP256R1())
    plain = issue_cert(
        key.public_key(), issuer_key=key, issuer_name=None, subject_cn="p", not_before=now, not_after=now + 60
    )
    with pytest.raises(RaTlsCertInvalid, match="no TDX quote"):
        parse_ratls_cert(plain)
    for junk in (
        b"",
        b"\x30\x03\x02\x01",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"\x00" * (2 << 20),
    ):
        with pytest.raises(MalformedKeyMaterial):
            parse_ratls_cert(junk)


def test_unwrap_accepts_bare_content():
    assert ratls._unwrap_octet_string(b"\x04\x00\x02\x00rest") == b"\x04\x00\x02\x00rest"
    assert ratls._unwrap_octet_string(ratls._der_octet_string(b"a" * 300)) == b"a" * 300
