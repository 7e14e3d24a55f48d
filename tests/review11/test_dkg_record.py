"""Review 11: t19-dkg (merged at 52a5192) — `teecloud up`'s first DKG opened with one member token per node
(`devstack.open_first_dkg`), the group it records from the nodes' stated commitments
(`devstack.first_dkg_group`, `kms.rotation.rotation_commitments` for `kms rotate-finish`), and a rotation's
rolling round between a member's two boots (`threshold_client.PendingDkg`, `finish_dkg`).

Held: each node's plan holds its own token only (0600), every dealer was opened with the sha256 of exactly
those n distinct tokens and one session; a dealer answering as another dealer stops the opening before any
plan (or token) is written. The record is the commitments every node states, only when all n state the same
t values: a node stating the sum over EVERY dealer (a disqualified dealer's commitments included) while the
others state the sum over QUAL, a node stating none, another epoch's, fewer or more than t, or unparsable
values, stops `up` (NodeError) and leaves `rotate-finish` recording nothing. A second pass with the pending
state of another round, epoch or member is refused before any dealer is asked; a malformed pending state is
a SealingError, never another exception.

By reading (info): the record trusts the nodes' endpoint files (written by the `kms up` processes into the
data directories) and checks neither that the values are curve points nor that they match the shares the
nodes sealed; so did the previous record (the dealers' admin answers). A writer of those files is the
operator's own host; a wrong record makes every partial fail to verify (availability)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from teecloud.devstack import first_dkg_group, open_first_dkg
from teecloud.keys import threshold as th
from teecloud.kms.errors import KmsUsageError, SealingError
from teecloud.kms.rotation import RotationPlan, rotation_commitments
from teecloud.kms.threshold import DkgPlan
from teecloud.kms.threshold_client import PendingDkg, finish_dkg
from teecloud.node.errors import NodeError

T, N = 3, 5


def test_each_plan_holds_its_own_token_and_the_dealers_its_hash(tmp_path: Path) -> None:
    bodies: dict[int, dict[str, Any]] = {}

    def admin_post(i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert path == "/dkg/open"
        bodies[i] = body
        return {"dealer": i, "commitments": []}

    eps = {i: {"url": f"https://127.0.0.1:{9000 + i}", "server_ca_pubkey": "ab"} for i in range(1, N + 1)}
    plans = open_first_dkg(eps, admin_post, t=T, n=N, plan_file_of=lambda j: tmp_path / f"m{j}" / "plan.json")
    tokens = {}
    for j, file in plans.items():
        doc = json.loads(file.read_text())
        assert set(doc["member_tokens"]) == {str(j)}
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        tokens[j] = bytes.fromhex(doc["member_tokens"][str(j)])
    assert len(set(tokens.values())) == N and all(len(t) == 32 for t in tokens.values())
    hashes = {str(j): hashlib.sha256(tok).hexdigest() for j, tok in tokens.items()}
    assert {b["session"] for b in bodies.values()} == {json.loads(plans[1].read_text())["session"]}
    assert all(b["member_token_hashes"] == hashes and b["complaint_round"] is True for b in bodies.values())
    assert all(tok.hex() not in json.dumps(b) for b in bodies.values() for tok in tokens.values())


def test_a_dealer_answering_as_another_writes_no_plan(tmp_path: Path) -> None:
    def admin_post(i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"dealer": 1 if i == 3 else i}

    eps = {i: {"url": "https://127.0.0.1:1", "server_ca_pubkey": "ab"} for i in range(1, N + 1)}
    with pytest.raises(NodeError, match="dealer 3"):
        open_first_dkg(eps, admin_post, t=T, n=N, plan_file_of=lambda j: tmp_path / f"m{j}.json")
    assert list(tmp_path.iterdir()) == []


def _docs(per_node: dict[int, Any], epoch: int = 1) -> dict[int, dict[str, Any]]:
    return {j: {"commitments": {str(epoch): c}} for j, c in per_node.items()}


def test_the_record_is_the_group_every_node_states_never_a_disqualified_dealers_sum() -> None:
    dealings = [th.deal(None, T, N, dealer=i) for i in range(1, N + 1)]
    qual = [c.hex() for c in th.sum_commitments([d for d in dealings if d.dealer != 2])]
    everyone = [c.hex() for c in th.sum_commitments(dealings)]
    assert qual != everyone
    good = _docs({j: qual for j in range(1, N + 1)})
    record = first_dkg_group(good, t=T, n=N)
    assert record.commitments == tuple(bytes.fromhex(c) for c in qual) and (record.t, record.n) == (T, N)
    plan = RotationPlan(os.urandom(16), 2, T, N, {}, (), {}, complaint_round=True)
    assert rotation_commitments(plan, _docs({j: qual for j in range(1, N + 1)}, 2))[0] == record.commitments
    rng = random.Random(1111)
    bad_values: list[Any] = [
        everyone,
        qual[:2],
        [*qual, qual[0]],
        [],
        None,
        "x",
        [q.upper() + "0" for q in qual],
    ]
    for _ in range(200):
        j = rng.randrange(1, N + 1)
        docs = {k: {"commitments": {"1": list(qual)}} for k in range(1, N + 1)}
        kind = rng.randrange(4)
        if kind == 0:
            docs[j]["commitments"]["1"] = rng.choice(bad_values)
        elif kind == 1:
            docs[j] = {"commitments": {"2": list(qual)}, "join_error": "x"}
        elif kind == 2:
            del docs[j]
        else:
            docs[j]["commitments"]["1"] = list(reversed(qual))
        with pytest.raises(NodeError):
            first_dkg_group(docs, t=T, n=N)
        moved = {k: {"commitments": {"2": v["commitments"].get("1")}} for k, v in docs.items()}
        got, why = rotation_commitments(plan, moved)
        assert got is None and why


def test_a_second_pass_with_another_rounds_or_members_pending_state_asks_no_dealer() -> None:
    plan = DkgPlan(os.urandom(16), 2, tuple(range(1, N + 1)), T, N, complaint_round=True)
    dealing = th.deal(None, T, N, dealer=1)

    def pending(session: bytes, epoch: int, index: int) -> PendingDkg:
        return PendingDkg(session, epoch, index, (dealing,), {1: b"\x01" * 32}, ())

    for other in (pending(os.urandom(16), 2, 1), pending(plan.session, 3, 1), pending(plan.session, 2, 2)):
        with pytest.raises(KmsUsageError, match="another round or member"):
            finish_dkg(plan, 1, None, {}, other, app_id=b"\x00" * 20)  # type: ignore[arg-type]


def test_malformed_pending_states_are_sealing_errors() -> None:
    dealing = th.deal(None, T, N, dealer=1)
    good = json.loads(PendingDkg(os.urandom(16), 2, 1, (dealing,), {1: b"\x01" * 32}, (2,)).to_json_bytes())
    assert PendingDkg.from_json_bytes(json.dumps(good).encode()).index == 1
    rng = random.Random(7)
    odd: list[Any] = [None, 1, "zz", [], {}, "", -1, 1.5, [None], {"1": None}, True]
    for _ in range(300):
        doc = json.loads(json.dumps(good))
        key = rng.choice(list(doc))
        if rng.random() < 0.5:
            doc[key] = rng.choice(odd)
        elif isinstance(doc[key], dict) and doc[key]:
            inner = rng.choice(list(doc[key]))
            doc[key][inner] = rng.choice(odd)
        else:
            del doc[key]
        raw = json.dumps(doc).encode() if rng.random() < 0.9 else b"\xff" + json.dumps(doc).encode()[:5]
        try:
            PendingDkg.from_json_bytes(raw)
        except SealingError:
            pass
