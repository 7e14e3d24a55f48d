"""Threshold mode: the group's secp256k1 signing key and presignatures made by RUNNING nodes (GJKR as
teecloud.keys.threshold_ecdsa implements it), over the channel of teecloud.kms.peering.

A round lives in the memory of each member only (a member that restarts mid-round has nothing: the round
fails, nothing is half-applied); its result is applied at the end at once (the signing share, sealed in one
atomic write; or every presignature of the batch into this process's in-memory pool, never sealed: one
message per presignature, in one process only — R4-4). The operator
(or the launcher) drives it on the members' admin listeners and relays the broadcast values; secret
sub-shares go member to member only, over mutual RA-TLS under kms.peering's rule.

    stage   sigkey (Joint-Feldman, all n deal)        presign (count presignatures, participants P >= 2t-1)
    open    Feldman dealing -> commitments            round 1 dealings of k, a, z -> their commitments
    deal    view: everyone's commitments; advance: fetch the sub-shares dealt to me from every dealer,
            check them against the relayed commitments (a bad dealer is named), then
              sigkey: sum -> KeyShare, sealed          presign: w_j = k_j·a_j + z_j with its proof
    mul     -                                         view: every w; advance: check them (a liar is named),
                                                      μ, re-deal p_j = (k^-1)_j·x_j -> commitments + proof
    reduce  -                                         view: every re-dealing; advance: fetch my sub-shares,
                                                      check proofs and sub-shares, presignatures -> pool

The same two rounds run over the group's P-256 CA key (kinds "ca-sigkey", "ca-presign": its own sealed
share and its own in-memory pool; the root CA and app CA certificates, kms.threshold_sign).

The relay is untrusted: a member refuses a view that alters its own values of that stage (so a relay that
changes member j's values everywhere is caught by j, not blamed on j); each member hashes the broadcast it
was given (chained over the stages) and sends that hash with every sub-share request; a dealer answers only
a member that saw exactly what it saw (an equivocating relay is refused), each (stage, member) once (a
replayed request is refused), and, per round, member i under one boot-time peer key only (a second process
of share i, a copy of the node's disk, is refused: R4-4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography import x509

from teecloud.keys import threshold_certs as tc
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.certs import cert_to_pem
from teecloud.keys.errors import KeysError
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsClientError, KmsDenied, KmsUsageError, SealingError
from teecloud.kms.peering import AdmittedNode, PeerClient
from teecloud.kms.threshold_sign import ThresholdSigner

__all__ = [
    "ROUND_WINDOW_S",
    "AdminEndpoint",
    "PresignRefiller",
    "RefillPolicy",
    "RoundFailed",
    "SignRounds",
    "pool_size",
    "presignature_session",
    "read_pool",
    "run_ca_root",
    "run_presign_round",
    "run_signing_key_dkg",
]

log = logging.getLogger("teecloud.kms.threshold")

ROUND_WINDOW_S = 600
_STAGES = {"sigkey": ("deal",), "presign": ("deal", "mul", "reduce")}
# the same rounds over the group's P-256 CA key (issue 19's app CA): "ca-" kinds, their own share and pool
_STAGES.update({"ca-" + kind: stages for kind, stages in _STAGES.items()})


def _is_sigkey(kind: str) -> bool:
    return kind.endswith("sigkey")


def _group_of(kind: str) -> te.Group:
    return te.P256 if kind.startswith("ca-") else te.SECP256K1


class RoundFailed(KmsUsageError):
    """A round failed; `party` names the member at fault when one is known."""

    def __init__(self, message: str, *, party: int | None = None) -> None:
        super().__init__(message if party is None else f"member {party}: {message}")
        self.party = party


def presignature_session(round_session: bytes, k: int) -> bytes:
    """The 16-byte session of presignature k of a batch (each presignature its own Fiat–Shamir labels)."""
    return hashlib.sha256(b"teecloud-presign\x00" + round_session + k.to_bytes(2, "big")).digest()[:16]


def _hexes(points: Sequence[bytes]) -> list[str]:
    return [p.hex() for p in points]


def _points(values: Sequence[str], *, what: str, party: int) -> tuple[bytes, ...]:
    try:
        return tuple(bytes.fromhex(v) for v in values)
    except ValueError as exc:
        raise RoundFailed(f"{what} is not hex", party=party) from exc


def _scalar(text: str, *, what: str, party: int) -> int:
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise RoundFailed(f"{what} is not hex", party=party) from exc
    if len(raw) != 32:
        raise RoundFailed(f"{what} is not 32 bytes", party=party)
    return int.from_bytes(raw, "big")


def _view_hash(prev: str, broadcast: Mapping[int, Sequence[api.RoundValue]]) -> str:
    doc = {str(i): [v.model_dump() for v in vals] for i, vals in sorted(broadcast.items())}
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(prev.encode() + b"\x00" + body).hexdigest()


@dataclass
class _Round:
    kind: str
    session: bytes
    t: int
    n: int
    participants: tuple[int, ...]
    count: int
    peers: dict[int, str]
    opened_at: float
    sigkey_dealing: te.Dealing | None = None
    presign_dealings: list[te.PresignDealing] = field(default_factory=list)
    views: dict[str, tuple[str, dict[int, list[api.RoundValue]]]] = field(default_factory=dict)
    advanced: set[str] = field(default_factory=set)
    served: set[tuple[str, int]] = field(default_factory=set)
    # the one process (its boot-time peer key) that fetches as member i in this round (R4-4: a copy of a
    # node's disk is admitted as member i too; it gets nothing of a round its twin takes part in)
    bound: dict[int, str] = field(default_factory=dict)
    states: list[Any] = field(default_factory=list)  # keys.threshold_ecdsa round-1 states, one per presig
    reduces: list[te.ReduceDealing] = field(default_factory=list)
    # what this member broadcast for each stage (checked against every view it is relayed)
    outputs: dict[str, list[api.RoundValue]] = field(default_factory=dict)
    done: bool = False

    def fully_served(self, me: int) -> bool:
        last = _STAGES[self.kind][-1]
        stage = "deal" if last == "mul" else last
        return all((stage, j) in self.served for j in self.participants if j != me)


class SignRounds:
    """This member's side of signing-key and presigning rounds (module docstring)."""

    def __init__(
        self,
        *,
        index: int,
        t: int,
        n: int,
        signer: Callable[[], ThresholdSigner | None],
        install_key: Callable[[te.KeyShare], None],
        connect: Callable[[int, str], PeerClient],
        clock: Callable[[], float] = time.time,
        ca_signer: Callable[[], ThresholdSigner | None] | None = None,
        install_ca_key: Callable[[te.KeyShare], None] | None = None,
    ) -> None:
        """`signer`: this member's current signer (None without a signing share); `install_key` seals a new
        signing share and makes it this member's signer; `connect(i, url)` a PeerClient to member i.
        `ca_signer` / `install_ca_key`: the same for the group's P-256 CA key (without them the "ca-" rounds
        are refused)."""
        self.index, self.t, self.n = index, t, n
        self._signer = signer
        self._install_key = install_key
        self._ca_signer = ca_signer
        self._install_ca_key = install_ca_key
        self._connect = connect
        self._clock = clock
        self._rounds: dict[bytes, _Round] = {}
        self._lock = threading.Lock()

    # --- admin: open, view, advance

    def open(self, req: api.RoundOpenRequest) -> api.RoundPublic:
        session = bytes.fromhex(req.session)
        participants = tuple(sorted(set(req.participants)))
        try:
            peers = {int(i): u for i, u in req.peers.items()}
        except ValueError as exc:
            raise KmsUsageError("peers: share index -> URL") from exc
        if len(participants) != len(req.participants) or any(not 1 <= i <= self.n for i in participants):
            raise KmsUsageError(f"participants must be distinct members 1..{self.n}")
        if self.index not in participants:
            raise KmsUsageError(f"member {self.index} is not a participant of this round")
        if set(peers) != set(participants) - {self.index} and set(peers) != set(participants):
            raise KmsUsageError("peers: one URL per other participant")
        rnd = _Round(req.kind, session, self.t, self.n, participants, req.count, peers, self._clock())
        if req.kind.startswith("ca-") and (self._ca_signer is None or self._install_ca_key is None):
            raise KmsUsageError("this member has no place for a P-256 CA key share (no sealing configured)")
        if _is_sigkey(req.kind):
            if self._signer_of(req.kind) is not None:
                raise KmsUsageError("this member already holds a signing share (a new key is a new epoch)")
            if participants != tuple(range(1, self.n + 1)) or req.count != 1:
                raise KmsUsageError("a signing-key DKG is dealt by all n members, once")
            rnd.sigkey_dealing = te.feldman_deal(
                None, self.t - 1, list(range(1, self.n + 1)), dealer=self.index, group=_group_of(req.kind)
            )
            values = [api.RoundValue(c=_hexes(rnd.sigkey_dealing.commitments))]
        else:
            key = self._key(req.kind)
            try:
                rnd.presign_dealings = [
                    te.presign_round1(presignature_session(session, k), key, participants)
                    for k in range(req.count)
                ]
            except KeysError as exc:
                raise KmsUsageError(f"presign round refused: {exc}") from exc
            values = [
                api.RoundValue(
                    k=_hexes(d.k.commitments), a=_hexes(d.a.commitments), z=_hexes(d.z.commitments)
                )
                for d in rnd.presign_dealings
            ]
        rnd.outputs["deal"] = values
        with self._lock:
            self._expire()
            if session in self._rounds:
                raise KmsUsageError("a round with this session is already open here")
            self._rounds[session] = rnd
        return api.RoundPublic(session=req.session, index=self.index, stage="open", values=values)

    def view(self, req: api.RoundViewRequest) -> api.RoundViewResponse:
        rnd = self._round(bytes.fromhex(req.session))
        stages = _STAGES[rnd.kind]
        if req.stage not in stages:
            raise KmsUsageError(f"a {rnd.kind} round has no stage {req.stage}")
        pos = stages.index(req.stage)
        if req.stage in rnd.views or (pos > 0 and stages[pos - 1] not in rnd.advanced):
            raise KmsUsageError(f"stage {req.stage} is not the next one of this round")
        try:
            broadcast = {int(i): list(v) for i, v in req.broadcast.items()}
        except ValueError as exc:
            raise KmsUsageError("broadcast: share index -> values") from exc
        if set(broadcast) != set(rnd.participants):
            raise KmsUsageError("broadcast: one entry per participant")
        if any(len(v) != rnd.count for v in broadcast.values()):
            raise KmsUsageError(f"broadcast: {rnd.count} values per participant")
        mine = rnd.outputs.get(req.stage)
        if mine is None or broadcast[self.index] != mine:
            raise RoundFailed("the relayed broadcast alters this member's own values (relay fault)")
        prev = rnd.views[stages[pos - 1]][0] if pos > 0 else rnd.session.hex()
        h = _view_hash(prev, broadcast)
        rnd.views[req.stage] = (h, broadcast)
        return api.RoundViewResponse(view_hash=h)

    def advance(self, req: api.RoundAdvanceRequest) -> api.RoundPublic:
        session = bytes.fromhex(req.session)
        rnd = self._round(session)
        if req.stage not in rnd.views or req.stage in rnd.advanced:
            raise KmsUsageError(f"stage {req.stage}: no view yet, or already advanced")
        try:
            if _is_sigkey(rnd.kind):
                values = self._finish_sigkey(rnd)
            elif req.stage == "deal":
                values = self._multiply(rnd)
            elif req.stage == "mul":
                values = self._reduce(rnd)
            else:
                values = self._finish_presign(rnd)
        except RoundFailed:
            self._drop(session)
            raise
        except te.ThresholdSignatureError as exc:
            self._drop(session)
            raise RoundFailed(str(exc).removeprefix(f"party {exc.party}: "), party=exc.party) from exc
        except (KeysError, SealingError) as exc:  # e.g. a reopened session's names already pooled (R5-3)
            self._drop(session)
            raise KmsUsageError(f"the round cannot finish here: {exc}") from exc
        rnd.advanced.add(req.stage)
        stages = _STAGES[rnd.kind]
        done = req.stage == stages[-1]
        if not done:
            rnd.outputs[stages[stages.index(req.stage) + 1]] = values
        if done:
            with self._lock:
                # the secret dealings stay only until every other participant has fetched its sub-shares
                rnd.done = True
                if rnd.fully_served(self.index):
                    self._rounds.pop(session, None)
        return api.RoundPublic(
            session=req.session, index=self.index, stage="done" if done else req.stage, values=values
        )

    # --- peer: sub-shares for an admitted member

    def serve(self, node: AdmittedNode, req: api.PeerRoundRequest) -> tuple[int, list[list[str]]]:
        if not isinstance(node, AdmittedNode):
            raise TypeError("sub-shares only for an AdmittedNode")
        session = bytes.fromhex(req.session)
        with self._lock:
            self._expire()
            rnd = self._rounds.get(session)
            if rnd is None:
                raise AccessDenied(
                    "no open round with this session here (never opened, finished, expired, or this node "
                    "restarted since)",
                    step="round",
                )
            if req.stage not in _STAGES[rnd.kind] or req.stage == "mul":
                raise AccessDenied(f"a {rnd.kind} round has no sub-shares at stage {req.stage}", step="round")
            if node.index not in rnd.participants or node.index == self.index:
                raise AccessDenied(
                    f"member {node.index} is not another participant of this round", step="round"
                )
            view = rnd.views.get(req.stage)
            if view is None or not secrets.compare_digest(view[0], req.view_hash):
                raise AccessDenied(
                    "the broadcast values member "
                    f"{node.index} was relayed differ from this member's (or it has none yet): refusing",
                    step="round",
                )
            if rnd.bound.setdefault(node.index, node.key_id) != node.key_id:
                raise AccessDenied(
                    f"another process (another boot-time key) already fetches as member {node.index} in this "
                    "round: one process per share index per round",
                    step="round",
                )
            if (req.stage, node.index) in rnd.served:
                raise AccessDenied(
                    f"stage {req.stage} sub-shares for member {node.index} were already handed out (replay)",
                    step="round",
                )
            rnd.served.add((req.stage, node.index))
            if rnd.done and rnd.fully_served(self.index):
                self._rounds.pop(session, None)
            j = node.index
            if _is_sigkey(rnd.kind):
                assert rnd.sigkey_dealing is not None
                return self.index, [[f"{rnd.sigkey_dealing.shares[j]:064x}"]]
            if req.stage == "deal":
                out = []
                for d in rnd.presign_dealings:
                    sk, sa, sz = d.shares_for(j)
                    out.append([f"{sk:064x}", f"{sa:064x}", "" if sz is None else f"{sz:064x}"])
                return self.index, out
            if len(rnd.reduces) != rnd.count:
                raise AccessDenied("this member has not made its re-dealings yet", step="round")
            return self.index, [[f"{r.dealing.shares[j]:064x}"] for r in rnd.reduces]

    # --- the stages

    def _signer_of(self, kind: str) -> ThresholdSigner | None:
        if kind.startswith("ca-"):
            return self._ca_signer() if self._ca_signer is not None else None
        return self._signer()

    def _key(self, kind: str) -> te.KeyShare:
        signer = self._signer_of(kind)
        if signer is None:
            what = "P-256 CA key share" if kind.startswith("ca-") else "signing share"
            raise KmsUsageError(f"this member holds no {what}: run the signing-key DKG first")
        return signer.key

    def _fetch(self, rnd: _Round, stage: str) -> dict[int, list[list[str]]]:
        """This member's sub-shares of `stage` from every other participant, in parallel."""
        view_hash = rnd.views[stage][0]
        others = [i for i in rnd.participants if i != self.index]

        def one(i: int) -> list[list[str]]:
            url = rnd.peers.get(i)
            if url is None:
                raise RoundFailed("no URL for this participant", party=i)
            try:
                answer = self._connect(i, url).peer_call(
                    api.PATH_PEER_ROUND,
                    api.PeerRoundResponse,
                    {"session": rnd.session.hex(), "stage": stage, "view_hash": view_hash},
                )
            except (KmsClientError, KmsDenied) as exc:
                raise RoundFailed(f"sub-shares not obtained: {exc}", party=i) from exc
            if answer.dealer != i or answer.session != rnd.session.hex() or answer.stage != stage:
                raise RoundFailed("answered for another dealer, round or stage", party=i)
            if len(answer.shares) != rnd.count:
                raise RoundFailed(f"{len(answer.shares)} sub-share sets, {rnd.count} expected", party=i)
            return answer.shares

        with ThreadPoolExecutor(max_workers=max(1, len(others))) as pool:
            results = dict(zip(others, pool.map(one, others), strict=True))
        return results

    def _finish_sigkey(self, rnd: _Round) -> list[api.RoundValue]:
        assert rnd.sigkey_dealing is not None
        broadcast = rnd.views["deal"][1]
        fetched = self._fetch(rnd, "deal")
        commitments = {i: _points(broadcast[i][0].c, what="commitments", party=i) for i in rnd.participants}
        shares = {self.index: rnd.sigkey_dealing.shares[self.index]}
        for i, sets in fetched.items():
            if len(sets[0]) != 1:
                raise RoundFailed("one sub-share expected", party=i)
            shares[i] = _scalar(sets[0][0], what="sub-share", party=i)
        key = te.dkg_receive(self.index, self.t, self.n, commitments, shares, group=_group_of(rnd.kind))
        install = self._install_ca_key if rnd.kind.startswith("ca-") else self._install_key
        assert install is not None  # open() refused a "ca-" round without one
        install(key)
        return [api.RoundValue(c=[key.group_public_key.hex()])]

    def _multiply(self, rnd: _Round) -> list[api.RoundValue]:
        key = self._key(rnd.kind)
        broadcast = rnd.views["deal"][1]
        fetched = self._fetch(rnd, "deal")
        out = []
        rnd.states = []
        for k in range(rnd.count):
            dealings = []
            for i in rnd.participants:
                v = broadcast[i][k]
                ck = _points(v.k, what="k commitments", party=i)
                ca = _points(v.a, what="a commitments", party=i)
                cz = _points(v.z, what="z commitments", party=i)
                if i == self.index:
                    sk, sa, sz = rnd.presign_dealings[k].shares_for(self.index)
                else:
                    got = fetched[i][k]
                    if len(got) != 3:
                        raise RoundFailed("three sub-shares (k, a, z) expected", party=i)
                    sk = _scalar(got[0], what="k sub-share", party=i)
                    sa = _scalar(got[1], what="a sub-share", party=i)
                    sz = _scalar(got[2], what="z sub-share", party=i) if got[2] else None
                dealings.append(
                    te.PresignDealing(
                        i,
                        te.Dealing(i, ck, {self.index: sk}),
                        te.Dealing(i, ca, {self.index: sa}),
                        te.Dealing(i, cz, {} if sz is None else {self.index: sz}, zero=True),
                    )
                )
            state, mul = te.presign_multiply(
                presignature_session(rnd.session, k), key, rnd.participants, dealings
            )
            assert mul is not None  # this member is a participant
            rnd.states.append(state)
            out.append(api.RoundValue(w=f"{mul.w:064x}", proof=mul.proof.hex()))
        return out

    def _muls(self, rnd: _Round, k: int) -> list[te.MulMessage]:
        broadcast = rnd.views["mul"][1]
        out = []
        for j in rnd.participants:
            v = broadcast[j][k]
            try:
                proof = bytes.fromhex(v.proof)
            except ValueError as exc:
                raise RoundFailed("a multiplication proof is not hex", party=j) from exc
            out.append(te.MulMessage(j, _scalar(v.w, what="w", party=j), proof))
        return out

    def _reduce(self, rnd: _Round) -> list[api.RoundValue]:
        key = self._key(rnd.kind)
        rnd.reduces = [te.presign_reduce(key, rnd.states[k], self._muls(rnd, k)) for k in range(rnd.count)]
        return [api.RoundValue(c=_hexes(r.dealing.commitments), proof=r.proof.hex()) for r in rnd.reduces]

    def _finish_presign(self, rnd: _Round) -> list[api.RoundValue]:
        key = self._key(rnd.kind)
        signer = self._signer_of(rnd.kind)
        assert signer is not None
        broadcast = rnd.views["reduce"][1]
        fetched = self._fetch(rnd, "reduce")
        made = []
        for k in range(rnd.count):
            reduces = []
            for j in rnd.participants:
                v = broadcast[j][k]
                if j == self.index:
                    share = rnd.reduces[k].dealing.shares[self.index]
                else:
                    got = fetched[j][k]
                    if len(got) != 1:
                        raise RoundFailed("one re-dealing sub-share expected", party=j)
                    share = _scalar(got[0], what="re-dealing sub-share", party=j)
                try:
                    proof = bytes.fromhex(v.proof)
                except ValueError as exc:
                    raise RoundFailed("a re-dealing proof is not hex", party=j) from exc
                reduces.append(
                    te.ReduceDealing(
                        te.Dealing(
                            j, _points(v.c, what="re-dealing commitments", party=j), {self.index: share}
                        ),
                        proof,
                    )
                )
            made.append(te.presign_finish(key, rnd.states[k], self._muls(rnd, k), reduces))
        signer.pool.add(made)  # this process's memory only (never sealed: R4-4)
        return [api.RoundValue(c=[p.big_r.hex()]) for p in made]

    # --- bookkeeping

    def _round(self, session: bytes) -> _Round:
        with self._lock:
            self._expire()
            rnd = self._rounds.get(session)
        if rnd is None:
            raise KmsUsageError("no open round with this session (never opened, failed, finished or expired)")
        return rnd

    def _drop(self, session: bytes) -> None:
        with self._lock:
            self._rounds.pop(session, None)

    def _expire(self) -> None:
        now = self._clock()
        for s in [s for s, r in self._rounds.items() if now - r.opened_at > ROUND_WINDOW_S]:
            del self._rounds[s]


