"""The runtime on a booted (simulated) CVM: limits each enforced and reported, fetch rules, secrets per
function, signed results that verify offline up to the KMS root, at-most-once requests."""

from __future__ import annotations

import time

import pytest

from teecloud.functions import (
    BadFunction,
    FunctionKeys,
    FunctionRuntime,
    InvocationFailed,
    LimitExceeded,
    NotAllowed,
    ResultInvalid,
    SecretError,
    SignedResult,
    verify_result,
)
from teecloud.keys.envcrypt import encrypt_env
from teecloud.keys.sigchain import k256_public_key

from . import wat
from .conftest import Guest, Outside


def _call(rt: FunctionRuntime, wasm: bytes, inp: bytes, **deploy: object) -> bytes:
    rec = rt.deploy(wasm, **deploy)  # type: ignore[arg-type]
    return rt.invoke(rec.function_hash.hex(), inp).result.output


def test_result_is_signed_by_the_function_key_up_to_the_kms_root(
    runtime: FunctionRuntime, guest: Guest
) -> None:
    rec = runtime.deploy(wat.ECHO)
    inv = runtime.invoke(rec.function_hash.hex(), b"hello", ttl_s=60)
    r = inv.result
    assert r.output == b"hello" and r.function_hash == rec.function_hash
    assert r.runtime_app_id == guest.app_id and r.runtime_compose_hash == guest.compose_hash
    now = int(time.time())
    verify_result(r, kms_root_public_key=guest.kms_root, now=now, function_hash=rec.function_hash)
    # the JSON form round-trips and still verifies
    again = SignedResult.from_json(__import__("json").dumps(r.to_json()))
    verify_result(again, kms_root_public_key=guest.kms_root, now=now)
    # expired, tampered, another function's hash, another KMS root: each refused
    with pytest.raises(ResultInvalid, match="expired"):
        verify_result(r, kms_root_public_key=guest.kms_root, now=r.expiry + 1)
    for field, value in [("output", b"hellp"), ("input_hash", b"\1" * 32), ("expiry", r.expiry + 1)]:
        forged = SignedResult(**{**r.__dict__, field: value})
        with pytest.raises(ResultInvalid):
            verify_result(forged, kms_root_public_key=guest.kms_root, now=now)
    other = runtime.deploy(wat.COUNTER)
    relabelled = SignedResult(**{**r.__dict__, "function_hash": other.function_hash})
    with pytest.raises(ResultInvalid):
        verify_result(relabelled, kms_root_public_key=guest.kms_root, now=now)
    with pytest.raises(ResultInvalid, match="KMS root"):
        verify_result(r, kms_root_public_key=k256_public_key(b"\x11" * 32), now=now)
    # each function has its own result key
    assert runtime.invoke(other.function_hash.hex(), b"").result.public_key != r.public_key
    assert [e["status"] for e in runtime.logs(rec.function_hash.hex())] == ["ok"]


def test_infinite_loop_stops_at_its_cpu_limit(runtime: FunctionRuntime) -> None:
    rec = runtime.deploy(wat.INFINITE_LOOP, limits={"cpu_fuel": 20_000_000})
    with pytest.raises(LimitExceeded) as e:
        runtime.invoke(rec.function_hash.hex(), b"")
    assert e.value.limit == "cpu"
    assert e.value.report["cpu_fuel_used"] == 20_000_000
    assert runtime.logs(rec.function_hash.hex())[-1]["report"]["stopped_by"] == "cpu"


def test_infinite_loop_stops_at_its_wall_limit(runtime: FunctionRuntime) -> None:
    rec = runtime.deploy(wat.INFINITE_LOOP, limits={"wall_ms": 200})
    t0 = time.monotonic()
    with pytest.raises(LimitExceeded) as e:
        runtime.invoke(rec.function_hash.hex(), b"")
    assert e.value.limit == "wall"
    assert 0.19 <= time.monotonic() - t0 < 5
    assert e.value.report["wall_ms"] >= 200
    assert e.value.report["cpu_ms"] > 0 and e.value.report["cpu_fuel_used"] is None  # not written back


