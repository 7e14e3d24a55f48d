"""Review 7, R7-1 (the part that was open): a ceremony committed on fewer than t members must not leave them
a share of a sharing that is not the app's one. The fix is a two-phase commit without the chain
(docs/kms.md "Two-phase commit"): a commit seals the share TENTATIVE; a member serves nothing from it
(no signature, no partial, no recovery help) until its own poll of the members shows t of them, itself
included, hold the same commitments (then it is CONFIRMED); a tentative share that fewer than t members
can hold (an orphan), or that a sharing confirmed by t members superseded, is dropped and the app's sharing
recovered. Here: the sealed store (states, atomic promotion, drop, the host replaying files), the settle
decision under generated polls with up to t - 1 lying members, and the attacker's exact steps against
running members (the coordinator stops after 0, 1, … q commits, or before its confirms; a second
ceremony; a member lying in its `held` answers)."""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys import threshold_ecdsa as te
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_env import EnvKeyBusy, EnvKeys, EnvKeyStore, ceremony_quorum
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_net_peering import Member, allow_build, start_member
from tests.kms.test_threshold_nodes import HELLO

APP = bytes(range(20))
Sharing = tuple[bytes, ...]


def _store(path: Path, index: int, t: int) -> EnvKeyStore:
    return EnvKeyStore(path, lambda b: b, lambda b: b, index=index, t=t)


# --- the sealed store: states, promotion, drop, the host's replays


def test_a_committed_share_is_sealed_tentative_and_served_only_once_confirmed(tmp_path: Path) -> None:
    share = tx.dkg_local(2, 3)[0]
    store = _store(tmp_path, 1, 2)
    store.put(1, APP, share, tentative=True)
    assert store.get(1, APP) is None  # nothing is served from a tentative share
    assert store.record(1, APP) == (share, False)
    assert _store(tmp_path, 1, 2).record(1, APP) == (share, False)  # sealed so (a restart keeps it)
    with pytest.raises(KmsUsageError, match="never replaced"):
        store.put(1, APP, tx.dkg_local(2, 3)[0])  # no second share beside a tentative one
    with pytest.raises(KmsUsageError, match="to confirm"):
        store.confirm(1, APP, tx.dkg_local(2, 3)[0].commitments)  # only its own commitments
    assert store.confirm(1, APP, share.commitments) == share
    assert store.get(1, APP) == share
    assert _store(tmp_path, 1, 2).get(1, APP) == share
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".sealed")]  # no temp file left


def test_only_a_tentative_share_of_those_commitments_is_dropped_with_its_answer(tmp_path: Path) -> None:
    share, other = tx.dkg_local(2, 3)[0], tx.dkg_local(2, 3)[0]
    store = _store(tmp_path, 1, 2)
    store.put(1, APP, share, tentative=True)
    store._answer_path(1, APP).write_bytes(b"{}")
    with pytest.raises(KmsUsageError, match="to drop"):
        store.drop_tentative(1, APP, other.commitments)
    store.drop_tentative(1, APP, share.commitments)
    assert store.record(1, APP) is None and list(tmp_path.iterdir()) == []
    store.put(1, APP, other)  # a recovered share: sealed confirmed
    with pytest.raises(KmsUsageError, match="to drop"):  # a confirmed share is never dropped
        store.drop_tentative(1, APP, other.commitments)
    assert store.get(1, APP) == other


def test_the_host_replaying_a_tentative_or_v2_file_gets_a_share_settled_again_not_served(
    tmp_path: Path,
) -> None:
    """The host's steps: keep the bytes of the tentative file, wait for the promotion, write them back; or
    write a record of the format sealed before the two-phase commit (v2: no state)."""
    share = tx.dkg_local(2, 3)[0]
    store = _store(tmp_path, 1, 2)
    store.put(1, APP, share, tentative=True)
    old = store._path(1, APP).read_bytes()
    store.confirm(1, APP, share.commitments)
    store._path(1, APP).write_bytes(old)
    assert _store(tmp_path, 1, 2).record(1, APP) == (share, False)  # back to tentative: settled anew
    v2 = {
        "format": "teecloud-env-share-v2",
        "epoch": 1,
        "app_id": APP.hex(),
        "share": __import__("json").loads(tx.share_to_json(share)),
    }
    store._path(1, APP).write_bytes(__import__("json").dumps(v2).encode())
    assert _store(tmp_path, 1, 2).record(1, APP) == (share, False)


