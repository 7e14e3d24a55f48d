"""Review 11: one member (or one node's host) answering 503 "busy" to the env ceremony's messages.

`EnvKeys._all` turns a member's HTTP 503 (any 503: the member's EnvKeyBusy "retry shortly", but also a
503 step `sealing` when its sealed state does not open) into EnvKeyBusy for the WHOLE call, so `_each`
raises for every member instead of counting that one member as down. `_ceremony_run` retries only
`_Withheld`, so the request ends in a 503; the next request asks the same member again.

FINDING R11-1 (fixed in r11-fix): member 5 answering every `deal` with 503 "retry shortly" (a liar:
R7-3's and R8-1's attack through another answer; or dealing, then answering `view` or `finish` so), or
member 5's HOST writing a junk `1-<app>.sealed` file into its node's env directory for a new app (the host
watches the chain for registrations; node 5 then answers `deal` with 503 `sealing`), blocks the app's
first env key on every coordinator while four honest members (q = 4) are up. The same holds for the
`held` poll: one member answering 503, or its host corrupting its sealed share of an existing app, stops
every other member's recovery and settling of that app.

Minimal fix: in `_each`, a member's busy answer fails that member (`failed[i]`, as a down member) except
when it is this node's own; the quorum (a majority) still keeps two concurrent ceremonies of one app from
both completing, which is why a busy member stopped the call."""

from __future__ import annotations

import time

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.threshold_env import EnvKeyBusy
from tests.kms._threshold_env_world import env_of, held_by
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow

LIAR = 5


def _key_after_retries(m: Member, app_id: bytes, tries: int = 6) -> tuple[str | None, str]:
    last = ""
    for _ in range(tries):
        try:
            return m.service.env_encrypt_pubkey(app_id.hex()).public_key, ""
        except (EnvKeyBusy, KmsUsageError, AccessDenied) as exc:
            last = str(exc)
            time.sleep(0.2)
    return None, last


def _busy_at(m: Member, stages: set[str]) -> None:
    env = env_of(m)
    real = env.stage

    def busy(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.stage in stages:
            raise EnvKeyBusy(
                f"member {LIAR}: another env-key ceremony for this app is under way: retry shortly"
            )
        return real(req)

    env.stage = busy  # type: ignore[method-assign]


def test_control_a_member_that_is_down_for_deal_does_not_block_the_key(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """The control: member 5 failing `deal` with a plain error (a member down) is left out; members 1..4
    (q = 4) make the app's sharing."""
    nodes = members_3of5
    env5 = env_of(nodes[LIAR])
    real = env5.stage

    def down(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.stage == "deal":
            raise KmsUsageError(f"member {LIAR}: down")
        return real(req)

    env5.stage = down  # type: ignore[method-assign]
    app_id = world.register(compose_hash(dict(HELLO, name="r11-down-control")))
    key, last = _key_after_retries(nodes[1], app_id)
    assert key is not None, last


@pytest.mark.parametrize("stage", ["deal", "view", "finish"])
def test_one_member_answering_busy_to_a_stage_does_not_block_a_new_apps_env_key(
    world: World, members_3of5: dict[int, Member], stage: str
) -> None:
    """The attacker's steps: member 5 answers every `deal` (or deals, then answers every `view`, or every
    `finish`) with 503 "retry shortly"; members 1..4 honest and up. A client asks member 1 (then member 2)
    for a new app's env key, six times each."""
    nodes = members_3of5
    _busy_at(nodes[LIAR], {stage})
    app_id = world.register(compose_hash(dict(HELLO, name=f"r11-busy-{stage}")))
    key, last = _key_after_retries(nodes[1], app_id)
    if key is None:
        key, last = _key_after_retries(nodes[2], app_id)
    assert key is not None, f"no env key while 4 honest members (q = 4) are up: {last}"


def test_one_hosts_junk_file_for_a_new_app_does_not_block_its_env_key(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """The attacker's steps (the host of node 5 alone, its TEE honest): it writes 64 junk bytes as
    `1-<app>.sealed` into node 5's env directory for a newly registered app; node 5 answers `deal` with a
    503 step `sealing`. A client asks member 1 (then member 2) six times each."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="r11-host-junk")))
    store5 = env_of(nodes[LIAR]).store
    store5.dir.mkdir(parents=True, exist_ok=True)
    (store5.dir / f"1-{app_id.hex()}.sealed").write_bytes(b"\x00" * 64)
    key, last = _key_after_retries(nodes[1], app_id)
    if key is None:
        key, last = _key_after_retries(nodes[2], app_id)
    assert key is not None, f"no env key while 4 honest members (q = 4) are up: {last}"


@pytest.mark.parametrize("who", ["member", "host"])
def test_one_member_answering_busy_to_held_does_not_stop_another_members_recovery(
    world: World, members_3of5: dict[int, Member], who: str
) -> None:
    """The app's sharing is made on all five; member 1 loses its share (a fresh disk); member 5 answers
    every `held` poll with 503 "retry shortly" (`member`), or the host of node 5 overwrites node 5's sealed
    share of the app with junk (`host`: node 5 answers 503 step `sealing`). Members 2, 3, 4 (t = 3) hold
    the sharing confirmed, so member 1 should recover its share at its next need (six tries)."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name=f"r11-busy-held-{who}")))
    key, last = _key_after_retries(nodes[2], app_id)
    assert key is not None, last
    for i in range(1, 6):  # every member settles (a member not confirmed yet recovers on its need)
        _key_after_retries(nodes[i], app_id)
    assert all(v is not None and v[1] for v in held_by(nodes, app_id).values()), held_by(nodes, app_id)
    store1 = env_of(nodes[1]).store
    (store1.dir / f"1-{app_id.hex()}.sealed").unlink()
    (store1.dir / f"1-{app_id.hex()}.answer").unlink(missing_ok=True)
    with store1._lock:
        store1._cache.clear()
    env_of(nodes[1])._answers.clear()
    if who == "member":
        _busy_at(nodes[LIAR], {"held"})
    else:
        store5 = env_of(nodes[LIAR]).store
        (store5.dir / f"1-{app_id.hex()}.sealed").write_bytes(b"\x00" * 64)
        with store5._lock:
            store5._cache.clear()  # as after a restart of node 5
    got, last = _key_after_retries(nodes[1], app_id)
    share = store1.get(1, app_id)
    assert got == key and share is not None, f"member 1 did not recover: {last}"
    assert tx.x25519_public_key(share.commitments).hex() == key
