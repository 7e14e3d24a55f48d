"""Review 5, R4-6's fix (0a0f44d): KmsGroup's active committee checked in admission, cached per block for at
most 30 s; no active committee (or no KmsGroup) admits. Attacks: a superseded member kept in by the cache
for longer than documented; a chain read that fails (or looks empty)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from teecloud.chain.errors import NotDeployed
from teecloud.kms.errors import AccessDenied
from teecloud.kms.peering import Committee
from teecloud.kms.service import ACTIVE_COMMITTEE_CACHE_S, KmsService
from teecloud.kms.threshold import ThresholdShare
from tests.kms.test_threshold_net_peering import Member
from tests.review4._attack import as_member, post_as
from tests.review4.test_admission import hello_body

A, B = (b"\x02" + b"a" * 32,), (b"\x02" + b"b" * 32,)
EPOCH = 7


@dataclass
class FakeGroup:
    """KmsGroup.active as the chain answers it; counts the reads."""

    commitments: tuple[bytes, ...] | None
    reads: int = 0
    error: Exception | None = None

    def active(self, epoch: int) -> Any:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return (
            None if self.commitments is None else SimpleNamespace(commitments=self.commitments, peer_keys={})
        )


def _service(group: FakeGroup, head: list[Any], now: list[float]) -> Any:
    """Just the state KmsService's R4-6 methods read (the real methods run on it)."""
    svc: Any = SimpleNamespace(
        _head=lambda: head[0],
        clock=lambda: now[0],
        _active_lock=threading.Lock(),
        _active_cache={},
        authorizer=SimpleNamespace(chain=SimpleNamespace(kms_group=group)),
    )
    svc._active_record = lambda e: KmsService._active_record(svc, e)
    return svc


def _admits(svc: Any, commitments: tuple[bytes, ...]) -> bool:
    try:
        KmsService._committee_still_active(svc, Committee(EPOCH, 1, commitments))
    except AccessDenied as exc:
        assert exc.step == "membership" and "superseded" in exc.reason
        return False
    return True


def test_a_superseded_member_is_in_for_at_most_the_documented_30_s() -> None:
    """Committee A admitted and cached; B is activated while the head the node reads stays at one block (a
    chain that makes no block, or a head reader that lags). A is admitted from the cache until 30 s after
    the read, refused at 30 s, and refused at once when the head moves. Held (docs: cached <= 30 s)."""
    group, head, now = FakeGroup(A), [100], [1000.0]
    svc = _service(group, head, now)
    assert _admits(svc, A)
    group.commitments = B  # the owner activates B
    now[0] = 1000.0 + ACTIVE_COMMITTEE_CACHE_S - 0.1
    assert _admits(svc, A)  # the documented window
    now[0] = 1000.0 + ACTIVE_COMMITTEE_CACHE_S
    assert not _admits(svc, A)
    svc._active_cache.clear()
    group.commitments, now[0] = A, 2000.0
    assert _admits(svc, A)
    group.commitments, head[0] = B, 101
    assert not _admits(svc, A)  # a new block: read again at once
    now[0] = 2000.0 - 5  # a clock set back does not extend the cache
    group.commitments, head[0] = A, 101
    svc._active_cache[EPOCH] = (101, 2000.0, (B, {}))
    assert _admits(svc, A) and group.reads == 5


def test_a_chain_read_that_fails_refuses_and_is_never_cached() -> None:
    """KmsGroup's read raises (RPC down, a lying endpoint's garbage): refused as step chain. Held."""
    group, head, now = FakeGroup(A, error=RuntimeError("rpc down")), [100], [1000.0]
    svc = _service(group, head, now)
    with pytest.raises(AccessDenied) as refused:
        KmsService._committee_still_active(svc, Committee(EPOCH, 1, A))
    assert refused.value.step == "chain"
    assert not svc._active_cache


def test_no_active_committee_or_no_kmsgroup_admits_as_documented() -> None:
    """What "no active committee → admit" means: before the first activation of the epoch, and on a
    deployment without KmsGroup (NotDeployed), every committee holding shares of the epoch is admitted.
    Documented (docs/kms.md); exploitable only by the owner (two committees of one epoch before recording
    either) or by whoever controls the KMS's deployment record / RPC, which the chain gate trusts too."""
    group, head, now = FakeGroup(None), [100], [1000.0]
    svc = _service(group, head, now)
    assert _admits(svc, A) and _admits(svc, B)
    group.error = NotDeployed("no KmsGroup")
    svc._active_cache.clear()
    assert _admits(svc, A) and _admits(svc, B)


def test_a_failed_head_read_during_admission_is_a_clear_refusal(
    committee: tuple[dict[int, Member], list[ThresholdShare]],
) -> None:
    """The head reader (ChainConnection.checked_head) fails between step 3 and step 4's KmsGroup read (an
    RPC that drops the connection). Safe: a 403 naming step chain, as every other failed chain read; the
    head is read outside _active_commitments' try, so the exception escapes admission."""
    members, _ = committee
    m1, m2 = members[1], members[2]

    def head_fails() -> int:
        raise ConnectionError("the RPC dropped the connection")

    m1.service._head = head_fails
    key, cert = as_member(m2, m1)
    status, body = post_as(m1, key, cert, hello_body(m2.identity.member))
    assert status == 403 and body.get("step") == "chain", (status, body)