# --- the settle decision, from generated polls (up to t - 1 members lying)


def _settler(tmp_path: Path, t: int, n: int) -> EnvKeys:
    store = _store(tmp_path, 1, t)

    def no_call(*_a: object) -> None:
        raise AssertionError("no peer call in a settle decision")

    return EnvKeys(
        index=1,
        t=t,
        n=n,
        epochs=lambda: (1,),
        store=store,
        signer=lambda: None,
        connect=no_call,  # type: ignore[arg-type]
        app_registered=lambda _a: None,
    )


@pytest.mark.parametrize("seed", range(300))
def test_liars_cannot_make_a_member_drop_the_apps_sharing_or_promote_over_it(
    tmp_path: Path, seed: int
) -> None:
    """Member 1 holds a tentative share of sharing C. The truth: C is sealed on the members H_C (1 among
    them), another sharing B on H_B (disjoint; only in states the ceremony can reach); some members are
    down; up to t - 1 liars answer anything.
    Whatever the liars say: C is never dropped while t honest members hold it, never promoted while t
    honest members that answer hold B; without liars and with everyone up, C is settled (promoted when t
    hold it, dropped otherwise)."""
    rng = random.Random(seed)
    n = rng.randint(3, 7)
    t = rng.randint(2, n - 1)
    c_share = tx.dkg_local(t, n)[0]
    c, b, z = c_share.commitments, tx.dkg_local(t, n)[0].commitments, tx.dkg_local(t, n)[0].commitments
    others = list(range(2, n + 1))
    rng.shuffle(others)
    liars = set(others[: rng.randint(0, t - 1)]) if rng.random() < 0.7 else set()
    honest = [i for i in others if i not in liars]
    k_c = rng.randint(0, len(honest))
    h_c = set(honest[:k_c]) | {1}
    h_b = set(honest[k_c : k_c + rng.randint(0, len(honest) - k_c)])
    if len(h_c) > n - ceremony_quorum(t, n):
        # unreachable with B: a sharing committed on an honest member had q dealers, none of them an
        # honest holder of C (each answers `deal` with `held`), so at most n - q <= t - 1 of those exist
        h_b = set()
    b_confirmed = rng.random() < 0.7
    down = {i for i in honest if rng.random() < 0.2}
    claims: dict[Sharing, list[int]] = {}
    confirmed: dict[Sharing, list[int]] = {}
    answered = 0
    for i in sorted(set(range(2, n + 1)) - down):
        answered += 1
        if i in liars:
            what = rng.choice([c, b, z, None])
            conf = rng.random() < 0.5
        elif i in h_c:
            what, conf = c, rng.random() < 0.3
        elif i in h_b:
            what, conf = b, b_confirmed
        else:
            what, conf = None, False
        if what is not None:
            claims.setdefault(what, []).append(i)
            if conf:
                confirmed.setdefault(what, []).append(i)
    env = _settler(tmp_path, t, n)
    env.store.put(1, APP, c_share, tentative=True)
    try:
        out = env._settle(1, APP, c_share, claims, confirmed, answered)
        outcome = "promoted" if out is not None else "dropped"
    except KmsUsageError:
        outcome = "tentative"
    rec = env.store.record(1, APP)
    assert {"promoted": (c_share, True), "dropped": None, "tentative": (c_share, False)}[outcome] == rec
    honest_b_up = len(h_b - down)
    if len(h_c) >= t:
        assert outcome != "dropped", (seed, n, t, liars, h_c, h_b, down)
    if honest_b_up >= t:
        assert outcome != "promoted", (seed, n, t, liars, h_c, h_b, down)
    if not liars and not down and not h_b:
        assert outcome == ("promoted" if len(h_c) >= t else "dropped")
    if not liars and not down and h_b and b_confirmed and len(h_b) >= t and len(h_c) < t:
        assert outcome == "dropped"  # superseded


# --- running members: the attacker's exact steps