def test_memory_bomb_stops_at_its_memory_limit(runtime: FunctionRuntime) -> None:
    rec = runtime.deploy(wat.MEMORY_BOMB, limits={"memory_bytes": 8 << 20})
    with pytest.raises(LimitExceeded) as e:
        runtime.invoke(rec.function_hash.hex(), b"")
    assert e.value.limit == "memory"
    assert e.value.report["memory_bytes"] <= 8 << 20


def test_output_above_its_limit_is_refused(runtime: FunctionRuntime) -> None:
    rec = runtime.deploy(wat.BIG_OUTPUT, limits={"output_bytes": 100})
    assert runtime.invoke(rec.function_hash.hex(), (100).to_bytes(4, "little")).result.output[:4] == (
        100
    ).to_bytes(4, "little")
    with pytest.raises(LimitExceeded) as e:
        runtime.invoke(rec.function_hash.hex(), (101).to_bytes(4, "little"))
    assert e.value.limit == "output"


def test_input_above_its_limit_and_bad_manifests_are_refused(runtime: FunctionRuntime) -> None:
    rec = runtime.deploy(wat.ECHO, limits={"input_bytes": 10})
    with pytest.raises(BadFunction):
        runtime.invoke(rec.function_hash.hex(), b"x" * 11)
    for bad in [
        {"limits": {"cpu_fuel": 10**12}},
        {"limits": {"nope": 1}},
        {"limits": {"wall_ms": -1}},
        {"allowed_hosts": ["a b"]},
        {"allowed_hosts": ["host:99999"]},
    ]:
        with pytest.raises(BadFunction):
            runtime.deploy(wat.ECHO, **bad)  # type: ignore[arg-type]
    for module in [b"\0asm garbage", b"not wasm at all", __import__("wasmtime").wat2wasm("(module)")]:
        with pytest.raises(BadFunction):
            runtime.deploy(module)


def test_no_state_survives_a_call_or_crosses_functions(runtime: FunctionRuntime) -> None:
    a = runtime.deploy(wat.COUNTER)
    b = runtime.deploy(wat.COUNTER, limits={"wall_ms": 9000})  # the same code as another function
    assert a.function_hash != b.function_hash
    outs = [runtime.invoke(f.function_hash.hex(), b"").result.output for f in (a, b, a, b, a)]
    assert outs == [b"\1"] * 5  # each call starts from a fresh instance: no global, memory or table carried


def test_fetch_from_an_allowed_https_host(runtime: FunctionRuntime, outside: Outside) -> None:
    host = outside.url.removeprefix("https://")
    out = _call(runtime, wat.PRICE, f"{outside.url}/price".encode(), allowed_hosts=[host])
    assert int.from_bytes(out, "big") == 4242
    assert outside.hits == ["/price"]


def test_fetch_refusals(runtime: FunctionRuntime, outside: Outside) -> None:
    host = outside.url.removeprefix("https://")

    def code(url: str, hosts: list[str]) -> int:
        return int.from_bytes(
            _call(runtime, wat.FETCH_ONCE, url.encode(), allowed_hosts=hosts), "big", signed=True
        )

    assert code(f"{outside.url}/price", []) == -1  # host not on the allowlist
    assert code(f"{outside.url}/price", ["127.0.0.1:1"]) == -1  # another port
    assert (
        code(f"{outside.untrusted_url}/price", [outside.untrusted_url.removeprefix("https://")]) == -4
    )  # cert
    assert code(f"http://{host}/price", [host]) == -5  # plain HTTP
    assert code(f"{outside.url}/big", [host]) == -3  # above the response cap
    assert code(f"{outside.url}/redirect", [host]) == -6  # redirects are not followed
    assert code(f"{outside.url}/error", [host]) == -6
    # the refused ones never reached the network; the cert failure was refused in the TLS handshake
    assert "/price" not in outside.hits


def test_too_many_fetches_are_refused(runtime: FunctionRuntime, outside: Outside) -> None:
    host = outside.url.removeprefix("https://")
    rec = runtime.deploy(wat.FETCH_MANY, allowed_hosts=[host], limits={"http_requests": 3})
    inv = runtime.invoke(rec.function_hash.hex(), f"{outside.url}/price".encode())
    codes = [b - 256 if b > 127 else b for b in inv.result.output]
    assert codes[3:] == [-2] * 7
    assert inv.report.http_requests == 3 and inv.report.http_refused == 7
    assert outside.hits == ["/price"] * 3


