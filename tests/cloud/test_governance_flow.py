"""cloud.governance on the embedded chain: an upgrade's compose hash is allowed directly, refused with the
owner named, or left pending (approvals, ETA) under a multisig / timelock until it may run; moving an app
under a new owner takes AppAuth's two steps."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from teecloud.chain import DEV_KEYS, ChainClient
from teecloud.cloud.errors import DeployError
from teecloud.cloud.governance import GovernanceSpec, ensure_allowed, pending_changes, transfer_ownership


@pytest.fixture
def chain(teecloud_home: Path) -> Iterator[ChainClient]:
    with ChainClient.embedded(teecloud_home) as c:
        c.deploy()
        yield c


def h() -> bytes:
    return os.urandom(32)


def test_direct_owner_allows_at_once(chain: ChainClient) -> None:
    v1, v2 = h(), h()
    app = chain.register_app(None, v1)
    out = ensure_allowed(chain, app, v2)
    assert out.allowed and chain.is_compose_hash_allowed(app, v2)
    assert out.done and "allowed compose hash 0x" + v2.hex() in out.done[0]
    assert ensure_allowed(chain, app, v2).done == []  # idempotent: nothing sent again


def test_other_account_is_refused_with_the_owner_named(chain: ChainClient) -> None:
    other = chain.with_signer(DEV_KEYS[1])
    app = other.register_app(None, h())
    v2 = h()
    with pytest.raises(DeployError) as e:
        ensure_allowed(chain, app, v2)
    assert other.address in str(e.value) and "teecloud app allow-hash" in str(e.value)
    assert not chain.is_compose_hash_allowed(app, v2)


def test_timelock_keeps_the_hash_pending_until_its_eta(chain: ChainClient) -> None:
    delay = 3600
    tl = chain.deploy_timelock(chain.address, delay)
    app = chain.register_app(tl, h())
    v2 = h()
    first = ensure_allowed(chain, app, v2)
    assert not first.allowed and first.pending is not None
    p = first.pending
    assert p.kind == "timelock" and p.function == "add_compose_hash" and bytes(p.args[0]) == v2
    assert p.eta is not None and p.eta - p.now >= delay - 5 and not p.executable
    assert re.fullmatch(
        r"executable from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in (1h 0m 0s|59m \d+s), chain time\)",
        p.status_text(),
    ), p.status_text()
    assert p.change_text("shop") == f"add compose hash 0x{v2.hex()} to app shop"
    # the same call again finds the queued call (no second queue), and commit before the ETA does nothing
    again = ensure_allowed(chain, app, v2, commit=True)
    assert not again.allowed and again.done == [] and again.pending and again.pending.ident == p.ident
    assert len(pending_changes(chain, app)) == 1
    assert not chain.is_compose_hash_allowed(app, v2)
    chain.increase_time(delay + 1)
    assert ensure_allowed(chain, app, v2, commit=False).allowed is False  # not executed without commit
    done = ensure_allowed(chain, app, v2, commit=True)
    assert done.allowed and chain.is_compose_hash_allowed(app, v2)
    assert pending_changes(chain, app) == []


def test_multisig_reports_approvals_and_runs_at_the_threshold(chain: ChainClient) -> None:
    a, b = chain, chain.with_signer(DEV_KEYS[1])
    ms = chain.deploy_multisig([a.address, b.address], 2)
    app = chain.register_app(ms, h())
    v2 = h()
    out = ensure_allowed(a, app, v2, commit=True)
    assert not out.allowed and out.pending is not None
    assert (out.pending.approvals, out.pending.threshold) == (1, 2) and not out.pending.executable
    assert "approvals 1/2" in out.pending.describe("shop")
    b.multisig_approve(ms, int(out.pending.ident))
    done = ensure_allowed(a, app, v2, commit=True)
    assert done.allowed and any("executed" in d for d in done.done)


def test_no_propose_only_checks(chain: ChainClient) -> None:
    tl = chain.deploy_timelock(chain.address, 60)
    app = chain.register_app(tl, h())
    out = ensure_allowed(chain, app, h(), propose=False)
    assert not out.allowed and out.pending is None and pending_changes(chain, app) == []


def test_transfer_under_a_timelock_takes_effect_after_its_delay(chain: ChainClient) -> None:
    v1 = h()
    app = chain.register_app(None, v1)
    spec = GovernanceSpec.build(multisig=None, threshold=None, timelock=600)
    assert spec is not None
    out = transfer_ownership(chain, app, spec=spec)
    assert not out.accepted and out.pending is not None and out.pending.function == "accept_ownership"
    assert chain.app_owner(app) == chain.address  # still the signer until the timelock accepts
    rerun = transfer_ownership(chain, app)  # finds the started transfer and its queued acceptance
    assert not rerun.accepted and rerun.new_owner == out.new_owner and rerun.pending is not None
    chain.increase_time(601)
    final = transfer_ownership(chain, app)
    assert final.accepted and chain.app_owner(app) == out.new_owner
    assert chain.governance_kind(out.new_owner) == "timelock"
    # from now on an upgrade's hash waits for the timelock
    pending = ensure_allowed(chain, app, h())
    assert not pending.allowed and pending.pending is not None and pending.pending.kind == "timelock"


def test_transfer_to_a_one_of_one_multisig_is_immediate(chain: ChainClient) -> None:
    app = chain.register_app(None, h())
    spec = GovernanceSpec.build(multisig=chain.address, threshold=1, timelock=None)
    assert spec is not None
    out = transfer_ownership(chain, app, spec=spec)
    assert out.accepted and chain.governance_kind(chain.app_owner(app)) == "multisig"


def test_only_the_owner_can_transfer(chain: ChainClient) -> None:
    other = chain.with_signer(DEV_KEYS[1])
    app = other.register_app(None, h())
    with pytest.raises(DeployError, match="not by this signer"):
        transfer_ownership(chain, app, to=chain.address)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"multisig": "0x12", "threshold": 1, "timelock": None}, "is not an address"),
        ({"multisig": None, "threshold": 2, "timelock": None}, "--threshold goes with --multisig"),
        ({"multisig": "0x" + "11" * 20, "threshold": None, "timelock": None}, "needs --threshold"),
        ({"multisig": "0x" + "11" * 20, "threshold": 2, "timelock": None}, "between 1 and 1"),
        ({"multisig": ",".join(["0x" + "11" * 20] * 2), "threshold": 1, "timelock": None}, "twice"),
        ({"multisig": None, "threshold": None, "timelock": 0}, "between 1 and"),
        ({"multisig": None, "threshold": None, "timelock": 10**9}, "30 days"),
    ],
)
def test_governance_options_are_checked(kw: dict[str, object], message: str) -> None:
    from teecloud.cloud.errors import InvalidOption

    with pytest.raises(InvalidOption, match=message):
        GovernanceSpec.build(**kw)  # type: ignore[arg-type]
