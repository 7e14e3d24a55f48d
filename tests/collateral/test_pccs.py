"""PCCS client + server: a real uvicorn server on 127.0.0.1 serving the vector collateral."""

from __future__ import annotations

import calendar
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from teecloud.attestation.dcap import pck_ca, pck_fmspc, verify_dcap_quote
from teecloud.collateral import (
    CollateralNotFound,
    CollateralStore,
    InvalidCollateral,
    PccsClient,
    PccsUnavailable,
    collateral_next_update,
    make_pccs_app,
)

TDX_PIN = calendar.timegm((2025, 7, 4, 0, 0, 0))
DSTACK_PIN = calendar.timegm((2026, 3, 5, 0, 0, 0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def collateral_dir(vectors: Path, tmp_path: Path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    for name in (
        "tdx/tdx_quote_collateral.json",
        "tdx/tdx_quote_outdated_collateral.json",
        "sgx/sgx_quote_collateral.json",
    ):
        raw = (vectors / name).read_bytes()
        fmspc = json.loads(json.loads(raw)["tcb_info"])["fmspc"]
        (d / f"{fmspc}.json").write_bytes(raw)
    return d


@pytest.fixture
def pccs(collateral_dir: Path) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_pccs_app(collateral_dir), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_store_reads_directory(collateral_dir: Path) -> None:
    store = CollateralStore.from_directory(collateral_dir)
    assert store.fmspcs() == ["00A067110000", "90C06F000000", "B0C06F000000"]
    assert store.entry("b0c06f000000").tee == "tdx" and store.entry("00A067110000").tee == "sgx"
    with pytest.raises(CollateralNotFound):
        store.entry("FFFFFFFFFFFF")


def test_fetch_verify_and_cache(pccs: str, vectors: Path, tmp_path: Path) -> None:
    quote = (vectors / "tdx/tdx_quote").read_bytes()
    client = PccsClient(pccs, tmp_path / "cache")
    fmspc, ca = pck_fmspc(quote), pck_ca(quote)
    raw = client.get_collateral(fmspc, ca=ca, tee="tdx", now=TDX_PIN)
    # the signed JSON members survive byte for byte: the quote verifies with the fetched collateral
    ev = verify_dcap_quote(quote, raw, now=TDX_PIN)
    assert ev.tcb_status == "UpToDate"
    assert client.fetches == 1 and client.cache_hits == 0
    assert (tmp_path / "cache" / f"tdx-{ca}-{fmspc}.json").read_bytes() == raw
    # second call: served from the on-disk cache, even by a new client object
    again = PccsClient(pccs, tmp_path / "cache")
    assert again.get_collateral(fmspc, ca=ca, tee="tdx", now=TDX_PIN + 3600) == raw
    assert again.fetches == 0 and again.cache_hits == 1


def test_sgx_collateral_via_pccs(pccs: str, vectors: Path, tmp_path: Path) -> None:
    quote = (vectors / "sgx/sgx_quote").read_bytes()
    client = PccsClient(pccs, tmp_path / "cache")
    raw = client.get_collateral(pck_fmspc(quote), ca=pck_ca(quote), tee="sgx", now=TDX_PIN)
    assert verify_dcap_quote(quote, raw, now=TDX_PIN).tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_expired_cache_entry_is_refetched(pccs: str, vectors: Path, tmp_path: Path) -> None:
    real = (vectors / "tdx/tdx_quote_outdated_collateral.json").read_bytes()
    doc = json.loads(real)
    tcb = json.loads(doc["tcb_info"])
    tcb["nextUpdate"] = "2026-03-01T00:00:00Z"  # a stale copy in the cache
    doc["tcb_info"] = json.dumps(tcb)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tdx-platform-90C06F000000.json").write_bytes(json.dumps(doc).encode())
    client = PccsClient(pccs, cache)
    assert client.cached("90C06F000000", ca="platform", tee="tdx", now=DSTACK_PIN) is None
    raw = client.get_collateral("90C06F000000", ca="platform", tee="tdx", now=DSTACK_PIN)
    assert client.fetches == 1
    assert collateral_next_update(raw) > DSTACK_PIN
    assert (cache / "tdx-platform-90C06F000000.json").read_bytes() == raw
    quote = bytes.fromhex(json.loads((vectors / "tdx/dstack_quote_report.json").read_text())["quote"])
    assert verify_dcap_quote(quote, raw, now=DSTACK_PIN).tcb_status == "UpToDate"


def test_cache_honours_earliest_next_update(vectors: Path) -> None:
    raw = (vectors / "tdx/tdx_quote_collateral.json").read_bytes()
    nu = collateral_next_update(raw)
    assert nu <= calendar.timegm((2025, 7, 19, 10, 16, 3))


def test_pccs_serving_only_expired_collateral_is_an_error(pccs: str, tmp_path: Path) -> None:
    client = PccsClient(pccs, tmp_path / "cache")
    with pytest.raises(InvalidCollateral, match="expired"):
        client.get_collateral("B0C06F000000", ca="platform", tee="tdx", now=TDX_PIN + 60 * 86400)


def test_unknown_fmspc_is_not_found(pccs: str, tmp_path: Path) -> None:
    with pytest.raises(CollateralNotFound):
        PccsClient(pccs, tmp_path).get_collateral("FFFFFFFFFFFF", ca="platform", tee="tdx", now=TDX_PIN)


def test_server_down_is_a_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PccsUnavailable, match="unreachable") as info:
        PccsClient(url, tmp_path, timeout=2).get_collateral(
            "B0C06F000000", ca="platform", tee="tdx", now=TDX_PIN
        )
    assert url in str(info.value)


def test_bad_arguments(tmp_path: Path) -> None:
    client = PccsClient("http://127.0.0.1:1", tmp_path)
    for kw in (
        {"fmspc": "xyz"},
        {"fmspc": "B0C06F000000", "ca": "root"},
        {"fmspc": "B0C06F000000", "tee": "snp"},
    ):
        with pytest.raises(ValueError):
            client.get_collateral(now=TDX_PIN, **kw)  # type: ignore[arg-type]


def test_hostile_pccs_answers(tmp_path: Path) -> None:
    def missing_header(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"tcbInfo": {"fmspc": "B0C06F000000"}, "signature": "00"})

    with pytest.raises(InvalidCollateral, match="header"):
        PccsClient("http://pccs", tmp_path, transport=httpx.MockTransport(missing_header)).get_collateral(
            "B0C06F000000", now=TDX_PIN
        )

    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 5000)

    with pytest.raises(InvalidCollateral, match="over"):
        PccsClient(
            "http://pccs", tmp_path, transport=httpx.MockTransport(huge), max_response_size=1000
        ).get_collateral("B0C06F000000", now=TDX_PIN)

    def error(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    with pytest.raises(PccsUnavailable, match="503"):
        PccsClient("http://pccs", tmp_path, transport=httpx.MockTransport(error)).get_collateral(
            "B0C06F000000", now=TDX_PIN
        )


def test_wrong_fmspc_from_pccs_is_refused(collateral_dir: Path, tmp_path: Path) -> None:
    # a PCCS that answers every FMSPC with B0C06F000000's TCB info
    from fastapi.testclient import TestClient

    app = make_pccs_app(collateral_dir)
    inner = TestClient(app)

    def lying(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        params["fmspc"] = "B0C06F000000"
        r = inner.get(request.url.path, params=params)
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    client = PccsClient("http://pccs", tmp_path, transport=httpx.MockTransport(lying))
    with pytest.raises(InvalidCollateral, match="FMSPC B0C06F000000 when asked for 90C06F000000"):
        client.get_collateral("90C06F000000", ca="platform", now=DSTACK_PIN)
