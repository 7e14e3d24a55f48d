"""Review 7, R7-3 (open): ONE member that falsely answers `held` to every `deal` stops every new app's env
key. The coordinator treats any `held` answer as "a sharing exists: repair, never a second sharing"; the
repair then needs t holders of one sharing, which a single liar never makes. The attacker's exact steps:
member 5 (a compromised member, t−1 = 2 are allowed) answers each deal with `held` and commitments of its
choosing. Safe behaviour: a claim no t members back does not block a ceremony among the members that deal
(at 3-of-5, members 1..4 are a quorum)."""

from __future__ import annotations

from typing import Any

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.threshold_env import EnvKeys
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow

Nodes = dict[int, Member]


def _env(m: Member) -> EnvKeys:
    assert m.service.env_keys is not None
    return m.service.env_keys


@pytest.mark.xfail(
    strict=True,
    reason="R7-3 (open): a single member answering `held` (with commitments of its choosing) to every deal "
    "blocks every new app's env key (the coordinator repairs instead, and no t holders exist)",
)
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
