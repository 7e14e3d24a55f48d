"""The official dstack-sdk (0.5.4, unpatched) is the referee: every method against our agent."""

from __future__ import annotations

import hashlib
import json
import time

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dstack_sdk import AsyncDstackClient, DstackClient, TappdClient, get_compose_hash

from teecloud.agent.api import decode_attestation
from teecloud.attestation.dcap import parse_quote
from teecloud.attestation.eventlog import mr_aggregated as _mr_aggregated
from teecloud.keys.certs import verify_cert_chain
from teecloud.keys.kdf import derive_key
from teecloud.keys.sigchain import verify_key_signature_chain, verify_sign_signature_chain

from .conftest import COMPOSE


def _verify_quote(tee, quote: bytes) -> None:
    now = int(time.time())
    coll = dcap_qvl.QuoteCollateralV3.from_json(tee.collateral(now=now).decode())
    assert dcap_qvl.verify_with_root_ca(quote, coll, tee.dev_root_der(), now).status == "UpToDate"
    try:
        from teecloud.attestation.dcap import verify_dcap_quote
    except ImportError:
        return
    ev = verify_dcap_quote(quote, tee.collateral(now=now), now=now, dev_root_der=tee.dev_root_der())
    assert ev.simulated and ev.tee == "tdx-simulated"


@pytest.fixture(params=["socket", "env-socket", "env-http"])
def client(request, agent, monkeypatch):
    if request.param == "socket":
        return DstackClient(str(agent.dstack_sock))
    if request.param == "env-socket":
        monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(agent.dstack_sock))
    else:
        monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", f"http://127.0.0.1:{agent.bound_port}")
    return DstackClient()


def test_get_key_deterministic_and_separated(client, booted):
    a1 = client.get_key("wallet/eth", "ethereum")
    a2 = client.get_key("wallet/eth", "ethereum")
    assert a1.key == a2.key and a1.signature_chain == a2.signature_chain
    assert a1.decode_key() == derive_key(booted.keys.k256_key, [b"wallet/eth"])
    assert client.get_key("wallet/btc", "ethereum").key != a1.key
    same_key_other_purpose = client.get_key("wallet/eth", "other")
    assert same_key_other_purpose.key == a1.key  # purpose does not change the key...
    assert same_key_other_purpose.signature_chain[0] != a1.signature_chain[0]  # ...only what is signed
    ed = client.get_key("wallet/eth", "p", algorithm="ed25519")
    assert ed.key != a1.key and len(ed.decode_key()) == 32
    import coincurve

    pub = coincurve.PrivateKey(a1.decode_key()).public_key.format()
    app_pub = verify_key_signature_chain(
        app_id=booted.app_id,
        public_key=pub,
        purpose="ethereum",
        signature_chain=a1.decode_signature_chain(),
        kms_root_public_key=booted.keys.kms_k256_pubkey,
    )
    assert app_pub == booted.keys.k256_public_key


def test_keys_differ_across_apps(teecloud_home, sockdir):
    from teecloud.agent import AgentRunner, LocalDevKeyProvider, boot
    from teecloud.tee.simulated import SimulatedTdx

    keys = []
    for name in ("app-one", "app-two"):
        st = boot(
            SimulatedTdx(teecloud_home),
            json.dumps({**COMPOSE, "name": name}),
            None,
            None,
            LocalDevKeyProvider(teecloud_home),
        )
        with AgentRunner(st, dstack_sock=sockdir / f"{name}.sock") as r:
            keys.append(DstackClient(str(r.dstack_sock)).get_key("same/path").key)
    assert keys[0] != keys[1]