# ------------------------------------------------------------------------------ the operator's driver


@dataclass(frozen=True)
class AdminEndpoint:
    """A member as the operator reaches it: its admin listener and token, and its public URL."""

    admin_url: str
    token: str
    url: str


def _admin(ep: AdminEndpoint, path: str, body: dict[str, Any], index: int) -> dict[str, Any]:
    try:
        r = httpx.post(
            ep.admin_url + path, json=body, headers={"authorization": f"Bearer {ep.token}"}, timeout=120
        )
    except httpx.HTTPError as exc:
        raise RoundFailed(f"unreachable: {exc}", party=index) from exc
    if r.status_code != 200:
        try:
            reason = str(r.json().get("reason", r.text))
        except ValueError:
            reason = r.text
        raise RoundFailed(f"refused {path}: {reason[:500]}", party=index)
    doc = r.json()
    assert isinstance(doc, dict)
    return doc


def _all(nodes: Mapping[int, AdminEndpoint], path: str, body: dict[str, Any]) -> dict[int, list[Any]]:
    """The same admin call on every member in parallel; each answer's `values` (none for a view)."""
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        futures = {i: pool.submit(_admin, ep, path, body, i) for i, ep in sorted(nodes.items())}
        return {i: f.result().get("values", []) for i, f in futures.items()}


