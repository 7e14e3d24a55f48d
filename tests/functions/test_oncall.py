"""Calling a function on chain: request (deposit) -> Requested event -> the runtime runs it -> fulfill with
the signed result -> the consumer's callback; the relayer paid from the deposit, the rest refunded; a
runtime restarting mid-request never answers twice (the requester cancels after the timeout)."""

from __future__ import annotations

import pytest
from eth_account import Account

from teecloud.chain import DEV_KEYS, ContractReverted
from teecloud.chain.functions import FunctionOracle
from teecloud.functions import FetchPolicy, FunctionKeys, FunctionRuntime
from teecloud.functions.oncall import OracleWatcher, relayer_key

from .conftest import World

DEPOSIT = 10**16


def _watcher(w: World, runtime: FunctionRuntime | None = None) -> tuple[OracleWatcher, str]:
    rt = runtime or w.runtime
    key = relayer_key(rt)
    addr = Account.from_key(key).address
    if w.chain.balance(addr) == 0:
        w.chain.send(addr, b"", value=10**18)
    return OracleWatcher(rt, FunctionOracle(w.chain.with_signer(key), w.oracle.address)), addr


def test_an_on_chain_request_is_answered_once_through_the_callback(world: World) -> None:
    w = world
    watcher, relayer = _watcher(w)
    requester = w.chain.with_signer(DEV_KEYS[5])
    before = w.chain.balance(requester.address)
    rid = FunctionOracle(requester, w.oracle.address).request(
        w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address
    )
    assert w.oracle.get(rid).pending
    relayer_before = w.chain.balance(relayer)
    rep = watcher.poll()
    assert rep.fulfilled == [rid], rep.skipped
    assert w.feed.price() == 4242 and w.feed.updates() == 1
    assert w.oracle.get(rid).state == 2
    # the relayer's gas came out of the deposit; the rest went back to the requester
    spent_by_requester = before - w.chain.balance(requester.address)
    assert 0 < spent_by_requester < DEPOSIT + 10**15  # its own request tx gas + the fee it paid
    assert w.chain.balance(relayer) > relayer_before - 10**15
    # nothing new on the next poll; polling from the start finds it answered; a second fulfil reverts
    assert watcher.poll().fulfilled == []
    again = OracleWatcher(w.runtime, watcher.oracle)
    assert [why for _, why in again.poll().skipped] == ["not pending"]
    # only the oracle may call the feed back
    with pytest.raises(ContractReverted, match="not the oracle"):
        w.chain.transact(
            "FunctionPriceFeed",
            w.feed.address,
            "on_function_result",
            rid,
            w.registry.address,
            b"\0" * 32,
            b"\0" * 32,
        )


def test_a_runtime_restarting_mid_request_never_answers_twice(world: World) -> None:
    w = world
    requester = w.chain.with_signer(DEV_KEYS[6])
    oracle_r = FunctionOracle(requester, w.oracle.address)
    rid = oracle_r.request(w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address)
    # the runtime took the request and ran it, then stopped before sending fulfill
    w.runtime.invoke(w.registry.address, w.price_input, request_id=rid, oracle=True)
    w.runtime.close()
    restarted = FunctionRuntime(
        w.runtime.dir.parent,
        FunctionKeys(w.guest.keys),
        fetch_policy=FetchPolicy(trust=w.outside.trust, allow_private_addresses=True),
        registry_check=w.runtime.registry_check,
    )
    try:
        watcher, _ = _watcher(w, restarted)
        rep = watcher.poll()
        assert rep.fulfilled == [] and "already taken" in rep.skipped[0][1]
    finally:
        restarted.close()
    assert w.oracle.get(rid).pending and w.feed.updates() == 0
    # the requester gets its deposit back after the timeout, not before
    with pytest.raises(ContractReverted, match="not timed out"):
        oracle_r.cancel(rid)
    with pytest.raises(ContractReverted, match="not the requester"):
        w.oracle.cancel(rid)
    w.chain.increase_time(3601)
    before = w.chain.balance(requester.address)
    oracle_r.cancel(rid)
    assert w.chain.balance(requester.address) > before + DEPOSIT - 10**15
    assert w.oracle.get(rid).state == 3


