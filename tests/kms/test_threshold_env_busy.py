"""Review 11's R11-1 and R11-2 at the coordinator (teecloud.kms.threshold_env): another member's busy answer
(any 503) fails that member as a down one, this node's own busy state still ends the request; a `deal` answer
that is not t valid points is that dealer's failure, left out before the view is built. And what leaving a
busy member out must not break: two concurrent ceremonies of one app never both complete (ceremony_quorum is
a majority and each member deals once per app)."""

from __future__ import annotations

import random
import secrets
import threading
from pathlib import Path
from typing import Any

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsClientError, KmsDenied, KmsUsageError, SealingError
from teecloud.kms.threshold_env import EnvKeyBusy, EnvKeys, EnvKeyStore, _dealing_fault, ceremony_quorum
from tests.kms import _threshold_env_world
from tests.kms._threshold_env_world import ask_key, env_files, env_of, held_by, run_stage
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

APP = bytes.fromhex("ab" * 20)
members_3of5 = _threshold_env_world.members_3of5  # the committee fixture


class _Peer:
    """A member as the coordinator's PeerClient sees it: `answer(body)` or the error it raises."""

    def __init__(self, index: int, fail: Exception | None) -> None:
        self.index, self.fail = index, fail

    def peer_call(self, path: str, model: type[Any], body: dict[str, Any]) -> Any:
        if self.fail is not None:
            raise self.fail
        return api.PeerEnvDkgResponse(index=self.index, stage=body["stage"])


def _env(tmp_path: Path, fails: dict[int, Exception]) -> EnvKeys:
    store = EnvKeyStore(tmp_path / "env", lambda b: b, lambda b: b, index=1, t=3)
    env = EnvKeys(
        index=1,
        t=3,
        n=5,
        epochs=lambda: (1,),
        store=store,
        signer=lambda: None,
        connect=lambda i, _url: _Peer(i, fails.get(i)),  # type: ignore[arg-type,return-value]
        app_registered=lambda _a: None,
    )
    env.set_peers({i: f"https://127.0.0.1:{9000 + i}" for i in range(2, 6)})
    return env


def _body(stage: str) -> dict[str, object]:
    return {"session": secrets.token_hex(16), "epoch": 1, "app_id": APP.hex(), "stage": stage}


@pytest.mark.parametrize(
    "busy",
    [
        # any 503 (its EnvKeyBusy, its sealed state not opening): kms.client.read_answer's error
        KmsClientError("the node answered HTTP 503"),
        KmsDenied("peer 5 refused: member 5: another env-key ceremony: retry shortly", step="retry"),
    ],
)
def test_another_members_busy_answer_fails_that_member_only(tmp_path: Path, busy: Exception) -> None:
    env = _env(tmp_path, {5: busy, 3: KmsClientError("connection refused")})
    answers, failed = env._each(_body("held"), [2, 3, 4, 5])
    assert sorted(answers) == [2, 4] and sorted(failed) == [3, 5]
    assert "member 5" in failed[5] and "busy" in failed[5]


def test_generated_mixes_of_busy_down_and_answering_members(tmp_path: Path) -> None:
    """300 draws of what members 2..5 answer a stage (an answer, a 503 of any kind, another error): the
    call never raises for them; exactly the answering members answer, every other one is failed, named."""
    rng = random.Random(1114)
    kinds: list[Exception | None] = [
        None,
        KmsClientError("the node answered HTTP 503"),
        KmsDenied("peer refused: too many env-key ceremonies open: retry shortly", step="retry"),
        KmsDenied("peer refused: not admitted", step="membership"),
        KmsClientError("connection refused"),
    ]
    for _ in range(300):
        fails = {i: rng.choice(kinds) for i in range(2, 6)}
        env = _env(tmp_path, {i: e for i, e in fails.items() if e is not None})
        members = sorted(rng.sample(range(2, 6), rng.randint(1, 4)))
        answers, failed = env._each(_body(rng.choice(["held", "view", "finish", "confirm"])), members)
        assert sorted(answers) == [i for i in members if fails[i] is None]
        assert sorted(failed) == [i for i in members if fails[i] is not None]
        assert all(f"member {i}" in failed[i] for i in failed)