def _run(
    nodes: Mapping[int, AdminEndpoint], kind: str, *, count: int = 1, session: str | None = None
) -> dict[int, list[Any]]:
    """One round: open on every member, then per stage relay every member's values to all (view) and let
    each advance. A failure names the member (RoundFailed.party) and leaves every member's state unchanged
    except what a completed round sealed."""
    session = session or secrets.token_hex(16)
    peers = {str(i): ep.url for i, ep in nodes.items()}
    values = _all(
        nodes,
        "/tround/open",
        {"session": session, "kind": kind, "count": count, "participants": sorted(nodes), "peers": peers},
    )
    for stage in _STAGES[kind]:
        broadcast = {str(i): v for i, v in values.items()}
        _all(nodes, "/tround/view", {"session": session, "stage": stage, "broadcast": broadcast})
        values = _all(nodes, "/tround/advance", {"session": session, "stage": stage})
    return values


def run_signing_key_dkg(nodes: Mapping[int, AdminEndpoint], *, kind: str = "sigkey") -> bytes:
    """Joint-Feldman of the group's signing key (`kind` "ca-sigkey": its P-256 CA key) among all members
    (each seals its share). Returns the group key; every member must report the same one."""
    results = _run(nodes, kind)
    keys = {i: v[0]["c"][0] for i, v in results.items()}
    if len(set(keys.values())) != 1:
        raise RoundFailed(f"the members disagree on the group signing key: {keys}")
    return bytes.fromhex(next(iter(keys.values())))


