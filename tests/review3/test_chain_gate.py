"""Third review, area 2: the chain gate's finality depth and chain-id check (peer._chain.ChainGate,
chain.connection.ChainConnection.checked_head, chain.kmsauth.KmsAuth `at=`). A scripted chain plays the
attacker's timeline: grants and removals at given blocks, a reorg, an endpoint that switches chains. Open
findings are strict xfails (see test_os_images.py)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from eth_abi.abi import encode

from teecloud.chain.api import BlockRef, BootInfo
from teecloud.chain.connection import ChainConnection
from teecloud.chain.kmsauth import KmsAuth
from teecloud.peer import ChainGate, PeerRejected

BOOT = BootInfo(
    b"\1" * 20, b"\2" * 32, b"\3" * 20, b"\4" * 32, b"\5" * 32, b"\6" * 32, b"\7" * 32, "UpToDate"
)


def _hash(label: str, number: int) -> str:
    return "0x" + hashlib.sha256(f"{label}:{number}".encode()).hexdigest()


class ScriptedChain:
    """KmsAuth as the gate sees it: `allowed[block]` is the verdict at that block (the canonical fork).
    Blocks have hashes: `forked[n] = "B"` replaces block n by another block at the same height (a reorg);
    a question at a BlockRef the canonical fork no longer holds is an error, as EIP-1898 answers it."""

    def __init__(self, head: int, allowed: dict[int, bool]) -> None:
        self.head = head
        self.allowed = allowed
        self.forked: dict[int, str] = {}
        self.asked: list[int] = []

    def block(self, number: int) -> BlockRef:
        parent = _hash(self.forked.get(number - 1, "A"), number - 1) if number else "0x" + "00" * 32
        return BlockRef(number, _hash(self.forked.get(number, "A"), number), parent)

    def head_block(self) -> BlockRef:
        return self.block(self.head)

    def block_by_hash(self, block_hash: str) -> BlockRef:
        for number in range(self.head, -1, -1):
            if self.block(number).hash == block_hash:
                return self.block(number)
        raise LookupError(f"unknown block {block_hash}")

    def check_chain_id(self) -> None:
        pass

    def _at(self, at: int | BlockRef | None) -> tuple[bool, str]:
        if isinstance(at, BlockRef):
            if self.block(at.number) != at:
                raise LookupError(f"block {at.hash} is not on the canonical chain")
            at = at.number
        block = self.head if at is None else at
        self.asked.append(block)
        ok = self.allowed.get(block, False)
        return ok, "allowed" if ok else f"not allowed at block {block}"

    def is_app_allowed(self, boot_info: BootInfo, *, at: int | BlockRef | None = None) -> tuple[bool, str]:
        return self._at(at)

    def is_kms_allowed(self, boot_info: BootInfo, *, at: int | BlockRef | None = None) -> tuple[bool, str]:
        return self._at(at)


@pytest.fixture(params=["by number", "by hash"])
def head_reader(request: pytest.FixtureRequest) -> str:
    """The gate's head reader: a bare block number (fakes) or a BlockRef (ChainConnection.checked_head)."""
    return str(request.param)


def _gate(chain: ScriptedChain, depth: int, head_reader: str = "by hash") -> ChainGate:
    if head_reader == "by number":
        return ChainGate(chain, block_number=lambda: chain.head, finality_depth=depth)
    return ChainGate(chain, block_number=chain.head_block, finality_depth=depth)


def test_a_permission_counts_only_once_it_is_final(head_reader: str) -> None:
    """The owner's (or a hijacked owner key's) grant mined at block 100; depth 6: refused at heads
    100..105, allowed from 106 (the block 6 below the head holds the grant)."""
    chain = ScriptedChain(100, {b: b >= 100 for b in range(0, 200)})
    gate = _gate(chain, 6, head_reader)
    for head in range(100, 106):
        chain.head = head
        with pytest.raises(PeerRejected, match="counts once it is 6 blocks deep") as err:
            gate.app_allowed(BOOT)
        assert err.value.step == "chain"
    chain.head = 106
    assert gate.app_allowed(BOOT) == "allowed"


def test_a_removal_counts_at_once_even_with_a_cached_yes(head_reader: str) -> None:
    """Allowed and cached at block 120; the removal is mined in block 121: the next request is refused."""
    chain = ScriptedChain(120, {b: b <= 120 for b in range(0, 200)})
    gate = _gate(chain, 6, head_reader)
    assert gate.kms_allowed(BOOT) == "allowed"
    chain.head = 121
    with pytest.raises(PeerRejected, match="not allowed at block 121"):
        gate.kms_allowed(BOOT)


