"""Independent attack battery against the F9 fix (boot-time rule, strict logs, boot-nonce, onboarding).

Every test here is an ATTEMPT: it asserts what the attacker observes. A test that passes means the attack
was refused (or, where noted, what was obtained is harmless)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.agent.api import GetQuoteRequest
from teecloud.attestation.eventlog import RUNTIME_EVENT_TYPE, runtime_event_digest
from teecloud.keys.certs import issue_cert, spki_der
from teecloud.keys.ratls import (
    OID_APP_ID,
    OID_CERT_USAGE,
    OID_EVENT_LOG,
    OID_QUOTE,
    _der_octet_string,
    _ext,
    event_log_json,
    ratls_report_data,
)
from teecloud.kms.challenge import BootChallenges
from teecloud.kms.client import vm_config_json
from teecloud.kms.errors import AccessDenied
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import COMPOSE_V1, Kms, boot_app, harness_challenges, make_kms
from tests.kms.test_boot_rule import booted_app, cert_with_log, oracle_evidence

RT = RUNTIME_EVENT_TYPE


def _deny(kms: Kms, der: bytes, tee_home: Path, vm: str | None = None) -> AccessDenied:
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm or vm_config_json(SimulatedTdx(tee_home)))
    return err.value


def _csr(key: ec.EllipticCurvePrivateKey, cn: str, sans: list[str]) -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _genuine(home: Path, app_id: bytes, compose: bytes = COMPOSE_V1, iid: bytes = bytes.fromhex("ab" * 20)):
    tee = SimulatedTdx(home)
    boot_app(tee, app_id, compose, iid)
    key = ec.generate_private_key(ec.SECP256R1())
    quote = tee.quote(ratls_report_data(spki_der(key.public_key())))
    return tee, key, quote, [e.to_json() for e in tee.event_log()]


# ---------------------------------------------------------------- A: post-boot oracle, log rewritten


def test_a1_oracle_quote_with_log_truncated_at_boot(teecloud_home, world, kms, server):
    """Drop every RTMR3 entry after the boot measurement: the log now IS the grammar, but the register is
    not."""
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(agent, key)
    names = [e["event"] for e in entries if e["imr"] == 3]
    cut = names.index("os-image-hash") + 1
    rt3 = [e for e in entries if e["imr"] == 3][:cut]
    log = [e for e in entries if e["imr"] != 3] + rt3
    err = _deny(kms, cert_with_log(kms, key, quote, json.dumps(log), app_id), teecloud_home)
    assert err.step == "event_log_verified"


def test_a2_oracle_post_boot_entries_resplit_at_colon(teecloud_home, world, kms, server):
    """Post-boot entries renamed name:payload-prefix (same digest): each still a valid runtime event, the
    register unchanged; the grammar reads names exactly, so the log is still past the boot measurement."""
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(agent, key)
    # key-provider's payload is JSON text with ':' in it: re-split it into name "key-provider:{..." + rest
    for e in entries:
        if e["event"] == "key-provider":
            p = bytes.fromhex(e["event_payload"])
            k = p.index(b":")
            e["event"] = "key-provider:" + p[:k].decode()
            e["event_payload"] = p[k + 1 :].hex()
            assert runtime_event_digest(e["event"], p[k + 1 :]).hex() == e["digest"]
    err = _deny(kms, cert_with_log(kms, key, quote, json.dumps(entries), app_id), teecloud_home)
    # refused as a log: an RTMR3 name may not hold ':', so each digest has one reading
    assert err.step == "event_log_verified" and "may not contain ':'" in err.reason, err.reason


@pytest.mark.parametrize(
    "trick",
    [
        "bom",
        "unicode-escape-names",
        "nested-dup",
        "huge-int",
        "float-imr",
        "bool-imr",
        "lone-surrogate",
        "uppercase-hex",
        "nan",
    ],
)
def test_a3_json_encoding_tricks_on_oracle_log(teecloud_home, world, kms, server, trick):
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(agent, key)
    text = json.dumps(entries)
    if trick == "bom":
        text = "\ufeff" + text
    elif trick == "unicode-escape-names":
        text = json.dumps(entries, ensure_ascii=True).replace('"system-ready"', '"\\u0073ystem-ready"')
        text = text.replace('"key-provider"', '"key\\u002dprovider"')
    elif trick == "nested-dup":
        text = text.replace('"imr": 3', '"imr": 3, "x": {"a": 1, "a": 2}', 1)
    elif trick == "huge-int":
        text = text.replace('"imr": 3', '"imr": 3' + "0" * 5000, 1)
    elif trick == "float-imr":
        text = text.replace('"imr": 3', '"imr": 3.0', 1)
    elif trick == "bool-imr":
        text = text.replace('"imr": 1', '"imr": true', 1)
    elif trick == "lone-surrogate":
        text = text.replace('"system-ready"', '"system-ready\\ud800"')
    elif trick == "uppercase-hex":
        text = text.replace(entries[-1]["digest"], entries[-1]["digest"].upper())
    elif trick == "nan":
        text = text.replace('"imr": 0', '"imr": NaN', 1)
    err = _deny(kms, cert_with_log(kms, key, quote, text, app_id), teecloud_home)
    assert err.step in ("event_log_verified", "boot_time", "parsed"), (trick, err.step, err.reason)


# ----------------------------------------------------------------- B: certificate extension tricks


def _cert(kms: Kms, key, exts: list[x509.UnrecognizedExtension]) -> bytes:
    now = int(time.time()) - 30
    return issue_cert(
        key.public_key(),
        issuer_key=kms.service.state.temp_ca_key,
        issuer_name=kms.service.state.temp_ca_cert.subject,
        subject_cn="x",
        not_before=now,
        not_after=now + 600,
        server_auth=False,
        client_auth=True,
        extra_extensions=exts,
    ).public_bytes(serialization.Encoding.DER)


def test_b1_event_log_double_wrapped_or_in_second_extension(teecloud_home, world, kms, server):
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(agent, key)
    # a boot-grammar log (truncated) double-wrapped, plus the real log under a neighbouring OID
    rt3 = [e for e in entries if e["imr"] == 3]
    cut = [e["event"] for e in rt3].index("os-image-hash") + 1
    fake = json.dumps([e for e in entries if e["imr"] != 3] + rt3[:cut]).encode()
    for ext_log in (
        x509.UnrecognizedExtension(OID_EVENT_LOG, _der_octet_string(_der_octet_string(fake))),
        x509.UnrecognizedExtension(OID_EVENT_LOG, fake),
    ):
        der = _cert(
            kms,
            key,
            [
                _ext(OID_QUOTE, quote),
                ext_log,
                _ext(x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.5"), json.dumps(entries).encode()),
                _ext(OID_APP_ID, app_id),
                _ext(OID_CERT_USAGE, b"app:kms-client"),
            ],
        )
        err = _deny(kms, der, teecloud_home)
        assert err.step in ("parsed", "event_log_verified"), err.reason


def test_b2_duplicate_quote_extension_is_refused_at_parse(teecloud_home, world, kms):
    """Two quote extensions (the second one bound to the attacker's key, the first a boot-time quote): made
    by patching the DER of a neighbouring OID into the quote OID. Refused when the extensions are read."""
    app_id = world.register(COMPOSE_V1)
    tee, key, quote, log = _genuine(teecloud_home, app_id)
    other = ec.generate_private_key(ec.SECP256R1())
    q2 = tee.quote(ratls_report_data(spki_der(other.public_key())))
    decoy = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.9")
    der = _cert(
        kms, key, [_ext(OID_QUOTE, q2), _ext(decoy, quote), _ext(OID_EVENT_LOG, json.dumps(log).encode())]
    )
    oid_der = lambda o: bytes([0x06, len(o)]) + o  # noqa: E731
    from cryptography.hazmat.primitives.serialization import Encoding  # noqa: F401

    enc_quote = OID_QUOTE.dotted_string
    body_q = x509.ObjectIdentifier(enc_quote)
    # DER of the OIDs: both share the arc prefix, differ in the last byte (0x01 vs 0x09)
    a = der.find(b"\x2b\x06\x01\x04\x01\x83\xe7\x3d\x01\x09")
    assert a > 0
    patched = der[:a] + b"\x2b\x06\x01\x04\x01\x83\xe7\x3d\x01\x01" + der[a + 10 :]
    del body_q, oid_der
    # Found by the review: cryptography's DuplicateExtension is not a ValueError and escaped as an internal
    # error (HTTP 500, nothing released). Now refused at step `parsed` with a reason.
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(patched, vm_config=vm_config_json(tee))
    assert err.value.step == "parsed" and "do not parse" in err.value.reason, err.value.reason
    rec = kms.audit.read()[-1]
    assert rec.decision == "denied" and rec.step == "parsed", rec


def test_b3_app_id_extension_names_another_app(teecloud_home, world, kms):
    mine = world.register(COMPOSE_V1)
    victim = world.register(COMPOSE_V1)
    tee, key, quote, log = _genuine(teecloud_home, mine)
    der = cert_with_log(kms, key, quote, json.dumps(log), victim)
    err = _deny(kms, der, teecloud_home, vm_config_json(tee))
    assert err.step in ("boot_info", "ratls_cert_verified"), err.step


def test_b4_own_boot_time_quote_with_victim_app_id_payload(teecloud_home, world, kms):
    """Attacker's own genuine boot-time quote; its log's app-id payload (and digest) rewritten to the
    victim's."""
    mine = world.register(COMPOSE_V1)
    victim = world.register(COMPOSE_V1)
    tee, key, quote, log = _genuine(teecloud_home, mine)
    for e in log:
        if e["event"] == "app-id":
            e["event_payload"] = victim.hex()
            e["digest"] = runtime_event_digest("app-id", victim).hex()
    err = _deny(
        kms, cert_with_log(kms, key, quote, json.dumps(log), victim), teecloud_home, vm_config_json(tee)
    )
    assert err.step == "event_log_verified"


# ------------------------------------------------------------------ C: other endpoints / paths


def test_c1_getkmskey_with_an_apps_genuine_boot_time_cert(teecloud_home, world, kms):
    app_id = world.register(COMPOSE_V1)
    _, key, quote, log = _genuine(teecloud_home, app_id)
    der = cert_with_log(kms, key, quote, json.dumps(log), app_id)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_kms_key(der)
    assert err.value.step == "chain"


def test_c2_getkmskey_with_oracle_cert(teecloud_home, world, kms, server):
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(agent, key)
    der = cert_with_log(kms, key, quote, json.dumps(entries), app_id)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_kms_key(der)
    assert err.value.step == "boot_time"


def test_c3_tappd_raw_quote_oracle(teecloud_home, world, kms, server):
    """Legacy Tappd.TdxQuote (raw) as the oracle: same post-boot RTMR3."""
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    rd = ratls_report_data(spki_der(key.public_key()))
    out = agent.get_quote(GetQuoteRequest(report_data=rd.hex()))
    der = cert_with_log(kms, key, bytes.fromhex(out["quote"]), out["event_log"], app_id)
    assert _deny(kms, der, teecloud_home).step == "boot_time"


def test_c4_signcert_csr_for_another_apps_names(teecloud_home, world, kms):
    """A genuine booting app asks SignCert for a CSR naming another app's host names. Observed at review:
    issued under the CALLER's app CA with the CALLER's app_id extension, CN/SAN unchecked (INFO). Now
    refused: SignCert certifies only the attested app's own names (tests/kms/test_signcert_names.py)."""
    mine = world.register(COMPOSE_V1)
    victim = world.register(COMPOSE_V1)
    tee, key, quote, log = _genuine(teecloud_home, mine)
    der = cert_with_log(kms, key, quote, json.dumps(log), mine)
    leafkey = ec.generate_private_key(ec.SECP256R1())
    name = f"{victim.hex()}.app.localhost"
    with pytest.raises(AccessDenied) as err:
        kms.service.sign_cert(
            der, _csr(leafkey, name, [name, "*.app.localhost", "localhost"]), vm_config=vm_config_json(tee)
        )
    assert err.value.step == "csr" and "another app" in err.value.reason
    # its own id is issued, bound to the caller
    ans = kms.service.sign_cert(der, _csr(leafkey, mine.hex(), [mine.hex()]), vm_config=vm_config_json(tee))
    leaf = x509.load_pem_x509_certificate(ans.certificate_chain[0].encode())
    assert leaf.extensions.get_extension_for_oid(OID_APP_ID).value.value.endswith(mine)


def test_c5_vm_config_names_another_image(teecloud_home, world, kms):
    app_id = world.register(COMPOSE_V1)
    tee, key, quote, log = _genuine(teecloud_home, app_id)
    der = cert_with_log(kms, key, quote, json.dumps(log), app_id)
    vm = json.loads(vm_config_json(tee))
    vm["os_image_hash"] = "00" * 32
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=json.dumps(vm))
    assert err.value.step == "os_image"