def presign_participants(indices: Sequence[int], t: int) -> list[int]:
    """The 2t-1 members (the lowest of `indices`) that make a presignature: exactly 2t-1, never more
    (keys.threshold_ecdsa: two disjoint signing sets must not share a presignature)."""
    chosen = sorted(set(indices))[: 2 * t - 1]
    if len(chosen) != 2 * t - 1:
        raise RoundFailed(f"a presignature needs {2 * t - 1} running members, got {len(chosen)}")
    return chosen


def run_presign_round(
    nodes: Mapping[int, AdminEndpoint], count: int, t: int, *, kind: str = "presign"
) -> list[bytes]:
    """`count` presignatures (`kind` "ca-presign": of the P-256 CA key) among exactly 2t-1 of `nodes`
    (presign_participants); each adds its part to its in-memory pool. Returns the presignatures' R (every
    participant must agree)."""
    chosen = presign_participants(list(nodes), t)
    results = _run({i: nodes[i] for i in chosen}, kind, count=count)
    rs = {i: tuple(v["c"][0] for v in vals) for i, vals in results.items()}
    if len(set(rs.values())) != 1:
        raise RoundFailed("the members disagree on the presignatures' R")
    return [bytes.fromhex(r) for r in next(iter(rs.values()))]


def run_ca_root(
    nodes: Mapping[int, AdminEndpoint], t: int, ca_key: bytes, *, not_before: int
) -> x509.Certificate:
    """The group's root CA, self-signed by t members with the P-256 CA key `ca_key` (after the "ca-sigkey"
    DKG): one fresh "ca-presign" presignature among 2t-1 members, a share of the root's self-signature from t
    of them (each builds the TBS itself, kms.threshold_sign), combined and checked here, then installed on
    every member (each keeps it only if it is exactly its key's root). Returns the root."""
    chosen = presign_participants(list(nodes), t)
    round_session = secrets.token_hex(16)
    _run({i: nodes[i] for i in chosen}, "ca-presign", count=1, session=round_session)
    session = presignature_session(bytes.fromhex(round_session), 0).hex()
    signers = chosen[:t]
    answers = {
        i: _admin(nodes[i], "/tround/ca-root-share", {"session": session, "not_before": not_before}, i)
        for i in signers
    }
    to_sign = tc.root_ca_to_sign(ca_key, not_before=not_before)
    first = answers[signers[0]]
    try:
        presig = te.Presignature(
            index=signers[0],
            t=t,
            session=bytes.fromhex(session),
            big_r=bytes.fromhex(str(first["big_r"])),
            group_public_key=ca_key,
            kinv_share=None,
            sigma_share=0,
            kinv_commitments=tuple(bytes.fromhex(c) for c in first["kinv_commitments"]),
            sigma_commitments=tuple(bytes.fromhex(c) for c in first["sigma_commitments"]),
            curve=te.P256.name,
        )
        shares = [te.SignatureShare(i, int(str(answers[i]["s"]), 16)) for i in signers]
        root = tc.assemble_certificate(
            to_sign, te.combine_signature(presig, to_sign.digest, shares), tc.group_ca_public_key(ca_key)
        )
    except te.ThresholdSignatureError as exc:
        raise RoundFailed(str(exc).removeprefix(f"party {exc.party}: "), party=exc.party) from exc
    except (KeysError, ValueError, KeyError, TypeError) as exc:
        raise RoundFailed(f"the root CA's signature shares do not combine: {exc}") from exc
    body = {"certificate": cert_to_pem(root)}
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        for f in [pool.submit(_admin, ep, "/tround/ca-root", body, i) for i, ep in sorted(nodes.items())]:
            f.result()
    return root