def test_this_nodes_own_busy_state_still_ends_the_call(tmp_path: Path) -> None:
    """This node already deals in another ceremony of the app (another coordinator's): its own `deal` is
    busy, and that ends the call (the request is a 503 "retry shortly"), whatever the others answer."""
    env = _env(tmp_path, {})
    env.stage(api.PeerEnvDkgRequest.model_validate(_body("deal")))
    with pytest.raises(EnvKeyBusy, match="member 1: another env-key ceremony for this app"):
        env._each(_body("deal"), [1, 2, 3, 4, 5])


def _dealing(t: int) -> api.PeerEnvDkgResponse:
    commitments, _ = tx.deal(t, 5)
    return api.PeerEnvDkgResponse(index=5, stage="deal", commitments=[c.hex() for c in commitments])


def _not_a_point(rng: random.Random) -> str:
    """32 bytes that are not a point of the prime-order group (libsodium's check), as hex."""
    small_order = [
        "00" * 32,
        "01" + "00" * 31,  # the identity
        "ec" + "ff" * 30 + "7f",  # y = p - 1: order 2
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    ]
    if rng.random() < 0.3:
        return rng.choice(small_order)
    while True:
        c = rng.randbytes(32)
        if not tx._valid(c):
            return c.hex()


def test_generated_malformed_dealings_are_the_dealers_fault() -> None:
    """Every mutation of a valid dealing of t = 3 points (a point dropped, added, repeated from another
    dealing's count, replaced by a non-point or a small-order point) is named; the dealing itself is not."""
    rng = random.Random(1111)
    assert _dealing_fault(_dealing(3), 3) == ""
    named = 0
    for _ in range(200):
        good = _dealing(3).commitments
        kind = rng.randrange(4)
        if kind == 0:
            bad = good[: rng.randrange(3)]
        elif kind == 1:
            bad = good + [c.hex() for c in tx.deal(rng.randint(1, 4), 5)[0]]
        elif kind == 2:
            bad = list(good)
            bad[rng.randrange(3)] = _not_a_point(rng)
        else:
            bad = [c.hex() for c in tx.deal(rng.choice([1, 2, 4, 5]), 5)[0]]
        answer = api.PeerEnvDkgResponse(index=5, stage="deal", commitments=bad)
        why = _dealing_fault(answer, 3)
        assert why, bad
        named += 1
    assert named == 200


# --- real members (each its own listener and sealed state), the 3-of-5 committee

LIAR = 5


