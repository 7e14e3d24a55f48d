from __future__ import annotations

from pathlib import Path

from tests.kms.conftest import APP_ID, COMPOSE_V1, client_cert, make_app, make_kms


def test_attested_app_gets_keys(teecloud_home: Path, fake_chain) -> None:
    kms = make_kms(teecloud_home, fake_chain)
    app = make_app(teecloud_home, APP_ID, COMPOSE_V1)
    _, der = client_cert(kms, app)
    resp = kms.service.get_app_key(der)
    assert resp.app_id == APP_ID.hex()
    assert len(bytes.fromhex(resp.disk_crypt_key)) == 32