def test_get_quote_verifies_and_replays(client, booted):
    rd = b"nonce-1234"
    q = client.get_quote(rd)
    quote = q.decode_quote()
    assert bytes.fromhex(q.report_data) == rd.ljust(64, b"\x00")
    _verify_quote(booted.tee, quote)
    ms = booted.tee.measurements()
    replayed = q.replay_rtmrs()
    for i in range(4):
        assert replayed[i] == ms[f"rtmr{i}"].hex()
    # the RTMRs inside the signed quote itself (TD report body, quote v4: header 48 + offset 328)
    td = quote[48 : 48 + 584]
    for i in range(4):
        assert td[328 + 48 * i : 376 + 48 * i].hex() == replayed[i]
    assert td[520:584] == rd.ljust(64, b"\x00")
    events = [e.event for e in q.decode_event_log() if e.imr == 3]
    assert events[:7] == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "key-provider",
        "system-ready",
    ]
    # the attestation package's full check: quote + event log replay + policy (simulation allowed)
    import dataclasses

    from teecloud.attestation.policy import Policy
    from teecloud.attestation.verifier import verify_tdx_with_event_log

    now = int(time.time())
    ev = verify_tdx_with_event_log(
        quote,
        booted.tee.collateral(now=now),
        q.event_log,
        now=now,
        dev_root_der=booted.tee.dev_root_der(),
        policy=dataclasses.replace(Policy.default(), allow_simulated=True),
    )
    assert ev.app_info.app_id == booted.app_id and ev.app_info.compose_hash == booted.compose_hash
    vm = json.loads(q.vm_config)
    assert vm["os_image_hash"] == booted.tee.os_image_hash.hex()


