"""PCCS server: fuzzed and hostile requests get a 4xx {"error"} (400 for bad parameters, 404 when the store
has nothing), never a 5xx; the store is unchanged and still serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from teecloud.collateral import CollateralStore, InvalidCollateral, make_pccs_app
from tests.robustness._fuzz import run_hostile, run_schemathesis

NAMES = (
    "tdx/tdx_quote_collateral.json",
    "tdx/tdx_quote_outdated_collateral.json",
    "sgx/sgx_quote_collateral.json",
)


@pytest.fixture
def store(vectors: Path) -> CollateralStore:
    return CollateralStore({n: (vectors / n).read_bytes() for n in NAMES})


def _snapshot(store: CollateralStore) -> list[tuple[str, bytes]]:
    return [(f, store.get(f) or b"") for f in store.fmspcs()]


@pytest.mark.parametrize("empty", [False, True])
def test_schemathesis_and_hostile_matrix(store: CollateralStore, empty: bool) -> None:
    st = CollateralStore() if empty else store
    app = make_pccs_app(st)
    before = _snapshot(st)
    assert run_schemathesis(app, max_examples=30, snapshot=lambda: _snapshot(st)) == []
    c = TestClient(app, raise_server_exceptions=False)
    n, problems = run_hostile(c, app, lambda p: p.replace("{tee}", "tdx"), snapshot=lambda: _snapshot(st))
    assert n > 50 and problems == []
    assert _snapshot(st) == before
    r = c.get("/tdx/certification/v4/tcb", params={"fmspc": "B0C06F000000"})
    assert r.status_code == (404 if empty else 200)


# -- regressions (were FastAPI's {"detail"} / 422, or served the wrong thing) ------------------------------


@pytest.mark.parametrize(
    ("url", "status", "needle"),
    [
        ("/tdx/certification/v4/tcb", 400, "fmspc"),  # was 422 {"detail": [...]}
        ("/tdx/certification/v4/tcb?fmspc=", 400, "12 hex digits"),  # was 200 with the latest entry
        ("/tdx/certification/v4/tcb?fmspc=%ED%A0%80", 400, "12 hex digits"),
        ("/tdx/certification/v4/qe/identity?fmspc=zz", 400, "12 hex digits"),
        ("/sgx/certification/v4/pckcrl", 400, "ca"),
        ("/sgx/certification/v4/pckcrl?ca=zzz", 400, "'processor' or 'platform'"),
        (
            "/sgx/certification/v4/pckcrl?ca=platform&encoding=bogus",
            400,
            "'pem' or 'der'",
        ),  # was served as PEM
        ("/sgx/certification/v4/rootcacrl?fmspc=zz", 400, "12 hex digits"),
        ("/tdx/certification/v4/tcb?fmspc=FFFFFFFFFFFF", 404, "no collateral"),
        ("/xyz/certification/v4/tcb?fmspc=B0C06F000000", 404, "unknown TEE"),
        ("/nope", 404, "no such PCCS endpoint"),
    ],
)
def test_pccs_errors(store: CollateralStore, url: str, status: int, needle: str) -> None:
    r = TestClient(make_pccs_app(store)).get(url)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_wrong_method_is_json(store: CollateralStore) -> None:
    r = TestClient(make_pccs_app(store)).post("/sgx/certification/v4/rootcacrl")
    assert r.status_code == 405 and r.json()["error"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("tcb_info_signature"),
        lambda d: d.__setitem__("pck_crl", "zz"),
        lambda d: d.__setitem__("root_ca_crl", 5),
        lambda d: d.__setitem__("qe_identity_issuer_chain", None),
    ],
)
def test_store_refuses_incomplete_collateral_when_loading(vectors: Path, mutate: object) -> None:
    """Such an entry used to load, and then every request for it was a 500 (KeyError/ValueError)."""
    doc = json.loads((vectors / NAMES[0]).read_bytes())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(InvalidCollateral):
        CollateralStore({"x": json.dumps(doc).encode()})
    with pytest.raises(InvalidCollateral):
        CollateralStore({"x": b"[1, 2]"})


def test_openapi_schema_is_served(store: CollateralStore) -> None:
    """Was a 500: the routes' `Response` return annotation could not be resolved for the schema."""
    r = TestClient(make_pccs_app(store)).get("/openapi.json")
    assert r.status_code == 200 and "/sgx/certification/v4/pckcrl" in r.json()["paths"]