# ------------------------------------------------------------------------- D: the boot-nonce


def test_d1_use_count_under_concurrency(teecloud_home, world, kms):
    app_id = world.register(COMPOSE_V1)
    tee, key, quote, log = _genuine(teecloud_home, app_id)
    der = cert_with_log(kms, key, quote, json.dumps(log), app_id)
    vm = vm_config_json(tee)
    ok, bad = [], []
    barrier = threading.Barrier(24)

    def go() -> None:
        barrier.wait()
        try:
            kms.service.get_app_key(der, vm_config=vm)
            ok.append(1)
        except AccessDenied as exc:
            bad.append(exc.step)

    ts = [threading.Thread(target=go) for _ in range(24)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(ok) == kms.service.challenges.max_uses
    assert set(bad) == {"boot_nonce"}


def test_d2_two_copies_of_this_kms_token(teecloud_home, world, kms):
    app_id = world.register(COMPOSE_V1)
    tok = harness_challenges().issue()
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, COMPOSE_V1, bytes(20), boot_nonce=tok + tok)
    key = ec.generate_private_key(ec.SECP256R1())
    q = tee.quote(ratls_report_data(spki_der(key.public_key())))
    der = cert_with_log(kms, key, q, event_log_json(tee.event_log()), app_id)
    err = _deny(kms, der, teecloud_home, vm_config_json(tee))
    assert err.step == "boot_nonce"


