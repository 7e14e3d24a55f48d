"""Multisig (M-of-N) and Timelock governance owning an AppAuth."""

from __future__ import annotations

import pytest

from teecloud.chain import ChainClient, ContractReverted
from teecloud.chain.client import abi_of

from .helpers import OS_IMAGE, boot_info, rand32


def _signers(chain: ChainClient, n: int) -> list[ChainClient]:
    return [chain.with_signer(k) for k in chain.keys[:n]]  # type: ignore[attr-defined]


@pytest.fixture
def ms_app(chain: ChainClient) -> tuple[str, str, bytes, list[ChainClient]]:
    """An app owned by a 2-of-3 multisig of keys 0..2."""
    s = _signers(chain, 3)
    ms = chain.deploy_multisig([c.address for c in s], 2)
    h = rand32()
    chain.add_os_image(OS_IMAGE)
    app_id = chain.register_app(ms, h)
    return app_id, ms, h, s


def test_multisig_upgrade_needs_threshold(
    chain: ChainClient, ms_app: tuple[str, str, bytes, list[ChainClient]]
) -> None:
    app_id, ms, _, (a, b, _c) = ms_app
    new = rand32()
    res = a.propose_app_change(app_id, "add_compose_hash", new)
    assert res["kind"] == "multisig"
    pid = res["id"]
    with pytest.raises(ContractReverted, match="not enough approvals"):
        a.multisig_execute(ms, pid)
    assert not chain.is_app_allowed(boot_info(app_id, new))[0]
    b.multisig_approve(ms, pid)
    a.multisig_execute(ms, pid)
    assert chain.is_app_allowed(boot_info(app_id, new))[0]
    with pytest.raises(ContractReverted, match="proposal already executed"):
        b.multisig_execute(ms, pid)


def test_multisig_owner_cannot_bypass(
    chain: ChainClient, ms_app: tuple[str, str, bytes, list[ChainClient]]
) -> None:
    app_id, _, _, (a, _b, _c) = ms_app
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        a.add_compose_hash(app_id, rand32())


def test_multisig_replayed_approval(
    chain: ChainClient, ms_app: tuple[str, str, bytes, list[ChainClient]]
) -> None:
    app_id, ms, _, (a, b, _c) = ms_app
    pid = a.propose_app_change(app_id, "add_compose_hash", rand32())["id"]
    with pytest.raises(ContractReverted, match="already approved"):
        a.multisig_approve(ms, pid)  # the proposer's approval is already counted
    b.multisig_approve(ms, pid)
    with pytest.raises(ContractReverted, match="already approved"):
        b.multisig_approve(ms, pid)
    assert chain.call("Multisig", ms, "approval_count", pid) == 2


def test_multisig_non_owner(chain: ChainClient, ms_app: tuple[str, str, bytes, list[ChainClient]]) -> None:
    app_id, ms, _, (a, b, _c) = ms_app
    stranger = chain.with_signer(chain.keys[7])  # type: ignore[attr-defined]
    data = abi_of("AppAuth").encode_call("add_compose_hash", rand32())
    with pytest.raises(ContractReverted, match="caller is not an owner"):
        stranger.multisig_propose(ms, app_id, data)
    pid = a.multisig_propose(ms, app_id, data)
    with pytest.raises(ContractReverted, match="caller is not an owner"):
        stranger.multisig_approve(ms, pid)
    with pytest.raises(ContractReverted, match="caller is not an owner"):
        stranger.transact("Multisig", ms, "execute", pid, app_id, 0, data)
    with pytest.raises(ContractReverted, match="caller is not an owner"):
        stranger.transact("Multisig", ms, "cancel", pid)
    with pytest.raises(ContractReverted, match="caller is not the proposer"):
        b.transact("Multisig", ms, "cancel", pid)


def test_multisig_execute_must_match_proposal(ms_app: tuple[str, str, bytes, list[ChainClient]]) -> None:
    app_id, ms, _, (a, b, _c) = ms_app
    data = abi_of("AppAuth").encode_call("add_compose_hash", rand32())
    pid = a.multisig_propose(ms, app_id, data)
    b.multisig_approve(ms, pid)
    other = abi_of("AppAuth").encode_call("disable_upgrades")
    with pytest.raises(ContractReverted, match="call does not match the proposal"):
        a.transact("Multisig", ms, "execute", pid, app_id, 0, other)