def test_the_oracle_refuses_results_for_another_request(world: World) -> None:
    w = world
    rid = w.oracle.request(w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address)
    # a valid result for the same request id but another input
    other = w.runtime.invoke(w.registry.address, w.price_input + b"#x", request_id=rid, oracle=True).result
    with pytest.raises(ContractReverted, match="another input"):
        w.oracle.fulfill(other.to_abi())
    # a result for a request nobody made
    stray = w.runtime.invoke(w.registry.address, w.price_input, request_id=b"\5" * 32).result
    with pytest.raises(ContractReverted, match="no pending request"):
        w.oracle.fulfill(stray.to_abi())
    assert w.oracle.get(rid).pending


def test_the_watcher_certifies_a_result_key_once_and_later_answers_cost_less(world: World) -> None:
    """The first answer of a result key certifies it on the oracle's verifier (one certify_key); its answers
    then take the certified path (no chain ecrecovers): the same steady-state answer costs less gas than
    from a watcher that does not certify."""
    w = world
    key = relayer_key(w.runtime)
    requester = FunctionOracle(w.chain.with_signer(DEV_KEYS[7]), w.oracle.address)
    verifier = w.oracle.verifier()

    def answer_twice(certify: bool) -> int:
        _watcher(w)  # funds the relayer
        watcher = OracleWatcher(
            w.runtime,
            FunctionOracle(w.chain.with_signer(key), w.oracle.address),
            from_block=w.chain.block_number() + 1,
            certify=certify,
        )
        gas = 0
        for _ in range(2):  # the second answer is the steady state (warm feed storage)
            rid = requester.request(
                w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address
            )
            before = w.chain.block_number()
            assert watcher.poll().fulfilled == [rid]
            (fulfilled,) = w.chain.events(
                "FunctionOracle", w.oracle.address, from_block=before, names=["Fulfilled"]
            )
            gas = int(w.chain.rpc_call("eth_getTransactionReceipt", fulfilled["tx"])["gasUsed"], 16)
        return gas

    full = answer_twice(certify=False)
    assert not w.chain.events("FunctionResultVerifier", verifier.address, names=["KeyCertified"])
    certified = answer_twice(certify=True)
    assert len(w.chain.events("FunctionResultVerifier", verifier.address, names=["KeyCertified"])) == 1
    assert full - certified > 5_000, (full, certified)  # two ecrecovers and the purpose string skipped


def test_oracle_request_ids_count_up_and_may_be_answered_out_of_order(world_both: World) -> None:
    """Request ids are this oracle's prefix then its nonce: consecutive (they share the verifier's replay
    words), distinct from another oracle's; answers may come in any order, each once."""
    w = world_both
    rids = [
        w.oracle.request(w.registry.address, w.price_input, deposit=DEPOSIT, callback=w.feed.address)
        for _ in range(3)
    ]
    n = [int.from_bytes(r, "big") for r in rids]
    assert n[1] == n[0] + 1 and n[2] == n[0] + 2 and n[0] & (2**64 - 1) == 0
    second = FunctionOracle.deploy(w.chain, w.verifier.address)
    other = second.request(w.registry.address, w.price_input, deposit=DEPOSIT)
    assert other[:24] != rids[0][:24] and other[24:] == rids[0][24:]
    results = {
        r: w.runtime.invoke(w.registry.address, w.price_input, request_id=r, oracle=True).result for r in rids
    }
    for r in (rids[2], rids[0], rids[1]):  # out of order
        w.oracle.fulfill(results[r].to_abi())
        assert w.oracle.get(r).state == 2
        assert w.verifier.is_accepted(w.oracle.address, w.registry.address, r)
    assert w.feed.updates() == 3
    for r in rids:
        with pytest.raises(ContractReverted, match="no pending request"):
            w.oracle.fulfill(results[r].to_abi())
