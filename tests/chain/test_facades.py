"""The per-contract facades over one connection: typed results, the same answers as the flat ChainClient
methods, signers kept apart, and a CLI that goes through them instead of raw ABI names."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from teecloud.chain import (
    ChainClient,
    ContractReverted,
    DeploymentEscrow,
    GovernanceAction,
    KmsInfo,
    MultisigProposal,
    NodeInfo,
    TimelockCall,
)

from .helpers import OS_IMAGE, boot_info, rand32

ETH = 10**18


def test_node_and_escrow_are_typed(chain: ChainClient) -> None:
    op, user = (chain.with_signer(k) for k in chain.keys[1:3])  # type: ignore[attr-defined]
    nid = op.registry.register_node(
        tee_kind="tdx",
        device_id=rand32(),
        attestation_hash=rand32(),
        capacity=2,
        price_per_hour=3600,
        stake=ETH,
    )
    n = chain.registry.node(nid)
    assert isinstance(n, NodeInfo) and n == chain.node(nid) == chain.registry.require_node(nid)
    assert (n.node_id, n.operator, n.tee_kind, n.capacity, n.stake, n.active) == (
        nid,
        op.address,
        "tdx",
        2,
        ETH,
        True,
    )
    assert isinstance(n.device_id, bytes) and len(n.device_id) == 32
    with pytest.raises(ValueError, match=r"no such node: 99 \(this registry has \d+\)"):
        chain.registry.require_node(99)
    dep = user.escrow.open(nid, 10_000)
    d = chain.escrow.deployment(dep)
    assert isinstance(d, DeploymentEscrow) and d == chain.deployment_escrow(dep)
    assert (d.user, d.usage_signer, d.node_id, d.balance, d.price_per_hour) == (
        user.address,
        user.address,
        nid,
        10_000,
        3600,
    )
    assert d.state(chain.timestamp()) == "open"
    assert [x.deployment_id for x in chain.escrow.deployments(party=user.address)] == [dep]
    assert chain.escrow.deployments(party=op.address) == []
    assert op.registry.claim(dep, 10, user.escrow.sign_usage(dep, 10)) == 10
    user.escrow.request_close(dep)
    closing = chain.escrow.deployment(dep)
    assert closing.close_ready_at > 0 and closing.state(chain.timestamp()).startswith("closing (in ")
    challenger = chain.with_signer(chain.keys[3])  # type: ignore[attr-defined]
    chain.registry.set_challenger(challenger.address)
    s = challenger.registry.slash(nid, ETH // 10, b"\x0e" * 32)
    assert (s.node_id, s.challenger, s.amount, s.reward) == (nid, challenger.address, ETH // 10, ETH // 50)
    assert s.evidence_hash == b"\x0e" * 32


def test_governance_is_typed(chain: ChainClient) -> None:
    a, b = (chain.with_signer(k) for k in chain.keys[:2])  # type: ignore[attr-defined]
    chain.kms.add_os_image(OS_IMAGE)
    h, new = rand32(), rand32()
    direct = chain.app(chain.kms.register_app(chain.address or "", h))
    done = direct.propose_add_compose_hash(new)
    assert (
        isinstance(done, GovernanceAction) and done.applied and done.tx and done.governance == chain.address
    )
    assert direct.is_compose_hash_allowed(new)

    ms = chain.multisig(chain.deploy_multisig([a.address, b.address], 2))
    app = a.app(chain.kms.register_app(ms.address, h))
    action = app.propose_add_compose_hash(new)
    assert (action.kind, action.governance, action.applied) == ("multisig", ms.address, False)
    p = ms.proposal(int(action.ident))  # type: ignore[arg-type]
    assert isinstance(p, MultisigProposal)
    assert (p.proposer, p.target, p.approvals, p.threshold, p.executed) == (
        a.address,
        app.address,
        1,
        2,
        False,
    )
    assert chain.multisig_proposal(ms.address, p.proposal_id)["approvals"] == 1  # the flat dict shape
    b.multisig(ms.address).approve(p.proposal_id)
    a.multisig(ms.address).execute(p.proposal_id)
    assert ms.proposal(p.proposal_id).executed and app.is_compose_hash_allowed(new)

    tl = chain.timelock(chain.deploy_timelock(chain.address or "", 3600))
    tl_app = chain.app(chain.kms.register_app(tl.address, h))
    queued = tl_app.propose_add_compose_hash(new)
    assert queued.kind == "timelock" and queued.eta is not None
    call = tl.queued(str(queued.ident))
    assert isinstance(call, TimelockCall) and call.eta == queued.eta == call.pending_eta and not call.done
    assert isinstance(tl_app.governance_of(str(queued.ident)), type(tl))
    with pytest.raises(ContractReverted, match="too early"):
        tl.execute(call.call_id)
    tl.cancel(call.call_id)
    assert tl.queued(call.call_id).pending_eta == 0


def test_kms_facade(chain: ChainClient) -> None:
    chain.kms.set_info(b"\x02" * 33, b"\x30" * 40, b"\x09" * 32)
    info = chain.kms.info()
    assert isinstance(info, KmsInfo) and info.k256_pubkey == b"\x02" * 33 and info.quote_hash == b"\x09" * 32
    assert chain.kms_info()["ca_pubkey"] == b"\x30" * 40  # the flat dict shape
    chain.kms.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.kms.register_app(chain.address or "", h)
    assert chain.kms.is_registered(app_id) and chain.app(app_id).state().registered
    assert (
        chain.kms.is_app_allowed(boot_info(app_id, h))
        == chain.is_app_allowed(boot_info(app_id, h))
        == (True, "")
    )


def test_with_signer_keeps_signers_apart(chain: ChainClient) -> None:
    h = rand32()
    app_id = chain.kms.register_app(chain.address or "", h)
    stranger = chain.with_signer(chain.keys[5])  # type: ignore[attr-defined]
    assert stranger.app(app_id).conn is stranger and stranger.kms.conn is stranger
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        stranger.app(app_id).add_compose_hash(rand32())
    assert chain.address != stranger.address and chain.app(app_id).owner() == chain.address


CLI_CHAIN_MODULES = ("chain_cmd.py", "app_cmd.py", "node_cmd.py", "escrow_cmd.py", "_chain_common.py")


def test_cli_speaks_no_raw_abi() -> None:
    """The CLI's chain groups go through the facades: no contract names, function names or events."""
    raw = re.compile(
        r"""\.(call|transact|event_of|events)\(|["'](KmsAuth|AppAuth|Multisig|Timelock|NodeRegistry)["']"""
    )
    for name in CLI_CHAIN_MODULES:
        text = (resources.files("teecloud.cli") / name).read_text()
        hits = [line.strip() for line in text.splitlines() if raw.search(line)]
        assert not hits, f"{name}: {hits}"
