"""Review 4, area 2: parser strictness of the new fields (PeerMember, PeerHelloRequest, PeerRoundRequest) and
generated mutations around an accepted membership proof: every mutated byte or field is refused, at the
membership step, never as an internal error. Open findings are xfail(strict=True): a fix makes them XPASS
(a failure): then drop the marker."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from teecloud.keys import threshold as th
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold import ThresholdShare
from tests.kms.test_threshold_net_peering import Member
from tests.review4._attack import as_member, client_cert_der, post_as

Committee = tuple[dict[int, Member], list[ThresholdShare]]


def _admit(members: dict[int, Member], member: api.PeerMember) -> int:
    """Member 1's rule applied to member 2's genuine boot-time certificate with `member` as its proof."""
    m2 = members[2]
    cert = client_cert_der(members[1], m2.identity.key, m2.identity.evidence)
    return members[1].service.peering.admit(cert, member).index


def _refused(members: dict[int, Member], member: api.PeerMember) -> str:
    try:
        index = _admit(members, member)
    except AccessDenied as exc:
        return exc.step
    return f"admitted as {index}"


def _flip(hex_text: str, byte: int, bit: int = 0) -> str:
    raw = bytearray(bytes.fromhex(hex_text))
    raw[byte] ^= 1 << bit
    return raw.hex()


def test_every_mutated_byte_and_field_of_a_genuine_proof_is_refused(committee: Committee) -> None:
    members, _ = committee
    genuine = members[2].identity.member
    assert _admit(members, genuine) == 2
    mutants: list[api.PeerMember] = []
    for byte in range(32):
        for bit in (0, 7):
            mutants.append(genuine.model_copy(update={"element": _flip(genuine.element, byte, bit)}))
    for byte in range(64):
        for bit in (0, 7):
            mutants.append(genuine.model_copy(update={"proof": _flip(genuine.proof, byte, bit)}))
    mutants += [genuine.model_copy(update={"epoch": e}) for e in (0, 2, (1 << 32) - 1)]
    mutants += [genuine.model_copy(update={"index": i}) for i in (1, 3, 4, 5, 6, 64)]
    # element and proof swapped halves, the proof's (c, s) swapped, the identity element, all zeros
    p = genuine.proof
    mutants += [
        genuine.model_copy(update={"proof": p[64:] + p[:64]}),
        genuine.model_copy(update={"element": "00" * 32}),
        genuine.model_copy(update={"proof": "00" * 64}),
        genuine.model_copy(update={"element": members[3].identity.member.element}),
    ]
    steps = {_refused(members, m) for m in mutants}
    assert steps == {"membership"}, steps


def test_non_canonical_scalars_and_elements_are_refused(committee: Committee) -> None:
    """The same proof with c or s + L (the same value mod the group order) and the element with its
    top bit set (not a canonical ristretto255 encoding): refused, not read as the same."""
    members, _ = committee
    genuine = members[2].identity.member
    raw = bytes.fromhex(genuine.proof)
    c, s = int.from_bytes(raw[:32], "little"), int.from_bytes(raw[32:], "little")
    mutants = []
    if c + th.GROUP_ORDER < 1 << 256:
        mutants.append(((c + th.GROUP_ORDER).to_bytes(32, "little") + raw[32:]).hex())
    if s + th.GROUP_ORDER < 1 << 256:
        mutants.append((raw[:32] + (s + th.GROUP_ORDER).to_bytes(32, "little")).hex())
    assert mutants
    for proof in mutants:
        assert _refused(members, genuine.model_copy(update={"proof": proof})) == "membership"
    elem = bytearray(bytes.fromhex(genuine.element))
    elem[31] |= 0x80
    assert _refused(members, genuine.model_copy(update={"element": elem.hex()})) == "membership"


def _hello(members: dict[int, Member], member: dict[str, Any], **top: Any) -> tuple[int, dict[str, Any]]:
    key, cert = as_member(members[2], members[1])
    return post_as(members[1], key, cert, {"member": member, **top})


def test_a_genuine_hello_with_canonical_fields_is_admitted(committee: Committee) -> None:
    members, _ = committee
    status, body = _hello(members, members[2].identity.member.model_dump())
    assert status == 200 and body["index"] == 2, body


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"epoch": "1"}, id="epoch-as-string"),
        pytest.param({"epoch": True}, id="epoch-as-bool"),
        pytest.param({"index": 2.0}, id="index-as-float"),
        pytest.param({"index": "2"}, id="index-as-string"),
        pytest.param({"extra": "x"}, id="unknown-member-field"),
        pytest.param("upper", id="upper-case-hex"),
    ],
)
def test_non_canonical_member_fields_are_refused(committee: Committee, change: Any) -> None:
    """The same proof in non-canonical JSON: the safe outcome is a 400 `request` refusal (as for any field
    the API does not define), not an admission that read something else than what was sent."""
    members, _ = committee
    doc = members[2].identity.member.model_dump()
    if change == "upper":
        doc["element"] = doc["element"].upper()
        doc["proof"] = doc["proof"].upper()
    else:
        doc.update(change)
    status, body = _hello(members, doc)
    assert status == 400 and body["step"] == "request", body


def test_unknown_top_level_fields_are_refused(committee: Committee) -> None:
    members, _ = committee
    status, body = _hello(members, members[2].identity.member.model_dump(), index=5, admitted=True)
    assert status == 400 and body["step"] == "request", body


def test_member_field_bounds_are_refused_as_requests(committee: Committee) -> None:
    """Out-of-range and wrong-length fields: 400 at the request step, before any verification."""
    members, _ = committee
    genuine = members[2].identity.member.model_dump()
    for change in (
        {"epoch": -1},
        {"epoch": 1 << 32},
        {"index": 0},
        {"index": 65},
        {"element": genuine["element"][:-2]},
        {"element": genuine["element"] + "00"},
        {"proof": genuine["proof"][:-2]},
        {"proof": genuine["proof"] + "00"},
    ):
        status, body = _hello(members, {**genuine, **change})
        assert status == 400 and body["step"] == "request", (change, body)
    # hex-shaped but not lowercase hex, and whitespace inside: refused as requests too (R4-1's fix), never
    # an internal error
    for change in ({"element": "zz" * 32}, {"element": genuine["element"][:62] + " 1"}, {"proof": "é" * 128}):
        status, body = _hello(members, {**genuine, **change})
        assert status == 400 and body["step"] == "request", (change, body)


def test_generated_byte_mutations_of_the_hello_body_are_refused_or_read_the_same(
    committee: Committee,
) -> None:
    """The genuine PeerHello body as bytes on the wire; 120 generated single-byte mutations (fixed seed):
    each is refused (400 `request` / 403 `membership`) or admitted exactly as member 2 (e.g. a hex digit's
    case changed). Never a 500, never another index."""
    members, _ = committee
    key, cert = as_member(members[2], members[1])
    wire = json.dumps({"member": members[2].identity.member.model_dump()}, separators=(",", ":")).encode()
    status, body = post_as(members[1], key, cert, wire)
    assert status == 200 and body["index"] == 2, body
    rng = random.Random(4)
    outcomes: dict[str, int] = {}
    for _ in range(120):
        mutated = bytearray(wire)
        pos = rng.randrange(len(mutated))
        mutated[pos] = rng.choice([rng.randrange(256), mutated[pos] ^ 0x20, mutated[pos] ^ 0x01])
        if bytes(mutated) == wire:
            continue
        status, body = post_as(members[1], key, cert, bytes(mutated))
        if status == 200:
            assert body["index"] == 2 and body["member"]["index"] == 1, (bytes(mutated), body)
            outcome = "read the same"
        else:
            assert (status, body.get("step")) in ((400, "request"), (403, "membership")), (
                bytes(mutated),
                status,
                body,
            )
            outcome = f"{status} {body['step']}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("403 membership", 0) > 0 and outcomes.get("400 request", 0) > 0, outcomes