def test_a_regrant_inside_the_finality_window_is_not_final(head_reader: str) -> None:
    """FINDING R3-7 (low). The gate asks at the head and at head - d only. Allowed long ago (final), removed
    at block 155 (the owner revokes a compose hash), granted again at block 160 (the head): at head 160 with
    d = 6 both probes (160, 154) say yes, so the new grant counts at once, though it is 0 blocks deep — a
    reorg that drops block 160 leaves the removal in force, yet keys were released. The docstring's rule
    ("a permission counts once d blocks sit on top of the block that granted it") does not hold. Safe:
    refused until block 166 (every block of the window allows, or the grant's own block is d deep)."""
    chain = ScriptedChain(160, {b: not 155 <= b < 160 for b in range(0, 200)})
    gate = _gate(chain, 6, head_reader)
    with pytest.raises(PeerRejected):
        gate.app_allowed(BOOT)


def test_a_short_chain_and_a_zero_depth_head_are_not_confused() -> None:
    chain = ScriptedChain(3, {0: True, 1: True, 2: True, 3: True})
    for reader in ("by number", "by hash"):
        with pytest.raises(PeerRejected, match="fewer than the finality depth"):
            _gate(chain, 6, reader).app_allowed(BOOT)
    with pytest.raises(ValueError):
        ChainGate(chain, finality_depth=2)  # a depth needs the block number
    with pytest.raises(ValueError):
        ChainGate(chain, block_number=lambda: 1, finality_depth=True)  # type: ignore[arg-type]


def test_a_chain_that_fails_mid_question_is_a_refusal() -> None:
    chain = ScriptedChain(100, {94: True, 100: True})

    def head() -> int:
        raise ConnectionError("rpc down")

    with pytest.raises(PeerRejected, match="failing closed"):
        ChainGate(chain, block_number=head, finality_depth=6).app_allowed(BOOT)


@pytest.mark.parametrize("depth", [0, 6])
def test_a_reorg_at_the_same_height_is_not_served_from_the_cache(depth: int) -> None:
    """FINDING R3-3 (fixed). The gate (and KmsAuth's VerdictCache) keyed a cached verdict by block *number*.
    Fork A's block 200 allows the instance and the KMS caches that; a one-block reorg replaces it with fork
    B's block 200, which carries the owner's removal (e.g. `teecloud rm` retiring the instance). The head
    number has not changed, so the gate kept answering fork A's yes until block 201. Now the verdict is
    keyed by the head's hash and asked at that hash."""
    chain = ScriptedChain(200, {b: True for b in range(0, 201)})
    gate = _gate(chain, depth)
    assert gate.app_allowed(BOOT) == "allowed"
    asked = len(chain.asked)
    assert gate.app_allowed(BOOT) == "allowed" and len(chain.asked) == asked  # same block: cached
    chain.forked[200] = "B"  # fork B's block 200: the removal
    chain.allowed[200] = False
    with pytest.raises(PeerRejected, match="not allowed at block 200"):
        gate.app_allowed(BOOT)


def test_a_reorg_below_the_head_is_seen_in_the_finality_window() -> None:
    """Fork B replaces blocks 197..200 and its block 196 carries a removal that a re-grant at 197 undoes:
    the window is walked by parent hashes from B's head, so B's block 196 (not A's) is asked."""
    chain = ScriptedChain(200, {b: True for b in range(0, 201)})
    gate = _gate(chain, 6)
    assert gate.app_allowed(BOOT) == "allowed"
    for n in range(196, 201):
        chain.forked[n] = "B"
    chain.allowed[196] = False
    with pytest.raises(PeerRejected, match="not at block 196"):
        gate.app_allowed(BOOT)


def test_a_window_block_that_does_not_chain_to_the_head_is_a_refusal() -> None:
    """An endpoint answering the parent-hash walk with a block of another height (or hash) authorizes
    nothing: the window must be the head's own ancestors."""
    chain = ScriptedChain(200, {b: True for b in range(0, 201)})
    wrong = chain.block(150)
    chain.block_by_hash = lambda block_hash: wrong  # type: ignore[method-assign]
    with pytest.raises(PeerRejected, match="failing closed") as err:
        _gate(chain, 6).app_allowed(BOOT)
    assert "parent" in err.value.reason


