"""A chain of event-emitting transactions for eth_getLogs tests and bench/bench_chain_logs.py.

The emitter is hand-assembled EVM code (no compiler needed): calldata = k topics (32 bytes each) followed by
the log data; the contract emits LOGk with them, `repeat` times per call."""

from __future__ import annotations

import random
from typing import Any

from teecloud.chain import EmbeddedChain

PUSH1, CALLDATALOAD, CALLDATASIZE, CALLDATACOPY, SUB = 0x60, 0x35, 0x36, 0x37, 0x03
LOG0, STOP, CODECOPY, RETURN = 0xA0, 0x00, 0x39, 0xF3


def emitter_runtime(k: int, repeat: int = 1) -> bytes:
    """EVM runtime: CALLDATACOPY(0, 32k, size - 32k), then LOGk(0, size - 32k, calldata[0:32], ...)."""
    once = bytes([PUSH1, 32 * k, CALLDATASIZE, SUB, PUSH1, 32 * k, PUSH1, 0, CALLDATACOPY])
    for i in reversed(range(k)):  # LOGk pops offset, size, topic0, topic1, ...: push the last topic first
        once += bytes([PUSH1, 32 * i, CALLDATALOAD])
    once += bytes([PUSH1, 32 * k, CALLDATASIZE, SUB, PUSH1, 0, LOG0 + k])
    return once * repeat + bytes([STOP])


def initcode(runtime: bytes) -> bytes:
    """Returns `runtime` as the deployed code (the standard CODECOPY/RETURN constructor, 12 bytes)."""
    n = len(runtime)
    return bytes([PUSH1, n, PUSH1, 12, PUSH1, 0, CODECOPY, PUSH1, n, PUSH1, 0, RETURN]) + runtime


class EventChain:
    """Emitters with 0..4 topics (some emitting twice per call) deployed on an EmbeddedChain."""

    def __init__(self, chain: EmbeddedChain) -> None:
        self.chain = chain
        self.tester = chain.tester
        self.sender = self.tester.get_accounts()[0]
        self.emitters: list[tuple[str, int]] = []  # (address, topics per log)
        for k in range(5):
            for repeat in (1, 2):
                self.emitters.append((self._deploy(emitter_runtime(k, repeat)), k))

    def _deploy(self, runtime: bytes) -> str:
        tx = self.tester.send_transaction(
            {"from": self.sender, "data": "0x" + initcode(runtime).hex(), "gas": 300_000}
        )
        return str(self.tester.get_transaction_receipt(tx)["contract_address"])

    def emit(self, emitter: int, topics: list[bytes], data: bytes, sender: str | None = None) -> str:
        """One call of an emitter (another `sender` for a second transaction in a block not yet mined)."""
        address, k = self.emitters[emitter]
        assert len(topics) == k
        payload = b"".join(topics) + data
        tx = {"from": sender or self.sender, "to": address, "data": "0x" + payload.hex(), "gas": 200_000}
        return str(self.tester.send_transaction(tx))

    def random_events(self, rng: random.Random, n: int, topic_pool: list[bytes]) -> None:
        """n transactions (one block each), some mined empty blocks between them."""
        for _ in range(n):
            e = rng.randrange(len(self.emitters))
            k = self.emitters[e][1]
            data = rng.randbytes(rng.choice((0, 1, 32, 40)))
            self.emit(e, [rng.choice(topic_pool) for _ in range(k)], data)
            if rng.random() < 0.2:
                self.tester.mine_blocks(1)


def eth_tester_logs(chain: EmbeddedChain, flt: dict[str, Any]) -> list[dict[str, Any]]:
    """The answer eth_getLogs gave before (eth-tester's get_logs, rendered as embedded.py did): the oracle."""
    from teecloud.chain.embedded import _to_rpc

    latest = chain.tester.get_block_by_number("latest")["number"]

    def num(v: Any) -> int:
        if v is None or v in ("latest", "pending", "safe", "finalized"):
            return int(latest)
        if v == "earliest":
            return 0
        return int(min(int(v, 16) if isinstance(v, str) else v, latest))

    if flt.get("blockHash") is not None:
        first = last = int(chain.tester.get_block_by_hash(flt["blockHash"])["number"])
    else:
        first, last = num(flt.get("fromBlock")), num(flt.get("toBlock"))
    out = []
    for entry in chain.tester.get_logs(
        from_block=first, to_block=last, address=flt.get("address"), topics=flt.get("topics")
    ):
        d = dict(entry)
        d.pop("type", None)
        o = _to_rpc(d)
        o["removed"] = False
        out.append(o)
    return out
