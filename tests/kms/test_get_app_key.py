"""GetAppKey: keys only for attested, on-chain-authorized code. Every denial names its reason, releases
nothing, and is audited. All requests go over real mutual TLS to a running KMS."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation.models import EventLogEntry
from teecloud.chain import ChainClient, ChainRpcServer
from teecloud.chain.client import HttpTransport
from teecloud.chain.errors import ChainUnreachable
from teecloud.keys.appkeys import derive_app_keys
from teecloud.keys.certs import spki_der
from teecloud.keys.ratls import ratls_report_data
from teecloud.kms.api import PATH_GET_APP_KEY
from teecloud.kms.client import KmsClient, ratls_server_check
from teecloud.kms.server import KmsServer
from teecloud.tee.simulated import os_image_hash_for, runtime_event_digest
from tests.kms.conftest import (
    COMPOSE_V1,
    COMPOSE_V2,
    SIM_OS,
    Kms,
    World,
    assert_nothing_released,
    client_cert,
    denied_record,
    make_app,
    make_kms,
    post_with_cert,
    vm_config,
)

# The vm_config of an app CVM of the default shape on the allowed simulated image, as KmsClient sends it.
SIM_VM_CONFIG = json.dumps(
    {"os_image_hash": os_image_hash_for(SIM_OS).hex(), "cpu_count": 2, "memory_size": 2 * 1024**3}
)


def client_for(kms: Kms, server: KmsServer) -> KmsClient:
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    return KmsClient(server.url, server_check=check)


def expect_denied(
    kms: Kms,
    server: KmsServer,
    key: ec.EllipticCurvePrivateKey,
    der: bytes,
    *needles: str,
    vm: str = SIM_VM_CONFIG,
) -> str:
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm})
    assert status == 403, body
    assert_nothing_released(body)
    for needle in needles:
        assert needle.lower() in (body["reason"] + " " + body["step"]).lower(), body
    rec = denied_record(kms)
    assert rec.reason == body["reason"]
    assert rec.cert_sha256  # the request is identified
    return str(body["reason"])


# ------------------------------------------------------------------------------------------------ positive


def test_attested_app_gets_its_keys(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    keys = client_for(kms, server).get_app_keys(app.tee, app_id, app.instance_id)
    expected = derive_app_keys(kms.service.state.root, app_id, app.instance_id, now=int(time.time()))
    assert keys.disk_crypt_key == expected.disk_crypt_key
    assert keys.env_crypt_key == expected.env_crypt_key
    assert keys.k256_key == expected.k256_key
    assert keys.ca_key_pem == expected.ca_key_pem
    rec = kms.audit.read()[-1]
    assert rec.decision == "allowed"
    assert rec.boot_info is not None
    assert rec.boot_info["compose_hash"] == COMPOSE_V1.hex()
    assert rec.boot_info["tcb_status"] == "UpToDate"
    # The audit never holds key material.
    text = (kms.home / "kms" / "audit.jsonl").read_text()
    assert keys.disk_crypt_key.hex() not in text and keys.k256_key.hex() not in text


def test_upgraded_app_keeps_its_keys(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app_id = world.register(COMPOSE_V1)
    iid = bytes.fromhex("ab" * 20)
    v1 = make_app(teecloud_home, app_id, COMPOSE_V1, instance_id=iid)
    client = client_for(kms, server)
    before = client.get_app_keys(v1.tee, app_id, iid)
    world.chain.add_compose_hash("0x" + app_id.hex(), COMPOSE_V2)
    v2 = make_app(teecloud_home, app_id, COMPOSE_V2, instance_id=iid)
    after = client.get_app_keys(v2.tee, app_id, iid)
    assert (after.disk_crypt_key, after.env_crypt_key, after.k256_key, after.ca_key_pem) == (
        before.disk_crypt_key,
        before.env_crypt_key,
        before.k256_key,
        before.ca_key_pem,
    )


# ------------------------------------------------------------------------------------------------ denials


def test_unregistered_app(teecloud_home: Path, kms: Kms, server: KmsServer) -> None:
    app = make_app(teecloud_home, bytes.fromhex("42" * 20), COMPOSE_V1)
    key, der = client_cert(kms, app)
    expect_denied(kms, server, key, der, "not registered", "chain")


def test_compose_hash_not_allowed(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V2)
    key, der = client_cert(kms, app)
    expect_denied(kms, server, key, der, "compose hash", "chain")


def test_compose_hash_inside_timelock_delay(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    chain = world.chain
    timelock = chain.deploy_timelock(chain.address or "", 3600)
    app_id = bytes.fromhex(chain.register_app(timelock, COMPOSE_V1)[2:])
    queued = chain.propose_app_change("0x" + app_id.hex(), "add_compose_hash", COMPOSE_V2)
    assert queued["kind"] == "timelock"
    v2 = make_app(teecloud_home, app_id, COMPOSE_V2)
    key, der = client_cert(kms, v2)
    expect_denied(kms, server, key, der, "compose hash", "chain")
    # Once the delay has passed and the call is executed, the same code is allowed.
    chain.increase_time(3700)
    chain.timelock_execute(timelock, queued["id"])
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm_config(v2)})
    assert status == 200, body
    assert body["app_id"] == app_id.hex()


def test_removed_compose_hash(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key, der = client_cert(kms, app)
    status, _ = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm_config(app)})
    assert status == 200
    world.chain.remove_compose_hash("0x" + app_id.hex(), COMPOSE_V1)
    # Same certificate (its evidence is cached), but the chain answer is re-read at the new block.
    expect_denied(kms, server, key, der, "compose hash", "chain")


def test_disallowed_os_image(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1, os_image="unlisted-os-9.9")
    key, der = client_cert(kms, app)
    expect_denied(kms, server, key, der, "os image", "chain", vm=vm_config(app))


def test_os_image_event_must_match_measured_firmware(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """A CVM on an unlisted image that claims an allowed os-image-hash in its event log."""
    from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for
    from tests.kms.conftest import SIM_OS, AppCvm

    app_id = world.register(COMPOSE_V1)
    tee = SimulatedTdx(teecloud_home, os_image="unlisted-os-9.9")
    iid = bytes(20)
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", COMPOSE_V1),
        ("instance-id", iid),
        ("boot-mr-done", b""),
        ("os-image-hash", os_image_hash_for(SIM_OS)),
    ]:
        tee.emit_event(name, payload)
    key, der = client_cert(kms, AppCvm(tee, app_id, COMPOSE_V1, iid))
    expect_denied(kms, server, key, der, "rtmr1", "os_image")  # (its MRTD waits for the VM shape)


def test_production_kms_without_os_image_references_fails_closed(
    teecloud_home: Path, world: World, kms: Kms
) -> None:
    """A production KMS has no reference measurements for real OS images (none are wired yet). The
    os-image-hash event is written by the guest, so a TD on any firmware/kernel could claim an allowed image:
    without references the KMS must release no app keys (it used to skip the check and release them)."""
    from teecloud.kms.errors import AccessDenied
    from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for
    from tests.kms.conftest import SIM_OS, AppCvm

    app_id = world.register(COMPOSE_V1)
    tee = SimulatedTdx(teecloud_home, os_image="unlisted-os-9.9")
    iid = bytes(20)
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", COMPOSE_V1),
        ("instance-id", iid),
        ("boot-mr-done", b""),
        ("os-image-hash", os_image_hash_for(SIM_OS)),
    ]:
        tee.emit_event(name, payload)
    _, der = client_cert(kms, AppCvm(tee, app_id, COMPOSE_V1, iid))
    # Stand-in for genuine hardware evidence: the dev KMS's attestation (the production KMS would refuse the
    # simulated root first, which is not what this test is about).
    kms.service.os_image_reference = None
    prod = make_kms(teecloud_home, world.chain, dev=False)
    prod.service.os_image_reference = None
    prod.service.authz.attest = kms.service.authz.attest  # type: ignore[method-assign]
    with pytest.raises(AccessDenied) as err:
        prod.service.get_app_key(der)
    assert err.value.step == "os_image"
    with pytest.raises(AccessDenied) as err:
        prod.service.sign_cert(der, "unused")
    assert err.value.step == "os_image"
    assert denied_record(prod).step == "os_image"


def test_debug_td(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1, debug=True)
    key, der = client_cert(kms, app)
    expect_denied(kms, server, key, der, "debug")


def test_tcb_below_floor(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1, tcb="OutOfDate")
    key, der = client_cert(kms, app)
    expect_denied(kms, server, key, der, "OutOfDate", "tcb")


def test_dev_root_quote_refused_in_production_mode(teecloud_home: Path, world: World) -> None:
    prod = make_kms(teecloud_home, world.chain, dev=False)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key, der = client_cert(prod, app)
    with KmsServer(prod.service) as server:
        expect_denied(prod, server, key, der, "development root")


def test_tampered_event_log(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    """The CVM ran COMPOSE_V2 (not allowed) and rewrites its event log to claim COMPOSE_V1."""
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V2)

    class Liar:
        def quote(self, report_data: bytes) -> bytes:
            return app.tee.quote(report_data)

        def event_log(self) -> list[EventLogEntry]:
            out = []
            for e in app.tee.event_log():
                if e.event == "compose-hash":
                    e = dataclasses.replace(
                        e, event_payload=COMPOSE_V1, digest=runtime_event_digest("compose-hash", COMPOSE_V1)
                    )
                out.append(e)
            return out

    key, der = client_cert(kms, app, quote_tee=Liar())
    expect_denied(kms, server, key, der, "event_log")


def test_report_data_not_binding_the_tls_key(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """A genuine quote of an allowed CVM, but over another key than the certificate's (a replayed quote)."""
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    victim_key = ec.generate_private_key(ec.SECP256R1())

    class Replayer:
        def quote(self, report_data: bytes) -> bytes:
            return app.tee.quote(ratls_report_data(spki_der(victim_key.public_key())))

        def event_log(self) -> list[EventLogEntry]:
            return app.tee.event_log()

    key, der = client_cert(kms, app, quote_tee=Replayer())
    expect_denied(kms, server, key, der, "report_data")


