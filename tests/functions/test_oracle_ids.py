"""Issue 22: no caller can take a FunctionOracle request id before the oracle's own watcher does.

FunctionOracle's ids are predictable (ORACLE_ID_TAG ‖ 128 bits of keccak(oracle ‖ chain id) ‖ nonce). The
runtime runs an id in that space only for its oracle watcher (`invoke(oracle=True)`, a request read from the
chain) and refuses it from every other caller with HTTP 409. Without that refusal a caller could block the
request in the claim journal, or post a result made before the request was (the oracle checks only the
function id and the input hash: shown below)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from eth_account import Account
from eth_utils.crypto import keccak

from teecloud.chain import DEV_KEYS, ContractReverted
from teecloud.chain.functions import FunctionOracle
from teecloud.functions import (
    ORACLE_ID_TAG,
    BadFunction,
    FetchPolicy,
    FunctionKeys,
    FunctionRuntime,
    NotAllowed,
    ReservedRequestId,
    is_oracle_request_id,
    sequential_request_id,
)
from teecloud.functions.client import FunctionsClient, RemoteError
from teecloud.functions.http import FunctionServer
from teecloud.functions.oncall import OracleWatcher, relayer_key

from .conftest import World

DEPOSIT = 10**16


def _predict_next_id(w: World, oracle_address: str) -> bytes:
    """What an attacker computes from public facts: the oracle's address, the chain id and its nonce."""
    addr = bytes.fromhex(oracle_address[2:])
    h = keccak(addr.rjust(32, b"\0") + int(w.chain.chain_id).to_bytes(32, "big"))
    nonce = int(w.chain.call("FunctionOracle", oracle_address, "nonce"))
    return ORACLE_ID_TAG + h[:16] + nonce.to_bytes(8, "big")


def _watcher(w: World, runtime: FunctionRuntime, from_block: int = 0) -> OracleWatcher:
    key = relayer_key(runtime)
    addr = Account.from_key(key).address
    if w.chain.balance(addr) == 0:
        w.chain.send(addr, b"", value=10**18)
    return OracleWatcher(
        runtime, FunctionOracle(w.chain.with_signer(key), w.oracle.address), from_block=from_block
    )


def _restart(w: World, runtime: FunctionRuntime) -> FunctionRuntime:
    runtime.close()
    return FunctionRuntime(
        w.runtime.dir.parent,
        FunctionKeys(w.guest.keys),
        fetch_policy=FetchPolicy(trust=w.outside.trust, allow_private_addresses=True),
        registry_check=w.runtime.registry_check,
    )


@pytest.fixture
def client(world: World) -> Iterator[FunctionsClient]:
    server = FunctionServer(world.runtime)
    server.start()
    c = FunctionsClient(server.url)
    yield c
    c.close()
    server.stop()


def test_claiming_the_next_oracle_id_over_http_is_refused_and_the_request_is_answered(
    world: World, client: FunctionsClient
) -> None:
    w = world
    journal = w.runtime.dir / "claims.log"
    predicted = _predict_next_id(w, w.oracle.address)
    # the attacker's steps: claim the next oracle ids over HTTP before anyone requests them
    for rid in (predicted, (int.from_bytes(predicted, "big") + 1).to_bytes(32, "big")):
        with pytest.raises(RemoteError) as exc:
            client.call(w.registry.address, w.price_input.decode(), request_id=rid)
        assert exc.value.status == 409 and exc.value.body["error"] == "ReservedRequestId"
        assert "FunctionOracle's id space" in exc.value.body["detail"]
    assert predicted.hex() not in journal.read_text()  # nothing claimed, nothing run
    assert client.logs(w.registry.address) == []
    # then the on-chain request is made: it has the predicted id, and the runtime answers it
    rid = w.oracle.request(w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address)
    assert rid == predicted
    rep = _watcher(w, w.runtime).poll()
    assert rep.fulfilled == [rid], rep.skipped
    assert w.oracle.get(rid).state == 2 and w.feed.price() == 4242 and w.feed.updates() == 1
    # replays: over HTTP still refused; the watcher's own path refuses it as taken
    with pytest.raises(RemoteError) as exc:
        client.call(w.registry.address, w.price_input.decode(), request_id=rid)
    assert exc.value.status == 409 and exc.value.body["error"] == "ReservedRequestId"
    with pytest.raises(NotAllowed, match="already taken"):
        w.runtime.invoke(w.registry.address, w.price_input, request_id=rid, oracle=True)


