"""Review 11: getlogs — eth_getLogs on the embedded chain answered from block receipts, as the readers of
AppAuth / KmsGroup events (`ChainConnection.events()`) see it.

Held: a log of another contract with the same event signature (a second AppAuth, and a hand-made emitter of
ComposeHashAdded's exact topics) is never read as the app's; a ComposeHashAdded emitted inside a transaction
that reverts is never read (the same call without the revert is, so the attack path is live); after a
reorg (the block reverted, another mined at its number) the reverted block's log is gone and its hash is
refused as a `blockHash` filter; generated filters over a chain with reverted transactions, a reorg and
several contracts answer exactly as eth-tester's get_logs (the oracle), and never a log of another address.

By the way (info, unchanged from before getlogs): a range that starts past the head is clamped to the head,
so `fromBlock = head + 1` answers the head block's logs again (geth answers []); the one reader that asks
so (functions/oncall.py) re-reads those requests and skips them as not pending."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from teecloud.chain import ChainClient, EmbeddedChain
from teecloud.chain.embedded import RpcError
from teecloud.chain.errors import ContractReverted
from tests.chain.logs_helpers import EventChain, emitter_runtime, eth_tester_logs, initcode

PUSH1, CALLDATASIZE, SUB, CALLDATACOPY, CALLDATALOAD, GAS, CALL, REVERT, DUP1, STOP = (
    0x60, 0x36, 0x03, 0x37, 0x35, 0x5A, 0xF1, 0xFD, 0x80, 0x00,
)  # fmt: skip
COMPOSE_HASH_ADDED = keccak(text="ComposeHashAdded(bytes32,address)")


def _forwarder(revert: bool) -> bytes:
    """EVM runtime: CALL(calldata[0:32] as the target, calldata[32:] as its input), then STOP or REVERT(0, 0)
    (the inner call's logs are then undone with it)."""
    code = bytes([PUSH1, 0x20, CALLDATASIZE, SUB, PUSH1, 0x20, PUSH1, 0, CALLDATACOPY])
    code += bytes([PUSH1, 0, PUSH1, 0, PUSH1, 0x20, CALLDATASIZE, SUB, PUSH1, 0, PUSH1, 0])
    code += bytes([PUSH1, 0, CALLDATALOAD, GAS, CALL])
    return code + (bytes([PUSH1, 0, DUP1, REVERT]) if revert else bytes([STOP]))


def _reverting_emitter(k: int) -> bytes:
    """emitter_runtime(k) that reverts after its LOGk."""
    return emitter_runtime(k)[:-1] + bytes([PUSH1, 0, DUP1, REVERT])


def _deploy(tester: Any, runtime: bytes) -> str:
    """On a bare EmbeddedChain's eth-tester (the generated test)."""
    sender = tester.get_accounts()[0]
    tx = tester.send_transaction({"from": sender, "data": "0x" + initcode(runtime).hex(), "gas": 300_000})
    return to_checksum_address(tester.get_transaction_receipt(tx)["contract_address"])


def _send(tester: Any, to: str, data: bytes) -> dict[str, Any]:
    sender = tester.get_accounts()[0]
    tx = tester.send_transaction({"from": sender, "to": to, "data": "0x" + data.hex(), "gas": 500_000})
    return dict(tester.get_transaction_receipt(tx))


def _deploy_signed(chain: ChainClient, runtime: bytes) -> str:
    """Through the ChainClient (signed transactions, the embedded chain's own block times)."""
    return to_checksum_address(chain.send(None, initcode(runtime), gas=300_000)["contractAddress"])


def _hashes(chain: ChainClient, app_id: str) -> set[str]:
    """The compose hashes of the app's ComposeHashAdded events as `state()` reads them (its history: the
    events alone; `allowed_compose_hashes` is also checked against the contract, which would hide a log
    read from elsewhere)."""
    state = chain.app(app_id).state()
    added = {
        "0x" + bytes(e["args"]["compose_hash"]).hex()
        for e in state.history
        if e["source"] == "app" and e["event"] == "ComposeHashAdded"
    }
    assert all(e["address"] == app_id for e in state.history if e["source"] == "app")
    assert set(state.allowed_compose_hashes) == added
    return added


def test_same_signature_logs_of_other_contracts_and_reverted_calls_are_not_the_apps(
    embedded_chain: ChainClient,
) -> None:
    chain = embedded_chain
    evm = chain.transport.chain  # type: ignore[attr-defined]
    h_a, h_b, h_fake, h_rev, h_ok = (bytes([i]) * 32 for i in (0xA1, 0xB2, 0xC3, 0xD4, 0xE5))
    fwd_revert = _deploy_signed(chain, _forwarder(revert=True))
    fwd_ok = _deploy_signed(chain, _forwarder(revert=False))
    app_a = chain.register_app(fwd_revert, h_a)  # A's owner reverts every call it makes
    app_b = chain.register_app(None, h_b)  # another AppAuth: the same event, another address
    app_c = chain.register_app(fwd_ok, h_a)
    # a hand-made emitter of ComposeHashAdded's exact topics (the signature, h_fake, an owner)
    fake = _deploy_signed(chain, emitter_runtime(3))
    owner_topic = bytes(12) + bytes.fromhex(fwd_revert[2:])
    chain.send(fake, COMPOSE_HASH_ADDED + h_fake + owner_topic, gas=200_000)
    # A's owner adds h_rev, then reverts: the log is undone with the transaction
    call = bytes(12) + bytes.fromhex(app_a[2:])
    add = keccak(text="add_compose_hash(bytes32)")[:4]
    with pytest.raises(ContractReverted):
        chain.send(fwd_revert, call + add + h_rev, gas=500_000)
    # the same path without the revert is live: C's owner adds h_ok and C reads it
    call_c = bytes(12) + bytes.fromhex(app_c[2:])
    chain.send(fwd_ok, call_c + add + h_ok, gas=500_000)
    assert _hashes(chain, app_c) == {"0x" + h_a.hex(), "0x" + h_ok.hex()}
    assert _hashes(chain, app_a) == {"0x" + h_a.hex()}
    assert _hashes(chain, app_b) == {"0x" + h_b.hex()}
    every = chain.rpc_call(
        "eth_getLogs", {"fromBlock": "0x0", "toBlock": "latest", "topics": ["0x" + COMPOSE_HASH_ADDED.hex()]}
    )
    assert {log["address"] for log in every} == {app_a, app_b, app_c, fake}
    assert all(log["topics"][1] != "0x" + h_rev.hex() for log in every)
    assert every == eth_tester_logs(evm, {"fromBlock": "0x0", "topics": ["0x" + COMPOSE_HASH_ADDED.hex()]})


def test_a_reverted_blocks_log_is_gone_and_its_hash_is_refused(embedded_chain: ChainClient) -> None:
    chain = embedded_chain
    evm = chain.transport.chain  # type: ignore[attr-defined]
    h_old, h_new = b"\x0a" * 32, b"\x0b" * 32
    app = chain.register_app(None, h_old)
    with evm._lock:
        snap = evm.tester.take_snapshot()
    chain.app(app).add_compose_hash(h_new)
    assert "0x" + h_new.hex() in _hashes(chain, app)
    orphan = chain.checked_head()
    assert chain.rpc_call("eth_getLogs", {"blockHash": orphan.hash, "address": app})
    with evm._lock:
        evm.tester.revert_to_snapshot(snap)
    evm.request("evm_mine", [])
    evm.request("evm_mine", [])
    assert chain.checked_head().number >= orphan.number
    assert _hashes(chain, app) == {"0x" + h_old.hex()}
    with pytest.raises(RpcError, match=r"not found|not on the canonical chain"):
        evm.request("eth_getLogs", [{"blockHash": orphan.hash}])
    at = evm.request("eth_getLogs", [{"fromBlock": hex(orphan.number), "toBlock": hex(orphan.number)}])
    assert all(log["blockHash"] != orphan.hash for log in at)


@pytest.mark.slow
def test_generated_filters_with_reverted_transactions_and_a_reorg_answer_as_eth_tester(
    tmp_path: Path,
) -> None:
    evm = EmbeddedChain(tmp_path / "chain")
    try:
        _generated(evm)
    finally:
        evm.close()


def _generated(evm: EmbeddedChain) -> None:
    ec = EventChain(evm)
    rng = random.Random(1111)
    pool = [rng.randbytes(32) for _ in range(3)]
    reverting = [_deploy(evm.tester, _reverting_emitter(k)) for k in range(4)]
    ec.random_events(rng, 12, pool)
    with evm._lock:
        snap = evm.tester.take_snapshot()
    ec.random_events(rng, 8, pool)  # to be reverted
    gone = {log["transactionHash"] for log in evm.request("eth_getLogs", [{"fromBlock": "earliest"}])}
    with evm._lock:
        evm.tester.revert_to_snapshot(snap)
    for i in range(16):
        k = i % 4
        topics = [rng.choice(pool) for _ in range(k)]
        receipt = _send(evm.tester, reverting[k], b"".join(topics) + rng.randbytes(8))
        assert receipt["status"] == 0
        ec.random_events(rng, 1, pool)
    latest = int(evm.tester.get_block_by_number("latest")["number"])
    addresses = [a for a, _ in ec.emitters] + reverting
    everything = evm.request("eth_getLogs", [{"fromBlock": "earliest"}])
    assert everything and not {log["transactionHash"] for log in everything} & (
        gone - {log["transactionHash"] for log in everything}
    )
    assert not {log["address"] for log in everything} & set(reverting)
    for _ in range(300):
        flt: dict[str, Any] = {}
        if rng.random() < 0.8:
            pick = rng.sample(addresses, rng.randint(1, 3))
            flt["address"] = pick if rng.random() < 0.5 else pick[0]
        if rng.random() < 0.5:
            flt["topics"] = [
                rng.choice([None, "0x" + rng.choice(pool).hex()]) for _ in range(rng.randint(0, 3))
            ]
        a, b = rng.randrange(latest + 2), rng.randrange(latest + 2)
        flt["fromBlock"], flt["toBlock"] = hex(a), hex(b)
        got = evm.request("eth_getLogs", [flt])
        assert got == eth_tester_logs(evm, flt), flt
        wanted = flt.get("address")
        if wanted is not None:
            wanted = {w.lower() for w in ([wanted] if isinstance(wanted, str) else wanted)}
            assert all(log["address"].lower() in wanted for log in got)
        assert all(int(log["blockNumber"], 16) <= latest for log in got)
        if a > b and a <= latest:
            assert got == []


_ODD: list[Any] = [
    None, True, False, 0, -1, 1.5, 2**300, "", "0x", "0xg", "latest", "earliest", "pending", "0x" + "f" * 64,
    "0x" + "f" * 65, "0X10", [], [None], [[]], {}, {"a": 1}, "0x" + "ab" * 20, "0x" + "AB" * 20,
    ["0x" + "ab" * 20] * 3, "0x" + "11" * 32, ["0x" + "11" * 32, None], [["0x" + "11" * 32, None]],
    [[["x"]]], "\u0663", "0x" + "ab" * 19 + "Ab", 10**40, "0x0",
]  # fmt: skip


def test_generated_malformed_filters_are_invalid_params_never_an_internal_error(tmp_path: Path) -> None:
    """3000 filters of odd values under the five keys (and one unknown), or not an object: each answer is
    a list or a JSON-RPC error -32602 (invalid params) / -32001 (unknown block), never another exception
    (a 500 at the RPC server)."""
    evm = EmbeddedChain(tmp_path / "chain")
    try:
        ec = EventChain(evm)
        rng = random.Random(11)
        ec.random_events(rng, 5, [rng.randbytes(32) for _ in range(3)])
        keys = ["fromBlock", "toBlock", "address", "topics", "blockHash", "extra"]
        for _ in range(3000):
            flt: Any = {k: rng.choice(_ODD) for k in rng.sample(keys, rng.randint(0, 4))}
            if rng.random() < 0.05:
                flt = rng.choice(_ODD)
            try:
                assert isinstance(evm.request("eth_getLogs", [flt]), list)
            except RpcError as exc:
                assert exc.code in (-32602, -32001), (flt, exc.code, exc)
    finally:
        evm.close()