def test_certificate_from_another_instance(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """An attacker CVM copies instance A's evidence (quote + event log) into its own certificate."""
    app_id = world.register(COMPOSE_V1)
    a = make_app(teecloud_home, app_id, COMPOSE_V1, instance_id=bytes.fromhex("aa" * 20))
    _, a_der = client_cert(kms, a)
    from teecloud.keys.ratls import parse_ratls_cert

    a_claims = parse_ratls_cert(a_der)

    class CopyOfA:
        def quote(self, report_data: bytes) -> bytes:
            return a_claims.quote

        def event_log(self) -> list[EventLogEntry]:
            return a.tee.event_log()

    key, der = client_cert(kms, a, quote_tee=CopyOfA())
    expect_denied(kms, server, key, der, "report_data")


def test_certificate_app_id_must_match_event_log(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key, der = client_cert(kms, app, app_id_ext=bytes.fromhex("99" * 20))
    expect_denied(kms, server, key, der, "app_id")


def test_expired_certificate(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key, der = client_cert(kms, app, not_before=int(time.time()) - 4000, lifetime=600)
    expect_denied(kms, server, key, der, "expired", "cert_fresh")


def test_long_lived_certificate_refused(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key, der = client_cert(kms, app, lifetime=30 * 24 * 3600)
    expect_denied(kms, server, key, der, "cert_fresh")


def test_chain_unreachable_fails_closed(teecloud_home: Path, world: World) -> None:
    rpc = ChainRpcServer(world.chain.transport.chain).start()  # type: ignore[attr-defined]
    try:
        remote = ChainClient.rpc(rpc.url, home=world.chain_dir)
    finally:
        rpc.stop()
    # The server's stop() closes its listener, but a kept-alive HTTP/1.1 connection would still be served by
    # its handler thread; a fresh transport to the closed port is what "unreachable" means.
    remote.transport.close()
    remote.transport = HttpTransport(rpc.url)
    with pytest.raises(ChainUnreachable):
        remote.block_number()
    kms = make_kms(teecloud_home, remote)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key, der = client_cert(kms, app)
    with KmsServer(kms.service) as server:
        expect_denied(kms, server, key, der, "failing closed", "chain")


def test_self_signed_client_cert_fails_at_tls(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """Client certificates must chain to the KMS's temporary CA for the handshake to complete."""
    import httpx

    from teecloud.keys.ratls import generate_ratls_identity

    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key_pem, cert_pem = generate_ratls_identity(
        app.tee, usage="app:kms-client", app_id=app_id, now=int(time.time())
    )
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    with pytest.raises((httpx.HTTPError, OSError)):
        post_with_cert(server.url, PATH_GET_APP_KEY, key, der)
