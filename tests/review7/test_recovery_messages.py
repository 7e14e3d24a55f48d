"""Review 7: generated mutations of share-recovery messages from a genuine member (PeerEnvRecover split /
view / sum, PeerEnvPiece) around the attacker's exact steps — naming another target, a helper set that
leaves the helper out or holds the target, replaying a session under another app or epoch, a view or sum
from a second process of the target's index, a helper fetching another helper's piece twice. HELD: each is
a clear refusal (never a 500), no recovery is opened by a refused split, and no secret leaves a helper."""

from __future__ import annotations

import random
from typing import Any

import pytest

from teecloud.appcompose import compose_hash
from teecloud.kms import api
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.threshold_env import RECOVERIES_PER_MINUTE, RECOVERIES_PER_TARGET, EnvKeys
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member, client
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow

Nodes = dict[int, Member]


def _env(m: Member) -> EnvKeys:
    assert m.service.env_keys is not None
    return m.service.env_keys


def _call(src: Member, dst: Member, body: dict[str, Any]) -> api.PeerEnvRecoverResponse:
    return client(src, dst).peer_call(api.PATH_PEER_ENV_RECOVER, api.PeerEnvRecoverResponse, body)


def _mutations(base: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {**base, "target": 1},  # naming another target: not a field (the target is the caller)
        {**base, "index": 1},
        {**base, "helpers": [1, 2, 5]},  # the caller among the helpers
        {**base, "helpers": [2, 3, 4]},  # this helper left out
        {**base, "helpers": [1, 1, 2]},
        {**base, "helpers": [0, 1, 2]},
        {**base, "helpers": [1, 2, 6]},
        {**base, "helpers": [1, 2, 2**70]},
        {**base, "helpers": [1, 2]},
        {**base, "helpers": list(range(1, 65))},
        {**base, "helpers": []},
        {**base, "epoch": 0},
        {**base, "epoch": 2},
        {**base, "epoch": "1"},
        {**base, "app_id": base["app_id"][:-2]},
        {**base, "app_id": base["app_id"].upper()},
        {**base, "stage": "piece"},
        {**base, "session": "zz" * 16},
        {k: v for k, v in base.items() if k != "helpers"},
        {k: v for k, v in base.items() if k != "session"},
    ]
    for _ in range(10):
        body = dict(base)
        body["helpers"] = rng.sample(range(0, 8), rng.randrange(0, 5))
        hs = set(body["helpers"])
        if len(hs) == 3 and 1 in hs and 5 not in hs and hs <= {1, 2, 3, 4}:  # a valid set: make it not
            body["helpers"] = [*body["helpers"], 5]
        out.append(body)
    return out


