"""Review 11: r9-fix (R9-1/R9-2) — who a failed env ceremony leaves out, against a dealer whose `deal`
answer the relayed view then breaks for everyone.

`_ceremony_once` takes each `deal` answer's commitments into the view unchecked. A view holding one dealer's
list of t − 1 (or t + 1) points is refused by EVERY member, the coordinator included ("view: t commitments
of each of at least q ..."), so `_leave_out` sees this node failing its own stage and ends the request
(KmsUsageError); nobody is left out and the next request deals the same member in again.

FINDING R11-2 (fixed in r11-fix): member 5 answering every `deal` with t − 1 genuine points (or t + 1) blocks
every new app's env key while four honest members (q = 4) are up (R8-1/R9-2's symptom through the deal
answer). Held (control): a dealing of t points that are not the dealer's (its sub-shares then fail to
verify) is named by the finishing members and left out.

Minimal fix: in `_ceremony_once`, a `deal` answer that is not `held` and does not carry exactly t
commitments (valid points) is that member's failure (left out of the view as a down member, or
`_Withheld("deal", {i: ...})`)."""

from __future__ import annotations

import time

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.threshold_env import EnvKeyBusy
from tests.kms._threshold_env_world import env_of
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


def _deal_with(m: Member, commitments: list[str]) -> None:
    """Member m answers `deal` with these commitments (its dealing otherwise real: it still serves its own
    sub-shares, which then do not match)."""
    env = env_of(m)
    real = env.stage

    def deal(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        out = real(req)
        if req.stage == "deal" and not out.held:
            return api.PeerEnvDkgResponse(index=out.index, stage="deal", commitments=commitments)
        return out

    env.stage = deal  # type: ignore[method-assign]


def test_control_a_dealing_under_other_commitments_is_named_and_left_out(
    world: World, members_3of5: dict[int, Member]
) -> None:
    nodes = members_3of5
    other = [c.hex() for c in tx.dkg_local(3, 5)[0].commitments]
    _deal_with(nodes[LIAR], other)
    app_id = world.register(compose_hash(dict(HELLO, name="r11-other-commitments")))
    key, last = _key_after_retries(nodes[1], app_id)
    assert key is not None, last


@pytest.mark.parametrize("count", [2, 4])
def test_a_dealing_of_the_wrong_length_does_not_block_a_new_apps_env_key(
    world: World, members_3of5: dict[int, Member], count: int
) -> None:
    """The attacker's steps: member 5 answers every `deal` with `count` valid points (t = 3); members 1..4
    honest and up. A client asks member 1, then member 2, six times each."""
    nodes = members_3of5
    points = [c.hex() for c in tx.dkg_local(4, 5)[0].commitments][:count]
    _deal_with(nodes[LIAR], points)
    app_id = world.register(compose_hash(dict(HELLO, name=f"r11-wrong-length-{count}")))
    key, last = _key_after_retries(nodes[1], app_id)
    if key is None:
        key, last = _key_after_retries(nodes[2], app_id)
    assert key is not None, f"no env key while 4 honest members (q = 4) are up: {last}"