def test_multisig_revoke_and_cancel(
    chain: ChainClient, ms_app: tuple[str, str, bytes, list[ChainClient]]
) -> None:
    app_id, ms, _, (a, b, _c) = ms_app
    pid = a.propose_app_change(app_id, "add_compose_hash", rand32())["id"]
    b.multisig_approve(ms, pid)
    b.transact("Multisig", ms, "revoke", pid)
    with pytest.raises(ContractReverted, match="not enough approvals"):
        a.multisig_execute(ms, pid)
    a.transact("Multisig", ms, "cancel", pid)
    with pytest.raises(ContractReverted, match="proposal cancelled"):
        b.multisig_approve(ms, pid)
    with pytest.raises(ContractReverted, match="no such proposal"):
        b.multisig_approve(ms, pid + 10)


def test_multisig_owner_set_changes_only_by_itself(
    chain: ChainClient, ms_app: tuple[str, str, bytes, list[ChainClient]]
) -> None:
    app_id, ms, _, (a, b, c) = ms_app
    d = chain.with_signer(chain.keys[3])  # type: ignore[attr-defined]
    with pytest.raises(ContractReverted, match="only the multisig itself"):
        a.transact("Multisig", ms, "add_owner", d.address)
    with pytest.raises(ContractReverted, match="only the multisig itself"):
        a.transact("Multisig", ms, "change_threshold", 1)
    # remove c through a proposal: c's pending approval stops counting
    pid_upgrade = c.propose_app_change(app_id, "add_compose_hash", rand32())["id"]
    ms_abi = abi_of("Multisig")
    pid = a.multisig_propose(ms, ms, ms_abi.encode_call("remove_owner", c.address))
    b.multisig_approve(ms, pid)
    a.multisig_execute(ms, pid)
    assert chain.call("Multisig", ms, "get_owners") == [a.address, b.address]
    assert chain.call("Multisig", ms, "approval_count", pid_upgrade) == 0
    with pytest.raises(ContractReverted, match="caller is not an owner"):
        c.multisig_approve(ms, pid_upgrade)
    with pytest.raises(ContractReverted, match="caller is not an owner"):
        c.transact("Multisig", ms, "cancel", pid_upgrade)  # its own proposal, but no longer an owner
    # re-adding c does not bring back the approval it gave in its earlier term
    pid = a.multisig_propose(ms, ms, ms_abi.encode_call("add_owner", c.address))
    b.multisig_approve(ms, pid)
    a.multisig_execute(ms, pid)
    assert chain.call("Multisig", ms, "approval_count", pid_upgrade) == 0
    c.multisig_approve(ms, pid_upgrade)  # a fresh approval in the new term counts
    assert chain.call("Multisig", ms, "approval_count", pid_upgrade) == 1
    pid = a.multisig_propose(ms, ms, ms_abi.encode_call("remove_owner", c.address))
    b.multisig_approve(ms, pid)
    a.multisig_execute(ms, pid)
    # cannot go below the threshold
    pid = a.multisig_propose(ms, ms, ms_abi.encode_call("remove_owner", b.address))
    b.multisig_approve(ms, pid)
    with pytest.raises(ContractReverted, match="would leave fewer owners than the threshold"):
        a.multisig_execute(ms, pid)


def test_multisig_constructor_rules(chain: ChainClient) -> None:
    a, b = _signers(chain, 2)
    with pytest.raises(ContractReverted, match="threshold out of range"):
        chain.deploy_multisig([a.address, b.address], 3)
    with pytest.raises(ContractReverted, match="threshold out of range"):
        chain.deploy_multisig([a.address, b.address], 0)
    with pytest.raises(ContractReverted, match="duplicate owner"):
        chain.deploy_multisig([a.address, a.address], 1)


@pytest.fixture
def tl_app(chain: ChainClient) -> tuple[str, str, bytes]:
    """An app owned by a timelock (1 hour) whose admin is keys[0]."""
    tl = chain.deploy_timelock(chain.address, 3600)
    h = rand32()
    chain.add_os_image(OS_IMAGE)
    return chain.register_app(tl, h), tl, h


