"""FunctionRegistry keeps each allowed code hash's runtime app in the code hash's own slot, so `check` (the
verifier's step 2) reads one slot. These tests hold it to the rule it replaced: a code hash passes exactly
when it is allowed now and the result names the registry's runtime app now, through any sequence of
governance changes (generated), including moving the function to another runtime app."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_utils.crypto import keccak

from teecloud.chain import ChainClient, ContractReverted
from teecloud.chain.functions import FunctionRegistry, deploy_function_registry

APPS = ["0x" + bytes([0x70 + i] * 20).hex() for i in range(3)]


@pytest.fixture
def chain(teecloud_home: Path) -> Iterator[ChainClient]:
    c = ChainClient.embedded(teecloud_home)
    c.deploy()
    yield c
    c.close()


def _h(i: int) -> bytes:
    return keccak(b"version %d" % i)


def _check(reg: FunctionRegistry, code_hash: bytes, app: str) -> int:
    return int(reg.conn.call("FunctionRegistry", reg.address, "check", code_hash, app))


def _expect(reg: FunctionRegistry, allowed: set[bytes], runtime_app: str, probes: list[bytes]) -> None:
    """The registry answers as the old two-slot rule would: 1 not allowed, 2 another runtime app, 0 yes."""
    assert set(reg.code_hashes()) == allowed
    assert reg.runtime_app_id().lower() == runtime_app.lower()
    for h in probes:
        assert reg.is_code_hash_allowed(h) == (h in allowed)
        for app in APPS:
            want = 1 if h not in allowed else (0 if app.lower() == runtime_app.lower() else 2)
            assert _check(reg, h, app) == want, (h.hex(), app)
            ok, reason = reg.is_allowed(h, app)
            assert ok == (want == 0) and reason == ["", "code hash not allowed", "another runtime app"][want]


@pytest.mark.slow
def test_check_answers_the_old_rule_through_generated_governance_changes(chain: ChainClient) -> None:
    rng = random.Random(2222)
    owner = chain.address or ""
    reg = deploy_function_registry(chain, owner, "f", APPS[0], _h(0))
    allowed, runtime_app, fresh = {_h(0)}, APPS[0], iter(range(1, 10_000))
    seen = [_h(0), _h(9999)]  # 9999: never allowed
    for _ in range(24):
        op = rng.choice(["add", "add", "remove", "upgrade", "runtime"])
        if op == "add" or not allowed:
            h = _h(next(fresh))
            reg.propose_add_code_hash(h)
            allowed.add(h)
            seen.append(h)
        elif op == "remove":
            h = rng.choice(sorted(allowed))
            reg.propose_remove_code_hash(h)
            allowed.discard(h)
        elif op == "upgrade":
            old, new = rng.choice(sorted(allowed)), _h(next(fresh))
            reg.propose_upgrade(old, new)
            allowed.discard(old)
            allowed.add(new)
            seen.append(new)
        else:
            runtime_app = rng.choice([a for a in APPS if a != runtime_app])
            reg.propose_set_runtime_app_id(runtime_app)
        _expect(reg, allowed, runtime_app, seen)


def test_moving_a_function_to_another_runtime_app_moves_every_allowed_version(chain: ChainClient) -> None:
    reg = deploy_function_registry(chain, chain.address or "", "f", APPS[0], _h(0))
    for i in (1, 2, 3):
        reg.propose_add_code_hash(_h(i))
    reg.propose_remove_code_hash(_h(1))  # a gap in the middle of the list: the last one moves into it
    reg.propose_set_runtime_app_id(APPS[1])
    _expect(reg, {_h(0), _h(2), _h(3)}, APPS[1], [_h(i) for i in range(5)])
    reg.propose_remove_code_hash(_h(3))  # the one that moved: its new position was recorded
    reg.propose_upgrade(_h(0), _h(4))
    reg.propose_add_code_hash(_h(1))  # allowed again, on the runtime app of now
    _expect(reg, {_h(1), _h(2), _h(4)}, APPS[1], [_h(i) for i in range(5)])


def test_refusals_of_the_governance_calls_are_unchanged(chain: ChainClient) -> None:
    reg = deploy_function_registry(chain, chain.address or "", "f", APPS[0], _h(0))
    for fn, args, reason in [
        ("add_code_hash", (_h(0),), "code hash already allowed"),
        ("add_code_hash", (b"\0" * 32,), "empty code hash"),
        ("remove_code_hash", (_h(1),), "code hash not allowed"),
        ("upgrade", (_h(1), _h(2)), "old code hash not allowed"),
        ("upgrade", (_h(0), _h(0)), "new code hash already allowed"),
        ("upgrade", (_h(0), b"\0" * 32), "empty code hash"),
        ("set_runtime_app_id", ("0x" + "00" * 20,), "no runtime app"),
    ]:
        with pytest.raises(ContractReverted, match=reason):
            chain.transact("FunctionRegistry", reg.address, fn, *args)
    _expect(reg, {_h(0)}, APPS[0], [_h(0), _h(1), _h(2)])


@pytest.mark.slow
def test_at_most_64_versions_are_allowed_at_once(chain: ChainClient) -> None:
    """The bound that lets set_runtime_app_id rewrite every entry in one transaction."""
    reg = deploy_function_registry(chain, chain.address or "", "f", APPS[0], _h(0))
    for i in range(1, 64):
        reg.propose_add_code_hash(_h(i))
    with pytest.raises(ContractReverted, match="too many allowed code hashes"):
        reg.propose_add_code_hash(_h(64))
    reg.propose_set_runtime_app_id(APPS[2])
    reg.propose_remove_code_hash(_h(7))
    reg.propose_add_code_hash(_h(64))
    _expect(reg, {_h(i) for i in range(65)} - {_h(7)}, APPS[2], [_h(0), _h(7), _h(63), _h(64), _h(65)])