def test_d3_token_with_tag_of_this_kms_but_future_issue_time(teecloud_home, world, kms):
    """issued_at is under the MAC: a token claiming the future cannot be made without the secret."""
    c = harness_challenges()
    tok = bytearray(c.issue())
    tok[9:17] = (int(time.time()) + 10**6).to_bytes(8, "big")
    app_id = world.register(COMPOSE_V1)
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, COMPOSE_V1, bytes(20), boot_nonce=bytes(tok))
    key = ec.generate_private_key(ec.SECP256R1())
    q = tee.quote(ratls_report_data(spki_der(key.public_key())))
    der = cert_with_log(kms, key, q, event_log_json(tee.event_log()), app_id)
    err = _deny(kms, der, teecloud_home, vm_config_json(tee))
    assert err.step == "boot_nonce" and "not issued by this KMS" in err.reason


def test_d4_challenge_from_a_restarted_kms(teecloud_home, world):
    """A KMS with a fresh random secret (the production default) refuses the old KMS's tokens."""
    kms1 = make_kms(teecloud_home, world.chain)
    kms1.service.challenges = kms1.service.authz.challenges = BootChallenges()
    tok = kms1.service.challenges.issue()
    kms2 = make_kms(teecloud_home, world.chain)
    kms2.service.challenges = kms2.service.authz.challenges = BootChallenges()
    app_id = world.register(COMPOSE_V1)
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, COMPOSE_V1, bytes(20), boot_nonce=tok)
    key = ec.generate_private_key(ec.SECP256R1())
    q = tee.quote(ratls_report_data(spki_der(key.public_key())))
    der = cert_with_log(kms2, key, q, event_log_json(tee.event_log()), app_id)
    err = _deny(kms2, der, teecloud_home, vm_config_json(tee))
    assert err.step == "boot_nonce"