def test_timelock_hash_valid_only_after_delay(chain: ChainClient, tl_app: tuple[str, str, bytes]) -> None:
    app_id, tl, _ = tl_app
    new = rand32()
    res = chain.propose_app_change(app_id, "add_compose_hash", new)
    assert res["kind"] == "timelock"
    # announced: the queued call is visible, with its eta, before it takes effect
    state = chain.app_state(app_id)
    assert len(state.pending) == 1 and state.pending[0].function == "add_compose_hash"
    assert state.pending[0].args == (new,)
    assert state.pending[0].eta >= chain.timestamp() + 3600 - 5  # type: ignore[operator]
    with pytest.raises(ContractReverted, match="timelock: too early"):
        chain.timelock_execute(tl, res["id"])
    chain.increase_time(1800)
    with pytest.raises(ContractReverted, match="timelock: too early"):
        chain.timelock_execute(tl, res["id"])
    assert not chain.is_app_allowed(boot_info(app_id, new))[0]
    chain.increase_time(1801)
    anyone = chain.with_signer(chain.keys[6])  # type: ignore[attr-defined]
    anyone.timelock_execute(tl, res["id"])  # execution is open once due
    assert chain.is_app_allowed(boot_info(app_id, new))[0]
    assert chain.app_state(app_id).pending == []
    with pytest.raises(ContractReverted, match="call not queued"):
        chain.timelock_execute(tl, res["id"])


def test_timelock_rules(chain: ChainClient, tl_app: tuple[str, str, bytes]) -> None:
    app_id, tl, _ = tl_app
    stranger = chain.with_signer(chain.keys[4])  # type: ignore[attr-defined]
    data = abi_of("AppAuth").encode_call("add_compose_hash", rand32())
    with pytest.raises(ContractReverted, match="caller is not the admin"):
        stranger.timelock_queue(tl, app_id, data)
    with pytest.raises(ContractReverted, match="delay below the minimum"):
        chain.timelock_queue(tl, app_id, data, delay=60)
    cid = chain.timelock_queue(tl, app_id, data)
    with pytest.raises(ContractReverted, match="caller is not the admin"):
        stranger.timelock_cancel(tl, cid)
    chain.timelock_cancel(tl, cid)
    chain.increase_time(7200)
    with pytest.raises(ContractReverted, match="call not queued"):
        chain.timelock_execute(tl, cid)
    with pytest.raises(ContractReverted, match="only the timelock itself"):
        chain.transact("Timelock", tl, "set_min_delay", 0)
    with pytest.raises(ContractReverted, match="only the timelock itself"):
        chain.transact("Timelock", tl, "set_admin", stranger.address)
    with pytest.raises(ContractReverted, match="delay above maximum"):
        chain.deploy_timelock(chain.address, 31 * 86400)


def test_timelock_delay_change_is_itself_delayed(chain: ChainClient, tl_app: tuple[str, str, bytes]) -> None:
    _, tl, _ = tl_app
    cid = chain.timelock_queue(tl, tl, abi_of("Timelock").encode_call("set_min_delay", 0))
    with pytest.raises(ContractReverted, match="timelock: too early"):
        chain.timelock_execute(tl, cid)
    chain.increase_time(3601)
    chain.timelock_execute(tl, cid)
    assert chain.call("Timelock", tl, "min_delay") == 0


def test_multisig_admin_of_timelock(chain: ChainClient) -> None:
    a, b = _signers(chain, 2)
    ms = chain.deploy_multisig([a.address, b.address], 2)
    tl = chain.deploy_timelock(ms, 600)
    h = rand32()
    chain.add_os_image(OS_IMAGE)
    app_id = chain.register_app(tl, h)
    new = rand32()
    res = a.propose_app_change(app_id, "add_compose_hash", new)
    assert res["kind"] == "multisig->timelock"
    b.multisig_approve(ms, res["id"])
    a.multisig_execute(ms, res["id"])  # queues in the timelock
    queued = [p for p in chain.app_state(app_id).pending if p.kind == "timelock"]
    assert len(queued) == 1 and queued[0].args == (new,)
    with pytest.raises(ContractReverted, match="timelock: too early"):
        a.timelock_execute(tl, queued[0].ident)
    chain.increase_time(601)
    a.timelock_execute(tl, queued[0].ident)
    assert chain.is_app_allowed(boot_info(app_id, new))[0]


def test_app_show_history(chain: ChainClient, ms_app: tuple[str, str, bytes, list[ChainClient]]) -> None:
    app_id, ms, h, (a, b, _c) = ms_app
    new = rand32()
    pid = a.propose_app_change(app_id, "add_compose_hash", new)["id"]
    st = chain.app_state(app_id)
    assert st.owner_kind == "multisig" and st.governance["multisig"]["threshold"] == 2
    assert [p.ident for p in st.pending] == [str(pid)] and st.pending[0].approvals == 1
    b.multisig_approve(ms, pid)
    a.multisig_execute(ms, pid)
    st = chain.app_state(app_id)
    assert st.pending == []
    assert set(st.allowed_compose_hashes) == {"0x" + h.hex(), "0x" + new.hex()}
    events = [e["event"] for e in st.history]
    assert "ProposalExecuted" in events and events.count("ComposeHashAdded") == 2