def test_secrets_open_only_for_their_own_function(runtime: FunctionRuntime) -> None:
    from teecloud.functions.service import function_hash_of

    fh = function_hash_of(wat.SECRET, [], {})
    sealed = encrypt_env(runtime.secrets_public_key(fh), {"API_KEY": "s3cret"})
    rec = runtime.deploy(wat.SECRET, sealed_secrets=sealed)
    assert rec.function_hash == fh
    assert runtime.invoke(fh.hex(), b"API_KEY").result.output == b"s3cret"
    assert runtime.invoke(fh.hex(), b"OTHER").result.output == b"none"
    # another function (another code hash) cannot take these secrets: the blob does not open under its key
    with pytest.raises(SecretError):
        runtime.deploy(wat.SECRET, limits={"wall_ms": 5000}, sealed_secrets=sealed)
    # and a function deployed without secrets sees none of another function's
    other = runtime.deploy(wat.SECRET, limits={"wall_ms": 4000})
    assert runtime.invoke(other.function_hash.hex(), b"API_KEY").result.output == b"none"
    # the secrets are stored sealed, never opened
    stored = (runtime.dir / fh.hex() / "secrets.bin").read_bytes()
    assert b"s3cret" not in stored and stored == sealed


def test_a_request_is_answered_at_most_once_across_a_restart(
    teecloud_home: object, guest: Guest, outside: Outside
) -> None:
    from pathlib import Path

    from teecloud.functions import FetchPolicy

    home = Path(str(teecloud_home))
    rt = FunctionRuntime(
        home,
        FunctionKeys(guest.keys),
        fetch_policy=FetchPolicy(trust=outside.trust, allow_private_addresses=True),
    )
    rec = rt.deploy(wat.ECHO)
    rid = b"\7" * 32
    rt.invoke(rec.function_hash.hex(), b"a", request_id=rid)
    with pytest.raises(NotAllowed, match="already taken"):
        rt.invoke(rec.function_hash.hex(), b"a", request_id=rid)
    rt.close()
    # a restarted runtime (same state directory) refuses the same request too
    rt2 = FunctionRuntime(
        home,
        FunctionKeys(guest.keys),
        fetch_policy=FetchPolicy(trust=outside.trust, allow_private_addresses=True),
    )
    try:
        with pytest.raises(NotAllowed, match="already taken"):
            rt2.invoke(rec.function_hash.hex(), b"a", request_id=rid)
        # a request that failed (trap) is not retried either: it is answered at most once
        loop = rt2.deploy(wat.INFINITE_LOOP, limits={"cpu_fuel": 1000})
        with pytest.raises(InvocationFailed):
            rt2.invoke(loop.function_hash.hex(), b"", request_id=rid)
        with pytest.raises(NotAllowed):
            rt2.invoke(loop.function_hash.hex(), b"", request_id=rid)
    finally:
        rt2.close()


def test_unknown_functions_are_clear_errors(runtime: FunctionRuntime) -> None:
    from teecloud.functions import UnknownFunction

    for ref in ["nope", "00" * 32, "0x" + "ab" * 20]:
        with pytest.raises(UnknownFunction):
            runtime.invoke(ref, b"")


def test_answers_from_non_public_addresses_are_refused_in_production(
    teecloud_home: object, guest: Guest, outside: Outside
) -> None:
    from pathlib import Path

    from teecloud.functions import FetchPolicy

    # production policy: the allowed host resolves to loopback (127.0.0.1): refused, body never read
    rt = FunctionRuntime(
        Path(str(teecloud_home)) / "prod",
        FunctionKeys(guest.keys),
        fetch_policy=FetchPolicy(trust=outside.trust),
    )
    try:
        host = outside.url.removeprefix("https://")
        out = _call(rt, wat.FETCH_ONCE, f"{outside.url}/price".encode(), allowed_hosts=[host])
        assert int.from_bytes(out, "big", signed=True) == -1
        assert rt.logs(rt.functions()[0].function_hash.hex())[-1]["report"]["http_refused"] == 1
    finally:
        rt.close()
