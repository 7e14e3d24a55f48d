"""Review 7, R7-3 (fixed): ONE member that falsely answers `held` to every `deal` stops every new app's env
key. The coordinator treats any `held` answer as "a sharing exists: repair, never a second sharing"; the
repair then needs t holders of one sharing, which a single liar never makes. The attacker's exact steps:
member 5 (a compromised member, t−1 = 2 are allowed) answers each deal with `held` and commitments of its
choosing. Safe behaviour: a claim no t members back does not block a ceremony among the members that deal
(at 3-of-5, members 1..4 are a quorum). The honest cases the fix keeps: a sharing committed on t or more
members is repaired, never replaced by a second one; a share committed on fewer than t members (an
orphan) stays on its member, which then signs and serves partials for no key but its own unusable one."""

from __future__ import annotations

from typing import Any

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api, threshold_env
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold_env import EnvKeyBusy, EnvKeys
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow

Nodes = dict[int, Member]


def _env(m: Member) -> EnvKeys:
    assert m.service.env_keys is not None
    return m.service.env_keys


def test_one_member_claiming_held_does_not_block_a_new_apps_env_key(
    world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    liar = _env(nodes[5])
    fake = tuple(tx._mul_base(k) for k in (5, 6, 7))
    real = liar.stage

    def lie(req: api.PeerEnvDkgRequest) -> Any:
        if req.stage in ("deal", "held"):
            return api.PeerEnvDkgResponse(
                index=5, stage=req.stage, held=True, commitments=[c.hex() for c in fake]
            )
        return real(req)

    liar.stage = lie  # type: ignore[method-assign]
    app = world.register(compose_hash(dict(HELLO, name="review7-lying-holder")))
    answers = {i: nodes[i].service.env_encrypt_pubkey(app.hex()).public_key for i in (1, 2, 3, 4)}
    assert len(set(answers.values())) == 1
    assert answers[1] != tx.x25519_public_key(fake).hex()


def _sharings(nodes: Nodes, app: bytes) -> dict[int, tuple[bytes, ...] | None]:
    out: dict[int, tuple[bytes, ...] | None] = {}
    for i, m in nodes.items():
        s = _env(m).store.get(1, app)
        out[i] = None if s is None else s.commitments
    return out


def test_a_sharing_committed_on_t_members_is_repaired_never_replaced(
    world: World, members: tuple[Nodes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit fails on members 4 and 5 (exactly t = 3 hold the sharing); a later request on member 4 finds
    three `held` answers with the same commitments: 4 and 5 recover their shares of THAT sharing. The
    ceremony quorum is lowered to 2 here, so that members 4 and 5 alone could deal: a rule that merely
    ignored `held` claims would make a second sharing among them, and this test would fail."""
    monkeypatch.setattr(threshold_env, "ceremony_quorum", lambda t, n: 2)
    nodes, _ = members
    down = {"yes": True}
    for i in (4, 5):
        real = _env(nodes[i]).stage

        def failing(req: api.PeerEnvDkgRequest, real: Any = real) -> Any:
            if down["yes"] and req.stage in ("commit", "recover"):
                if req.stage == "commit":  # the process loses its pending share (as a restart would)
                    real(req.model_copy(update={"stage": "abort"}))
                raise KmsClientError("connection refused (member down)")
            return real(req)

        _env(nodes[i]).stage = failing  # type: ignore[method-assign]
    app = world.register(compose_hash(dict(HELLO, name="review7-repair-t-holders")))
    first = nodes[1].service.env_encrypt_pubkey(app.hex()).public_key
    before = _sharings(nodes, app)
    assert before[4] is None and before[5] is None
    assert len({before[i] for i in (1, 2, 3)}) == 1
    down["yes"] = False
    assert nodes[4].service.env_encrypt_pubkey(app.hex()).public_key == first
    after = _sharings(nodes, app)
    assert set(after.values()) == {before[1]}  # every member: the first sharing, no second one
    assert nodes[5].service.env_encrypt_pubkey(app.hex()).public_key == first


def test_an_orphaned_share_is_left_out_and_serves_no_usable_key(
    world: World, members: tuple[Nodes, bytes]
) -> None:
    """Member 5 sealed a genuine share of a sharing no other member holds (a commit that reached it
    alone): the next request makes the group's sharing among 1..4 (the claim is left out), then has member
    5 poll again (review 8, R8-2): its orphan (4 members answer without it, the group's sharing has 4
    confirmed claimants) is dropped and member 5 recovers the group's sharing. So it signs for, and gives
    partials under, the group's key only."""
    nodes, _ = members
    app = world.register(compose_hash(dict(HELLO, name="review7-orphan")))
    orphan = tx.dkg_local(3, 5)[4]
    _env(nodes[5]).store.put(1, app, orphan)
    group = nodes[1].service.env_encrypt_pubkey(app.hex()).public_key
    assert group != tx.x25519_public_key(orphan.commitments).hex()
    shared = _sharings(nodes, app)
    assert len(set(shared.values())) == 1 and shared[5] != orphan.commitments
    commitments = shared[1]
    assert commitments is not None
    assert nodes[5].service.env_encrypt_pubkey(app.hex()).public_key == group
    # its partial is under the group's commitments now, and verifies
    eph = tx.x25519_public_key((tx._mul_base(7),))
    point = tx.strict_ephemeral_point(eph)
    answer = _env(nodes[5]).partial(1, app, eph)
    assert tuple(bytes.fromhex(c) for c in answer.commitments) == commitments
    p5 = tx.EcdhPartial(5, bytes.fromhex(answer.element), bytes.fromhex(answer.proof))
    assert tx.verify_partial(commitments, app, point, p5)


def test_a_claimant_left_out_is_named_when_the_rest_fall_short_of_the_quorum(
    world: World, members: tuple[Nodes, bytes]
) -> None:
    """Member 5 claims `held`, member 4 is down: three members deal (n − t + 1, so the claim is left out),
    fewer than q = 4: a 503 retry that names both, and nothing is sealed anywhere."""
    nodes, _ = members
    real5, real4 = _env(nodes[5]).stage, _env(nodes[4]).stage

    def lie(req: api.PeerEnvDkgRequest) -> Any:
        if req.stage in ("deal", "held"):
            return api.PeerEnvDkgResponse(index=5, stage=req.stage, held=True, commitments=["00" * 32] * 3)
        return real5(req)

    def down(req: api.PeerEnvDkgRequest) -> Any:
        raise KmsClientError("connection refused (member 4 down)")

    _env(nodes[5]).stage = lie  # type: ignore[method-assign]
    _env(nodes[4]).stage = down  # type: ignore[method-assign]
    app = world.register(compose_hash(dict(HELLO, name="review7-claimant-named")))
    with pytest.raises(EnvKeyBusy, match=r"needs 4 of 5 members, 3 answered") as err:
        nodes[1].service.env_encrypt_pubkey(app.hex())
    assert "member 5: claims `held`, left out" in str(err.value) and "member 4:" in str(err.value)
    assert all(_env(m).store.get(1, app) is None for m in nodes.values())
    assert all(not _env(nodes[i])._open for i in (1, 2, 3))  # the dealings were dropped
    _env(nodes[4]).stage = real4  # type: ignore[method-assign]
