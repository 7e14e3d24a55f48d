"""Env keys that survive missing members (issue 19): a new app's env key is made by the members that are up
(ceremony_quorum of them), a member that was down or whose commit failed gets ITS share of that sharing
later by share recovery (keys.share_repair enrollment between attested members, kms.peering's rule), never
from a second ceremony; the rule each helper applies before it sends anything is attacked: replays, stale
and foreign sessions, another target, a non-member, a lying helper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import share_repair as sr
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys.envcrypt import decrypt_env_with_shared_secret, encrypt_env
from teecloud.kms import api
from teecloud.kms.client import connect_kms
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider
from teecloud.kms.threshold_env import EnvKeyBusy, EnvKeys, ceremony_quorum
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_threshold_env import T, env_files, members, pubkey
from tests.kms.test_threshold_net_peering import Member, client, start_member
from tests.kms.test_threshold_nodes import HELLO, boot_hello

pytestmark = pytest.mark.slow

__all__ = ["members"]  # the five-member fixture of test_threshold_env

Nodes = dict[int, Member]


def env(m: Member) -> EnvKeys:
    assert m.service.env_keys is not None
    return m.service.env_keys


def restart(home: Path, world: World, nodes: Nodes, i: int) -> None:
    """Member i's process ends and starts again: the same data directory (its sealed shares), a new
    boot-time peer identity, a new URL; nothing in memory survives."""
    nodes[i].server.stop()
    share = nodes[i].service.threshold._share  # type: ignore[union-attr]
    nodes[i] = start_member(home, world.chain, share, name="env")
    urls = {j: m.server.url for j, m in nodes.items()}
    for m in nodes.values():
        env(m).set_peers(urls)


def sharing_of(nodes: Nodes, app_id: bytes) -> dict[int, tuple[bytes, ...] | None]:
    out: dict[int, tuple[bytes, ...] | None] = {}
    for i, m in nodes.items():
        s = env(m).store.get(1, app_id)
        out[i] = None if s is None else s.commitments
    return out


def boot_from(
    home: Path, world: World, nodes: Nodes, which: list[int], signing_key: bytes, app_id: bytes
) -> Any:
    """A CVM of HELLO whose provider knows only the members `which` (so exactly those answer)."""
    pub = tx.x25519_public_key(next(c for c in sharing_of(nodes, app_id).values() if c is not None))
    blob = encrypt_env(pub, {"SECRET": "made while a member was down"})
    dev = SimulatedTdx(home)
    ev = nodes[which[0]].service.threshold
    assert ev is not None
    clients = {
        i: connect_kms(
            nodes[i].server.url,
            collateral_for=lambda _q, _n: dev.collateral(),
            dev_root_der=dev.dev_root_der(),
            expected_ca_pubkey_der=nodes[i].service.keys.ca_public_key_der,
        )
        for i in which
    }
    group = ThresholdGroup(1, T, ev.commitments, {i: nodes[i].server.url for i in which}, signing_key)
    provider = ThresholdKeyProvider(group, clients, hedge_s=60.0)
    provider.bind_encrypted_env(blob)
    boot_hello(home, world, provider, app_id=app_id)
    return decrypt_env_with_shared_secret(provider.env_shared_secret or b"", blob)


def test_quorum_is_stated() -> None:
    assert [ceremony_quorum(t, n) for t, n in ((1, 1), (2, 3), (3, 5), (4, 7), (2, 7), (5, 5), (2, 5))] == [
        1,
        3,
        4,
        5,
        6,
        5,
        4,
    ]


def test_every_quorum_meets_every_t_holders_and_every_other_quorum() -> None:
    """The quorum's three bounds for every committee size the code allows: a quorum intersects every set of
    t members (q + t > n: no second sharing among non-holders of a usable one, R7-1), every other quorum
    (a majority), and exceeds t where the committee allows (durability)."""
    for n in range(1, 65):
        for t in range(1, n + 1):
            q = ceremony_quorum(t, n)
            assert q + t > n and 2 * q > n and q >= min(n, t + 1) and q <= n, (t, n, q)


def test_a_new_key_with_a_member_down_and_that_member_recovers_its_share_at_a_boot(
    teecloud_home: Path, world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, signing_key = members
    app_id = world.register(compose_hash(HELLO))
    nodes[5].server.stop()  # down
    first = pubkey(nodes[1], app_id)  # a ceremony among members 1..4 (the quorum at 3-of-5 is 4)
    files = env_files(nodes)
    assert all(len(files[i]) == 1 for i in (1, 2, 3, 4)) and files[5] == []
    restart(teecloud_home, world, nodes, 5)
    # a boot that asks members 3, 4, 5: member 5 has no share, recovers it from t of the holders (1..4),
    # checks it against the commitments they agree on, seals it, and answers its partial; the env decrypts
    assert boot_from(teecloud_home, world, nodes, [3, 4, 5], signing_key, app_id) == {
        "SECRET": "made while a member was down"
    }
    shared = sharing_of(nodes, app_id)
    assert len(set(shared.values())) == 1 and shared[5] is not None  # the same sharing, one more holder
    assert tx.x25519_public_key(shared[5]) == bytes.fromhex(first.public_key)
    rec = [r for r in nodes[5].service.audit.read() if r.endpoint == api.PATH_THRESHOLD_ENV_PARTIAL]
    assert [r.decision for r in rec] == ["allowed"]
    helpers = [
        i
        for i in (1, 2, 3, 4)
        if any(
            r.endpoint == api.PATH_PEER_ENV_RECOVER and r.decision == "allowed" and "member 5" in r.reason
            for r in nodes[i].service.audit.read()
        )
    ]
    assert len(helpers) == T


def test_with_two_of_five_down_no_new_key_is_made_and_existing_keys_are_served(
    world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    old = world.register(compose_hash(dict(HELLO, name="before")))
    before = pubkey(nodes[1], old).public_key
    nodes[4].server.stop()
    nodes[5].server.stop()
    fresh = world.register(compose_hash(dict(HELLO, name="after")))
    with pytest.raises(EnvKeyBusy, match=r"needs 4 of 5 members, 3 answered"):
        pubkey(nodes[1], fresh)
    assert all(not any(fresh.hex() in f for f in fs) for fs in env_files(nodes).values())
    assert all(not env(nodes[i])._open for i in (1, 2, 3))  # the dealings were dropped
    assert pubkey(nodes[2], old).public_key == before


def test_repair_after_a_member_is_killed_between_commit_on_the_others_and_commit_on_it(
    teecloud_home: Path, world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, signing_key = members
    app_id = world.register(compose_hash(HELLO))
    env4 = env(nodes[4])
    real = env4.stage
    dead = {"yes": False}

    def killed_at_commit(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.stage == "commit":
            dead["yes"] = True
        if dead["yes"]:  # the process is gone: it answers nothing from here on
            raise KmsClientError("connection refused (member 4 killed)")
        return real(req)

    env4.stage = killed_at_commit  # type: ignore[method-assign]
    first = pubkey(nodes[2], app_id).public_key  # the request succeeds: the sharing exists on 1, 2, 3, 5
    files = env_files(nodes)
    assert files[4] == [] and all(len(files[i]) == 1 for i in (1, 2, 3, 5))
    restart(teecloud_home, world, nodes, 4)
    # the first thing that needs member 4's share repairs it from the others (no new dealing anywhere):
    # here a boot that asks members 2, 4 and 5
    assert boot_from(teecloud_home, world, nodes, [2, 4, 5], signing_key, app_id) == {
        "SECRET": "made while a member was down"
    }
    shared = sharing_of(nodes, app_id)
    assert len(set(shared.values())) == 1 and all(c is not None for c in shared.values())
    assert tx.x25519_public_key(shared[4]) == bytes.fromhex(first)  # type: ignore[arg-type]
    assert all(len(f) == 1 for f in env_files(nodes).values())
    # and a ceremony request on member 4 now finds its share: the same key, no ceremony
    assert env(nodes[4]).store.get(1, app_id) is not None
    assert pubkey(nodes[1], app_id).public_key == first


def _split(c: Any, app_id: bytes, helpers: list[int], session: str = "a1" * 16, epoch: int = 1) -> Any:
    return c.peer_call(
        api.PATH_PEER_ENV_RECOVER,
        api.PeerEnvRecoverResponse,
        {"stage": "split", "session": session, "epoch": epoch, "app_id": app_id.hex(), "helpers": helpers},
    )


def test_the_helper_rule_refuses_replays_stale_and_foreign_sessions_and_other_targets(
    teecloud_home: Path, world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    app_a = world.register(compose_hash(dict(HELLO, name="rule-a")))
    app_b = world.register(compose_hash(dict(HELLO, name="rule-b")))
    pubkey(nodes[1], app_a)
    pubkey(nodes[1], app_b)
    m5_to_2 = client(nodes[5], nodes[2])
    # a replayed split (same session) is refused, even by the same target
    ans = _split(m5_to_2, app_a, [1, 2, 3])
    assert set(ans.split) == {"1", "2", "3"} and len(ans.commitments) == T
    with pytest.raises((KmsDenied, KmsClientError), match="already used"):
        _split(m5_to_2, app_a, [1, 2, 3])
    # the view of that session for ANOTHER app or epoch: refused (no such recovery for it)
    table = {"1": ans.split, "2": ans.split, "3": ans.split}
    for other in ({"app_id": app_b.hex(), "epoch": 1}, {"app_id": app_a.hex(), "epoch": 2}):
        with pytest.raises((KmsDenied, KmsClientError), match="no open share recovery"):
            m5_to_2.peer_call(
                api.PATH_PEER_ENV_RECOVER,
                api.PeerEnvRecoverResponse,
                {"stage": "view", "session": "a1" * 16, "helpers": [1, 2, 3], "table": table, **other},
            )
    # a split for an epoch this node does not serve, helpers including the target, or not t of them
    for helpers, epoch, match in (
        ([1, 2, 3], 2, "serves no root epoch 2"),
        ([2, 3, 5], 1, "not the target"),
        ([2, 3], 1, "exactly t = 3"),
        ([2, 3, 4, 1], 1, "exactly t = 3"),
        ([1, 3, 4], 1, "this one among them"),
    ):
        with pytest.raises((KmsDenied, KmsClientError), match=match):
            _split(m5_to_2, app_a, helpers, session=f"{epoch:02x}" * 8 + "b" * 16, epoch=epoch)
    # another member (a helper, not the target) cannot drive the target's recovery nor take the sum
    with pytest.raises((KmsDenied, KmsClientError), match="not the target of this recovery"):
        client(nodes[3], nodes[2]).peer_call(
            api.PATH_PEER_ENV_RECOVER,
            api.PeerEnvRecoverResponse,
            {
                "stage": "view",
                "session": "a1" * 16,
                "epoch": 1,
                "app_id": app_a.hex(),
                "helpers": [1, 2, 3],
                "table": table,
            },
        )
    # the target cannot fetch a helper's piece (pieces go to the other helpers only)
    with pytest.raises((KmsDenied, KmsClientError), match="not another helper"):
        m5_to_2.peer_call(
            api.PATH_PEER_ENV_PIECE, api.PeerEnvPieceResponse, {"session": "a1" * 16, "view_hash": "0" * 64}
        )
    # a table that alters the helper's own split: refused and the recovery dropped (stale from then on)
    bad_row = dict(ans.split)
    bad_row["1"], bad_row["2"] = ans.split["2"], ans.split["1"]
    with pytest.raises((KmsDenied, KmsClientError), match="alters this helper's own split"):
        m5_to_2.peer_call(
            api.PATH_PEER_ENV_RECOVER,
            api.PeerEnvRecoverResponse,
            {
                "stage": "view",
                "session": "a1" * 16,
                "epoch": 1,
                "app_id": app_a.hex(),
                "helpers": [1, 2, 3],
                "table": {**table, "2": bad_row},
            },
        )
    for stage in ("view", "sum"):
        with pytest.raises((KmsDenied, KmsClientError), match="no open share recovery"):
            m5_to_2.peer_call(
                api.PATH_PEER_ENV_RECOVER,
                api.PeerEnvRecoverResponse,
                {
                    "stage": stage,
                    "session": "a1" * 16,
                    "epoch": 1,
                    "app_id": app_a.hex(),
                    "helpers": [1, 2, 3],
                    "table": table,
                },
            )
    # a stale (expired) recovery: the window passed
    _split(m5_to_2, app_a, [1, 2, 3], session="c3" * 16)
    env2 = env(nodes[2])
    real_clock = env2._clock
    env2._clock = lambda: real_clock() + 10_000  # type: ignore[method-assign]
    try:
        with pytest.raises((KmsDenied, KmsClientError), match="no open share recovery"):
            m5_to_2.peer_call(
                api.PATH_PEER_ENV_RECOVER,
                api.PeerEnvRecoverResponse,
                {
                    "stage": "view",
                    "session": "c3" * 16,
                    "epoch": 1,
                    "app_id": app_a.hex(),
                    "helpers": [1, 2, 3],
                    "table": table,
                },
            )
    finally:
        env2._clock = real_clock  # type: ignore[method-assign]
    # a member whose sharing is complete recovers the same share it holds (nothing new to learn), and
    # sealed files are never replaced
    before = (env(nodes[5]).store.dir / f"1-{app_a.hex()}.sealed").read_bytes()
    held = env(nodes[5]).store.get(1, app_a)
    assert held is not None
    got = env(nodes[5])._recover_from(1, app_a, held.commitments, [1, 2, 3])
    assert got == held
    assert (env(nodes[5]).store.dir / f"1-{app_a.hex()}.sealed").read_bytes() == before


def test_a_non_member_cannot_ask_for_a_recovery_nor_a_piece(
    teecloud_home: Path, world: World, members: tuple[Nodes, bytes]
) -> None:
    """An allowed KMS build, booted properly, holding a share of ANOTHER committee (same t, n, epoch and
    index 5): it asks for "its own" recovery; and a build KmsAuth does not list holding a genuine share."""
    nodes, _ = members
    app_id = world.register(compose_hash(dict(HELLO, name="outsider")))
    pubkey(nodes[1], app_id)
    stranger = start_member(teecloud_home, world.chain, local_joint_feldman(T, 5, epoch=1)[4], name="rs")
    genuine = nodes[4].service.threshold._share  # type: ignore[union-attr]
    rogue = start_member(teecloud_home, world.chain, genuine, build="recovery-rogue-build", name="rr")
    try:
        for who, step in ((stranger, "membership"), (rogue, "chain")):
            c = client(who, nodes[1])
            for path, model, body in (
                (
                    api.PATH_PEER_ENV_RECOVER,
                    api.PeerEnvRecoverResponse,
                    {
                        "stage": "split",
                        "session": "d4" * 16,
                        "epoch": 1,
                        "app_id": app_id.hex(),
                        "helpers": [1, 2, 3],
                    },
                ),
                (
                    api.PATH_PEER_ENV_PIECE,
                    api.PeerEnvPieceResponse,
                    {"session": "d4" * 16, "view_hash": "0" * 64},
                ),
            ):
                with pytest.raises((KmsDenied, KmsClientError)) as err:
                    c.peer_call(path, model, body)
                assert step in str(err.value) or getattr(err.value, "step", "") == step, (path, err.value)
        assert not env(nodes[1])._recoveries
    finally:
        stranger.server.stop()
        rogue.server.stop()


def test_a_lying_helper_is_named_and_the_recovery_completes_from_others(
    teecloud_home: Path, world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    app_id = world.register(compose_hash(dict(HELLO, name="liar")))
    nodes[5].server.stop()
    pubkey(nodes[1], app_id)
    restart(teecloud_home, world, nodes, 5)
    env1 = env(nodes[1])
    real = env1.serve_recover

    def lie(node: Any, req: api.PeerEnvRecoverRequest) -> api.PeerEnvRecoverResponse:
        ans = real(node, req)
        if req.stage == "split":  # a split of another value, self-consistent commitments
            g = tx.EDWARDS25519
            other = (g.base_mul(2), g.base_mul(2), g.base_mul(3))  # f = 2 + 2x + 3x^2: f(1) = 7
            fake = sr.repair_split(g, other, 1, 7, req.helpers, node.index)
            ans.split = {str(j): d.hex() for j, d in fake.commitments.items()}
        return ans

    env1.serve_recover = lie  # type: ignore[method-assign]
    with env(nodes[5])._app_lock(1, app_id):
        share = env(nodes[5]).recover(1, app_id)
    shared = sharing_of(nodes, app_id)
    assert share.commitments == shared[2] and len(set(shared.values())) == 1
    # member 1 split once (the attempt it spoiled); the second attempt asked members 2, 3 and 4

    def splits(i: int) -> int:
        return sum(
            r.endpoint == api.PATH_PEER_ENV_RECOVER and "step split for member 5" in r.reason
            for r in nodes[i].service.audit.read()
        )

    assert [splits(i) for i in (1, 2, 3, 4)] == [1, 2, 2, 1]
