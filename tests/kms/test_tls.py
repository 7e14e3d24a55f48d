"""The KMS over real TLS: RA-TLS server cert checked by the client, client cert reaching the handler."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from teecloud.kms.client import KmsClient, ratls_server_check
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.service import KmsServer
from tests.kms.conftest import APP_ID, COMPOSE_V1, COMPOSE_V2, make_app, make_kms


def _client(kms, url: str) -> KmsClient:
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(), dev_root_der=kms.tee.dev_root_der()
    )
    return KmsClient(url, server_check=check)


def test_get_app_keys_over_mutual_ratls(teecloud_home: Path, fake_chain) -> None:
    kms = make_kms(teecloud_home, fake_chain)
    app = make_app(teecloud_home, APP_ID, COMPOSE_V1)
    with KmsServer(kms.service) as server:
        client = _client(kms, server.url)
        keys = client.get_app_keys(app.tee, APP_ID, app.instance_id)
        assert keys.key_provider_info == {"name": "kms", "id": kms.service.state.root.ca_public_key_der.hex()}
        assert len(keys.disk_crypt_key) == 32
        recs = kms.audit.read()
        assert recs[-1].decision == "allowed"
        assert recs[-1].boot_info is not None and recs[-1].boot_info["app_id"] == APP_ID.hex()


def test_denied_over_tls_reports_reason(teecloud_home: Path, fake_chain) -> None:
    kms = make_kms(teecloud_home, fake_chain)
    app = make_app(teecloud_home, APP_ID, COMPOSE_V2)  # not allowed
    with KmsServer(kms.service) as server:
        with pytest.raises(KmsDenied) as info:
            _client(kms, server.url).get_app_keys(app.tee, APP_ID, app.instance_id)
        assert "compose hash not allowed" in info.value.reason
        assert info.value.step == "chain"


def test_no_client_cert_is_denied(teecloud_home: Path, fake_chain) -> None:
    kms = make_kms(teecloud_home, fake_chain)
    with KmsServer(kms.service) as server:
        r = httpx.post(server.url + "/prpc/KMS.GetAppKey", json={}, verify=False)
        assert r.status_code == 403
        body = r.json()
        assert body["step"] == "tls" and "client certificate" in body["reason"]
        assert "disk_crypt_key" not in body
        assert kms.audit.read()[-1].decision == "denied"


def test_server_check_rejects_a_kms_from_another_dev_root(teecloud_home: Path, fake_chain, tmp_path) -> None:
    kms = make_kms(teecloud_home, fake_chain)
    from teecloud.tee.simulated import SimulatedTdx

    other = SimulatedTdx(tmp_path / "other-installation")
    with KmsServer(kms.service) as server:
        check = ratls_server_check(
            collateral_for=lambda quote, now: other.collateral(), dev_root_der=other.dev_root_der()
        )
        with pytest.raises(KmsClientError, match="does not verify"):
            KmsClient(server.url, server_check=check).meta()