def _fail_at(m: Member, stage: str, exc: Exception) -> None:
    env = env_of(m)
    real = env.stage

    def stage_(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.stage == stage:
            raise exc
        return real(req)

    env.stage = stage_  # type: ignore[method-assign]


def _deal_with(m: Member, commitments: list[str]) -> None:
    env = env_of(m)
    real = env.stage

    def stage_(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        out = real(req)
        if req.stage == "deal" and not out.held:
            return api.PeerEnvDkgResponse(index=out.index, stage="deal", commitments=commitments)
        return out

    env.stage = stage_  # type: ignore[method-assign]


@pytest.mark.slow
def test_generated_busy_members_never_block_a_new_apps_key_while_q_members_answer(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """Member 5 answers one stage (drawn) with a 503 (drawn: its busy error, or a sealed state that does
    not open); members 1..4 (q = 4) make each new app's key, one sharing everywhere it is held."""
    nodes = members_3of5
    rng = random.Random(1112)
    real = env_of(nodes[LIAR]).stage
    for k in range(5):
        env_of(nodes[LIAR]).stage = real  # type: ignore[method-assign]
        stage = rng.choice(["deal", "view", "finish", "commit", "confirm"])
        busy = EnvKeyBusy(f"member {LIAR}: too many env-key ceremonies open: retry shortly")
        exc = rng.choice([busy, SealingError("junk")])
        _fail_at(nodes[LIAR], stage, exc)
        app_id = world.register(compose_hash(dict(HELLO, name=f"r11-gen-busy-{k}")))
        key = ask_key(nodes[rng.randint(1, 4)], app_id, tries=6)
        held = {i: v for i, v in held_by(nodes, app_id).items() if v is not None}
        assert len({v[0] for v in held.values()}) == 1, (stage, held)
        assert sum(v[1] for v in held.values()) >= 3, (stage, held)  # confirmed on t members at least
        assert ask_key(nodes[rng.randint(1, 4)], app_id) == key


@pytest.mark.slow
def test_two_concurrent_ceremonies_of_one_app_never_both_complete(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """Another coordinator's ceremony of the app holds members 4 and 5 (their one dealing of it): member 1's
    request leaves them out as busy, has 3 dealers of the 4 needed, and ends in EnvKeyBusy with nothing
    sealed; the other ceremony cannot complete either (its dealers, 4 and 5, are no quorum: every member
    refuses its view). Once it is dropped, the app gets exactly one sharing."""
    nodes = members_3of5
    quorum = ceremony_quorum(3, 5)
    assert quorum == 4 and 2 * quorum > 5  # two disjoint sets of dealers cannot both reach it
    app_id = world.register(compose_hash(dict(HELLO, name="r11-two-ceremonies")))
    other: dict[str, object] = {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex()}
    deals = {i: run_stage(nodes[i], {**other, "stage": "deal"}) for i in (4, 5)}
    with pytest.raises(EnvKeyBusy, match=r"needs 4 of 5 members, 3 answered.*member 4: .*busy"):
        nodes[1].service.env_encrypt_pubkey(app_id.hex())
    assert all(f == [] for f in env_files(nodes).values())
    view = {str(i): a.commitments for i, a in deals.items()}
    with pytest.raises(KmsUsageError, match="at least 4 of the 5 members"):
        run_stage(nodes[4], {**other, "stage": "view", "view": view})
    # member 4 dropped that dealing with the view it refused; member 5 still deals in it: member 2's request
    # leaves 5 out as busy and has its quorum (1..4): the app's one sharing, made without member 5
    key = ask_key(nodes[2], app_id, tries=6)
    run_stage(nodes[5], {**other, "stage": "abort"})
    assert ask_key(nodes[5], app_id, tries=6) == key  # member 5 recovers its share of THAT sharing
    assert len({v[0] for v in held_by(nodes, app_id).values() if v is not None}) == 1


@pytest.mark.slow
def test_concurrent_first_requests_on_different_coordinators_make_one_sharing(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """First requests of one app on two coordinators at once (three apps, other pairs): whoever meets the
    other's dealers busy leaves them out and falls short of the quorum, so at most one ceremony completes;
    in the end every member holds one and the same sharing of each app."""
    nodes = members_3of5
    for k, pair in enumerate([(1, 4), (2, 5), (3, 1)]):
        app_id = world.register(compose_hash(dict(HELLO, name=f"r11-race-{k}")))
        results: list[object] = []

        def ask(i: int, app: bytes = app_id, out: list[object] = results) -> None:
            try:
                out.append(nodes[i].service.env_encrypt_pubkey(app.hex()).public_key)
            except (EnvKeyBusy, KmsUsageError, AccessDenied) as exc:
                out.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in pair]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        keys = {r for r in results if isinstance(r, str)}
        assert len(keys) <= 1, results
        final = {ask_key(nodes[i], app_id, tries=6) for i in nodes}
        assert len(final) == 1 and (not keys or keys == final)
        assert len({v[0] for v in held_by(nodes, app_id).values() if v is not None}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("dealt", ["none", "not-points", "one-more"])
def test_a_malformed_dealing_is_left_out_and_the_key_made(
    world: World, members_3of5: dict[int, Member], dealt: str
) -> None:
    """Member 5 deals no commitments, t strings that are no points, or t + 1 points; members 1..4 make the
    key in one request (member 5 is left out before the view: no member sees its dealing)."""
    nodes = members_3of5
    rng = random.Random(1113)
    bad = {
        "none": [],
        "not-points": [_not_a_point(rng) for _ in range(3)],
        "one-more": [c.hex() for c in tx.deal(4, 5)[0]],
    }[dealt]
    _deal_with(nodes[LIAR], bad)
    app_id = world.register(compose_hash(dict(HELLO, name=f"r11-malformed-{dealt}")))
    key = nodes[1].service.env_encrypt_pubkey(app_id.hex()).public_key  # one request, no retry
    assert ask_key(nodes[3], app_id) == key
    assert held_by(nodes, app_id)[LIAR] is None  # left out of the ceremony (it recovers on its need)