def test_mutated_split_requests_are_refused_and_open_nothing(
    world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    rng = random.Random(7)
    app = world.register(compose_hash(dict(HELLO, name="review7-recovery-mutations")))
    nodes[1].service.env_encrypt_pubkey(app.hex())  # the sharing, on all five
    base = {"stage": "split", "session": "e7" * 16, "epoch": 1, "app_id": app.hex(), "helpers": [1, 2, 3]}
    for i, body in enumerate(_mutations(base, rng)):
        if "session" in body and body["session"] == base["session"]:
            body["session"] = f"{i:04x}" * 8
        with pytest.raises((KmsDenied, KmsClientError)) as err:
            _call(nodes[5], nodes[1], body)
        assert "500" not in str(err.value) and "Internal" not in str(err.value), (body, err.value)
        assert not _env(nodes[1])._recoveries, body
    # the genuine split still works afterwards (the refusals above are not a blanket no)
    ok = _call(nodes[5], nodes[1], base)
    assert set(ok.split) == {"1", "2", "3"}


def test_a_recovery_is_driven_only_by_its_target_and_pieces_go_once_to_the_other_helpers(
    world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    app = world.register(compose_hash(dict(HELLO, name="review7-recovery-drive")))
    nodes[1].service.env_encrypt_pubkey(app.hex())
    session = "f8" * 16
    base = {"session": session, "epoch": 1, "app_id": app.hex(), "helpers": [1, 2, 3]}
    splits = {h: _call(nodes[5], nodes[h], {**base, "stage": "split"}) for h in (1, 2, 3)}
    table = {str(h): s.split for h, s in splits.items()}
    views = {h: _call(nodes[5], nodes[h], {**base, "stage": "view", "table": table}) for h in (1, 2, 3)}
    assert len({v.view_hash for v in views.values()}) == 1
    view_hash = views[1].view_hash
    piece = {"session": session, "view_hash": view_hash}
    # member 4 (a member, not a helper of this recovery) and the target itself get no piece
    for who in (4, 5):
        with pytest.raises((KmsDenied, KmsClientError), match="not another helper"):
            client(nodes[who], nodes[1]).peer_call(api.PATH_PEER_ENV_PIECE, api.PeerEnvPieceResponse, piece)
    # helper 2 takes its piece from helper 1 once; a second fetch (a replay, or to learn it again) is refused
    got = client(nodes[2], nodes[1]).peer_call(api.PATH_PEER_ENV_PIECE, api.PeerEnvPieceResponse, piece)
    assert got.helper == 1
    with pytest.raises((KmsDenied, KmsClientError), match="already handed out"):
        client(nodes[2], nodes[1]).peer_call(api.PATH_PEER_ENV_PIECE, api.PeerEnvPieceResponse, piece)
    # a wrong table hash: refused
    with pytest.raises((KmsDenied, KmsClientError), match="differs"):
        client(nodes[3], nodes[1]).peer_call(
            api.PATH_PEER_ENV_PIECE, api.PeerEnvPieceResponse, {**piece, "view_hash": "0" * 64}
        )
    # the sum goes only to the target: a helper (3) or another member (4) asking helper 1 for it is refused
    for who in (3, 4):
        with pytest.raises((KmsDenied, KmsClientError), match="not the target"):
            _call(nodes[who], nodes[1], {**base, "stage": "sum", "table": table})


def test_one_member_cannot_use_up_a_helpers_recovery_budget_for_everyone(
    world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    app = world.register(compose_hash(dict(HELLO, name="review7-recovery-budget")))
    nodes[1].service.env_encrypt_pubkey(app.hex())
    budget = RECOVERIES_PER_MINUTE
    for k in range(budget):  # member 5 asks for "its own" share again and again (fresh sessions)
        body = {
            "stage": "split",
            "session": f"{k:04x}" * 8,
            "epoch": 1,
            "app_id": app.hex(),
            "helpers": [1, 2, 3],
        }
        if k < RECOVERIES_PER_TARGET:
            _call(nodes[5], nodes[1], body)
            continue
        # past its own budget (R7-4's fix): a 503 retry (for member 5 only: see member 4 below)
        with pytest.raises(KmsClientError, match="503"):
            _call(nodes[5], nodes[1], body)
    # member 4, lacking nothing here but standing for a member that lacks its share, asks helper 1 once
    ok = _call(
        nodes[4],
        nodes[1],
        {"stage": "split", "session": "ab" * 16, "epoch": 1, "app_id": app.hex(), "helpers": [1, 2, 3]},
    )
    assert set(ok.split) == {"1", "2", "3"}


def test_the_node_wide_recovery_budget_still_caps_all_targets_together(
    world: World, members: tuple[Nodes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """R7-4's fix keeps the node-wide cap: the per-target budgets sum past it, the node still stops there."""
    nodes, _ = members
    monkeypatch.setattr("teecloud.kms.threshold_env.RECOVERIES_PER_MINUTE", RECOVERIES_PER_TARGET + 1)
    app = world.register(compose_hash(dict(HELLO, name="review7-recovery-node-budget")))
    nodes[1].service.env_encrypt_pubkey(app.hex())

    def split(who: int, session: str, helpers: list[int]) -> api.PeerEnvRecoverResponse:
        body = {"stage": "split", "session": session, "epoch": 1, "app_id": app.hex(), "helpers": helpers}
        return _call(nodes[who], nodes[1], body)

    for k in range(RECOVERIES_PER_TARGET):
        split(5, f"{k:04x}" * 8, [1, 2, 3])
    assert set(split(4, "ab" * 16, [1, 2, 3]).split) == {"1", "2", "3"}  # member 4's own budget
    with pytest.raises(KmsClientError, match="503"):  # member 3's budget is untouched, the node's is spent
        split(3, "cd" * 16, [1, 2, 4])
