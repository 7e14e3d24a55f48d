"""The KMS's TLS plumbing: RA-TLS server certificate checked by clients, client certificates reaching the
handler, requests without a certificate refused, admin API behind its token."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from teecloud.kms.client import KmsClient, UnsafeNoServerCheck, ratls_server_check
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.server import KmsServer
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import COMPOSE_V1, COMPOSE_V2, World, make_app, make_kms


def _client(kms, url: str) -> KmsClient:
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    return KmsClient(url, server_check=check)


def test_get_app_keys_over_mutual_ratls(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    with KmsServer(kms.service) as server:
        keys = _client(kms, server.url).get_app_keys(app.tee, app_id, app.instance_id)
    assert keys.key_provider_info == {"name": "kms", "id": kms.service.keys.ca_public_key_der.hex()}
    assert len(keys.disk_crypt_key) == 32
    rec = kms.audit.read()[-1]
    assert rec.decision == "allowed" and rec.boot_info is not None
    assert rec.boot_info["app_id"] == app_id.hex()
    assert rec.peer.startswith("127.0.0.1:")


def test_denial_over_tls_reports_reason(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V2)
    with KmsServer(kms.service) as server, pytest.raises(KmsDenied) as info:
        _client(kms, server.url).get_app_keys(app.tee, app_id, app.instance_id)
    assert "compose hash" in info.value.reason.lower()
    assert info.value.step == "chain"


def test_no_client_cert_is_denied(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    with KmsServer(kms.service) as server:
        for path in ("/prpc/KMS.GetAppKey", "/prpc/KMS.GetKmsKey", "/prpc/KMS.SignCert"):
            body = {"csr": "x"} if path.endswith("SignCert") else {}
            r = httpx.post(server.url + path, json=body, verify=False)
            assert r.status_code == 403, (path, r.text)
            assert r.json()["step"] == "tls" and "client certificate" in r.json()["reason"]
            assert "ca_key" not in r.json() and "k256_key" not in r.json()
    assert [r.decision for r in kms.audit.read()] == ["denied"] * 3


def test_malformed_request_is_400_not_500(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    with KmsServer(kms.service) as server:
        r = httpx.post(server.url + "/prpc/KMS.GetAppEnvEncryptPubKey", json={"app_id": "zz"}, verify=False)
        assert r.status_code == 400 and r.json()["error"] == "denied"
        r = httpx.post(
            server.url + "/prpc/KMS.GetAppEnvEncryptPubKey",
            content=b"{",
            verify=False,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        r = httpx.post(server.url + "/prpc/KMS.GetAppKey", content=b"x" * (300 * 1024), verify=False)
        assert r.status_code == 413


def test_server_check_rejects_a_kms_under_another_dev_root(
    teecloud_home: Path, world: World, tmp_path
) -> None:
    kms = make_kms(teecloud_home, world.chain)
    other = SimulatedTdx(tmp_path / "other-installation")
    with KmsServer(kms.service) as server:
        check = ratls_server_check(
            collateral_for=lambda quote, now: other.collateral(),
            dev_root_der=other.dev_root_der(),
            expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
        )
        with pytest.raises(KmsClientError, match="does not verify"):
            KmsClient(server.url, server_check=check).meta()


def test_server_check_with_chain_requires_an_authorized_kms(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain, build="not-allowlisted")
    with KmsServer(kms.service) as server:
        check = ratls_server_check(
            collateral_for=lambda quote, now: kms.tee.collateral(),
            dev_root_der=kms.tee.dev_root_der(),
            chain=world.chain,
        )
        with pytest.raises(KmsClientError, match="not an authorized KMS"):
            KmsClient(server.url, server_check=check).meta()


def test_admin_api_needs_token_and_never_returns_keys(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    with KmsServer(kms.service, admin_token="s3cret-token") as server:
        assert server.admin_port != server.port
        assert httpx.get(server.admin_url + "/status").status_code == 401
        assert (
            httpx.get(server.admin_url + "/status", headers={"authorization": "Bearer nope"}).status_code
            == 401
        )
        auth = {"authorization": "Bearer s3cret-token"}
        st = httpx.get(server.admin_url + "/status", headers=auth).json()
        assert st["ca_pubkey"] == kms.service.keys.ca_public_key_der.hex()
        audit = httpx.get(server.admin_url + "/audit", headers=auth)
        assert audit.status_code == 200
        state = kms.service.state
        secret_hex = (state.root.k256_key.hex(), state.root.to_pem().decode())
        for text in (str(st), audit.text):
            assert secret_hex[0] not in text and "PRIVATE KEY" not in text
        # Admin routes are not on the public listener, and key routes are not on the admin listener.
        assert httpx.get(server.url + "/status", verify=False).status_code == 404
        assert httpx.post(server.admin_url + "/prpc/KMS.GetKmsKey", headers=auth, json={}).status_code == 404


def test_unsafe_no_server_check_says_so(teecloud_home: Path, world: World, caplog) -> None:
    kms = make_kms(teecloud_home, world.chain)
    with KmsServer(kms.service) as server:
        meta = KmsClient(server.url, server_check=UnsafeNoServerCheck()).meta()
    assert meta.k256_pubkey == kms.service.keys.k256_public_key.hex()
    assert "NOT verified" in caplog.text


def test_client_refuses_plain_http() -> None:
    with pytest.raises(KmsClientError):
        KmsClient("http://127.0.0.1:1", server_check=UnsafeNoServerCheck())


def test_kms_client_is_an_agent_key_provider() -> None:
    from teecloud.agent.keyprovider import KeyProvider

    assert isinstance(KmsClient("https://127.0.0.1:1", server_check=UnsafeNoServerCheck()), KeyProvider)


def test_server_check_needs_an_authority(teecloud_home: Path, world: World) -> None:
    """Attestation alone proves "some CVM": any tenant app can mint an RA-TLS certificate from its own quote.
    A client that checks neither KmsAuth nor the KMS root key could be handed a fake KMS's keys."""
    kms = make_kms(teecloud_home, world.chain)
    with pytest.raises(ValueError, match="not necessarily the KMS"):
        ratls_server_check(collateral_for=lambda q, now: kms.tee.collateral(), dev_root_der=None)


def test_server_check_refuses_a_kms_with_another_root_key(teecloud_home: Path, world: World) -> None:
    from teecloud.keys.appkeys import RootKeys

    kms = make_kms(teecloud_home, world.chain)
    with KmsServer(kms.service) as server:
        check = ratls_server_check(
            collateral_for=lambda quote, now: kms.tee.collateral(),
            dev_root_der=kms.tee.dev_root_der(),
            expected_ca_pubkey_der=RootKeys.generate().ca_public_key_der,
        )
        with pytest.raises(KmsClientError, match="not issued by the expected KMS root"):
            KmsClient(server.url, server_check=check).meta()