# ------------------------------------------------------------------------------ pools refilled while running


def read_pool(ep: AdminEndpoint) -> api.PoolResponse | None:
    """A member's pool answer (`GET /tround/pool` on its admin listener: unused presignatures of the signing
    key and of the P-256 CA key, the keys it holds); None when it cannot say (unreachable, refused,
    malformed answer)."""
    try:
        r = httpx.get(
            ep.admin_url + "/tround/pool", headers={"authorization": f"Bearer {ep.token}"}, timeout=30
        )
        if r.status_code != 200:
            return None
        return api.PoolResponse.model_validate_json(r.content)
    except (httpx.HTTPError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def pool_size(ep: AdminEndpoint) -> int | None:
    """A member's unused presignatures of the signing key; None when it cannot say."""
    doc = read_pool(ep)
    return None if doc is None else int(doc.unused)


@dataclass(frozen=True)
class RefillPolicy:
    """When and how much the supervisor refills. A batch is one round (count <= 32, the round's bound);
    a failed round waits backoff_s, doubled per failure in a row up to max_backoff_s."""

    low: int = 8  # refill when a maker holds fewer unused presignatures than this
    batch: int = 16
    interval_s: float = 5.0  # how often the pools are read
    backoff_s: float = 5.0
    max_backoff_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.batch <= 32 or not 1 <= self.low <= 512 - self.batch:
            raise ValueError("refill: 1 <= batch <= 32 and 1 <= low <= 512 - batch (the pool's bound)")
        if not (0 < self.interval_s and 0 < self.backoff_s <= self.max_backoff_s):
            raise ValueError("refill: positive interval, 0 < backoff_s <= max_backoff_s")


class PresignRefiller:
    """The supervisor's refill loop (`teecloud up`, which holds every member's admin token): every
    `interval_s` it reads the pools of the 2t-1 makers (presign_participants of the members it reaches)
    and, when one holds fewer than `low`, runs ONE presigning round of `batch` among them. One round at a
    time (a check while a round runs returns at once); a failed round is logged and the next one waits
    (exponential backoff). Nothing here touches a pool: members add a whole batch at the end of a round,
    so signing (GetKey's boots) never waits for a refill; a member whose pool is empty meanwhile answers
    with what it has (none), and the CVM's GetKey says so (503, "no presignatures, refill in progress")."""

    def __init__(
        self,
        nodes: Mapping[int, AdminEndpoint],
        t: int,
        policy: RefillPolicy | None = None,
        *,
        run_round: Callable[[Mapping[int, AdminEndpoint], int, int], list[bytes]] = run_presign_round,
        read_pool: Callable[[AdminEndpoint], int | None] = pool_size,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nodes = dict(nodes)
        self._t = t
        self.policy = policy or RefillPolicy()
        self._run_round = run_round
        self._read_pool = read_pool
        self._clock = clock
        self._busy = threading.Lock()  # held for one check (and its round): one round at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0  # failed rounds in a row
        self.not_before = 0.0  # the clock value before which no round is started (backoff)
        self.last_error = ""
        self.rounds = 0  # rounds completed

    def check(self) -> bool:
        """One look at the pools, and one round when a maker is below the watermark. True when a round
        completed; False when none was needed or due, a round was already running, or it failed."""
        if not self._busy.acquire(blocking=False):
            return False
        try:
            if self._clock() < self.not_before:
                return False
            sizes = {i: self._read_pool(ep) for i, ep in sorted(self._nodes.items())}
            reachable = [i for i, size in sizes.items() if size is not None]
            try:
                makers = presign_participants(reachable, self._t)
            except RoundFailed as exc:
                return self._failed(exc)
            low = min(int(sizes[i] or 0) for i in makers)
            if low >= self.policy.low:
                return False
            try:
                made = self._run_round({i: self._nodes[i] for i in makers}, self.policy.batch, self._t)
            except RoundFailed as exc:
                return self._failed(exc)
            log.info(
                "presignature pools refilled: %d by members %s (the lowest held %d)", len(made), makers, low
            )
            self.failures, self.not_before, self.last_error = 0, 0.0, ""
            self.rounds += 1
            return True
        finally:
            self._busy.release()

    def _failed(self, exc: RoundFailed) -> bool:
        self.failures += 1
        wait = min(self.policy.backoff_s * 2 ** min(self.failures - 1, 16), self.policy.max_backoff_s)
        self.not_before = self._clock() + wait
        self.last_error = str(exc)
        log.warning(
            "presignature refill failed (%d in a row; next try in %.0f s): %s", self.failures, wait, exc
        )
        return False

    def start(self) -> PresignRefiller:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="presign-refill", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            try:
                self.check()
            except Exception:  # a supervisor thread must not die silently on an unexpected error
                log.exception("presignature refill: unexpected error")

    def stop(self, timeout: float = 150.0) -> None:
        """Stop the loop; waits for a round in progress (its HTTP calls are bounded) up to `timeout`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
