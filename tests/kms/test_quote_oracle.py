"""The quote oracle (issue 10, F1): a running app's quote over caller-chosen report_data never gets keys.

The attacker's exact steps, over real mutual TLS to a running KMS: the app booted the normal way and got its
keys; then anyone who can make the CVM quote chosen bytes (the agent's raw GetQuote, an app's /quote route,
legacy Tappd.TdxQuote with hash_algorithm=raw) makes a P-256 key K, asks for a quote over
sha512("ratls-cert:" ‖ SPKI(K)), puts it with the event log into a certificate for K under the KMS's public
temporary CA, and calls GetAppKey / SignCert. Each is denied at step `boot_time` with a reason, releases
nothing and is audited.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.agent.api import GetQuoteRequest
from teecloud.agent.boot import boot
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.attestation.eventlog import parse_event_log
from teecloud.attestation.models import EventLogEntry
from teecloud.keys.ratls import make_ratls_cert
from teecloud.kms.api import PATH_GET_APP_KEY, PATH_SIGN_CERT
from teecloud.kms.client import KmsClient, ratls_server_check, vm_config_json
from teecloud.kms.errors import AccessDenied
from teecloud.kms.server import KmsServer
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import (
    COMPOSE_V1,
    AppCvm,
    Kms,
    World,
    assert_nothing_released,
    boot_app,
    client_cert,
    denied_record,
    finish_boot,
    make_app,
    make_kms,
    post_with_cert,
    vm_config,
)

HELLO = {
    "manifest_version": 2,
    "name": "hello",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  web:\n    image: hello\n",
}


class GetQuoteOracle:
    """A QuoteSource that obtains every quote the way an outsider does: through the running app's agent
    (raw GetQuote, as dstack-sdk sends it), taking the event log from the same answer."""

    def __init__(self, agent: AgentService) -> None:
        self.agent = agent
        self._log: list[EventLogEntry] = []

    def quote(self, report_data: bytes) -> bytes:
        out = self.agent.get_quote(GetQuoteRequest(report_data=report_data.hex()))
        self._log = list(parse_event_log(out["event_log"]))
        return bytes.fromhex(out["quote"])

    def event_log(self) -> list[EventLogEntry]:
        return self._log


def attacker_cert(
    kms: Kms, oracle: GetQuoteOracle, app_id: bytes
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """Steps 1-3: key K, a quote binding K from the oracle, a certificate for K under GetTempCaCert's CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time()) - 30
    cert = make_ratls_cert(
        oracle,
        key,
        issuer_key=kms.service.state.temp_ca_key,
        issuer_cert=kms.service.state.temp_ca_cert,
        subject="teecloud app",
        usage="app:kms-client",
        not_before=now,
        not_after=now + 600,
        app_id=app_id,
        server_auth=False,
        client_auth=True,
    )
    return key, cert.public_bytes(serialization.Encoding.DER)


def csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))  # the KMS names the certificate after the attested app
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_getquote_oracle_gets_no_keys_after_a_normal_boot(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World
) -> None:
    text = json.dumps(HELLO)
    app_id = world.register(compose_hash(HELLO))
    tee = SimulatedTdx(teecloud_home)
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    # The normal boot: the guest asks for its keys at boot-mr-done (+ os-image-hash) and gets them.
    state = boot(
        tee,
        text,
        app_id,
        None,
        KmsClient(server.url, server_check=check),
        extra_events=[("os-image-hash", tee.os_image_hash)],
    )
    assert len(state.keys.disk_crypt_key) == 32
    assert kms.audit.read()[-1].decision == "allowed"
    oracle = GetQuoteOracle(AgentService(state))
    vm = vm_config_json(tee)

    # (4) GetAppKey and SignCert with the oracle's quote: denied at boot_time, nothing released, audited.
    key, der = attacker_cert(kms, oracle, app_id)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm})
    assert status == 403, body
    assert_nothing_released(body)
    assert body["step"] == "boot_time"
    assert "key-provider" in body["reason"] and "past the boot measurement" in body["reason"]
    rec = denied_record(kms)
    assert rec.endpoint == PATH_GET_APP_KEY and rec.step == "boot_time"
    assert rec.boot_info is not None and rec.boot_info["app_id"] == app_id.hex()

    status, body = post_with_cert(
        server.url, PATH_SIGN_CERT, key, der, {"csr": csr_pem(key), "vm_config": vm}
    )
    assert status == 403, body
    assert body["step"] == "boot_time"
    assert "certificate_chain" not in body
    assert denied_record(kms).endpoint == PATH_SIGN_CERT

    # The same quote, captured once, still gets nothing later (after a KMS restart: a new service).
    again = make_kms(teecloud_home, world.chain)
    with pytest.raises(AccessDenied) as err:
        again.service.get_app_key(der, vm_config=vm)
    assert err.value.step == "boot_time"
    assert denied_record(again).step == "boot_time"


