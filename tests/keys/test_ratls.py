import hashlib
import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation.dcap import parse_quote
from teecloud.keys import ratls
from teecloud.keys.certs import issue_cert, spki_der
from teecloud.keys.errors import MalformedKeyMaterial, RaTlsCertInvalid
from teecloud.keys.ratls import (
    OID_EVENT_LOG,
    OID_QUOTE,
    check_key_binding,
    generate_ratls_identity,
    parse_ratls_cert,
    ratls_report_data,
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


def test_identity_round_trip(tee, now):
    key_pem, cert_pem = generate_ratls_identity(tee, usage="kms:rpc", app_id=APP, now=now)
    claims = parse_ratls_cert(cert_pem)
    assert claims.usage == "kms:rpc" and claims.app_id == APP
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert claims.public_key_der == spki_der(key.public_key())
    assert json.loads(claims.event_log)[-1]["event"] == "boot-mr-done"
    # the quote in the certificate is over sha512("ratls-cert:" ‖ SPKI): the binding holds
    report_data = parse_quote(claims.quote)["report_data"]
    assert report_data == ratls_report_data(claims.public_key_der)
    check_key_binding(claims, report_data)
    # DER parses as PEM does
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    assert parse_ratls_cert(der).quote == claims.quote


def test_binding_refuses_another_key_or_short_report_data(tee, now):
    _, cert_pem = generate_ratls_identity(tee, usage="x", app_id=APP, now=now)
    claims = parse_ratls_cert(cert_pem)
    good = ratls_report_data(claims.public_key_der)
    other = ratls_report_data(spki_der(ec.generate_private_key(ec.SECP256R1()).public_key()))
    for bad in (other, good[:63], b"", bytes(64), hashlib.sha512(claims.public_key_der).digest()):
        with pytest.raises(RaTlsCertInvalid, match="report_data does not bind"):
            check_key_binding(claims, bad)
    check_key_binding(claims, good + b"ignored tail")  # a 64-byte prefix of a longer field (SNP: 64 bytes)


def test_extension_values_are_der_octet_strings(tee, now):
    _, cert_pem = generate_ratls_identity(tee, usage="x", app_id=None, now=now)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    raw = cert.extensions.get_extension_for_oid(OID_QUOTE).value.value
    assert raw[0] == 0x04 and raw[-len(parse_ratls_cert(cert).quote) :] == parse_ratls_cert(cert).quote


def test_quote_copied_onto_another_key_is_rejected(tee, now):
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
    claims = parse_ratls_cert(forged)
    with pytest.raises(RaTlsCertInvalid, match="report_data does not bind"):
        check_key_binding(claims, parse_quote(claims.quote)["report_data"])


def test_plain_certificate_and_garbage(tee, now):
    key = ec.generate_private_key(ec.SECP256R1())
    plain = issue_cert(
        key.public_key(), issuer_key=key, issuer_name=None, subject_cn="p", not_before=now, not_after=now + 60
    )
    with pytest.raises(RaTlsCertInvalid, match="no quote extension"):
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
