"""Removal means removal (issue 10 F1): once an instance is retired on chain (`teecloud rm`), the KMS never
releases its keys again, whatever evidence is presented; the refusal names the chain step and its reason,
and is audited. The KMS itself is not changed for this: KmsAuth asks the app's AppAuth."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.kms.api import PATH_GET_APP_KEY, PATH_SIGN_CERT
from teecloud.kms.server import KmsServer
from tests.kms.conftest import (
    COMPOSE_V1,
    Kms,
    World,
    assert_nothing_released,
    client_cert,
    denied_record,
    make_app,
    post_with_cert,
    vm_config,
)


def csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "hello")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_retired_instance_gets_no_keys(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    app_id = world.register(COMPOSE_V1)
    iid, sibling_iid = bytes.fromhex("a1" * 20), bytes.fromhex("b2" * 20)
    app = make_app(teecloud_home, app_id, COMPOSE_V1, instance_id=iid)
    key, der = client_cert(kms, app)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm_config(app)})
    assert status == 200, body  # before removal: the instance's keys are released
    assert body["instance_id"] == iid.hex()

    world.chain.retire_instance("0x" + app_id.hex(), iid)  # what `teecloud rm` does on chain

    # (1) the very evidence that worked a moment ago (a copy kept by whoever had it) is refused
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm_config(app)})
    assert status == 403, body
    assert_nothing_released(body)
    assert body["step"] == "chain" and "instance retired" in body["reason"], body
    rec = denied_record(kms)
    assert rec.reason == body["reason"] and rec.cert_sha256
    # ... and so is a certificate in its name (SignCert asks the chain the same question)
    status, body = post_with_cert(
        server.url, PATH_SIGN_CERT, key, der, {"csr": csr_pem(key), "vm_config": vm_config(app)}
    )
    assert status == 403 and body["step"] == "chain" and "instance retired" in body["reason"], body
    assert "certificate_chain" not in body
    assert denied_record(kms).endpoint == PATH_SIGN_CERT
    # (2) a fresh boot of the same instance (new registers, new quote, new certificate) is refused too
    again = make_app(teecloud_home, app_id, COMPOSE_V1, instance_id=iid)
    key2, der2 = client_cert(kms, again)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key2, der2, {"vm_config": vm_config(again)})
    assert status == 403 and body["step"] == "chain" and "instance retired" in body["reason"], body
    assert_nothing_released(body)
    assert denied_record(kms).reason == body["reason"]
    # (3) another instance of the same app is not affected
    sibling = make_app(teecloud_home, app_id, COMPOSE_V1, instance_id=sibling_iid)
    key3, der3 = client_cert(kms, sibling)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key3, der3, {"vm_config": vm_config(sibling)})
    assert status == 200 and body["instance_id"] == sibling_iid.hex(), body
