"""eth_getLogs on the embedded chain, answered from block receipts: field by field what eth-tester's
get_logs answered (the oracle, tests/chain/logs_helpers.eth_tester_logs), for generated events and filters."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils.address import to_checksum_address
from web3 import Web3

from teecloud.chain import ChainRpcServer, EmbeddedChain
from teecloud.chain.embedded import RpcError

from .logs_helpers import EventChain, eth_tester_logs

SEED = 20261205


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Any:
    chain = EmbeddedChain(Path(tmp_path_factory.mktemp("chain")))
    ec = EventChain(chain)
    rng = random.Random(SEED)
    pool = [rng.randbytes(32) for _ in range(4)]
    ec.random_events(rng, 40, pool)
    yield ec, pool
    chain.close()


def random_address(rng: random.Random, ec: EventChain) -> str:
    addr = rng.choice([a for a, _ in ec.emitters] + ["0x" + "ab" * 20])
    return rng.choice((to_checksum_address(addr), addr.lower(), "0x" + addr[2:].upper()))


def random_topic(rng: random.Random, pool: list[bytes]) -> str | None:
    return rng.choice(["0x" + t.hex() for t in pool] + ["0x" + "11" * 32, None])


def random_block(rng: random.Random, latest: int) -> Any:
    n = rng.choice((0, 1, latest - 1, latest, latest + 3, rng.randrange(latest + 1)))
    return rng.choice((None, "earliest", "latest", "pending", "safe", hex(n), n))


def random_filter(rng: random.Random, ec: EventChain, pool: list[bytes], latest: int) -> dict[str, Any]:
    flt: dict[str, Any] = {}
    shape = rng.randrange(3)
    if shape == 1:
        flt["address"] = random_address(rng, ec)
    elif shape == 2:
        flt["address"] = [random_address(rng, ec) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.7:
        topics: list[Any] = []
        for _ in range(rng.randint(0, 4)):
            kind = rng.randrange(3)
            if kind == 0:
                topics.append(None)
            elif kind == 1:
                topics.append(random_topic(rng, pool) or "0x" + pool[0].hex())
            else:
                topics.append([random_topic(rng, pool) for _ in range(rng.randint(0, 3))])
        flt["topics"] = topics
    if rng.random() < 0.15:
        number = rng.randrange(latest + 1)
        flt["blockHash"] = ec.tester.get_block_by_number(number)["hash"]
    else:
        for key in ("fromBlock", "toBlock"):
            if rng.random() < 0.85:
                flt[key] = random_block(rng, latest)
    return flt


def test_generated_filters_answer_as_eth_tester_did(events: Any) -> None:
    ec, pool = events
    latest = ec.tester.get_block_by_number("latest")["number"]
    everything = ec.chain.request("eth_getLogs", [{"fromBlock": "earliest"}])
    assert len(everything) > 40  # the generated chain has logs (some calls emit two)
    rng = random.Random(SEED + 1)
    matched = 0
    for _ in range(200):
        flt = random_filter(rng, ec, pool, latest)
        got = ec.chain.request("eth_getLogs", [flt])
        assert got == eth_tester_logs(ec.chain, flt), flt
        matched += bool(got)
    assert matched > 25  # the filters are not all empty-handed


def test_edges_of_the_range(events: Any) -> None:
    ec, _ = events
    latest = ec.tester.get_block_by_number("latest")["number"]
    for first, last in [(0, 0), (latest, latest), (latest, 0), (5, 4), (0, latest + 10), (latest + 5, None)]:
        flt = {"fromBlock": hex(first), "toBlock": None if last is None else hex(last)}
        assert ec.chain.request("eth_getLogs", [flt]) == eth_tester_logs(ec.chain, flt)
    assert ec.chain.request("eth_getLogs", [{"fromBlock": "0x5", "toBlock": "0x4"}]) == []
    assert ec.chain.request("eth_getLogs", [{}]) == eth_tester_logs(ec.chain, {})  # latest only


def test_log_index_counts_within_the_block(tmp_path: Path) -> None:
    """Two transactions with two logs each in one block: logIndex 0..3 (execution-apis: the log's position in
    the block); eth-tester numbered within each transaction (0, 1, 0, 1), else the answers agree."""
    chain = EmbeddedChain(tmp_path / "chain")
    try:
        ec = EventChain(chain)
        twice = next(i for i, (_, k) in enumerate(ec.emitters) if k == 1 and i % 2 == 1)
        ec.tester.disable_auto_mine_transactions()
        ec.emit(twice, [b"\x01" * 32], b"a")
        ec.emit(twice, [b"\x02" * 32], b"b", sender=ec.tester.get_accounts()[1])
        ec.tester.mine_blocks(1)
        got = chain.request("eth_getLogs", [{"fromBlock": "latest"}])
        old = eth_tester_logs(chain, {"fromBlock": "latest"})
        assert [g["logIndex"] for g in got] == ["0x0", "0x1", "0x2", "0x3"]
        assert [g["transactionIndex"] for g in got] == ["0x0", "0x0", "0x1", "0x1"]
        assert [o["logIndex"] for o in old] == ["0x0", "0x1", "0x0", "0x1"]
        assert [{**g, "logIndex": None} for g in got] == [{**o, "logIndex": None} for o in old]
    finally:
        chain.close()


def test_cache_follows_a_reverted_block(tmp_path: Path) -> None:
    """A block mined, reverted and replaced at the same height: the logs are the new block's (the per-block
    cache is keyed by block hash)."""
    chain = EmbeddedChain(tmp_path / "chain")
    try:
        ec = EventChain(chain)
        one = next(i for i, (_, k) in enumerate(ec.emitters) if k == 1)
        snapshot = ec.tester.take_snapshot()
        ec.emit(one, [b"\x01" * 32], b"old")
        assert chain.request("eth_getLogs", [{}])[0]["topics"] == ["0x" + "01" * 32]
        ec.tester.revert_to_snapshot(snapshot)
        ec.emit(one, [b"\x02" * 32], b"new")
        got = chain.request("eth_getLogs", [{}])
        assert [g["topics"] for g in got] == [["0x" + "02" * 32]]
        assert got == eth_tester_logs(chain, {})
    finally:
        chain.close()


MALFORMED: list[Any] = [
    "not an object",
    [],
    {"fromBlock": "0xzz"},
    {"fromBlock": "-0x1"},
    {"fromBlock": -1},
    {"toBlock": True},
    {"toBlock": "0x"},
    {"toBlock": "0x" + "f" * 65},
    {"fromBlock": "newest"},
    {"address": "0x1234"},
    {"address": 5},
    {"address": []},
    {"address": ["0x" + "ab" * 20, "nope"]},
    {"address": "0xF2e246bb76df876cef8b38ae84130f4f55de395B"},  # mixed case, wrong EIP-55 checksum
    {"address": ["0x" + "ab" * 20] * 1025},
    {"topics": "0x" + "00" * 32},
    {"topics": ["0x" + "00" * 31]},
    {"topics": [["0x" + "00" * 32, 7]]},
    {"topics": [[["0x" + "00" * 32]]]},
    {"topics": [None] * 5},
    {"topics": [["0x" + "00" * 32] * 1025]},
    {"blockHash": "0x1234"},
    {"blockHash": "0x" + "00" * 32, "fromBlock": "0x0"},
    {"fromBlock": "0x0", "limit": 5},
]


@pytest.mark.parametrize("flt", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_filters_are_refused(events: Any, flt: Any) -> None:
    ec, _ = events
    with pytest.raises(RpcError) as err:
        ec.chain.request("eth_getLogs", [flt])
    assert err.value.code == -32602


def test_unknown_block_hash(events: Any) -> None:
    ec, _ = events
    with pytest.raises(RpcError) as err:
        ec.chain.request("eth_getLogs", [{"blockHash": "0x" + "42" * 32}])
    assert err.value.code == -32001


def test_over_http_web3_and_refusals(events: Any) -> None:
    ec, pool = events
    server = ChainRpcServer(ec.chain).start()
    try:
        w3 = Web3(Web3.HTTPProvider(server.url))
        address, _ = next(e for e in ec.emitters if e[1] == 2)
        topics = [None, ["0x" + pool[1].hex()]]
        flt = {"fromBlock": 0, "toBlock": "latest", "address": address, "topics": topics}
        got = w3.eth.get_logs(flt)  # type: ignore[arg-type]
        want = eth_tester_logs(ec.chain, {**flt, "fromBlock": "0x0"})
        assert [(w["transactionHash"], w["logIndex"]) for w in want] == [
            ("0x" + g["transactionHash"].hex(), hex(g["logIndex"])) for g in got
        ]
        bad = {"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [{"topics": "x"}]}
        resp = httpx.post(server.url, json=bad, timeout=5)
        assert resp.status_code == 200
        assert resp.json()["error"]["code"] == -32602
    finally:
        server.stop()
