"""The chain gate at a finality depth: a permission counts only once it is `depth` blocks deep, a removal
at once; an endpoint that switches to another chain id authorizes nothing (both real EVMs)."""

from __future__ import annotations

from typing import Any

import pytest

from teecloud.chain import ChainClient
from teecloud.peer import ChainGate, PeerRejected

from .helpers import OS_IMAGE, boot_info, rand32

DEPTH = 3


def _mine(chain: ChainClient, n: int) -> None:
    for _ in range(n):
        chain.rpc_call("evm_mine")


def test_new_permission_counts_only_once_final_and_removal_at_once(chain: ChainClient) -> None:
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.register_app(None, h)
    gate = ChainGate(chain, block_number=chain.checked_head, finality_depth=DEPTH)
    _mine(chain, DEPTH)
    assert gate.app_allowed(boot_info(app_id, h)) == ""  # registered DEPTH blocks ago: final

    new = rand32()
    chain.add_compose_hash(app_id, new)  # e.g. an upgrade that a reorg could still undo
    with pytest.raises(PeerRejected) as exc:
        gate.app_allowed(boot_info(app_id, new))
    assert exc.value.step == "chain" and "counts once it is 3 blocks deep" in exc.value.reason
    _mine(chain, DEPTH - 1)  # one block short: the add needs DEPTH blocks on top of its own
    with pytest.raises(PeerRejected, match="counts once it is 3 blocks deep"):
        gate.app_allowed(boot_info(app_id, new))
    _mine(chain, 1)
    assert gate.app_allowed(boot_info(app_id, new)) == ""

    chain.remove_compose_hash(app_id, new)  # a removal needs no depth: the head already says no
    with pytest.raises(PeerRejected, match="compose hash not allowed"):
        gate.app_allowed(boot_info(app_id, new))


def test_without_depth_the_head_decides(chain: ChainClient) -> None:
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.register_app(None, h)
    assert ChainGate(chain, block_number=chain.checked_head).app_allowed(boot_info(app_id, h)) == ""


def test_a_chain_shorter_than_the_depth_allows_nothing(embedded_chain: ChainClient) -> None:
    # a fresh chain (the session's anvil may already be longer than the depth, after other tests)
    chain = embedded_chain
    assert chain.head().number < 256
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.register_app(None, h)
    gate = ChainGate(chain, block_number=chain.checked_head, finality_depth=256)
    with pytest.raises(PeerRejected, match="fewer than the finality depth"):
        gate.app_allowed(boot_info(app_id, h))


def test_an_endpoint_switched_to_another_chain_authorizes_nothing(
    chain: ChainClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.register_app(None, h)
    gate = ChainGate(chain, block_number=chain.checked_head)
    assert gate.app_allowed(boot_info(app_id, h)) == ""
    real = chain.transport.request

    def other_chain(method: str, params: list[Any]) -> Any:
        return hex(chain.chain_id + 1) if method == "eth_chainId" else real(method, params)

    monkeypatch.setattr(chain.transport, "request", other_chain)
    if hasattr(chain.transport, "request_batch"):  # HTTP: the head read's batch sees the switch too
        monkeypatch.setattr(
            chain.transport, "request_batch", lambda calls: [other_chain(m, p) for m, p in calls]
        )
    with pytest.raises(PeerRejected) as exc:
        gate.app_allowed(boot_info(app_id, h))
    assert exc.value.step == "chain" and "wrong chain id" in exc.value.reason


@pytest.mark.parametrize("depth", [-1, 257, 1.5, True])
def test_bad_depths_are_refused(depth: object) -> None:
    with pytest.raises(ValueError, match="finality depth"):
        ChainGate(object(), block_number=lambda: 1, finality_depth=depth)  # type: ignore[arg-type]


def test_a_depth_needs_the_block_number() -> None:
    with pytest.raises(ValueError, match="needs the chain's block number"):
        ChainGate(object(), finality_depth=2)  # type: ignore[arg-type]
