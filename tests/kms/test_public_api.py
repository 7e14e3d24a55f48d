"""Public endpoints: the env-encrypt public key (dstack-sdk compatible) and SignCert for attested callers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dstack_sdk.verify_env_encrypt_public_key import verify_env_encrypt_public_key

from teecloud.keys.envcrypt import decrypt_env, encrypt_env
from teecloud.kms.client import KmsClient, ratls_server_check
from teecloud.kms.server import KmsServer
from tests.kms.conftest import (
    COMPOSE_V1,
    COMPOSE_V2,
    World,
    client_cert,
    make_app,
    make_kms,
    post_with_cert,
    vm_config,
)


def test_env_encrypt_pubkey_verifies_with_dstack_sdk(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    with KmsServer(kms.service) as server:
        r = httpx.post(
            server.url + "/prpc/KMS.GetAppEnvEncryptPubKey",
            json={"app_id": "0x" + app_id.hex()},
            verify=False,
        )
        assert r.status_code == 200
        body = r.json()
        signer = verify_env_encrypt_public_key(
            bytes.fromhex(body["public_key"]),
            bytes.fromhex(body["signature_v1"]),
            app_id.hex(),
            body["timestamp"],
        )
        assert signer == "0x" + kms.service.keys.k256_public_key.hex()
        # The CLI path: encrypt for the app, and the attested app decrypts with the key the KMS releases.
        check = ratls_server_check(
            collateral_for=lambda q, now: kms.tee.collateral(),
            dev_root_der=kms.tee.dev_root_der(),
            expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
        )
        client = KmsClient(server.url, server_check=check)
        pub, _ = client.get_env_encrypt_pubkey(app_id)
        blob = encrypt_env(pub, {"DB_PASSWORD": "hunter2"})
        keys = client.get_app_keys(app.tee, app_id, app.instance_id)
        assert decrypt_env(keys.env_crypt_key, blob) == {"DB_PASSWORD": "hunter2"}


def _csr(cn: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def test_sign_cert_for_attested_allowed_app(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    leaf_key, csr = _csr(app_id.hex())  # SignCert certifies the attested app's own names only
    key, der = client_cert(kms, app)
    with KmsServer(kms.service) as server:
        status, body = post_with_cert(
            server.url, "/prpc/KMS.SignCert", key, der, {"csr": csr, "vm_config": vm_config(app)}
        )
    assert status == 200, body
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in body["certificate_chain"]]
    assert chain[0].public_key() == leaf_key.public_key()
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(chain[2])
    assert chain[2].public_key() == kms.service.state.root.ca_key.public_key()
    assert chain[0].not_valid_after_utc.timestamp() - time.time() <= 31 * 24 * 3600


def test_sign_cert_refused_for_disallowed_app(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V2)
    _, csr = _csr("app.example")
    key, der = client_cert(kms, app)
    with KmsServer(kms.service) as server:
        status, body = post_with_cert(
            server.url, "/prpc/KMS.SignCert", key, der, {"csr": csr, "vm_config": vm_config(app)}
        )
    assert status == 403 and "certificate_chain" not in body
    assert kms.audit.read()[-1].decision == "denied"


def test_sign_cert_rejects_bad_csr(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key, der = client_cert(kms, app)
    with KmsServer(kms.service) as server:
        status, body = post_with_cert(
            server.url, "/prpc/KMS.SignCert", key, der, {"csr": "not a csr", "vm_config": vm_config(app)}
        )
    assert status == 403 and body["step"] == "csr"