def test_get_quote_verifies_with_the_cli(client, booted, tmp_path):
    """`teecloud verify --trust-dev-root` on exactly what the SDK returned (dstack's JSON shape)."""
    from typer.testing import CliRunner

    from teecloud.cli import app

    q = client.get_quote(b"cli-check")
    doc = {"quote": q.quote, "event_log": q.event_log, "report_data": q.report_data, "vm_config": q.vm_config}
    path = tmp_path / "quote.json"
    path.write_text(json.dumps(doc))
    booted.tee.collateral()  # the platform's collateral file in the data directory
    r = CliRunner().invoke(app, ["verify", str(path), "--trust-dev-root", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["tee"] == "tdx-simulated"
    assert out["app_info"]["compose_hash"] == booted.compose_hash.hex()
    assert out["app_info"]["app_id"] == booted.app_id.hex()
    r = CliRunner().invoke(app, ["verify", str(path), "--json"])  # production settings
    assert r.exit_code != 0


def test_get_quote_with_64_bytes_and_hex_str(client, booted):
    q = client.get_quote(b"\xff" * 64)
    assert q.report_data == "ff" * 64
    # a str is not hex-decoded by dstack-sdk: it sends its UTF-8 bytes, so a 64-character hex string binds
    # those 64 ASCII bytes (not the 32 bytes it spells), and the quote itself carries them
    text = "ab" * 32
    q = client.get_quote(text)
    assert q.report_data == text.encode().hex()
    assert bytes.fromhex(q.report_data) != bytes.fromhex(text).ljust(64, b"\x00")
    _verify_quote(booted.tee, bytes.fromhex(q.quote))
    assert parse_quote(bytes.fromhex(q.quote))["report_data"] == text.encode()
    # a longer hex string is more than 64 bytes once encoded: the SDK refuses it before sending anything
    with pytest.raises(ValueError, match="less than 64 bytes"):
        client.get_quote("ab" * 64)


def test_attest_envelope(client, booted):
    a = client.attest(b"attest-me")
    env = decode_attestation(a.decode_attestation())
    assert env.tee == "tdx-simulated" and env.report_data == b"attest-me".ljust(64, b"\x00")
    _verify_quote(booted.tee, env.quote)
    assert json.loads(env.event_log)[-1]["event"]


def test_info_parses_and_is_consistent(client, booted):
    info = client.info()
    tcb = info.tcb_info
    ms = booted.tee.measurements()
    assert info.app_id == booted.app_id.hex() and len(info.app_id) == 40
    assert info.app_name == "demo-app"
    assert info.compose_hash == get_compose_hash(dict(COMPOSE)) == tcb.compose_hash
    assert hashlib.sha256(tcb.app_compose.encode()).hexdigest() == info.compose_hash
    assert len(tcb.mrtd) == 96 and len(tcb.rtmr3) == 96 and tcb.rtmr3 == ms["rtmr3"].hex()
    assert len(tcb.device_id) == 64 and tcb.device_id == booted.tee.device_id.hex() == info.device_id
    assert info.mr_aggregated == _mr_aggregated(ms).hex() == tcb.mr_aggregated
    assert info.os_image_hash == booted.tee.os_image_hash.hex()
    kp = json.loads(info.key_provider_info)
    assert kp["name"].startswith("local-dev") and "INSECURE" in kp["name"]
    assert [e.event for e in tcb.event_log if e.imr == 3][-1] == "system-ready"
    assert json.loads(info.vm_config)["cpu_count"] >= 1
    cert = x509.load_pem_x509_certificate(info.app_cert.encode())
    assert cert.issuer == x509.load_pem_x509_certificate(booted.keys.ca_cert_pem.encode()).subject
    assert client.is_reachable()


def test_emit_event_extends_rtmr3(client, booted):
    before = booted.tee.measurements()["rtmr3"]
    client.emit_event("my-app-event", b"payload")
    q = client.get_quote(b"x")
    log = q.decode_event_log()
    assert log[-1].event == "my-app-event" and log[-1].event_payload == b"payload".hex()
    assert q.replay_rtmrs()[3] == booted.tee.measurements()["rtmr3"].hex() != before.hex()


@pytest.mark.parametrize(
    "name",
    ["app-id", "compose-hash", "instance-id", "boot-mr-done", "key-provider", "system-ready", "gpu-evidence"],
)
def test_reserved_events_refused(client, booted, name):
    import httpx

    before = booted.tee.measurements()["rtmr3"]
    with pytest.raises(httpx.HTTPStatusError) as ei:
        client.emit_event(name, b"\x00" * 32)
    assert ei.value.response.status_code == 400 and "reserved" in ei.value.response.json()["error"]
    assert booted.tee.measurements()["rtmr3"] == before


@pytest.mark.parametrize("algorithm", ["ed25519", "secp256k1", "secp256k1_prehashed"])
def test_sign_verify_round_trip(client, booted, algorithm):
    data = hashlib.sha256(b"m").digest() if algorithm == "secp256k1_prehashed" else b"message"
    s = client.sign(algorithm, data)
    assert len(s.signature_chain) == 3 and s.signature_chain[0] == s.signature
    assert client.verify(algorithm, data, s.decode_signature(), s.decode_public_key()).valid
    other = hashlib.sha256(b"n").digest() if algorithm == "secp256k1_prehashed" else b"messagf"
    assert not client.verify(algorithm, other, s.decode_signature(), s.decode_public_key()).valid
    verify_sign_signature_chain(
        app_id=booted.app_id,
        algorithm=algorithm,
        data=data,
        signature=s.decode_signature(),
        public_key=s.decode_public_key(),
        signature_chain=s.decode_signature_chain(),
        kms_root_public_key=booted.keys.kms_k256_pubkey,
    )


def test_version(client):
    v = client.version()
    assert v.version and v.rev


def test_tls_key_chain_verifies_to_app_ca_and_root(client, booted, teecloud_home):
    from teecloud.agent import LocalDevKeyProvider

    r = client.get_tls_key(
        subject="api.example", alt_names=["api.example", "127.0.0.1"], usage_client_auth=True
    )
    key = serialization.load_pem_private_key(r.key.encode(), None)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in r.certificate_chain]
    assert chain[0].public_key().public_numbers() == key.public_key().public_numbers()
    assert len(r.as_uint8array()) > 0
    root = LocalDevKeyProvider(teecloud_home).root
    verify_cert_chain(chain, trusted_public_key=root.ca_key.public_key(), now=int(time.time()) + 1)
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "api.example" in san.get_values_for_type(x509.DNSName)
    r2 = client.get_tls_key()
    assert r2.key != r.key  # a fresh key per call


def test_tls_key_options(client):
    nb, na = int(time.time()), int(time.time()) + 3600
    r = client.get_tls_key(not_before=nb, not_after=na, with_app_info=True)
    c = x509.load_pem_x509_certificate(r.certificate_chain[0].encode())
    assert int(c.not_valid_before_utc.timestamp()) == nb and int(c.not_valid_after_utc.timestamp()) == na


def test_ra_tls_certificate_verifies(client, booted):
    r = client.get_tls_key(subject="ra", usage_ra_tls=True)
    from teecloud.keys.ratls import check_key_binding, parse_ratls_cert
    from teecloud.peer import PeerPolicy, PeerVerifier, StaticCollateral

    # the evidence (this test app's boot is not a full KMS-mode boot_info) and the key binding
    claims = parse_ratls_cert(r.certificate_chain[0])
    peers = PeerVerifier(PeerPolicy.dev(booted.tee.dev_root_der()), StaticCollateral(booted.tee.collateral))
    ev = peers.verify_evidence(claims.quote, claims.event_log)
    check_key_binding(claims, ev.report_data)
    assert ev.app_info is not None and ev.app_info.app_id == booted.app_id
    assert ev.app_info.compose_hash == booted.compose_hash


async def test_async_client_every_method(agent, booted):
    c = AsyncDstackClient(str(agent.dstack_sock))
    async with c:
        k = await c.get_key("p")
        assert k.key == (await c.get_key("p")).key
        q = await c.get_quote(b"async")
        _verify_quote(booted.tee, q.decode_quote())
        assert (await c.info()).app_id == booted.app_id.hex()
        await c.emit_event("async-event", b"1")
        s = await c.sign("ed25519", b"d")
        assert (await c.verify("ed25519", b"d", s.decode_signature(), s.decode_public_key())).valid
        assert (await c.get_tls_key()).certificate_chain
        assert (await c.attest(b"a")).attestation
        assert (await c.version()).version
        assert await c.is_reachable()


@pytest.mark.parametrize("via", ["socket", "env"])
def test_tappd_client(agent, booted, monkeypatch, via):
    if via == "env":
        monkeypatch.setenv("TAPPD_SIMULATOR_ENDPOINT", str(agent.tappd_sock))
        t = TappdClient()
    else:
        t = TappdClient(str(agent.tappd_sock))
    d1 = t.derive_key("tls/path", "svc.example", ["svc.example"])
    d2 = t.derive_key("tls/path", "svc.example", ["svc.example"])
    assert d1.key == d2.key and d1.key != t.derive_key("other").key
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in d1.certificate_chain]
    chain[0].verify_directly_issued_by(chain[1])
    raw = t.tdx_quote(b"raw-data", "raw")
    _verify_quote(booted.tee, raw.decode_quote())
    # the SDK left-pads raw data to 64 bytes with zeros (hex zfill)
    assert raw.decode_quote()[48 + 520 : 48 + 584] == b"raw-data".rjust(64, b"\x00")
    for algo, h in [
        ("sha256", hashlib.sha256),
        ("sha512", hashlib.sha512),
        ("sha3-256", hashlib.sha3_256),
        ("sha384", hashlib.sha384),
    ]:
        q = t.tdx_quote(b"app", algo).decode_quote()
        assert q[48 + 520 : 48 + 584] == h(b"app-data:app").digest().ljust(64, b"\x00")
    from Crypto.Hash import keccak

    q = t.tdx_quote(b"app", "keccak256").decode_quote()
    assert q[48 + 520 : 48 + 552] == keccak.new(digest_bits=256, data=b"app-data:app").digest()
    q = t.tdx_quote(b"app").decode_quote()  # SDK sends "raw" without its zfill: we zero-pad on the right
    assert q[48 + 520 : 48 + 584] == b"app".ljust(64, b"\x00")
    info = t.info()
    assert info.app_id == booted.app_id.hex() and info.tcb_info.rtmr3
