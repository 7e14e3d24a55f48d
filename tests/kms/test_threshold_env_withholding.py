"""Review 8, R8-1: a member that deals and then fails `view`/`finish` (or names a dealer for a sub-share it
did not get) is left out of one more try at once; the negative cases: a false accuser costs rounds, not the
app's key, and two withholders at 3-of-5 (q = 4) get a clean refusal after one more try, not a loop.
R8-3: a tentative share left by a coordinator that committed on t - 1 members and went silent is
dropped once stale."""

from __future__ import annotations

import os
import time

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.threshold_env import EnvKeyBusy
from tests.kms import _threshold_env_world
from tests.kms._threshold_env_world import env_of, partial_ceremony
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow


members_3of5 = _threshold_env_world.members_3of5  # the committee fixture


def _count_deals(m: Member) -> list[str]:
    """Wraps member m's stage: the sessions it was asked to deal in."""
    env = env_of(m)
    real = env.stage
    sessions: list[str] = []

    def counting(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.stage == "deal":
            sessions.append(req.session)
        return real(req)

    env.stage = counting  # type: ignore[method-assign]
    return sessions


def test_a_false_accuser_costs_rounds_not_the_apps_key(world: World, members_3of5: dict[int, Member]) -> None:
    """Member 5 deals honestly, then fails every `finish` naming another dealer (2, then 3, ...) as the one
    that withheld its sub-share. The first accusation leaves member 2 out; the second leaves member 5 itself
    out and deals member 2 in again: one request gets the key, from a sharing member 2 holds."""
    nodes = members_3of5
    env5 = env_of(nodes[5])
    real = env5.stage
    victims = iter([2, 3, 4, 1, 2, 3])

    def accuse(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.stage == "finish":  # the structured accusation a finishing member answers (R8-1)
            return api.PeerEnvDkgResponse(index=5, stage="finish", accused=next(victims))
        return real(req)

    env5.stage = accuse  # type: ignore[method-assign]
    deals2 = _count_deals(nodes[2])
    app_id = world.register(compose_hash(dict(HELLO, name="r8-false-accuser")))
    key = nodes[1].service.env_encrypt_pubkey(app_id.hex()).public_key
    assert len(deals2) == 2  # dealt in, left out on 5's word, dealt in again once 5 accused twice
    for i in (1, 2):
        share = env_of(nodes[i]).store.get(1, app_id)
        assert share is not None and tx.x25519_public_key(share.commitments).hex() == key


@pytest.mark.parametrize("stage", ["view", "share"])
def test_two_withholders_at_3_of_5_get_a_clean_refusal_not_a_loop(
    world: World, members_3of5: dict[int, Member], stage: str
) -> None:
    """Members 4 and 5 (t - 1 = 2) deal and then refuse the view, or refuse every PeerEnvShare. Leaving both
    out leaves 3 < q = 4 dealers: the request is refused (503, naming them) after one more try (deal asked
    twice of member 1 at most), and no member sealed anything."""
    nodes = members_3of5
    for i in (4, 5):
        env = env_of(nodes[i])
        real = env.stage

        def refuse(req: api.PeerEnvDkgRequest, real=real, i=i) -> api.PeerEnvDkgResponse:  # type: ignore[no-untyped-def]
            if req.stage == "view":
                raise KmsUsageError(f"member {i}: no (withheld at view)")
            return real(req)

        def withhold(node, req, i=i):  # type: ignore[no-untyped-def]
            raise AccessDenied(f"member {i}: sub-share withheld", step="round")

        if stage == "view":
            env.stage = refuse  # type: ignore[method-assign]
        else:
            env.serve_share = withhold  # type: ignore[method-assign]
    deals1 = _count_deals(nodes[1])
    app_id = world.register(compose_hash(dict(HELLO, name=f"r8-two-withholders-{stage}")))
    with pytest.raises(EnvKeyBusy) as err:
        nodes[1].service.env_encrypt_pubkey(app_id.hex())
    assert "needs 4 of 5" in str(err.value)
    assert "member 4: left out" in str(err.value) and "member 5: left out" in str(err.value)
    assert len(deals1) == 2
    assert all(env_of(m).store.record(1, app_id) is None for m in nodes.values())


@pytest.mark.parametrize("stale", [True, False])
def test_a_coordinator_silent_after_t_minus_1_commits_leaves_a_stale_share_that_is_dropped(
    world: World, members_3of5: dict[int, Member], stale: bool
) -> None:
    """R8-3: member 5 coordinates A among {1, 2, 3, 5}, commits on 1 and 2 only (t - 1), no confirm, then
    errors on every PeerEnvDkg of this app. Once the tentative shares are older than the ceremony window
    (their files' mtime set back 200 s), members 1 and 2 drop them (2 claimants + 1 silent < t: never
    usable) and member 3's request makes the app's sharing among 1..4. While they are fresh, nothing is
    dropped and the request is refused (a ceremony may still be under way)."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name=f"r8-3-silent-{stale}")))
    a = partial_ceremony(nodes, app_id, [1, 2, 3, 5], [1, 2], [])
    env5 = env_of(nodes[5])
    real = env5.stage

    def silent(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.app_id == app_id.hex():
            raise KmsUsageError("member 5: (silent for this app)")
        return real(req)

    env5.stage = silent  # type: ignore[method-assign]
    if stale:
        then = time.time() - 200
        for i in (1, 2):
            os.utime(env_of(nodes[i]).store._path(1, app_id), (then, then))
        key = nodes[3].service.env_encrypt_pubkey(app_id.hex()).public_key
        for i in (1, 2, 3, 4):
            share = env_of(nodes[i]).store.get(1, app_id)
            assert share is not None and tx.x25519_public_key(share.commitments).hex() == key
            assert share.commitments != a
    else:
        with pytest.raises(KmsUsageError):
            nodes[3].service.env_encrypt_pubkey(app_id.hex())
        for i in (1, 2):
            rec = env_of(nodes[i]).store.record(1, app_id)
            assert rec is not None and rec[1] is False and rec[0].commitments == a


def test_a_withholder_naming_an_honest_member_back_in_the_same_round_is_the_one_left_out() -> None:
    """Seen in CI (order-dependent before the fix): member 4's finish names dealer 5 (it withheld), and the
    withholder's own failed finish names honest member 3 in the same round; member 3 was left out beside
    5, leaving 3 of the 4 members a ceremony needs. Now an accusation by a member that a member nobody
    names accuses in the same round does not count."""
    from types import SimpleNamespace

    from teecloud.kms.threshold_env import EnvKeys, _Withheld

    def withheld(accused: dict[int, int]) -> _Withheld:
        """A finish round where each member of `accused` answered naming its dealer (the answer's field)."""
        return _Withheld("finish", {i: f"names dealer {d}" for i, d in accused.items()}, accused)

    coordinator = SimpleNamespace(index=1, n=5)
    for accused in ({4: 5, 5: 3}, {5: 3, 4: 5}, {2: 5, 4: 5, 5: 4}):
        left_out: dict[int, str] = {}
        EnvKeys._leave_out(coordinator, withheld(accused), left_out, {})  # type: ignore[arg-type]
        assert set(left_out) == {5}, (accused, left_out)
    # a lone accusation still leaves the named dealer out; naming oneself, the coordinator or a non-member
    # leaves the accuser out; a failure that names nobody leaves the failing member out
    for accused, out in (({4: 2}, {2}), ({4: 4}, {4}), ({4: 1}, {4}), ({4: 6}, {4}), ({4: 64}, {4})):
        left_out = {}
        EnvKeys._leave_out(coordinator, withheld(accused), left_out, {})  # type: ignore[arg-type]
        assert set(left_out) == out, (accused, left_out)
    left_out = {}
    EnvKeys._leave_out(coordinator, _Withheld("finish", {4: "member 4: no"}), left_out, {})  # type: ignore[arg-type]
    assert set(left_out) == {4}
    # the text of a failure no longer names anyone (was: a `node N:` regex over it)
    left_out = {}
    text = "member 4: the ceremony fails here: node 2: sub-share not obtained"
    EnvKeys._leave_out(coordinator, _Withheld("finish", {4: text}), left_out, {})  # type: ignore[arg-type]
    assert set(left_out) == {4}


@pytest.mark.parametrize("value", [0, 65, -1, "3", 3.0, True, [3]])
def test_a_peers_accusation_is_a_strictly_validated_share_index(value: object) -> None:
    """The `accused` field of a `finish` answer (R8-1): an int share index 1..64 only (a member of this
    committee is then checked by `_leave_out`); anything else makes the answer malformed."""
    from pydantic import ValidationError

    assert (
        api.PeerEnvDkgResponse.model_validate_json('{"index": 4, "stage": "finish", "accused": 3}').accused
        == 3
    )
    with pytest.raises(ValidationError):
        api.PeerEnvDkgResponse.model_validate({"index": 4, "stage": "finish", "accused": value})
