"""Review 9: R8-1's fix (a ceremony that fails at `view`/`finish` is tried again at once without the member at
fault, or the dealer a finishing member names) against one lying member.

Held: an error text of the liar's choosing (naming the coordinator, itself, a member out of range, a number
of 300 digits, non-ASCII digits, several `node N:` fragments, a prefix before the pattern) never leaves more
than one honest member out, and the liar is out by its second try (generated texts, the loop driven through
`EnvKeys._leave_out` as `_ceremony_run` drives it).

FINDING R9-1 (fixed on r9-fix, `_smallest_cover`): a withholder that withholds its sub-share from ONE honest
member and names that member in its own `finish` made an accusation nobody could tell from the honest one:
both were left out, which at 3-of-5 left 3 < q = 4 dealers, so the request ended in a 503 at once, and every
new app's every request did the same (R8-1's symptom back, with one member).

FINDING R9-2 (fixed on r9-fix, `_Withheld` for the member that differs): a member that answers `finish` (or
`view`) with a success carrying other commitments (or another view hash) was not a `_Withheld`: the ceremony
aborted with KmsUsageError, nobody was left out, and the
next request deals it in again (R8-1's symptom through the stages' success answers)."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.threshold_env import EnvKeyBusy, EnvKeys, _Withheld, ceremony_quorum
from tests.kms._threshold_env_world import env_of as _env
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

LIAR = 5
T, N = 3, 5


def _honest(member: int, dealer: int) -> str:
    """An honest member's failed finish as the coordinator's `_each` records it (as logged in the run of
    the test below: the prefix `_all` adds, the client's refusal, the member's own `the ceremony fails
    here` and its ThresholdEcdhError naming the dealer)."""
    return (
        f"member {member}: env-key ceremony stage finish: KMS denied the request: peer {member} refused: "
        f"member {member}: the ceremony fails here: node {dealer}: sub-share not obtained: KMS denied the "
        f"request: peer {dealer} refused: sub-share withheld (step round) (step request)"
    )[:300]


def _texts(rng: random.Random, coordinator: int) -> list[str]:
    """Failed-finish texts of the liar's choosing: fragments naming any number, spellings of numbers, junk
    around them, all cut at 300 characters as `_each` keeps them."""
    names = [str(rng.randint(-3, 9)), "0", str(coordinator), str(LIAR), "9" * 300, "٣", "０3", "03", "4" * 40]
    out = []
    for _ in range(6):
        parts = []
        for _ in range(rng.randint(1, 3)):
            n = rng.choice([*names, str(rng.randint(1, 4))])
            pre = rng.choice(["", "x" * rng.randint(0, 280), "é\u202e", "member 2: ", "node 3: "])
            parts.append(f"{pre}the ceremony fails here: node {n}: " + rng.choice(["", "z" * 50, "node 1: "]))
        out.append(f"member {LIAR}: env-key ceremony stage finish: HTTP 400: " + "".join(parts))
    return [s[:300] for s in out]


@pytest.mark.parametrize("seed", range(8))
def test_a_liars_error_texts_leave_out_at_most_one_honest_member_and_then_the_liar(seed: int) -> None:
    """The liar fails every `finish` with a generated text (one per try); honest members finish. Driven as
    `_ceremony_run` does (one shared `left_out`/`accused` per request, a try per failure): while the liar
    is dealt in, at most one honest member is out, and within two tries the liar itself is out and every
    honest member is back, so the next try runs on members 1..4 (q = 4)."""
    rng = random.Random(seed)
    for coordinator in range(1, N):
        for text_a, text_b in zip(_texts(rng, coordinator), _texts(rng, coordinator), strict=True):
            me = SimpleNamespace(index=coordinator, n=N)
            left_out: dict[int, str] = {}
            accused: dict[int, set[int]] = {}
            for text in (text_a, text_b):
                if LIAR in left_out:
                    break
                EnvKeys._leave_out(me, _Withheld("finish", {LIAR: text}), left_out, accused)  # type: ignore[arg-type]
                honest_out = [i for i in left_out if i != LIAR]
                assert len(honest_out) <= 1, (text, left_out)
                assert coordinator not in left_out
            assert set(left_out) == {LIAR}, (text_a, text_b, left_out)


def test_an_honest_accusation_is_read_from_the_answers_field_not_from_the_dealers_text() -> None:
    """The withholder's own error text is embedded after `node 5:` in the honest member's reason; a fragment
    naming member 3 inside it does not move the accusation (since r8-fix2 the dealer is the answer's
    structured `accused` field, never parsed from text)."""
    reason = _honest(2, LIAR).replace("sub-share withheld", "the ceremony fails here: node 3: x")
    left_out: dict[int, str] = {}
    failed = _Withheld("finish", {2: reason}, {2: LIAR})
    EnvKeys._leave_out(SimpleNamespace(index=1, n=N), failed, left_out, {})  # type: ignore[arg-type]
    assert set(left_out) == {LIAR}


@pytest.mark.parametrize("coordinator", range(1, N))
def test_a_mutual_accusation_leaves_a_quorum_or_only_one_of_the_two_out(coordinator: int) -> None:
    """Generated over coordinators and victims: the liar withholds its sub-share from honest member v only (v
    names the liar) and names v. The safe behaviour: the next try still has q dealers."""
    me = SimpleNamespace(index=coordinator, n=N)
    for victim in [v for v in range(1, N) if v != coordinator]:
        left_out: dict[int, str] = {}
        failed = {victim: _honest(victim, LIAR), LIAR: _honest(LIAR, victim)}
        names = {victim: LIAR, LIAR: victim}  # the answers' `accused` fields (r8-fix2)
        EnvKeys._leave_out(me, _Withheld("finish", failed, names), left_out, {})  # type: ignore[arg-type]
        assert N - len(left_out) >= ceremony_quorum(T, N), (victim, left_out)


def test_two_colluders_at_3_of_7_cannot_leave_fewer_than_q_by_naming_their_victims() -> None:
    """3-of-7, q = 5: two colluders (6, 7) could not block by refusing to deal (five honest members are a
    quorum). Each withholds its sub-share from one honest member (1, 2) and names it: four members are left
    out, three remain. Safe: the next try still has q dealers."""
    left_out: dict[int, str] = {}
    failed = {1: _honest(1, 6), 6: _honest(6, 1), 2: _honest(2, 7), 7: _honest(7, 2)}
    names = {1: 6, 6: 1, 2: 7, 7: 2}  # the answers' `accused` fields (r8-fix2)
    EnvKeys._leave_out(SimpleNamespace(index=4, n=7), _Withheld("finish", failed, names), left_out, {})  # type: ignore[arg-type]
    assert 7 - len(left_out) >= ceremony_quorum(3, 7), left_out


def _key_after_retries(m: Member, app_id: bytes, tries: int = 6) -> tuple[str | None, str]:
    last = ""
    for _ in range(tries):
        try:
            return m.service.env_encrypt_pubkey(app_id.hex()).public_key, ""
        except (EnvKeyBusy, KmsUsageError, AccessDenied) as exc:
            last = str(exc)
            time.sleep(0.2)
    return None, last


@pytest.mark.slow
def test_one_member_withholding_from_one_member_and_naming_it_does_not_block_new_env_keys(
    world: World, members_3of5: dict[int, Member]
) -> None:
    """The attacker's steps: member 5 deals honestly, refuses its sub-share to member 3 only (members 1, 2, 4
    get theirs), and answers its own `finish` naming member 3 (`accused`: 3) as the dealer that withheld.
    Members 1..4 are honest and up (q = 4). A client asks member 1 for a new app's env key six times."""
    nodes = members_3of5
    env5 = _env(nodes[LIAR])
    real_stage, real_serve = env5.stage, env5.serve_share

    def lying_stage(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.stage == "finish":  # names member 3 in its answer's `accused` field (r8-fix2's structure)
            return api.PeerEnvDkgResponse(index=LIAR, stage="finish", accused=3)
        return real_stage(req)

    def lying_serve(node, req):  # type: ignore[no-untyped-def]
        if node.index == 3:
            raise AccessDenied("sub-share withheld", step="round")
        return real_serve(node, req)

    env5.stage = lying_stage  # type: ignore[method-assign]
    env5.serve_share = lying_serve  # type: ignore[method-assign]
    app_id = world.register(compose_hash(dict(HELLO, name="r9-mutual-accusation")))
    key, last = _key_after_retries(nodes[1], app_id)
    assert key is not None, f"no env key for a new app while 4 honest members (q = 4) are up: {last}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["view", "finish"])
def test_one_member_answering_a_stage_with_other_values_does_not_block_new_env_keys(
    world: World, members_3of5: dict[int, Member], stage: str
) -> None:
    """The attacker's steps: member 5 deals honestly and runs every stage, but its `view` answer carries
    another view hash, or its `finish` answer other commitments (a fresh dealing's). A client asks member 1
    for a new app's env key six times."""
    nodes = members_3of5
    env5 = _env(nodes[LIAR])
    real = env5.stage
    other = [c.hex() for c in tx.dkg_local(T, N)[0].commitments]

    def lying(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        out = real(req)
        if req.stage == stage == "view":
            out.view_hash = "00" * 32
        if req.stage == stage == "finish":
            out.commitments = other
        return out

    env5.stage = lying  # type: ignore[method-assign]
    app_id = world.register(compose_hash(dict(HELLO, name=f"r9-other-values-{stage}")))
    key, last = _key_after_retries(nodes[1], app_id)
    assert key is not None, f"no env key for a new app while 4 honest members (q = 4) are up: {last}"