def _members(home: Path, world: World, t: int, n: int) -> dict[int, Member]:
    allow_build(world.chain, home)
    shares = local_joint_feldman(t, n, epoch=1)
    keys = te.dkg_local(t, n)
    out: dict[int, Member] = {}
    for s in shares:
        m = start_member(home, world.chain, s, name=f"tp{t}of{n}")
        m.service._install_signer(keys[s.index - 1])
        out[s.index] = m
    for _ in range(40):
        for i, p in te.presign_local(keys, list(range(1, n + 1))).items():
            out[i].service.threshold.signer.pool.add([p])  # type: ignore[union-attr]
    urls = {i: m.server.url for i, m in out.items()}
    for m in out.values():
        assert m.service.env_keys is not None
        m.service.env_keys.set_peers(urls)
    return out


@pytest.fixture
def members_3of5(teecloud_home: Path, world: World) -> Iterator[dict[int, Member]]:
    out: dict[int, Member] = {}
    try:
        out = _members(teecloud_home, world, 3, 5)
        yield out
    finally:
        stop_servers(m.server for m in out.values())


def _env(m: Member) -> EnvKeys:
    assert m.service.env_keys is not None
    return m.service.env_keys


def _stage(m: Member, body: dict[str, object]) -> api.PeerEnvDkgResponse:
    return _env(m).stage(api.PeerEnvDkgRequest.model_validate(body))


def _partial_ceremony(
    nodes: dict[int, Member], app_id: bytes, dealers: list[int], commit_on: list[int], confirm_on: list[int]
) -> Sharing:
    """A coordinator's messages, stopped after its commits to `commit_on` and confirms to `confirm_on` (the
    rest of the dealers keep their pending dealing until it expires, as after a crash)."""
    base: dict[str, object] = {"session": secrets.token_hex(16), "epoch": 1, "app_id": app_id.hex()}
    deals = {i: _stage(nodes[i], {**base, "stage": "deal"}) for i in dealers}
    view = {str(i): deals[i].commitments for i in dealers}
    for i in dealers:
        _stage(nodes[i], {**base, "stage": "view", "view": view})
    urls = {str(i): m.server.url for i, m in nodes.items()}
    done = {i: _stage(nodes[i], {**base, "stage": "finish", "peers": urls}) for i in dealers}
    agreed = done[dealers[0]].commitments
    for i in commit_on:
        _stage(nodes[i], {**base, "stage": "commit", "commitments": agreed})
    for i in confirm_on:
        _stage(nodes[i], {**base, "stage": "confirm"})
    for i in set(dealers) - set(commit_on):  # their open dealing expires (here: at once)
        _stage(nodes[i], {**base, "stage": "abort"})
    return tuple(bytes.fromhex(c) for c in agreed)


def _ask(m: Member, app_id: bytes, tries: int = 4) -> str:
    """GetAppEnvEncryptPubKey on one member, as a client retries a 503."""
    for k in range(tries):
        try:
            return m.service.env_encrypt_pubkey(app_id.hex()).public_key
        except EnvKeyBusy:
            if k == tries - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _one_sharing_everywhere(nodes: dict[int, Member], app_id: bytes) -> Sharing:
    records = {i: _env(m).store.record(1, app_id) for i, m in nodes.items()}
    states = {(r[0].commitments, r[1]) for r in records.values() if r is not None}
    assert len(states) == 1 and None not in records.values(), records
    ((sharing, confirmed),) = states
    assert confirmed
    return sharing


@pytest.mark.slow
@pytest.mark.parametrize("k", range(0, 5))
def test_a_coordinator_stopping_after_k_commits_leaves_one_sharing_after_the_next_request(
    world: World, members_3of5: dict[int, Member], k: int
) -> None:
    """3-of-5 (q = 4): ceremony A among {1..4} committed on members 1..k, no confirm sent (the coordinator
    crashed). Fewer than t: A is dropped wherever it was sealed and one new sharing is made; t or more: A
    is promoted and recovered on the rest, never replaced. Either way every member ends with one confirmed
    share, and all answer one key."""
    nodes = members_3of5
    q = ceremony_quorum(3, 5)
    app_id = world.register(compose_hash(dict(HELLO, name=f"two-phase-k{k}")))
    a = _partial_ceremony(nodes, app_id, list(range(1, q + 1)), list(range(1, k + 1)), [])
    for i in range(1, k + 1):  # nothing served from the tentative shares meanwhile
        assert _env(nodes[i]).store.get(1, app_id) is None
        with pytest.raises(AccessDenied, match="holds no env share"):
            _env(nodes[i]).sign_shares(1, app_id, int(time.time()), [])
    keys = {_ask(nodes[5], app_id)}  # the next request, at a member that holds nothing
    keys |= {_ask(m, app_id) for m in nodes.values()}
    sharing = _one_sharing_everywhere(nodes, app_id)
    assert len(keys) == 1 and keys == {tx.x25519_public_key(sharing).hex()}
    assert (sharing == a) == (k >= 3)


