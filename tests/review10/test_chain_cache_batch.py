"""Review 10: t19-perf's chain changes — the embedded chain's eth_call answers kept per (block hash, call),
and `checked_head`'s chain id + head in one JSON-RPC batch.

Held: after a reorg (the block a call was answered at is reverted and another block mined at its number),
the kept answer is never given: a call at the old hash is an error, the new block's state answers; a call
at latest / pending / by number is run every time; another contract, calldata or sender runs afresh.
Generated mutations of a batch answer (ids swapped, shifted, doubled, missing, extra, as strings, floats or
booleans, nested, another chain id, error objects, null results) are each a ChainError (the gate refuses)
or the exact head of chain 1 — never another block or another chain's head."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from teecloud.chain import ChainClient
from teecloud.chain.embedded import RpcError
from teecloud.chain.errors import ChainError
from teecloud.chain.kmsauth import KmsAuth
from teecloud.peer import ChainGate, PeerRejected
from tests.chain.helpers import OS_IMAGE, boot_info, rand32
from tests.chain.test_blockhash import _answers, _mock_endpoint


def _calls(chain: ChainClient, monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """The eth_call params the embedded chain receives."""
    evm = chain.transport.chain  # type: ignore[attr-defined]
    seen: list[list[Any]] = []
    real = evm.request

    def request(method: str, params: list[Any] | None = None) -> Any:
        if method == "eth_call":
            seen.append(copy.deepcopy(params or []))
        return real(method, params)

    monkeypatch.setattr(evm, "request", request)
    return seen


def test_a_kept_answer_is_never_given_for_a_reverted_block(
    embedded_chain: ChainClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app is registered in block N (hash H) and isAppAllowed asked at H (kept). The chain is reverted
    to before N and another block mined at N (the app not registered): the same call at H is an error, the
    same call at the new block runs and says not allowed; the call at latest runs every time."""
    chain = embedded_chain
    evm = chain.transport.chain  # type: ignore[attr-defined]
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    seen = _calls(chain, monkeypatch)
    with evm._lock:
        snap = evm.tester.take_snapshot()
    app_id = chain.register_app(None, h)
    info = boot_info(app_id, h, instance_id=b"\x01" * 20)
    head = chain.checked_head()
    assert chain.is_app_allowed(info, at=head) == (True, "")
    tx, at = seen[-1][0], seen[-1][1]
    assert at["blockHash"] == head.hash
    ran = evm.calls_executed
    allowed = evm.request("eth_call", [tx, at])
    assert evm.calls_executed == ran  # kept
    with evm._lock:  # the reorg: back to before the app's block, another block at its number
        evm.tester.revert_to_snapshot(snap)  # (the kept answers are not told)
    evm.request("evm_increaseTime", [7])
    evm.request("evm_mine", [])
    new = chain.checked_head()
    assert new.number >= head.number and new.hash != head.hash
    with pytest.raises(RpcError):
        evm.request("eth_call", [tx, {"blockHash": head.hash}])
    with pytest.raises(RpcError):
        evm.request("eth_call", [tx, {"blockHash": head.hash.upper().replace("0X", "0x")}])
    ran = evm.calls_executed
    fresh = evm.request("eth_call", [tx, {"blockHash": new.hash}])
    assert fresh != allowed and evm.calls_executed == ran + 1
    for tag in ("latest", "pending", hex(new.number), {"blockNumber": hex(new.number)}):
        ran = evm.calls_executed
        assert evm.request("eth_call", [tx, tag]) == fresh
        assert evm.request("eth_call", [tx, tag]) == fresh
        assert evm.calls_executed == ran + 2, tag


def test_another_contract_calldata_or_sender_runs_afresh(
    embedded_chain: ChainClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = embedded_chain
    evm = chain.transport.chain  # type: ignore[attr-defined]
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    seen = _calls(chain, monkeypatch)
    app_id = chain.register_app(None, h)
    head = chain.checked_head()
    chain.is_app_allowed(boot_info(app_id, h, instance_id=b"\x01" * 20), at=head)
    tx, at = seen[-1]
    variants = [
        {**tx, "to": "0x" + "00" * 19 + "01"},  # another contract (a precompile: answers something else)
        {**tx, "data": tx["data"][:-2] + ("00" if tx["data"][-2:] != "00" else "01")},
        {**tx, "from": "0x" + "11" * 20},
    ]
    for v in variants:
        ran = evm.calls_executed
        try:
            evm.request("eth_call", [v, at])
        except RpcError:
            pass  # a revert is an answer too; it must have run
        assert evm.calls_executed == ran + 1, v


def _mutations(rng: random.Random, payload: list[Any]) -> list[Any] | Any:
    a = _answers(payload)
    k = rng.randrange(2)
    choice = rng.randrange(14)
    if choice == 0:
        a[k]["id"] = a[1 - k]["id"]
    elif choice == 1:
        a[k]["id"] = a[k]["id"] + rng.choice([-2, -1, 2, 3, 10**6])
    elif choice == 2:
        a[k]["id"] = rng.choice([str(a[k]["id"]), float(a[k]["id"]), None, True, [a[k]["id"]]])
    elif choice == 3:
        del a[k]["id"]
    elif choice == 4:
        a.append(copy.deepcopy(a[k]))
    elif choice == 5:
        a = a[k : k + 1]
    elif choice == 6:
        a[0]["result"] = rng.choice(["0x2", "0x0", "0x01" + "0" * 70, 1, None, "0x"])
    elif choice == 7:
        a[k] = {
            "jsonrpc": "2.0",
            "id": a[k]["id"],
            "error": rng.choice([{"code": -32000, "message": "x"}, "x", 1]),
        }
    elif choice == 8:
        a[1]["result"] = None
    elif choice == 9:
        a[1]["result"] = {**a[1]["result"], "hash": rng.choice(["0x" + "bb" * 31, "aa" * 32, 5, None])}
    elif choice == 10:
        a = [a]
    elif choice == 11:
        a[k] = rng.choice([None, 1, "x", []])
    elif choice == 12:
        a[1]["result"] = {**a[1]["result"], "number": rng.choice(["0x-1", "-0x1", 100, "0x", None])}
    else:
        a = list(reversed(a))  # legal: answers in any order, matched by id
    return a


@pytest.mark.parametrize("seed", range(4))
def test_generated_batch_answers_are_refused_or_exactly_chain_1s_head(seed: int) -> None:
    """Each mutated answer gives exactly chain 1's head, or the chain gate refuses (fails closed). By the
    way: a null or non-hex chain id is a TypeError/ValueError, not a ChainError (as in `check_chain_id`
    before the batch); the gate fails closed on any exception, so it is refused all the same."""
    rng = random.Random(seed)
    for _ in range(40):
        one = rng.random()  # the same mutation for every batch this endpoint answers
        conn, _ = _mock_endpoint(lambda p, one=one: _mutations(random.Random(one), p))
        try:
            head = conn.checked_head()
        except (ChainError, TypeError, ValueError):
            gate = ChainGate(KmsAuth(conn, "0x" + "22" * 20), block_number=conn.checked_head)
            with pytest.raises(PeerRejected, match="failing closed"):
                gate.app_allowed(boot_info("0x" + "11" * 20, rand32()))
            continue
        assert (head.number, head.hash, head.parent_hash) == (100, "0x" + "aa" * 32, "0x" + "99" * 32)
