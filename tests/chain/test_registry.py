"""NodeRegistry: stake, escrow, signed usage claims, unstake delay, slashing, and no funds locked forever."""

from __future__ import annotations

import pytest

from teecloud.chain import ChainClient, ContractReverted

from .helpers import rand32

ETH = 10**18
PRICE = 36 * 10**14  # wei per CVM-hour = 10**12 wei per second
MIN_STAKE = 10**17  # client default
UNSTAKE_DELAY = 7 * 86400
CLOSE_DELAY = 86400


@pytest.fixture
def market(chain: ChainClient) -> dict[str, ChainClient]:
    op = chain.with_signer(chain.keys[1])  # type: ignore[attr-defined]
    user = chain.with_signer(chain.keys[2])  # type: ignore[attr-defined]
    challenger = chain.with_signer(chain.keys[3])  # type: ignore[attr-defined]
    chain.set_challenger(challenger.address, True)
    return {"owner": chain, "op": op, "user": user, "challenger": challenger}


def _node(op: ChainClient, stake: int = ETH) -> int:
    return op.register_node(
        tee_kind="tdx",
        device_id=rand32(),
        attestation_hash=rand32(),
        capacity=4,
        price_per_hour=PRICE,
        stake=stake,
    )


def test_register_requires_min_stake(market: dict[str, ChainClient]) -> None:
    with pytest.raises(ContractReverted, match="stake below the minimum"):
        _node(market["op"], stake=MIN_STAKE - 1)
    nid = _node(market["op"])
    n = market["op"].node(nid)
    assert n.operator == market["op"].address and n.stake == ETH and n.active


