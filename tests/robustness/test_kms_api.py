"""KMS public and admin listeners (read-only here: src/teecloud/kms is another worker's): fuzzed requests
never get a 5xx, refusals use the KMS's {"error": "denied", "reason", "step"} shape, nothing is released,
and the KMS keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from teecloud.kms.http import make_admin_app, make_public_app
from tests.kms.conftest import KEY_FIELDS, Kms, make_kms
from tests.robustness._fuzz import run_hostile, run_schemathesis

ADMIN = {"Authorization": "Bearer tok"}


@pytest.fixture
def kms(teecloud_home: Path) -> Kms:
    return make_kms(teecloud_home, None)  # no chain: nothing here gets far enough to ask it


def _kms_shape(doc: Any) -> bool:
    """The KMS's refusal shape (never FastAPI's own {"detail"})."""
    return isinstance(doc, dict) and bool(doc.get("error")) and "detail" not in doc


def _released(body: Any) -> bool:
    return isinstance(body, dict) and any(f in body for f in KEY_FIELDS)


def test_public_api(kms: Kms) -> None:
    app = make_public_app(kms.service)
    meta = TestClient(app).get("/prpc/KMS.GetMeta").json()
    assert run_schemathesis(app, max_examples=20, shape=_kms_shape) == []
    c = TestClient(app, raise_server_exceptions=False)
    n, problems = run_hostile(c, app, lambda p: p, shape=_kms_shape)
    assert n > 100 and problems == []
    for path in ("/prpc/KMS.GetAppKey", "/prpc/KMS.GetKmsKey"):
        r = c.post(path, json={})
        assert r.status_code == 403 and r.json()["error"] == "denied" and not _released(r.json())
    assert TestClient(app).get("/prpc/KMS.GetMeta").json() == meta


def test_admin_api(kms: Kms) -> None:
    app = make_admin_app(kms.service, token="tok")
    assert run_schemathesis(app, max_examples=20, headers=ADMIN, shape=_kms_shape) == []
    c = TestClient(app, raise_server_exceptions=False)
    _, problems = run_hostile(c, app, lambda p: p, headers=ADMIN, shape=_kms_shape)
    assert problems == []
    _, problems = run_hostile(c, app, lambda p: p, shape=_kms_shape)  # no token
    assert problems == []
    assert c.get("/status", headers=ADMIN).status_code == 200


def test_non_json_body_uses_the_denied_shape(kms: Kms) -> None:
    c = TestClient(make_public_app(kms.service))
    r = c.post("/prpc/KMS.GetAppKey", content=b"\xb7\xca", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "denied"


def test_unknown_route_uses_the_denied_shape(kms: Kms) -> None:
    c = TestClient(make_public_app(kms.service))
    assert c.get("/nope").json()["error"] == "denied"


def test_wrong_method_uses_the_denied_shape(kms: Kms) -> None:
    c = TestClient(make_admin_app(kms.service, token="tok"))
    assert c.put("/status", headers=ADMIN).json()["error"] == "denied"
