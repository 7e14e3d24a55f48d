"""The runtime's HTTP API through the Python client: deploy with sealed secrets (the runtime's key checked
up to the KMS root first), invoke, logs; client mistakes are 4xx with a reason, never a 500."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from teecloud.functions import FunctionRuntime, ResultInvalid, verify_result
from teecloud.functions.client import FunctionsClient, RemoteError
from teecloud.functions.http import FunctionServer
from teecloud.keys.sigchain import k256_public_key

from . import wat
from .conftest import Guest, Outside


@pytest.fixture
def server(runtime: FunctionRuntime) -> Iterator[FunctionServer]:
    s = FunctionServer(runtime)
    s.start()
    yield s
    s.stop()


def test_deploy_call_logs_over_http(server: FunctionServer, guest: Guest, outside: Outside) -> None:
    c = FunctionsClient(server.url)
    host = outside.url.removeprefix("https://")
    rec = c.deploy(wat.PRICE, allowed_hosts=[host])
    result, body = c.call(rec["function_hash"], f"{outside.url}/price")
    assert int.from_bytes(result.output, "big") == 4242
    assert body["report"]["http_requests"] == 1 and body["logs"] == ["fetched"]
    verify_result(result, kms_root_public_key=guest.kms_root, now=int(time.time()))
    assert [e["status"] for e in c.logs(rec["function_hash"])] == ["ok"]
    assert c.info()["app_id"] == "0x" + guest.app_id.hex()

    secret_rec = c.deploy(wat.SECRET, secrets={"API_KEY": "v1"}, kms_root_public_key=guest.kms_root)
    assert c.call(secret_rec["function_hash"], "API_KEY")[0].output == b"v1"
    # the runtime's secrets key is checked up to the KMS root: another root refuses to seal
    with pytest.raises(ResultInvalid):
        c.deploy(
            wat.SECRET,
            limits={"wall_ms": 1000},
            secrets={"A": "b"},
            kms_root_public_key=k256_public_key(b"\3" * 32),
        )
    c.close()


def test_failures_are_clear_4xx(server: FunctionServer) -> None:
    c = FunctionsClient(server.url)
    loop = c.deploy(wat.INFINITE_LOOP, limits={"cpu_fuel": 1_000_000})
    with pytest.raises(RemoteError) as e:
        c.call(loop["function_hash"])
    assert e.value.status == 422 and e.value.body["limit"] == "cpu"
    assert e.value.body["report"]["stopped_by"] == "cpu"
    echo = c.deploy(wat.ECHO)
    c.call(echo["function_hash"], "x", request_id=b"\1" * 32)
    with pytest.raises(RemoteError) as e:
        c.call(echo["function_hash"], "x", request_id=b"\1" * 32)
    assert e.value.status == 409
    with pytest.raises(RemoteError) as e:
        c.call("00" * 32)
    assert e.value.status == 404
    raw = httpx.Client(base_url=server.url)
    for method, path, kw, status in [
        ("POST", "/functions", {"content": b"{not json"}, 400),
        ("POST", "/functions", {"json": {"wasm_base64": "!!"}}, 400),
        ("POST", "/functions", {"json": {"wasm_base64": "AAAA"}}, 400),
        ("POST", f"/functions/{echo['function_hash']}/invoke", {"json": {"ttl_s": 0}}, 400),
        ("POST", f"/functions/{echo['function_hash']}/invoke", {"json": {"request_id": "zz"}}, 400),
        (
            "POST",
            f"/functions/{echo['function_hash']}/invoke",
            {"json": {"input": "a", "input_hex": "00"}},
            400,
        ),
        ("GET", "/secrets-key/abcd", {}, 400),
        ("GET", "/functions/nope/logs", {}, 404),
        ("POST", "/functions", {"content": b"x" * (9 << 20)}, 413),
    ]:
        r = raw.request(method, path, **kw)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert r.json()["error"]  # a reason, not a traceback
    raw.close()
    c.close()