def test_a_result_made_before_the_request_would_be_accepted_so_the_runtime_must_refuse_it(
    world: World,
) -> None:
    """Why the refusal is needed: the oracle checks the result's function id and input hash, not when it
    was made, so a signed result for a future id (what HTTP used to hand out) answers the request when a
    stranger posts it first. Only the watcher's path can make such a result now."""
    w = world
    predicted = _predict_next_id(w, w.oracle.address)
    with pytest.raises(ReservedRequestId):
        w.runtime.invoke(w.registry.address, w.price_input, request_id=predicted)
    early = w.runtime.invoke(w.registry.address, w.price_input, request_id=predicted, oracle=True).result
    rid = w.oracle.request(w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address)
    assert rid == predicted
    stranger = w.chain.with_signer(DEV_KEYS[8])
    FunctionOracle(stranger, w.oracle.address).fulfill(early.to_abi())
    assert w.oracle.get(rid).state == 2


def test_generated_ids_in_and_around_the_oracle_space(world: World, client: FunctionsClient) -> None:
    w = world
    rng = random.Random(22)
    journal = w.runtime.dir / "claims.log"
    nxt = int.from_bytes(_predict_next_id(w, w.oracle.address), "big")
    base = nxt & ~(2**64 - 1)
    second = FunctionOracle.deploy(w.chain, w.verifier.address)
    other_next = _predict_next_id(w, second.address)
    inside = [
        (base | n).to_bytes(32, "big") for n in (0, 1, 255, 256, 2**32, 2**64 - 1, (nxt & (2**64 - 1)) + 1)
    ]
    inside += [other_next, ORACLE_ID_TAG + b"\0" * 24, ORACLE_ID_TAG + b"\xff" * 24]
    inside += [ORACLE_ID_TAG + rng.randbytes(24) for _ in range(20)]
    size = journal.stat().st_size
    for rid in inside:
        assert is_oracle_request_id(rid)
        with pytest.raises(ReservedRequestId):
            w.runtime.invoke(w.registry.address, w.price_input, request_id=rid)
    for rid in inside[:8]:
        with pytest.raises(RemoteError) as exc:
            client.call(w.registry.address, w.price_input.decode(), request_id=rid)
        assert exc.value.status == 409 and exc.value.body["error"] == "ReservedRequestId"
    assert journal.stat().st_size == size and client.logs(w.registry.address) == []

    # outside the space: the tag with one bit flipped, the old id format (no tag), random ids. These run,
    # are answered once, and no oracle has a request under them
    nxt_b = nxt.to_bytes(32, "big")
    flipped = [
        (nxt ^ (1 << (255 - bit))).to_bytes(32, "big") for bit in rng.sample(range(8 * len(ORACLE_ID_TAG)), 6)
    ]
    outside = [*flipped, nxt_b[8:] + b"\0" * 8, rng.randbytes(32)]
    for rid in outside:
        assert not is_oracle_request_id(rid)
        with pytest.raises(BadFunction, match="not a FunctionOracle request id"):
            w.runtime.invoke(w.registry.address, w.price_input, request_id=rid, oracle=True)
        result, _ = client.call(w.registry.address, w.price_input.decode(), request_id=rid)
        with pytest.raises(ContractReverted, match="no pending request"):
            w.oracle.fulfill(result.to_abi())
        with pytest.raises(RemoteError) as exc:  # replay
            client.call(w.registry.address, w.price_input.decode(), request_id=rid)
        assert exc.value.status == 409 and "already taken" in exc.value.body["detail"]
    # random ids the runtime picks itself are never in the space; a caller's id stream may not start in it
    for _ in range(5):
        assert not is_oracle_request_id(w.runtime.invoke(w.registry.address, w.price_input).result.request_id)
    with pytest.raises(ValueError, match="tag"):
        sequential_request_id(ORACLE_ID_TAG + bytes(16), 0)
    # the other oracle's request is still open for whoever serves it; ours is answered by our watcher
    rid = w.oracle.request(w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address)
    assert rid == nxt_b
    assert _watcher(w, w.runtime).poll().fulfilled == [rid]


def test_restarts_around_an_attempt_still_answer_the_request_once(
    world: World, client: FunctionsClient
) -> None:
    w = world
    predicted = _predict_next_id(w, w.oracle.address)
    with pytest.raises(RemoteError) as exc:
        client.call(w.registry.address, w.price_input.decode(), request_id=predicted)
    assert exc.value.status == 409
    rt = _restart(w, w.runtime)  # the refused attempt left nothing behind that a restart would load
    try:
        rid = w.oracle.request(w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address)
        assert rid == predicted
        assert _watcher(w, rt).poll().fulfilled == [rid]
        rt = _restart(w, rt)  # after the answer: a watcher reading from block 0 never answers again
        rep = _watcher(w, rt).poll()
        assert rep.fulfilled == [] and [why for _, why in rep.skipped] == ["not pending"]
        with pytest.raises(NotAllowed, match="already taken"):
            rt.invoke(w.registry.address, w.price_input, request_id=rid, oracle=True)
        assert w.feed.updates() == 1
    finally:
        rt.close()
