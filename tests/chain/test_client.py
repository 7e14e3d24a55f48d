"""ChainClient plumbing: restarts, the JSON-RPC server, errors, keys, compose hash, compile cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from teecloud.chain import (
    DEV_KEYS,
    ChainClient,
    ChainError,
    ChainRpcServer,
    ChainStateError,
    ChainUnreachable,
    EmbeddedChain,
    InsufficientFunds,
    NotDeployed,
    WrongChainId,
    compose_hash,
    load_signer_key,
)
from teecloud.chain._compile import _cache_dir, _memo, compiled
from teecloud.chain.client import HttpTransport, LocalTransport

from .conftest import free_port
from .helpers import OS_IMAGE, boot_info, rand32


def test_restart_keeps_every_app_and_hash(teecloud_home: Path) -> None:
    c = ChainClient.embedded(teecloud_home)
    c.deploy()
    c.add_os_image(OS_IMAGE)
    apps = {}
    for _ in range(3):
        h = rand32()
        a = c.register_app(None, h)
        extra = rand32()
        c.add_compose_hash(a, extra)
        apps[a] = (h, extra)
    removed = rand32()
    first = next(iter(apps))
    c.add_compose_hash(first, removed)
    c.remove_compose_hash(first, removed)
    tl = c.deploy_timelock(c.address, 100)
    tl_app = c.register_app(tl, rand32())
    cid = c.propose_app_change(tl_app, "add_compose_hash", rand32())["id"]
    c.increase_time(50)
    head = c.rpc_call("eth_getBlockByNumber", "latest", False)
    c.close()

    c2 = ChainClient.embedded(teecloud_home)
    assert c2.rpc_call("eth_getBlockByNumber", "latest", False) == head  # same blocks, same hashes
    assert c2.deployment == c.deployment
    for a, (h, extra) in apps.items():
        assert c2.is_app_allowed(boot_info(a, h))[0]
        assert c2.is_app_allowed(boot_info(a, extra))[0]
    assert not c2.is_app_allowed(boot_info(first, removed))[0]
    # the clock offset survives: the queued call is still 50 s early, then due
    with pytest.raises(ChainError, match="too early"):
        c2.timelock_execute(tl, cid)
    c2.increase_time(51)
    c2.timelock_execute(tl, cid)
    c2.close()


def test_torn_journal_tail_is_dropped(teecloud_home: Path) -> None:
    c = ChainClient.embedded(teecloud_home)
    c.deploy()
    n = c.block_number()
    c.close()
    journal = teecloud_home / "chain" / "journal.jsonl"
    with journal.open("a") as f:
        f.write('{"tx": "0xdeadbe')  # crash in the middle of an append
    c2 = ChainClient.embedded(teecloud_home)
    assert c2.block_number() == n
    c2.deploy()  # still usable, and the torn line is gone
    c2.close()
    assert all(json.loads(line) for line in journal.read_text().splitlines())


def test_corrupt_journal_is_reported(teecloud_home: Path) -> None:
    c = ChainClient.embedded(teecloud_home)
    c.deploy()
    c.close()
    journal = teecloud_home / "chain" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    lines[0] = "garbage"
    journal.write_text("\n".join(lines) + "\n")
    with pytest.raises(ChainStateError, match="line 1 is corrupt"):
        EmbeddedChain(teecloud_home / "chain")


def test_one_owner_process(teecloud_home: Path) -> None:
    code = (
        "import sys; from teecloud.chain import EmbeddedChain, ChainStateError\n"
        "try:\n    EmbeddedChain(sys.argv[1])\n"
        "except ChainStateError as e:\n    print('LOCKED', e); sys.exit(3)\n"
    )
    chain = EmbeddedChain(teecloud_home / "chain")
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, str(teecloud_home / "chain")], capture_output=True, text=True
        )
        assert r.returncode == 3 and "in use by another process" in r.stdout
    finally:
        chain.close()


def test_served_over_json_rpc(teecloud_home: Path) -> None:
    chain = EmbeddedChain(teecloud_home / "chain")
    server = ChainRpcServer(chain, "127.0.0.1", free_port()).start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        # ChainClient.embedded finds the running server through chain/rpc.json
        c = ChainClient.embedded(teecloud_home)
        assert isinstance(c.transport, HttpTransport)
        c.deploy()
        h = rand32()
        c.add_os_image(OS_IMAGE)
        app = c.register_app(None, h)
        assert c.is_app_allowed(boot_info(app, h)) == (True, "")
        # a second client with another key over plain JSON-RPC
        other = ChainClient.rpc(server.url, DEV_KEYS[1], home=teecloud_home)
        with pytest.raises(ChainError, match="caller is not the owner"):
            other.add_compose_hash(app, rand32())
        import httpx

        r = httpx.post(server.url, content=b"{not json")
        assert r.status_code == 200 and r.json()["error"]["code"] == -32700
        r = httpx.post(server.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_nope", "params": []})
        assert r.json()["error"]["code"] == -32601
        r = httpx.post(server.url, json=[{"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}])
        assert r.json()[0]["result"] == hex(c.chain_id)
        # deep nesting is a parse error, not a crash of the chain's owner (py-evm raised the recursion limit)
        r = httpx.post(server.url, content=b"[" * 200_000)
        assert r.status_code == 200 and r.json()["error"]["code"] == -32700
        c.close()
        other.close()
    finally:
        server.stop()
        chain.close()
    assert not (teecloud_home / "chain" / "rpc.json").exists()


def test_stop_cuts_kept_alive_connections(teecloud_home: Path) -> None:
    import httpx

    chain = EmbeddedChain(teecloud_home / "chain")
    server = ChainRpcServer(chain, "127.0.0.1", free_port()).start()
    ask = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
    try:
        with httpx.Client(timeout=2) as kept:
            assert "result" in kept.post(server.url, json=ask).json()
            server.stop()
            # the same kept-alive connection must not be answered by a stopped chain
            with pytest.raises(httpx.HTTPError):
                kept.post(server.url, json=ask)
    finally:
        server.stop()
        chain.close()


def test_unreachable_fails_fast() -> None:
    import time

    t = time.monotonic()
    with pytest.raises(ChainUnreachable):
        ChainClient.rpc(f"http://127.0.0.1:{free_port()}", timeout=1)
    assert time.monotonic() - t < 3


def test_wrong_chain_id(embedded_chain: ChainClient, teecloud_home: Path) -> None:
    chain = embedded_chain.transport.chain  # type: ignore[attr-defined]
    with pytest.raises(WrongChainId, match="expected 1"):
        ChainClient(LocalTransport(chain), DEV_KEYS[0], chain_id=1)


def test_insufficient_funds(embedded_chain: ChainClient) -> None:
    poor = embedded_chain.with_signer("0x" + "ab" * 32)
    with pytest.raises(InsufficientFunds):
        poor.deploy_timelock(poor.address, 0)
    with pytest.raises(InsufficientFunds):
        embedded_chain.register_node(
            tee_kind="tdx",
            device_id=rand32(),
            attestation_hash=rand32(),
            capacity=1,
            price_per_hour=1,
            stake=10**30,
        )


def test_not_deployed(teecloud_home: Path) -> None:
    c = ChainClient.embedded(teecloud_home)
    with pytest.raises(NotDeployed, match="teecloud chain deploy"):
        _ = c.kms_auth
    c.close()


def test_deploy_is_idempotent_and_recorded(embedded_chain: ChainClient, teecloud_home: Path) -> None:
    first = embedded_chain.deployment
    assert embedded_chain.deploy() == first
    data = json.loads((teecloud_home / "chain" / "deployment.json").read_text())
    assert data[embedded_chain.chain_key]["KmsAuth"] == first["KmsAuth"]


def test_signer_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "0x" + "5a" * 32
    monkeypatch.delenv("TEECLOUD_CHAIN_KEY", raising=False)
    assert load_signer_key() is None
    monkeypatch.setenv("TEECLOUD_CHAIN_KEY", secret)
    assert load_signer_key() == secret
    kf = tmp_path / "key"
    kf.write_text("5b" * 32 + "\n")
    assert load_signer_key(kf) == "0x" + "5b" * 32
    kf.write_text("not-a-key-" + "5c" * 20)
    with pytest.raises(ChainError) as exc:
        load_signer_key(kf)
    assert "5c5c" not in str(exc.value)  # the key material is never echoed
    with pytest.raises(ChainError, match="cannot read key file"):
        load_signer_key(tmp_path / "missing")


def test_client_repr_hides_key(embedded_chain: ChainClient) -> None:
    c = embedded_chain.with_signer("0x" + "5d" * 32)
    assert "5d5d" not in repr(c) and "5d5d" not in str(c.__dict__.get("label"))


def test_compose_hash_normalization() -> None:
    a = {
        "name": "x",
        "runner": "docker-compose",
        "manifest_version": 2,
        "opt": None,
        "nested": {"b": 1, "a": "é"},
    }
    b = {"nested": {"a": "é", "b": 1}, "manifest_version": 2, "runner": "docker-compose", "name": "x"}
    assert compose_hash(a) == compose_hash(b)
    import hashlib

    expected = '{"manifest_version":2,"name":"x","nested":{"a":"é","b":1},"runner":"docker-compose"}'
    assert compose_hash(a) == hashlib.sha256(expected.encode()).digest()
    assert compose_hash({**a, "name": "y"}) != compose_hash(a)
    with pytest.raises(ValueError):
        compose_hash(["not", "an", "object"])  # type: ignore[arg-type]


def test_compile_cache_keyed_by_source(teecloud_home: Path) -> None:
    _memo.clear()
    compiled("Timelock")
    files = list(_cache_dir().glob("Timelock-*.json"))
    assert len(files) == 1
    _memo.clear()
    mtime = os.stat(files[0]).st_mtime_ns
    assert compiled("Timelock").bytecode  # served from the cache file, not recompiled
    assert os.stat(files[0]).st_mtime_ns == mtime
    files[0].write_text("{damaged")
    _memo.clear()
    assert compiled("Timelock").bytecode  # a damaged entry is rebuilt


def test_read_cache_never_outlives_a_block(chain: ChainClient) -> None:
    h = rand32()
    chain.add_os_image(OS_IMAGE)
    app = chain.register_app(None, h)
    bi = boot_info(app, h)
    assert chain.is_app_allowed(bi) == (True, "")
    assert chain.is_app_allowed(bi) == (True, "")  # served from the cache
    other = chain.with_signer(chain.keys[0])  # type: ignore[attr-defined]
    other.remove_compose_hash(app, h)  # a change by another client: a new block
    assert chain.is_app_allowed(bi) == (False, "compose hash not allowed")


@pytest.mark.parametrize(
    "doc",
    [
        {"name": "x", "runner": "docker-compose", "docker_compose_file": "services: {}"},
        {"name": "x", "runner": "docker-compose", "features": {"kms": None}, "public_logs": None},
        {"name": "ünï", "runner": "docker-compose", "nested": [{"b": 1, "a": None}], "ratio": float("nan")},
    ],
)
def test_registered_compose_hash_is_the_one_boot_measures(doc: dict) -> None:  # type: ignore[type-arg]
    """The hash `teecloud app register` puts on chain must equal what the agent measures into RTMR3 and
    what dstack-sdk computes, or an allowed app could never get its keys."""
    from dstack_sdk import get_compose_hash

    from teecloud.agent.boot import compose_hash as measured

    assert compose_hash(doc).hex() == get_compose_hash(doc) == measured(doc).hex()


def test_rpc_time_travel_only_when_enabled(teecloud_home: Path) -> None:
    """The attacker's steps: a local process reaches the chain's RPC port and moves the clock past a
    timelock's delay to run a queued change early. Refused unless the server was built with time travel."""
    import httpx

    chain = EmbeddedChain(teecloud_home / "chain")
    server = ChainRpcServer(chain, "127.0.0.1", free_port()).start()
    try:
        with ChainClient.rpc(server.url, DEV_KEYS[0], home=teecloud_home) as c:
            c.deploy()
            tl = c.deploy_timelock(c.address, 3600)
            app = c.register_app(tl, rand32())
            cid = c.propose_app_change(app, "add_compose_hash", rand32())["id"]
            head = c.block_number()
            batch = [
                {"jsonrpc": "2.0", "id": 1, "method": "evm_increaseTime", "params": [7200]},
                {"jsonrpc": "2.0", "id": 2, "method": "evm_mine", "params": []},
            ]
            answers = httpx.post(server.url, json=batch).json()
            assert [a["error"]["code"] for a in answers] == [-32601, -32601]
            assert all("--dev-time-travel" in a["error"]["message"] for a in answers)
            with pytest.raises(ChainError, match="evm_increaseTime is disabled"):
                c.increase_time(7200)
            assert c.block_number() == head
            with pytest.raises(ChainError, match="too early"):
                c.timelock_execute(tl, cid)
    finally:
        server.stop()
    server = ChainRpcServer(chain, "127.0.0.1", free_port(), time_travel=True).start()
    try:
        with ChainClient.rpc(server.url, DEV_KEYS[0], home=teecloud_home) as c:
            c.increase_time(3601)
            c.timelock_execute(tl, cid)
    finally:
        server.stop()
        chain.close()