# ----------------------------------------------------------------- E: grammar corner cases


def test_e1_empty_and_zero_instance_id_derive_the_same_keys(teecloud_home, world, kms):
    """Not an attack on another app: an app booted with instance-id empty and one with 20 zero bytes get the
    same disk key (both map to boot_info.instance_id = 0^20). Both need the app's allowed compose."""
    app_id = world.register(COMPOSE_V1)
    out = []
    for iid in (b"", bytes(20)):
        tee, key, quote, log = _genuine(teecloud_home, app_id, iid=iid)
        der = cert_with_log(kms, key, quote, json.dumps(log), app_id)
        out.append(kms.service.get_app_key(der, vm_config=vm_config_json(tee)).disk_crypt_key)
    assert out[0] == out[1]


def test_e2_grammar_without_os_image_hash(teecloud_home, world, kms):
    """A boot that stops at boot-mr-done (optional os-image-hash absent): boot_info needs an os image."""
    app_id = world.register(COMPOSE_V1)
    tee = SimulatedTdx(teecloud_home)
    for n, p in [
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", COMPOSE_V1),
        ("instance-id", bytes(20)),
        ("boot-nonce", harness_challenges().issue()),
        ("boot-mr-done", b""),
    ]:
        tee.emit_event(n, p)
    key = ec.generate_private_key(ec.SECP256R1())
    q = tee.quote(ratls_report_data(spki_der(key.public_key())))
    der = cert_with_log(kms, key, q, event_log_json(tee.event_log()), app_id)
    err = _deny(kms, der, teecloud_home, vm_config_json(tee))
    assert err.step == "boot_info"
