"""Third review, area 2: the chain gate's finality depth and chain-id check (peer._chain.ChainGate,
chain.connection.ChainConnection.checked_head, chain.kmsauth.KmsAuth `at=`). A scripted chain plays the
attacker's timeline: grants and removals at given blocks, a reorg, an endpoint that switches chains. Open
findings are strict xfails (see test_os_images.py)."""

from __future__ import annotations

from typing import Any

import pytest
from eth_abi.abi import encode

from teecloud.chain.api import BootInfo
from teecloud.chain.connection import ChainConnection
from teecloud.chain.kmsauth import KmsAuth
from teecloud.peer import ChainGate, PeerRejected

BOOT = BootInfo(
    b"\1" * 20, b"\2" * 32, b"\3" * 20, b"\4" * 32, b"\5" * 32, b"\6" * 32, b"\7" * 32, "UpToDate"
)


class ScriptedChain:
    """KmsAuth as the gate sees it: `allowed[block]` is the verdict at that block (the canonical fork)."""

    def __init__(self, head: int, allowed: dict[int, bool]) -> None:
        self.head = head
        self.allowed = allowed
        self.asked: list[int] = []

    def _at(self, at: int | None) -> tuple[bool, str]:
        block = self.head if at is None else at
        self.asked.append(block)
        ok = self.allowed.get(block, False)
        return ok, "allowed" if ok else f"not allowed at block {block}"

    def is_app_allowed(self, boot_info: BootInfo, *, at: int | None = None) -> tuple[bool, str]:
        return self._at(at)

    def is_kms_allowed(self, boot_info: BootInfo, *, at: int | None = None) -> tuple[bool, str]:
        return self._at(at)


def _gate(chain: ScriptedChain, depth: int) -> ChainGate:
    return ChainGate(chain, block_number=lambda: chain.head, finality_depth=depth)


def test_a_permission_counts_only_once_it_is_final() -> None:
    """The owner's (or a hijacked owner key's) grant mined at block 100; depth 6: refused at heads
    100..105, allowed from 106 (the block 6 below the head holds the grant)."""
    chain = ScriptedChain(100, {b: b >= 100 for b in range(0, 200)})
    gate = _gate(chain, 6)
    for head in range(100, 106):
        chain.head = head
        with pytest.raises(PeerRejected, match="counts once it is 6 blocks deep") as err:
            gate.app_allowed(BOOT)
        assert err.value.step == "chain"
    chain.head = 106
    assert gate.app_allowed(BOOT) == "allowed"


def test_a_removal_counts_at_once_even_with_a_cached_yes() -> None:
    """Allowed and cached at block 120; the removal is mined in block 121: the next request is refused."""
    chain = ScriptedChain(120, {b: b <= 120 for b in range(0, 200)})
    gate = _gate(chain, 6)
    assert gate.kms_allowed(BOOT) == "allowed"
    chain.head = 121
    with pytest.raises(PeerRejected, match="not allowed at block 121"):
        gate.kms_allowed(BOOT)


def test_a_regrant_inside_the_finality_window_is_not_final() -> None:
    """FINDING R3-7 (low). The gate asks at the head and at head - d only. Allowed long ago (final), removed
    at block 155 (the owner revokes a compose hash), granted again at block 160 (the head): at head 160 with
    d = 6 both probes (160, 154) say yes, so the new grant counts at once, though it is 0 blocks deep — a
    reorg that drops block 160 leaves the removal in force, yet keys were released. The docstring's rule
    ("a permission counts once d blocks sit on top of the block that granted it") does not hold. Safe:
    refused until block 166 (every block of the window allows, or the grant's own block is d deep)."""
    chain = ScriptedChain(160, {b: not 155 <= b < 160 for b in range(0, 200)})
    gate = _gate(chain, 6)
    with pytest.raises(PeerRejected):
        gate.app_allowed(BOOT)


def test_a_short_chain_and_a_zero_depth_head_are_not_confused() -> None:
    chain = ScriptedChain(3, {0: True, 1: True, 2: True, 3: True})
    with pytest.raises(PeerRejected, match="fewer than the finality depth"):
        _gate(chain, 6).app_allowed(BOOT)
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


@pytest.mark.xfail(strict=True, reason="FINDING R3-3 open (docs/threat-model.md, third review)")
@pytest.mark.parametrize("depth", [0, 6])
def test_a_reorg_at_the_same_height_is_not_served_from_the_cache(depth: int) -> None:
    """FINDING R3-3. The gate (and KmsAuth's VerdictCache) key a cached verdict by block *number*. Fork A's
    block 200 allows the instance and the KMS caches that; a one-block reorg replaces it with fork B's
    block 200, which carries the owner's removal (e.g. `teecloud rm` retiring the instance). The head
    number has not changed, so the gate keeps answering fork A's yes until block 201: the removal is
    delayed though the chain the endpoint now serves refuses. Safe: the verdict is keyed by block hash."""
    chain = ScriptedChain(200, {b: True for b in range(0, 201)})
    gate = _gate(chain, depth)
    assert gate.app_allowed(BOOT) == "allowed"
    chain.allowed[200] = False  # fork B's block 200: the removal
    with pytest.raises(PeerRejected):
        gate.app_allowed(BOOT)


class SwitchingEndpoint:
    """A JSON-RPC endpoint (an RPC load balancer, a misconfigured proxy) that serves chain 1 and then,
    from a given call on, another chain whose KmsAuth at the same address allows everything."""

    def __init__(self, switch_after: str | None = None) -> None:
        self.chain_id = 1
        self.calls: list[str] = []
        self.switch_after = switch_after

    def request(self, method: str, params: list[Any]) -> Any:
        self.calls.append(method)
        try:
            if method == "eth_chainId":
                return hex(self.chain_id)
            if method == "eth_getBlockByNumber":
                return {"hash": "0x" + "11" * 32, "timestamp": "0x1"}
            if method == "eth_blockNumber":
                return hex(500)
            if method == "eth_call":
                allowed = self.chain_id != 1  # the real chain refuses, the other one allows
                return "0x" + encode(["bool", "string"], [allowed, "other chain" if allowed else "no"]).hex()
            raise AssertionError(method)
        finally:
            if method == self.switch_after:
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


@pytest.mark.xfail(strict=True, reason="FINDING R3-4 open (docs/threat-model.md, third review)")
@pytest.mark.parametrize("depth", [0, 6])
def test_an_endpoint_that_switches_right_after_the_chain_id_check_answers_nothing(depth: int) -> None:
    """FINDING R3-4 (low). checked_head asks eth_chainId, then eth_blockNumber and the eth_calls follow as
    separate requests: an endpoint that switches chains between them (after the id check) has its
    other chain's answer believed. Safe: the chain id is checked again after the answers were read (or
    the calls are bound to a block hash of the checked chain, EIP-1898)."""
    endpoint = SwitchingEndpoint()
    gate = _kms_gate(endpoint, depth)
    endpoint.switch_after = "eth_chainId"
    with pytest.raises(PeerRejected):
        gate.app_allowed(BOOT)