class SwitchingEndpoint:
    """A JSON-RPC endpoint (an RPC load balancer, a misconfigured proxy) that serves chain 1 and then,
    from a given call on, another chain whose KmsAuth at the same address allows everything. Its eth_call
    ignores the block parameter (the worst case: an honest node of the other chain would not know chain 1's
    block hashes)."""

    def _block(self, number: int) -> dict[str, Any]:
        return {
            "number": hex(number),
            "hash": _hash(str(self.chain_id), number),
            "parentHash": _hash(str(self.chain_id), number - 1),
            "timestamp": "0x1",
        }

    def __init__(self, switch_after: str | None = None) -> None:
        self.chain_id = 1
        self.calls: list[str] = []
        self.switch_after = switch_after
        self.switch_at_call: int | None = None  # switch after this many calls (counted from 1)
        self.refuse_at: int | None = None  # chain 1 refuses at this block only (default: everywhere)

    def request(self, method: str, params: list[Any]) -> Any:
        self.calls.append(method)
        try:
            if method == "eth_chainId":
                return hex(self.chain_id)
            if method == "eth_getBlockByNumber":
                return self._block(0 if params[0] == "0x0" else 500)
            if method == "eth_getBlockByHash":
                return next((self._block(n) for n in range(501) if self._block(n)["hash"] == params[0]), None)
            if method == "eth_blockNumber":
                return hex(500)
            if method == "eth_call":
                allowed = self.chain_id != 1  # the real chain refuses, the other one allows
                if self.chain_id == 1 and self.refuse_at is not None:
                    by_hash = {self._block(n)["hash"]: n for n in range(501)}
                    allowed = by_hash[params[1]["blockHash"]] != self.refuse_at
                return "0x" + encode(["bool", "string"], [allowed, "other chain" if allowed else "no"]).hex()
            raise AssertionError(method)
        finally:
            if method == self.switch_after or len(self.calls) == self.switch_at_call:
                self.chain_id = 666

    def close(self) -> None:
        pass


def _kms_gate(endpoint: SwitchingEndpoint, depth: int) -> ChainGate:
    conn = ChainConnection(endpoint, chain_id=1)
    auth = KmsAuth(conn, "0x" + "22" * 20)
    return ChainGate(auth, block_number=conn.checked_head, finality_depth=depth)


@pytest.mark.parametrize("depth", [0, 6])
def test_an_endpoint_switched_to_another_chain_answers_nothing(depth: int) -> None:
    endpoint = SwitchingEndpoint()
    gate = _kms_gate(endpoint, depth)
    with pytest.raises(PeerRejected, match="refuses"):
        gate.app_allowed(BOOT)  # the real chain says no
    endpoint.chain_id = 666
    with pytest.raises(PeerRejected, match=r"WrongChainId|chain id"):
        gate.app_allowed(BOOT)


@pytest.mark.parametrize("depth", [0, 6])
@pytest.mark.parametrize("switch_after", ["eth_chainId", "eth_getBlockByNumber", "eth_call"])
def test_an_endpoint_that_switches_right_after_the_chain_id_check_answers_nothing(
    depth: int, switch_after: str
) -> None:
    """FINDING R3-4 (low, fixed). checked_head asks eth_chainId, then the head and the eth_calls follow as
    separate requests: an endpoint that switched chains between them (after the id check) had its other
    chain's answer believed. Now the calls are bound to the head's hash (EIP-1898) and the chain id is
    checked again after the answers were read; a switch anywhere in the exchange answers nothing."""
    endpoint = SwitchingEndpoint()
    gate = _kms_gate(endpoint, depth)
    endpoint.switch_after = switch_after
    with pytest.raises(PeerRejected, match=r"wrong chain id|refuses|does not know block") as err:
        gate.app_allowed(BOOT)
    assert "other chain" not in err.value.reason
    endpoint.switch_after = None
    with pytest.raises(PeerRejected, match="wrong chain id"):
        gate.app_allowed(BOOT)  # nothing of the other chain was cached: still refused


@pytest.mark.parametrize("depth", [0, 6])
def test_a_switch_after_any_call_of_the_exchange_answers_nothing(depth: int) -> None:
    """Generated: the endpoint switches to the allowing chain after call k, for every k of one request's
    exchange (chain id, head, eth_calls, window walk, chain id again)."""
    refuse_at = 499 if depth else None  # with a window: chain 1 refuses only at its newest block
    probe = SwitchingEndpoint()
    probe.refuse_at = refuse_at
    gate = _kms_gate(probe, depth)
    before = len(probe.calls)
    with pytest.raises(PeerRejected, match="refuses"):
        gate.app_allowed(BOOT)
    exchange = len(probe.calls) - before
    assert exchange == 4 + depth * 2  # chain id, head, eth_call at the head, (walk, eth_call) * d, chain id
    for k in range(exchange + 1):
        endpoint = SwitchingEndpoint()
        endpoint.refuse_at = refuse_at
        gate = _kms_gate(endpoint, depth)
        endpoint.switch_at_call = len(endpoint.calls) + k
        with pytest.raises(PeerRejected) as err:
            gate.app_allowed(BOOT)
        assert "other chain" not in err.value.reason, k
