"""Presignature pools refilled while the nodes run (kms.threshold_net.PresignRefiller, the supervisor's loop
in `teecloud up`): a round when a maker falls below the low watermark, one round at a time, backoff after a
failure; between five running members with a small batch; GetKey's 503 when a boot found no presignature."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping

import pytest

from teecloud.kms.threshold_net import (
    AdminEndpoint,
    PresignRefiller,
    RefillPolicy,
    RoundFailed,
    pool_size,
    run_signing_key_dkg,
)
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_net_presign import endpoints, members  # noqa: F401 (fixture)

NODES = {
    i: AdminEndpoint(f"http://127.0.0.1:{9000 + i}", "t", f"https://127.0.0.1:{8000 + i}")
    for i in range(1, 6)
}


class Fake:
    """Pools and a round runner standing in for five members (the loop's logic only)."""

    def __init__(self, sizes: dict[int, int | None]) -> None:
        self.sizes = sizes
        self.rounds: list[tuple[list[int], int, int]] = []
        self.fail: RoundFailed | None = None
        self.gate: threading.Event | None = None
        self.now = 1000.0

    def read(self, ep: AdminEndpoint) -> int | None:
        return self.sizes[int(ep.url.rsplit(":", 1)[1]) - 8000]

    def run(self, nodes: Mapping[int, AdminEndpoint], count: int, t: int) -> list[bytes]:
        self.rounds.append((sorted(nodes), count, t))
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        for i in nodes:
            self.sizes[i] = int(self.sizes[i] or 0) + count
        return [bytes(33)] * count

    def refiller(self, **policy: float) -> PresignRefiller:
        return PresignRefiller(
            NODES,
            3,
            RefillPolicy(**{"low": 4, "batch": 2, **policy}),  # type: ignore[arg-type]
            run_round=self.run,
            read_pool=self.read,
            clock=lambda: self.now,
        )


def test_a_round_only_when_a_maker_is_below_the_watermark() -> None:
    fake = Fake({1: 5, 2: 4, 3: 4, 4: 9, 5: 4})
    r = fake.refiller()
    assert r.check() is False and fake.rounds == []
    fake.sizes[3] = 3  # one maker below 4
    assert r.check() is True
    assert fake.rounds == [([1, 2, 3, 4, 5], 2, 3)] and r.rounds == 1  # exactly 2t-1 makers, one batch
    assert r.check() is False  # 5 now: nothing to do


def test_unreachable_members_are_skipped_and_too_few_back_off() -> None:
    fake = Fake({1: None, 2: 0, 3: 0, 4: 0, 5: 0})
    r = fake.refiller()
    assert r.check() is False  # four reachable: fewer than 2t-1 = 5
    assert fake.rounds == [] and r.failures == 1 and "needs 5 running members" in r.last_error
    fake = Fake({1: 0, 2: None, 3: 0, 4: 0, 5: 0, 6: 0})
    nodes6 = {**NODES, 6: AdminEndpoint("http://127.0.0.1:9006", "t", "https://127.0.0.1:8006")}
    r6 = PresignRefiller(nodes6, 3, RefillPolicy(low=4, batch=2), run_round=fake.run, read_pool=fake.read)
    assert r6.check() is True and fake.rounds == [([1, 3, 4, 5, 6], 2, 3)]


def test_a_failed_round_backs_off_exponentially_and_success_resets() -> None:
    fake = Fake({i: 0 for i in range(1, 6)})
    fake.fail = RoundFailed("sub-shares not obtained", party=4)
    r = fake.refiller(backoff_s=10, max_backoff_s=25)
    assert r.check() is False and len(fake.rounds) == 1 and r.failures == 1
    assert "member 4" in r.last_error
    fake.now += 9.9
    assert r.check() is False and len(fake.rounds) == 1  # within the backoff: no round
    fake.now += 0.2
    assert r.check() is False and len(fake.rounds) == 2 and r.failures == 2
    fake.now += 19.9
    assert r.check() is False and len(fake.rounds) == 2  # doubled: 20 s
    fake.now += 0.2
    r.check()
    assert len(fake.rounds) == 3 and r.failures == 3
    assert r.not_before == pytest.approx(fake.now + 25)  # capped at max_backoff_s
    fake.fail = None
    fake.now += 25.1
    assert r.check() is True and (r.failures, r.last_error, r.not_before) == (0, "", 0.0)


def test_one_round_at_a_time() -> None:
    fake = Fake({i: 0 for i in range(1, 6)})
    fake.gate = threading.Event()
    r = fake.refiller()
    first = threading.Thread(target=r.check)
    first.start()
    try:
        for _ in range(200):  # until the first round has started
            if fake.rounds:
                break
            time.sleep(0.01)
        assert len(fake.rounds) == 1
        assert r.check() is False  # a second check while the round runs starts none
        assert len(fake.rounds) == 1
    finally:
        fake.gate.set()
        first.join(30)
    assert r.rounds == 1


def test_the_policy_is_bounded() -> None:
    for bad in ({"batch": 0}, {"batch": 33}, {"low": 0}, {"low": 500, "batch": 16}, {"interval_s": 0}):
        with pytest.raises(ValueError, match="refill"):
            RefillPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refill"):
        RefillPolicy(backoff_s=10, max_backoff_s=5)


@pytest.mark.slow
def test_running_members_are_refilled_by_the_loop(members: dict[int, Member]) -> None:  # noqa: F811
    """Five members, a small batch: the loop fills the pools, then refills them after boots (here: direct
    signatures) used them up, while the members keep serving."""
    eps = endpoints(members)
    run_signing_key_dkg(eps)
    assert [pool_size(ep) for ep in eps.values()] == [0] * 5
    refiller = PresignRefiller(eps, 3, RefillPolicy(low=2, batch=2, interval_s=0.2)).start()
    try:

        def pools() -> list[int | None]:
            return [pool_size(ep) for ep in eps.values()]

        _wait(lambda: all(p is not None and p >= 2 for p in pools()), "first fill")
        assert refiller.rounds >= 1 and refiller.last_error == ""
        # boots use presignatures (one per signing node): the pools drop below the watermark
        signer = {i: m.service.threshold.signer for i, m in members.items()}  # type: ignore[union-attr]
        for k, session in enumerate(signer[1].pool.unused()):  # type: ignore[union-attr]
            digest = hashlib.sha256(b"boot %d" % k).digest()
            for i in (1, 2, 3):
                signer[i].pool.sign(session, digest)  # type: ignore[union-attr]
        assert pool_size(eps[1]) == 0
        _wait(lambda: all(p is not None and p >= 2 for p in pools()), "refill")
        assert refiller.rounds >= 2
    finally:
        refiller.stop()
    assert max(p or 0 for p in [pool_size(ep) for ep in eps.values()]) <= 6  # bounded: batches of 2


def _wait(cond: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:g} s")