def test_claim_pays_served_time_once(market: dict[str, ChainClient]) -> None:
    op, user = market["op"], market["user"]
    nid = _node(op)
    dep = user.open_deployment(nid, ETH // 100)
    sig = user.sign_usage(dep, 3600)
    assert op.claim(dep, 3600, sig) == PRICE
    assert op.withdrawable(op.address) == PRICE
    # replaying the same record (double claim) is refused
    with pytest.raises(ContractReverted, match="usage already claimed"):
        op.claim(dep, 3600, sig)
    # an older record too
    with pytest.raises(ContractReverted, match="usage already claimed"):
        op.claim(dep, 1800, user.sign_usage(dep, 1800))
    # cumulative: a later record pays only the difference
    assert op.claim(dep, 5400, user.sign_usage(dep, 5400)) == PRICE // 2
    esc = op.deployment_escrow(dep)
    assert esc.paid == PRICE * 3 // 2 and esc.balance == ETH // 100 - PRICE * 3 // 2


def test_claim_needs_usage_signer_and_operator(market: dict[str, ChainClient]) -> None:
    op, user, other = market["op"], market["user"], market["challenger"]
    nid = _node(op)
    dep = user.open_deployment(nid, ETH // 100)
    with pytest.raises(ContractReverted, match="not signed by the usage signer"):
        op.claim(dep, 3600, other.sign_usage(dep, 3600))  # signed by someone else
    with pytest.raises(ContractReverted, match="not signed by the usage signer"):
        op.claim(dep, 7200, user.sign_usage(dep, 3600))  # record altered after signing
    with pytest.raises(ContractReverted, match="caller is not the node's operator"):
        other.claim(dep, 3600, user.sign_usage(dep, 3600))
    bad = bytearray(user.sign_usage(dep, 3600))
    bad[64] = 99
    with pytest.raises(ContractReverted):
        op.claim(dep, 3600, bytes(bad))


def test_usage_signer_delegation(market: dict[str, ChainClient]) -> None:
    op, user, plane = market["op"], market["user"], market["owner"]
    nid = _node(op)
    dep = user.open_deployment(nid, ETH // 100, usage_signer=plane.address)
    with pytest.raises(ContractReverted, match="not signed by the usage signer"):
        op.claim(dep, 60, user.sign_usage(dep, 60))
    assert op.claim(dep, 60, plane.sign_usage(dep, 60)) == 60 * PRICE // 3600


def test_escrow_exhaustion(market: dict[str, ChainClient]) -> None:
    op, user = market["op"], market["user"]
    nid = _node(op)
    dep = user.open_deployment(nid, PRICE // 2)  # half an hour of funds
    assert op.claim(dep, 3600, user.sign_usage(dep, 3600)) == PRICE // 2  # paid what is there, no more
    ev = op.events("NodeRegistry", op.node_registry, names=["UsageClaimed"])[-1]["args"]
    assert ev["unpaid"] == PRICE // 2
    with pytest.raises(ContractReverted, match="escrow exhausted"):
        op.claim(dep, 7200, user.sign_usage(dep, 7200))
    user.fund_deployment(dep, PRICE)
    # a top-up pays the debt carried from the last record first
    assert op.claim(dep, 7200, user.sign_usage(dep, 7200)) == PRICE


def test_close_window_then_refund(market: dict[str, ChainClient]) -> None:
    op, user = market["op"], market["user"]
    nid = _node(op)
    dep = user.open_deployment(nid, ETH // 100)
    with pytest.raises(ContractReverted, match="close not requested"):
        user.withdraw_escrow(dep)
    with pytest.raises(ContractReverted, match="caller is not the deployment's user"):
        op.request_close(dep)
    user.request_close(dep)
    with pytest.raises(ContractReverted, match="deployment is closing"):
        user.fund_deployment(dep, 1)
    with pytest.raises(ContractReverted, match="claim window not over"):
        user.withdraw_escrow(dep)
    op.claim(dep, 3600, user.sign_usage(dep, 3600))  # the node can still claim during the window
    user.increase_time(CLOSE_DELAY + 1)
    with pytest.raises(ContractReverted, match="caller is not the deployment's user"):
        op.withdraw_escrow(dep)
    user.withdraw_escrow(dep)
    assert user.withdrawable(user.address) == ETH // 100 - PRICE
    before = user.balance(user.address)
    assert user.withdraw() == ETH // 100 - PRICE
    assert user.balance(user.address) > before  # minus gas
    with pytest.raises(ContractReverted, match="nothing to withdraw"):
        user.withdraw()


def test_unstake_delay(market: dict[str, ChainClient]) -> None:
    op = market["op"]
    nid = _node(op)
    with pytest.raises(ContractReverted, match="caller is not the node's operator"):
        market["user"].request_unstake(nid, ETH)
    with pytest.raises(ContractReverted, match="amount above the stake"):
        op.request_unstake(nid, ETH + 1)
    op.request_unstake(nid, ETH)
    assert not op.node(nid).active  # below the minimum stake: no new deployments
    with pytest.raises(ContractReverted, match="node is not active"):
        market["user"].open_deployment(nid, 1000)
    with pytest.raises(ContractReverted, match="unstake delay not over"):
        op.withdraw_unstaked(nid)
    op.increase_time(UNSTAKE_DELAY - 100)
    with pytest.raises(ContractReverted, match="unstake delay not over"):
        op.withdraw_unstaked(nid)
    op.increase_time(200)
    op.withdraw_unstaked(nid)
    assert op.withdraw() == ETH


def test_governance_cannot_extend_a_running_delay(market: dict[str, ChainClient]) -> None:
    owner, op = market["owner"], market["op"]
    nid = _node(op)
    op.request_unstake(nid, ETH)
    with pytest.raises(ContractReverted, match="unstake delay above maximum"):
        owner.transact(
            "NodeRegistry", owner.node_registry, "set_parameters", MIN_STAKE, 31 * 86400, 0, 0, owner.address
        )
    owner.transact(
        "NodeRegistry",
        owner.node_registry,
        "set_parameters",
        MIN_STAKE,
        30 * 86400,
        CLOSE_DELAY,
        2000,
        owner.address,
    )
    op.increase_time(UNSTAKE_DELAY + 1)
    op.withdraw_unstaked(nid)  # the delay fixed at request time applies


def test_slash(market: dict[str, ChainClient]) -> None:
    op, ch, owner, user = market["op"], market["challenger"], market["owner"], market["user"]
    nid = _node(op)
    with pytest.raises(ContractReverted, match="caller is not a challenger"):
        user.slash(nid, ETH // 2, rand32())
    with pytest.raises(ContractReverted, match="caller is not a challenger"):
        op.slash(nid, ETH // 2, rand32())
    with pytest.raises(ContractReverted, match="amount above the node's stake"):
        ch.slash(nid, ETH + 1, rand32())
    treasury_before = owner.withdrawable(owner.address)
    ch.slash(nid, ETH // 2, rand32())
    n = op.node(nid)
    assert n.stake == ETH // 2 and not n.active and n.slashed_total == ETH // 2
    assert ch.withdrawable(ch.address) == ETH // 2 * 2000 // 10000
    assert owner.withdrawable(owner.address) - treasury_before == ETH // 2 - ETH // 2 * 2000 // 10000
    # stake that is unstaking stays slashable during the delay
    op.request_unstake(nid, ETH // 2)
    ch.slash(nid, ETH // 4, rand32())
    assert op.node(nid).unstaking == ETH // 4
    op.increase_time(UNSTAKE_DELAY + 1)
    op.withdraw_unstaked(nid)
    assert op.withdraw() == ETH // 4
    # challengers are set by the owner only
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        user.set_challenger(user.address, True)
    owner.set_challenger(ch.address, False)
    with pytest.raises(ContractReverted, match="caller is not a challenger"):
        ch.slash(nid, 1, rand32())


def test_node_owner_only_operations(market: dict[str, ChainClient]) -> None:
    op, user = market["op"], market["user"]
    nid = _node(op)
    with pytest.raises(ContractReverted, match="caller is not the node's operator"):
        user.stake(nid, 10)
    with pytest.raises(ContractReverted, match="caller is not the node's operator"):
        user.transact("NodeRegistry", user.node_registry, "update_node", nid, rand32(), 1, 1)
    with pytest.raises(ContractReverted, match="caller is not the node's operator"):
        user.transact("NodeRegistry", user.node_registry, "set_active", nid, False)
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        user.transact("NodeRegistry", user.node_registry, "set_parameters", 0, 0, 0, 0, user.address)
    with pytest.raises(ContractReverted, match="no such node"):
        user.stake(99, 10)


def test_price_locked_at_open(market: dict[str, ChainClient]) -> None:
    op, user = market["op"], market["user"]
    nid = _node(op)
    dep = user.open_deployment(nid, ETH // 100)
    op.transact("NodeRegistry", op.node_registry, "update_node", nid, rand32(), 4, PRICE * 10)
    assert op.claim(dep, 3600, user.sign_usage(dep, 3600)) == PRICE


def test_registry_holds_exactly_what_it_owes(market: dict[str, ChainClient]) -> None:
    """Conservation: contract balance == stakes + unstaking + escrows + withdrawable (nothing stranded)."""
    op, user, ch, owner = market["op"], market["user"], market["challenger"], market["owner"]
    nid = _node(op)
    dep = user.open_deployment(nid, ETH // 10)
    op.claim(dep, 7200, user.sign_usage(dep, 7200))
    ch.slash(nid, ETH // 3, rand32())
    op.request_unstake(nid, ETH // 3)
    reg = owner.node_registry
    n = owner.node(nid)
    owed = n.stake + n.unstaking + owner.deployment_escrow(dep).balance
    owed += sum(owner.withdrawable(a) for a in {op.address, user.address, ch.address, owner.address})
    assert owner.balance(reg) == owed