@pytest.mark.parametrize(
    "late_events",
    [
        [("key-provider", b'{"name":"kms","id":""}')],  # after the keys were fetched
        [("key-provider", b"{}"), ("system-ready", b"")],  # a running app
        [("app-event", b"anything")],  # an app-chosen event, even before key-provider
        [("mr-kms", b"\x00" * 32), ("mr-kms", b"\x01" * 32)],  # a KMS-mode event twice
    ],
    ids=["key-provider", "system-ready", "app-event", "duplicate-mr-kms"],
)
def test_any_event_after_the_boot_measurement_is_refused(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World, late_events: list[tuple[str, bytes]]
) -> None:
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    for name, payload in late_events:
        app.tee.emit_event(name, payload)
    key, der = client_cert(kms, app)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm_config(app)})
    assert status == 403, body
    assert_nothing_released(body)
    assert body["step"] == "boot_time", body
    assert late_events[-1][0] in body["reason"] or late_events[0][0] in body["reason"]
    assert denied_record(kms).step == "boot_time"


def test_a_log_without_the_boot_measurement_is_refused(teecloud_home: Path, kms: Kms, world: World) -> None:
    app_id = world.register(COMPOSE_V1)
    tee = SimulatedTdx(teecloud_home)
    for name, payload in [("app-id", app_id), ("compose-hash", COMPOSE_V1), ("instance-id", bytes(20))]:
        tee.emit_event(name, payload)
    tee.emit_event("os-image-hash", tee.os_image_hash)
    cvm = AppCvm(tee, app_id, COMPOSE_V1, bytes(20))
    _, der = client_cert(kms, cvm)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm_config(cvm))
    assert err.value.step == "boot_time"
    assert "should be 'system-preparing'" in err.value.reason
    assert denied_record(kms).step == "boot_time"


def test_the_booting_cvm_still_gets_its_keys_and_a_reboot_measures_afresh(
    teecloud_home: Path, kms: Kms, world: World
) -> None:
    """The rule does not break the normal path, and a restarted CVM (a new TD: fresh registers) boots to
    the same boot-time RTMR3 and is served again, while its previous boot's later quotes stay refused."""
    app_id = world.register(COMPOSE_V1)
    first = make_app(teecloud_home, app_id, COMPOSE_V1)
    _, der = client_cert(kms, first)
    assert kms.service.get_app_key(der, vm_config=vm_config(first)).app_id == app_id.hex()
    finish_boot(first.tee)
    _, late = client_cert(kms, first)
    with pytest.raises(AccessDenied):
        kms.service.get_app_key(late, vm_config=vm_config(first))

    second = SimulatedTdx(teecloud_home)
    assert second.measurements()["rtmr3"] == bytes(48)
    boot_app(second, app_id, COMPOSE_V1, first.instance_id)
    assert second.measurements()["rtmr3"] != first.tee.measurements()["rtmr3"]
    cvm = AppCvm(second, app_id, COMPOSE_V1, first.instance_id)
    _, der2 = client_cert(kms, cvm)
    assert kms.service.get_app_key(der2, vm_config=vm_config(cvm)).instance_id == first.instance_id.hex()