@pytest.mark.slow
def test_a_member_never_serves_partials_or_the_key_from_a_tentative_share(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """A sealed on members 1 and 2 (t - 1) and member 5 down (so neither A nor an orphan is provable: 2
    members answer without it, n - t + 1 = 3 are needed): member 1 answers no partial and no env key
    from A, and keeps it tentative; once member 5 is back, member 1's next need drops it."""
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name="two-phase-no-serve")))
    _partial_ceremony(nodes, app_id, [1, 2, 3, 4], [1, 2], [])
    url5 = _env(nodes[1]).peers.pop(5)
    point = tx.x25519_public_key(tx.dkg_local(2, 3)[0].commitments)
    with pytest.raises(AccessDenied, match="not settled"):
        _env(nodes[1]).partial(1, app_id, point)
    with pytest.raises(EnvKeyBusy, match="not settled"):
        nodes[1].service.env_encrypt_pubkey(app_id.hex())
    assert _env(nodes[1]).store.record(1, app_id)[1] is False  # type: ignore[index]
    _env(nodes[1]).peers[5] = url5
    with pytest.raises(AccessDenied, match="no env share of this app to recover"):
        _env(nodes[1]).partial(1, app_id, point)  # dropped (an orphan); nothing to recover yet
    assert _env(nodes[1]).store.record(1, app_id) is None


def _lying(m: Member, answer: Callable[[api.PeerEnvDkgRequest], api.PeerEnvDkgResponse | None]) -> None:
    env = _env(m)
    real = env.stage

    def stage(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        lie = answer(req) if req.stage == "held" else None
        return lie if lie is not None else real(req)

    env.stage = stage  # type: ignore[method-assign]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_generated_crash_points_and_a_lying_member_never_leave_two_served_keys(
    world: World, members_3of5: dict[int, Member], seed: int
) -> None:
    """Generated: which members got `commit` and `confirm` of ceremony A, and t - 1 = 2 liars answering
    `held` polls with A's commitments, another sharing's, or nothing, (tentative or not) at random. Then
    requests at every honest member. Whatever happens: an honest member answers only from a confirmed
    share, and all honest members that answer give the same key."""
    rng = random.Random(seed)
    nodes = members_3of5
    app_id = world.register(compose_hash(dict(HELLO, name=f"two-phase-gen{seed}")))
    dealers = sorted(rng.sample(range(1, 6), 4))
    commit_on = sorted(rng.sample(dealers, rng.randint(0, 4)))
    confirm_on = sorted(rng.sample(commit_on, rng.randint(0, len(commit_on))))
    a = _partial_ceremony(nodes, app_id, dealers, commit_on, confirm_on)
    liars = sorted(rng.sample(range(1, 6), 2))
    fake = tx.dkg_local(3, 5)[0].commitments
    for i in liars:
        _lying(
            nodes[i],
            lambda req, i=i: (
                api.PeerEnvDkgResponse(
                    index=i,
                    stage="held",
                    held=True,
                    commitments=[c.hex() for c in rng.choice([a, fake])],
                    tentative=rng.random() < 0.5,
                )
                if rng.random() < 0.8
                else api.PeerEnvDkgResponse(index=i, stage="held")
            ),
        )
    honest = [i for i in range(1, 6) if i not in liars]
    keys: dict[int, str] = {}
    for i in honest:
        try:
            keys[i] = _ask(nodes[i], app_id, tries=2)
        except (EnvKeyBusy, KmsUsageError, AccessDenied):
            continue
    for i in keys:  # answered only from its own confirmed share of that key
        share = _env(nodes[i]).store.get(1, app_id)
        assert share is not None and tx.x25519_public_key(share.commitments).hex() == keys[i]
    assert len(set(keys.values())) <= 1, (seed, dealers, commit_on, confirm_on, liars, keys)
