"""Threshold mode: per-app env keys among RUNNING nodes (teecloud.keys.threshold_ecdh), over the channel of
teecloud.kms.peering, and their dstack-format public key signed by the group's threshold ECDSA key.

One sharing per (root epoch, app), made on the first GetAppEnvEncryptPubKey for an app KmsAuth deployed
itself from its app blueprint (the env-key gate, `app_registered`; docs/kms.md), by a Joint-Feldman DKG
among the members that answer — at least ceremony_quorum(t, n) of them — that the node receiving the
request coordinates (it relays public values only; secret sub-shares go member to member under
kms.peering's rule):

    stage   each member (the coordinator included)
    deal    checks the epoch is one it serves and the env-key gate; if it already holds a sealed
            sharing of the app it answers its commitments (no new dealing); else a fresh Feldman dealing,
            kept in memory (one open ceremony per app: a second is refused with a retry error)
    view    every dealer's commitments: checks its own are unaltered, hashes the view (bound to the session)
    finish  fetches its sub-share from every other dealer (the dealer answers only a member whose view hash
            equals its own, once), checks each against its dealer's commitments (a bad dealer is named),
            sums: the share is PENDING, in memory; answers the group commitments
    commit  the commitments every member finished with (the coordinator checked they all agree): equal to
            its pending result, it seals the share TENTATIVE (one atomic write; an existing sealing is never
            replaced); nothing is sealed anywhere before every member finished
    confirm after every commit: the member settles its tentative share from its own `held` poll of the
            members: promoted (sealed CONFIRMED) when t of them, itself included, hold the same
            commitments; dropped when fewer than t can (review 7, R7-1). Only confirmed shares are served.
            A confirmed share is polled again when its signature round fails or a ceremony made the app's
            sharing without it (`confirm` to each `held` claimant): dropped only when another sharing is
            confirmed by t members and n - t + 1 answer without it, then recovered (review 8, R8-2).

A ceremony that fails before commit leaves nothing sealed and is retried by the next request (a new
session). A member that was down, or whose commit failed, gets ITS share of the sharing later by share
recovery (keys.share_repair's enrollment: `recover` on the target, `serve_recover` / `serve_piece` on t
helpers, under the rule of docs/kms.md "Share recovery"), never from a second ceremony: a deal that finds
a member holding the app's sharing turns the request into a recovery.

The answer (`public_key`, `signature`, `timestamp`, `signature_v1`, dstack's shape) is signed by t members
over the two digests each member builds itself from ITS OWN sealed sharing (one presignature
each; a node re-signs at most once per SIGNATURE_REFRESH_S per app, so an unauthenticated caller drains at
most two presignatures per app per period). The signed answer is sealed beside the app's share (it is
public; sealed for integrity, bound to its epoch and app), so a restarted node serves it without new
signatures until it is SIGNATURE_REFRESH_S old. Every member checks the env-key gate itself before dealing
and before signing.

The CVM's partial (ThresholdEnvPartial): after the whole key-release rule of ThresholdEvaluate (the same
Authorizer.authorize_app call), D_i = x_i·P for the epoch its measured app-compose names and the app its
evidence names, P mapped from the ephemeral key it sends; the proof binds app_id and index.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coincurve
from eth_utils.crypto import keccak

from teecloud._fs import atomic_write
from teecloud.keys import share_repair as sr
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.appkeys import env_encrypt_pubkey_digest
from teecloud.keys.errors import KeysError
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsClientError, KmsDenied, KmsUsageError, SealingError
from teecloud.kms.peering import AdmittedNode, PeerClient
from teecloud.kms.threshold_sign import ThresholdSigner

__all__ = [
    "CEREMONY_WINDOW_S",
    "RECHECK_S",
    "RECOVERY_WINDOW_S",
    "SIGNATURE_REFRESH_S",
    "EnvKeyBusy",
    "EnvKeyStore",
    "EnvKeys",
    "ceremony_quorum",
    "legacy_digest",
]

log = logging.getLogger("teecloud.kms.threshold")

CEREMONY_WINDOW_S = 120
SIGNATURE_REFRESH_S = 120
# a confirmed share is polled again (R8-2) at most once per RECHECK_S per app while it is kept: a peer's
# `confirm`, or a client's requests whose signature round fails, cannot make a member poll in a loop
RECHECK_S = 10
# new env-key ceremonies a member opens per minute, for all apps together: a ceremony is n^2 sub-share calls
# and n sealed files kept for ever, and anyone can deploy an app (review 6, R6-2)
CEREMONIES_PER_MINUTE = 30

# presignatures an env-key signature never takes: each member's ENV_RESERVED lowest unused sessions are kept
# for app boots (ThresholdSignAppKey). Session ids are the same on every maker and env signing never takes
# the lowest ones, so those stay unused on every member alike (a count per member would not do: members'
# pools diverge as different t-subsets sign) and unauthenticated env-key requests cannot starve boots of
# their KMS signature (review 6, R6-2); when no other presignature is left the env request is a 503 "retry"
ENV_RESERVED = 4


def env_usable(unused: Iterable[bytes]) -> list[bytes]:
    """The presignatures of `unused` an env-key signature may take (all but the ENV_RESERVED lowest)."""
    return sorted(unused)[ENV_RESERVED:]


TIMESTAMP_SKEW_S = 60
SIGN_ATTEMPTS = 6
_pick = secrets.SystemRandom()
MAX_OPEN_CEREMONIES = 64
# share recovery (a member that missed a ceremony, or whose commit failed, gets its share from t holders)
RECOVERY_WINDOW_S = 120
MAX_OPEN_RECOVERIES = 64
RECOVERIES_PER_MINUTE = 30  # splits this node makes as a helper per minute, for all targets and apps
RECOVERIES_PER_TARGET = 4  # of those, splits per minute for one target (one member spends only its own)
_SEEN_RECOVERIES = 4096  # recovery sessions remembered (a replayed split is refused)


def ceremony_quorum(t: int, n: int) -> int:
    """Members that must deal in a new env-key ceremony: min(n, max(t+1, floor(n/2)+1, n-t+1)).
    t: secrecy (any t-1 colluders leave at least one honest dealer, whose random contribution hides x);
    +1: durability (the sharing survives one of its first holders failing before the absent members
    recovered their shares: recovery needs t holders); a majority: two ceremonies for one app cannot both
    gather a quorum of members that neither hold a share nor are busy with the other; n-t+1: every quorum
    meets every t members, so once t members hold a (usable) sharing, no quorum of members that hold none
    exists for a second one (review 7, R7-1; a sharing sealed on fewer than t members is not covered)."""
    return min(n, max(t + 1, n // 2 + 1, n - t + 1))


ENV_DIR = "threshold-env"
log = logging.getLogger("teecloud.kms.threshold_env")

_Sealer = Callable[[bytes], bytes]
_Sharing = tuple[bytes, ...]  # a sharing's Feldman commitments


class EnvKeyBusy(KmsUsageError):
    """Another ceremony for this app is under way (or the members' pools are contended): retry shortly."""


class _Withheld(KmsUsageError):
    """A ceremony's `view` or `finish` failed on `failed` (member -> why); `accused` (member -> dealer): the
    dealer a finishing member names in its answer's `accused` field. The coordinator tries once more
    without the member at fault (review 8, R8-1)."""

    def __init__(
        self, stage: str, failed: Mapping[int, str], accused: Mapping[int, int] | None = None
    ) -> None:
        super().__init__(
            f"env-key ceremony stage {stage} failed: "
            + "; ".join(f"{i}: {r}" for i, r in sorted(failed.items()))
        )
        self.stage, self.failed, self.accused = stage, dict(failed), dict(accused or {})


def legacy_digest(app_id: bytes, public_key: bytes) -> bytes:
    """dstack's legacy env-key signature digest: keccak256("dstack-env-encrypt-pubkey:" ‖ app_id ‖ pk)."""
    return keccak(b"dstack-env-encrypt-pubkey:" + app_id + public_key)


_RECORD_FORMAT = "teecloud-env-share-v3"
_LEGACY_FORMAT = "teecloud-env-share-v2"  # sealed before R7-1's two-phase commit: opened as tentative
_ANSWER_FORMAT = "teecloud-env-answer-v1"
_STATES = ("tentative", "confirmed")


def _sealed_record(epoch: int, app_id: bytes, share: tx.EnvKeyShare, state: str) -> bytes:
    """What is sealed for one app's env share: the share, the (epoch, app_id) it belongs to and its state
    (`tentative` as a ceremony's commit seals it, `confirmed` once t members are seen to hold the same
    commitments: review 7, R7-1). The file name is the host's to change; the sealed content is not
    (review 6, R6-1: a host that copied app B's sealed share over app A's file made the node answer A's
    boots with B's key)."""
    if state not in _STATES:
        raise ValueError(f"state: one of {_STATES}")
    doc = {
        "format": _RECORD_FORMAT,
        "epoch": epoch,
        "app_id": app_id.hex(),
        "state": state,
        "share": json.loads(tx.share_to_json(share)),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _open_record(data: bytes, epoch: int, app_id: bytes) -> tuple[tx.EnvKeyShare, bool]:
    """The share of a sealed record and whether it is confirmed, only if it was sealed for exactly
    (epoch, app_id). A v2 record (sealed before the two-phase commit) opens as tentative: it is promoted
    on first need only if t members hold its commitments, like any other tentative share."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise SealingError("not an env share record")
        if doc.get("format") == _LEGACY_FORMAT and set(doc) == {"format", "epoch", "app_id", "share"}:
            state = "tentative"
        elif doc.get("format") == _RECORD_FORMAT and set(doc) == {
            "format",
            "epoch",
            "app_id",
            "state",
            "share",
        }:
            state = doc["state"]
            if state not in _STATES:
                raise SealingError(f"unknown env share state {state!r}")
        else:
            raise SealingError(f"not a {_RECORD_FORMAT} record")
        if type(doc["epoch"]) is not int or doc["epoch"] != epoch or doc["app_id"] != app_id.hex():
            raise SealingError(
                f"sealed for epoch {doc['epoch']} and app {doc['app_id']}, not epoch {epoch} and app "
                f"{app_id.hex()} (a relabelled file)"
            )
        return tx.share_from_json(json.dumps(doc["share"]).encode()), state == "confirmed"
    except (ValueError, TypeError) as exc:
        raise SealingError(f"malformed sealed env record: {exc}") from exc


class EnvKeyStore:
    """This node's sealed per-app env shares: `<kms dir>/threshold-env/<epoch>-<app_id>.sealed`, each
    sealed to the node's measurement together with the (epoch, app_id) it belongs to (checked on open: the
    file name is the host's) and its state. A ceremony's commit seals a share TENTATIVE; it is served
    (`get`: signatures, partials, recovery help) only once CONFIRMED (`confirm`: one atomic rewrite, after
    this member saw t members hold the same commitments); a tentative share whose sharing was superseded is
    dropped (`drop_tentative`; review 7, R7-1), and so is a confirmed one that another sharing confirmed by t
    members superseded while n - t + 1 members answer without it (`drop_superseded`; review 8, R8-2). A
    share is never replaced otherwise."""

    def __init__(self, directory: Path, seal: _Sealer, unseal: _Sealer, *, index: int, t: int) -> None:
        self.dir = Path(directory)
        self._seal, self._unseal = seal, unseal
        self.index, self.t = index, t
        self._cache: dict[tuple[int, bytes], tuple[tx.EnvKeyShare, bool]] = {}
        self._lock = threading.Lock()

    def _path(self, epoch: int, app_id: bytes) -> Path:
        return self.dir / f"{epoch}-{app_id.hex()}.sealed"

    def record(self, epoch: int, app_id: bytes) -> tuple[tx.EnvKeyShare, bool] | None:
        """This node's sealed share of the app, in either state, and whether it is confirmed."""
        with self._lock:
            hit = self._cache.get((epoch, app_id))
        if hit is not None:
            return hit
        path = self._path(epoch, app_id)
        if not path.exists():
            return None
        try:
            share, confirmed = _open_record(self._unseal(path.read_bytes()), epoch, app_id)
        except (KeysError, SealingError, OSError) as exc:
            raise SealingError(f"the sealed env share {path.name} does not open: {exc}") from exc
        if share.index != self.index or share.t != self.t:
            raise SealingError(f"the sealed env share {path.name} is not share {self.index} at t={self.t}")
        with self._lock:
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[(epoch, app_id)] = (share, confirmed)
        return share, confirmed

    def sealed_at(self, epoch: int, app_id: bytes) -> float:
        """When the app's share file was last written (its mtime; 0.0 when there is none). The host can
        change it: it decides only when a tentative share counts as stale (R8-3), never whether it may be
        served."""
        try:
            return self._path(epoch, app_id).stat().st_mtime
        except OSError:
            return 0.0

    def get(self, epoch: int, app_id: bytes) -> tx.EnvKeyShare | None:
        """The app's CONFIRMED share (the only one anything is served from); None when there is none or
        it is still tentative."""
        rec = self.record(epoch, app_id)
        return rec[0] if rec is not None and rec[1] else None

    def apps(self, epoch: int) -> list[bytes]:
        """The apps this node holds a sealed env share of under `epoch`, in either state (from the file
        names; each share is still opened and checked by `record`)."""
        out = []
        for path in sorted(self.dir.glob(f"{epoch}-*.sealed")):
            app_hex = path.name[len(f"{epoch}-") : -len(".sealed")]
            if len(app_hex) == 40 and all(c in "0123456789abcdef" for c in app_hex):
                out.append(bytes.fromhex(app_hex))
        return out

    def erase(self) -> int:
        """Remove every sealed env share (a retired member: its shares were reshared away); how many."""
        gone = 0
        for path in self.dir.glob("*.sealed"):
            path.unlink(missing_ok=True)
            gone += 1
        with self._lock:
            self._cache.clear()
        return gone

    def put(self, epoch: int, app_id: bytes, share: tx.EnvKeyShare, *, tentative: bool = False) -> None:
        """Seal a share of the app: tentative (a ceremony's commit) or confirmed (a recovered or carried
        share: made from t holders' confirmed shares). Refused when any share of the app is sealed here."""
        if self.record(epoch, app_id) is not None:
            raise KmsUsageError("this member already holds a sealed env share of this app (never replaced)")
        state = "tentative" if tentative else "confirmed"
        atomic_write(self._path(epoch, app_id), self._seal(_sealed_record(epoch, app_id, share, state)))
        with self._lock:
            self._cache[(epoch, app_id)] = (share, not tentative)

    def confirm(self, epoch: int, app_id: bytes, commitments: tuple[bytes, ...]) -> tx.EnvKeyShare:
        """Promote the tentative share of exactly `commitments` (one atomic rewrite); the share."""
        rec = self.record(epoch, app_id)
        if rec is None or rec[0].commitments != commitments:
            raise KmsUsageError("no sealed env share of these commitments here to confirm")
        if not rec[1]:
            sealed = self._seal(_sealed_record(epoch, app_id, rec[0], "confirmed"))
            atomic_write(self._path(epoch, app_id), sealed)
            with self._lock:
                self._cache[(epoch, app_id)] = (rec[0], True)
        return rec[0]

    def drop_tentative(self, epoch: int, app_id: bytes, commitments: tuple[bytes, ...]) -> None:
        """Remove the TENTATIVE share of exactly `commitments` (a superseded sharing) and any answer sealed
        beside it; a confirmed share is never dropped here."""
        self._drop(epoch, app_id, commitments, confirmed=False)

    def drop_superseded(self, epoch: int, app_id: bytes, commitments: tuple[bytes, ...]) -> None:
        """Remove the CONFIRMED share of exactly `commitments` and the answer sealed beside it: only for
        `EnvKeys._settle_confirmed`'s rule (another sharing superseded it: review 8, R8-2)."""
        self._drop(epoch, app_id, commitments, confirmed=True)

    def _drop(self, epoch: int, app_id: bytes, commitments: tuple[bytes, ...], *, confirmed: bool) -> None:
        rec = self.record(epoch, app_id)
        if rec is None or rec[1] != confirmed or rec[0].commitments != commitments:
            state = "confirmed" if confirmed else "tentative"
            raise KmsUsageError(f"no {state} env share of these commitments here to drop")
        with self._lock:
            self._cache.pop((epoch, app_id), None)
        self._answer_path(epoch, app_id).unlink(missing_ok=True)
        self._path(epoch, app_id).unlink()

    # the last group-signed answer of GetAppEnvEncryptPubKey, sealed beside the share as
    # `<epoch>-<app>.answer`: public, sealed for integrity, bound to (epoch, app_id); replaced when re-signed

    def _answer_path(self, epoch: int, app_id: bytes) -> Path:
        return self.dir / f"{epoch}-{app_id.hex()}.answer"

    def answer(self, epoch: int, app_id: bytes) -> api.EnvEncryptPubKeyResponse | None:
        """The answer sealed for exactly (epoch, app_id); None when there is none or it does not open as
        one (the caller then signs anew and replaces it: nothing unverified is served)."""
        path = self._answer_path(epoch, app_id)
        try:
            if not path.exists():
                return None
            doc = json.loads(self._unseal(path.read_bytes()))
            if not isinstance(doc, dict) or set(doc) != {"format", "epoch", "app_id", "answer"}:
                return None
            bound = type(doc["epoch"]) is int and doc["epoch"] == epoch and doc["app_id"] == app_id.hex()
            if doc["format"] != _ANSWER_FORMAT or not bound:
                return None
            return api.EnvEncryptPubKeyResponse.model_validate(doc["answer"])
        except (KeysError, SealingError, OSError, ValueError, TypeError):
            return None

    def put_answer(self, epoch: int, app_id: bytes, answer: api.EnvEncryptPubKeyResponse) -> None:
        doc = {"format": _ANSWER_FORMAT, "epoch": epoch, "app_id": app_id.hex()}
        body = json.dumps({**doc, "answer": answer.model_dump()}, sort_keys=True, separators=(",", ":"))
        atomic_write(self._answer_path(epoch, app_id), self._seal(body.encode()))


@dataclass
class _Ceremony:
    session: bytes
    epoch: int
    app_id: bytes
    opened_at: float
    commitments: tuple[bytes, ...]
    shares: dict[int, int] = field(repr=False)
    view_hash: str = ""
    view: dict[int, tuple[bytes, ...]] = field(default_factory=dict)
    served: set[int] = field(default_factory=set)
    bound: dict[int, str] = field(default_factory=dict)
    pending: tx.EnvKeyShare | None = field(default=None, repr=False)


@dataclass
class _Recovery:
    """A helper's side of one share recovery (keys.share_repair enrollment) for `target`."""

    session: bytes
    epoch: int
    app_id: bytes
    target: int
    target_key: str  # the target's boot-time peer key: every later step comes from that process only
    opened_at: float
    split: sr.RepairSplit = field(repr=False)
    view_hash: str = ""
    table: dict[int, dict[int, bytes]] = field(default_factory=dict)
    summed: bool = False
    served: set[int] = field(default_factory=set)
    bound: dict[int, str] = field(default_factory=dict)


def _recovery_hash(
    session: bytes, epoch: int, app_id: bytes, target: int, table: Mapping[int, Mapping[int, bytes]]
) -> str:
    doc = {str(i): {str(j): d.hex() for j, d in sorted(row.items())} for i, row in sorted(table.items())}
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    head = (
        b"teecloud-env-recovery\x00" + session + epoch.to_bytes(4, "big") + app_id + target.to_bytes(2, "big")
    )
    return hashlib.sha256(head + body).hexdigest()


def _view_hash(session: bytes, epoch: int, app_id: bytes, view: Mapping[int, tuple[bytes, ...]]) -> str:
    doc = {str(i): [c.hex() for c in cs] for i, cs in sorted(view.items())}
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    h = hashlib.sha256(b"teecloud-env-dkg\x00" + session + epoch.to_bytes(4, "big") + app_id + body)
    return h.hexdigest()


def _hex32(text: str) -> bytes:
    return bytes.fromhex(text)


def _dealing_fault(answer: api.PeerEnvDkgResponse, t: int) -> str:
    """Why a member's `deal` answer that is a dealing (not `held`) cannot go into a view ("" when it can):
    exactly t commitments, each a valid edwards25519 point (review 11, R11-2: every member refuses
    a view holding one list of another length, so one dealer's bad list would fail every view, the
    coordinator's own included, and no one would be left out)."""
    if len(answer.commitments) != t:
        return f"dealt {len(answer.commitments)} commitments, {t} expected"
    try:  # public_share checks each is a point of the prime-order group (libsodium)
        tx.public_share([_hex32(c) for c in answer.commitments], 1)
    except (ValueError, tx.ThresholdEcdhError) as exc:
        return f"dealt commitments that are not points: {exc}"
    return ""


# a cover search stops after this many branches (reached only with many members and accusations); then a
# greedy cover (the most-accused first), which may be larger than the smallest
_COVER_BRANCHES = 20_000


def _smallest_cover(accused: Mapping[int, set[int]], me: int, budget: int) -> set[int]:
    """A smallest set of members that holds an end of every accusation (`accused`: dealer -> the members
    that named it; a member in its own set failed by itself and is forced in), `me` never in it (who names
    `me` is forced in). Among the smallest: the most named members, then the higher indices (deterministic).
    Searched up to `budget` members (branching on an uncovered accusation's two ends); none that small, or
    the search too long: a greedy cover (the most named first), for the caller's refusal."""
    edges = {(a, d) for d, who in accused.items() for a in who}
    forced = {a if d in (a, me) else d for a, d in edges if me in (a, d) or a == d}
    rest = sorted((a, d) for a, d in edges if a not in forced and d not in forced)
    named = collections.Counter(d for _, d in rest)
    found: list[frozenset[int]] = []
    branches = 0

    def grow(chosen: frozenset[int], size: int) -> None:
        nonlocal branches
        branches += 1
        edge = next(((a, d) for a, d in rest if a not in chosen and d not in chosen), None)
        if edge is None:
            found.append(chosen)
        elif len(chosen) < size and branches < _COVER_BRANCHES:
            for v in edge:
                grow(chosen | {v}, size)

    for size in range(max(0, budget - len(forced)) + 1):
        grow(frozenset(), size)
        if found or branches >= _COVER_BRANCHES:
            break
    if found:
        return forced | max(found, key=lambda c: (sum(named[v] for v in c), sorted(c, reverse=True)))
    cover: set[int] = set()
    for a, d in sorted(rest, key=lambda e: (-named[e[1]], e)):
        if a not in cover and d not in cover:
            cover.add(d)
    return forced | cover


class EnvKeys:
    """This member's side of per-app env keys (module docstring): ceremony stages, the coordinator, the
    signature and the CVM's partial."""

    def __init__(
        self,
        *,
        index: int,
        t: int,
        n: int,
        epochs: Callable[[], tuple[int, ...]],
        store: EnvKeyStore,
        signer: Callable[[], ThresholdSigner | None],
        connect: Callable[[int, str], PeerClient],
        app_registered: Callable[[bytes], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`app_registered(app_id)`: the env-key gate; raises AccessDenied unless KmsAuth deployed the app
        itself from its blueprint, read at the node's finality depth (KmsService._app_deployed; fail
        closed)."""
        self.index, self.t, self.n = index, t, n
        self._epochs = epochs
        self.store = store
        self._signer = signer
        self._connect = connect
        self._app_registered = app_registered
        self._clock = clock
        self.peers: dict[int, str] = {}
        self._open: dict[bytes, _Ceremony] = {}
        self._lock = threading.Lock()
        self._app_locks: dict[tuple[int, bytes], threading.Lock] = {}
        self._answers: dict[tuple[int, bytes], api.EnvEncryptPubKeyResponse] = {}
        self._opened: collections.deque[float] = collections.deque()  # when this member opened ceremonies
        self._burnt: set[bytes] = set()  # presignatures some member refused (bound to another digest)
        self._recoveries: dict[bytes, _Recovery] = {}
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._recovered: collections.deque[float] = collections.deque()  # when this helper split
        self._recovered_for: dict[int, collections.deque[float]] = {}  # the same, per target index
        self._rechecked: dict[tuple[int, bytes], float] = {}  # when a confirmed share was last polled, kept

    # --- configuration

    def set_peers(self, peers: Mapping[int, str]) -> None:
        if any(not 1 <= i <= self.n for i in peers):
            raise KmsUsageError(f"peers: share indices 1..{self.n}")
        self.peers = {i: u for i, u in peers.items() if i != self.index}

    def _check_epoch(self, epoch: int) -> None:
        if epoch not in self._epochs():
            raise AccessDenied(f"this node serves no root epoch {epoch}", step="epoch")

    # --- a member's stages (the coordinator calls its own directly, the others over kms.peering)

    def stage(self, req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        session, app_id = bytes.fromhex(req.session), bytes.fromhex(req.app_id)
        out = api.PeerEnvDkgResponse(index=self.index, stage=req.stage)
        if req.stage in ("held", "recover", "confirm"):
            self._check_epoch(req.epoch)
            self._app_registered(app_id)
            rec = self.store.record(req.epoch, app_id)
            # recover: a member that lacks the sharing (or holds a tentative share) repairs; confirm: a
            # member with a tentative share settles it (promoted, or dropped for the app's sharing and
            # recovered, or left tentative: the answer says which); held: never any call (a poll answer)
            settle = req.stage == "recover" and (rec is None or not rec[1])
            settle |= req.stage == "confirm" and rec is not None and not rec[1]
            if settle:
                try:
                    with self._app_lock(req.epoch, app_id):
                        self.recover(req.epoch, app_id)
                except KmsUsageError:
                    if req.stage == "recover":
                        raise
                rec = self.store.record(req.epoch, app_id)
            elif req.stage == "confirm" and rec is not None:
                # a confirmed share: polled again, dropped if another sharing superseded it (R8-2)
                try:
                    with self._app_lock(req.epoch, app_id):
                        self.recheck(req.epoch, app_id)
                except KmsUsageError as exc:  # dropped, and recovery failed: the next need recovers
                    log.warning("env share of app %s: dropped, not recovered: %s", app_id.hex(), exc)
                rec = self.store.record(req.epoch, app_id)
            if rec is not None:
                out.held, out.commitments = True, [c.hex() for c in rec[0].commitments]
                out.tentative = not rec[1]
            return out
        if req.stage == "deal":
            self._check_epoch(req.epoch)
            self._app_registered(app_id)
            rec = self.store.record(req.epoch, app_id)
            if rec is not None:  # a tentative share too: it is settled, never dealt over (R7-1)
                out.held, out.commitments = True, [c.hex() for c in rec[0].commitments]
                out.tentative = not rec[1]
                return out
            commitments, shares = tx.deal(self.t, self.n)
            with self._lock:
                self._expire()
                if session in self._open:
                    raise KmsUsageError("a ceremony with this session is already open here")
                busy = [c for c in self._open.values() if (c.epoch, c.app_id) == (req.epoch, app_id)]
                if busy:
                    raise EnvKeyBusy(
                        f"member {self.index}: another env-key ceremony for this app is under way: "
                        "retry shortly"
                    )
                if len(self._open) >= MAX_OPEN_CEREMONIES:
                    raise EnvKeyBusy(f"member {self.index}: too many env-key ceremonies open: retry shortly")
                now = self._clock()
                while self._opened and now - self._opened[0] >= 60:
                    self._opened.popleft()
                if len(self._opened) >= CEREMONIES_PER_MINUTE:  # node-wide, whoever asks (review 6, R6-2)
                    raise EnvKeyBusy(
                        f"member {self.index}: {CEREMONIES_PER_MINUTE} env-key ceremonies in the last minute "
                        "(this node's budget): retry shortly"
                    )
                self._opened.append(now)
                self._open[session] = _Ceremony(
                    session, req.epoch, app_id, self._clock(), commitments, shares
                )
            out.commitments = [c.hex() for c in commitments]
            return out
        if req.stage == "abort":  # the coordinator gave up: this member's dealing is dropped
            with self._lock:
                cer_ = self._open.get(session)
                if cer_ is not None and (cer_.epoch, cer_.app_id) == (req.epoch, app_id):
                    del self._open[session]
            return out
        cer = self._ceremony(session, req.epoch, app_id)
        if req.stage == "view":
            view = {int(i): tuple(_hex32(c) for c in cs) for i, cs in req.view.items()}
            quorum = ceremony_quorum(self.t, self.n)
            if (
                not set(view) <= set(range(1, self.n + 1))
                or len(view) < quorum
                or self.index not in view
                or any(len(cs) != self.t for cs in view.values())
            ):
                self._drop(session)
                raise KmsUsageError(
                    f"view: {self.t} commitments of each of at least {quorum} of the {self.n} members, this "
                    "member's among them"
                )
            if view[self.index] != cer.commitments:
                self._drop(session)
                raise KmsUsageError("the relayed view alters this member's own commitments")
            if cer.view_hash:
                raise KmsUsageError("this ceremony already has its view")
            cer.view, cer.view_hash = view, _view_hash(session, cer.epoch, app_id, view)
            out.view_hash = cer.view_hash
            return out
        if req.stage == "finish":
            if not cer.view_hash:
                raise KmsUsageError("finish before view")
            if cer.pending is None:
                try:
                    cer.pending = self._finish(cer, {int(i): u for i, u in req.peers.items()})
                except tx.ThresholdEcdhError as exc:
                    self._drop(session)
                    if exc.party is None or exc.party == self.index:
                        raise KmsUsageError(f"member {self.index}: the ceremony fails here: {exc}") from exc
                    # a dealer whose sub-share did not come or does not verify: named in a field (R8-1)
                    log.warning(
                        "env-key ceremony %s: dealer %d failed here: %s", req.session[:8], exc.party, exc
                    )
                    out.accused = exc.party
                    return out
                except (KmsClientError, KmsDenied) as exc:
                    self._drop(session)
                    raise KmsUsageError(f"member {self.index}: the ceremony fails here: {exc}") from exc
            out.commitments = [c.hex() for c in cer.pending.commitments]
            return out
        # commit
        if cer.pending is None or [c.hex() for c in cer.pending.commitments] != req.commitments:
            self._drop(session)
            raise KmsUsageError("commit of other commitments than this member finished with")
        self.store.put(cer.epoch, app_id, cer.pending, tentative=True)  # served only once confirmed (R7-1)
        self._drop(session)
        out.commitments = req.commitments
        return out

    def _finish(self, cer: _Ceremony, peers: Mapping[int, str]) -> tx.EnvKeyShare:
        urls = {**self.peers, **{i: u for i, u in peers.items() if i != self.index}}
        others = [i for i in sorted(cer.view) if i != self.index]  # the dealers of this ceremony
        got = self._secret_from_each(
            others,
            urls,
            api.PATH_PEER_ENV_SHARE,
            api.PeerEnvShareResponse,
            session=cer.session.hex(),
            view_hash=cer.view_hash,
            fields=("dealer", "share"),
            fail=tx.ThresholdEcdhError,
            words=("member", "sub-share", "dealer or ceremony"),
        )
        got[self.index] = cer.shares[self.index]
        return tx.dkg_receive(self.index, self.t, dict(cer.view), got)

    def serve_share(self, node: AdmittedNode, req: api.PeerEnvShareRequest) -> tuple[int, bytes]:
        """A member's sub-share of this member's dealing: once, to one boot-time key, same view only."""
        if not isinstance(node, AdmittedNode):
            raise TypeError("sub-shares only for an AdmittedNode")
        with self._lock:
            self._expire()
            cer = self._open.get(bytes.fromhex(req.session))
            if cer is None:
                raise AccessDenied("no open env-key ceremony with this session here", step="round")
            if node.index == self.index or node.index not in cer.view:
                raise AccessDenied(
                    f"member {node.index} is not another dealer of this ceremony", step="round"
                )
            if not cer.view_hash or not secrets.compare_digest(cer.view_hash, req.view_hash):
                raise AccessDenied(
                    f"the commitments member {node.index} was relayed differ from this member's", step="round"
                )
            if cer.bound.setdefault(node.index, node.key_id) != node.key_id or node.index in cer.served:
                raise AccessDenied(f"member {node.index}'s sub-share was already handed out", step="round")
            cer.served.add(node.index)
            return self.index, tx._scalar(cer.shares[node.index])

    # --- the coordinator (GetAppEnvEncryptPubKey on this node)

    def public_key(self, epoch: int, app_id: bytes) -> api.EnvEncryptPubKeyResponse:
        self._check_epoch(epoch)
        self._app_registered(app_id)
        key = (epoch, app_id)
        with self._app_lock(epoch, app_id):  # concurrent first requests of one app: one ceremony, others wait
            share = self.store.get(epoch, app_id)
            if share is None and self.store.record(epoch, app_id) is not None:
                try:  # this member's tentative share: settled first, never a ceremony over it (R7-1)
                    share = self.recover(epoch, app_id)
                except KmsUsageError as exc:
                    if self.store.record(epoch, app_id) is not None:
                        raise EnvKeyBusy(f"this member's env share of the app is not settled: {exc}") from exc
                    # dropped as an orphan and no sharing to recover: a new ceremony (below)
            if share is None:
                self._ceremony_run(epoch, app_id)
                share = self.store.get(epoch, app_id)
                if share is None:
                    raise EnvKeyBusy("the new env sharing is not confirmed on t members yet: retry shortly")
            cached = self._answers.get(key)
            if cached is None:  # a restarted node: the answer sealed beside the share, if it still verifies
                cached = self.store.answer(epoch, app_id)
                if cached is not None and not self._answer_verifies(app_id, share, cached):
                    cached = None
            if cached is None or not 0 <= self._clock() - cached.timestamp < SIGNATURE_REFRESH_S:
                try:
                    cached = self._sign(epoch, app_id, share)
                except EnvKeyBusy:
                    # no t members signed this key: maybe this member's share is of a dead sharing (R8-2)
                    replaced = self._after_recheck(epoch, app_id)
                    if replaced is None:
                        raise
                    share = replaced
                    cached = self._sign(epoch, app_id, share)
                try:
                    self.store.put_answer(epoch, app_id, cached)
                except (OSError, SealingError) as exc:  # served anyway (signed already); kept in memory
                    log.warning("the signed env answer of app %s was not sealed: %s", app_id.hex(), exc)
            if len(self._answers) >= 4096:
                self._answers.clear()
            self._answers[key] = cached
            return cached

    def _after_recheck(self, epoch: int, app_id: bytes) -> tx.EnvKeyShare | None:
        """After a failed signature round: the share this member holds once its confirmed share was polled
        again and replaced (R8-2); None when it was kept."""
        try:
            return self.recheck(epoch, app_id)
        except KmsUsageError as exc:
            raise EnvKeyBusy(
                f"this member's env share of the app was superseded and dropped; recovery failed: {exc}"
            ) from exc

    def _answer_verifies(
        self, app_id: bytes, share: tx.EnvKeyShare, answer: api.EnvEncryptPubKeyResponse
    ) -> bool:
        """A sealed answer is served only for this share's public key, both signatures by the group key."""
        signer = self._signer()
        pub = tx.x25519_public_key(share.commitments)
        if signer is None or answer.public_key != pub.hex():
            return False
        pairs = (
            (answer.signature, legacy_digest(app_id, pub)),
            (answer.signature_v1, env_encrypt_pubkey_digest(app_id, pub, answer.timestamp)),
        )
        try:
            for sig, digest in pairs:
                rec = coincurve.PublicKey.from_signature_and_message(bytes.fromhex(sig), digest, hasher=None)
                if rec.format(compressed=True) != signer.group_public_key:
                    return False
        except (ValueError, TypeError, OverflowError):
            return False
        return True

    def _app_lock(self, epoch: int, app_id: bytes) -> threading.Lock:
        key = (epoch, app_id)
        with self._lock:
            lock = self._app_locks.setdefault(key, threading.Lock())
            if len(self._app_locks) > 4096:
                self._app_locks = {key: lock}
        return lock

    def _each(
        self, body: dict[str, object], members: list[int]
    ) -> tuple[dict[int, api.PeerEnvDkgResponse], dict[int, str]]:
        """The stage on every member in parallel: the answers, and the members that failed (why). Only this
        node's own EnvKeyBusy makes the whole call EnvKeyBusy; another member's busy answer (its 503 "retry
        shortly", or any 503, e.g. a sealed file its host spoiled) fails THAT member, as a down one (review
        11, R11-1: else one liar or one host answering 503 to every message stops every ceremony and every
        poll of the app).

        Leaving a busy member out never lets two concurrent ceremonies of one app both complete: a member
        keeps at most one open dealing per app (`deal` refuses a second), so two ceremonies' dealers are
        disjoint sets of members, and each needs ceremony_quorum(t, n) > n/2 of them (the coordinator counts
        its dealers, and every member refuses a view of fewer): two disjoint majorities of n members do not
        exist. A ceremony that met the other's members busy falls short of the quorum and ends in EnvKeyBusy
        (tests/kms/test_threshold_env_busy.py)."""
        answers: dict[int, api.PeerEnvDkgResponse] = {}
        failed: dict[int, str] = {}

        def one(i: int) -> None:
            try:
                answers[i] = self._all(body, [i])[i]
            except EnvKeyBusy as exc:
                if i == self.index:  # this node's own ceremony slot or budget: the request waits
                    raise
                failed[i] = str(exc)[:300]
            except (KmsUsageError, KmsDenied, KmsClientError) as exc:
                failed[i] = str(exc)[:300]

        with ThreadPoolExecutor(max_workers=len(members)) as pool:
            for f in [pool.submit(one, i) for i in members]:
                f.result()
        return answers, failed

    def _all(self, body: dict[str, object], members: list[int]) -> dict[int, api.PeerEnvDkgResponse]:
        req = api.PeerEnvDkgRequest.model_validate(body)

        def one(i: int) -> api.PeerEnvDkgResponse:
            if i == self.index:
                return self.stage(req)
            url = self.peers.get(i)
            if url is None:
                raise KmsUsageError(f"member {i}: no URL known (admin POST /tenv/peers)")
            try:
                answer = self._connect(i, url).peer_call(api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, body)
            except (KmsClientError, KmsDenied) as exc:
                if "retry shortly" in str(exc) or "HTTP 503" in str(exc):  # that member's EnvKeyBusy
                    raise EnvKeyBusy(
                        f"member {i}: busy (another env-key ceremony of this app, its budget of ceremonies "
                        f"per minute, or its sealed state): {str(exc)[:160]}"
                    ) from exc
                raise KmsUsageError(f"member {i}: env-key ceremony stage {req.stage}: {exc}") from exc
            if answer.index != i or answer.stage != req.stage:
                raise KmsUsageError(f"member {i}: answered as another member or stage")
            return answer

        with ThreadPoolExecutor(max_workers=len(members)) as pool:
            futures = {i: pool.submit(one, i) for i in members}
            return {i: f.result() for i, f in futures.items()}

    def _ceremony_run(self, epoch: int, app_id: bytes) -> None:
        """A new sharing among the members that answer (at least ceremony_quorum), or, when t members
        already hold one (an earlier ceremony sealed on some members only), this node's share of THAT
        sharing by share recovery, and the same for every other reachable member that lacks it.

        A `held` answer to `deal` is a claim, not proof (review 7, R7-3: one member claiming `held` for
        every app must not stop every new env key). Claims turn the request into a repair whenever fewer
        than n − t + 1 members dealt: t holders of an existing sharing may then be among the claimants and
        the members that did not answer (t claimants of the same commitments always are, as
        t + (n − t + 1) > n). When at least n − t + 1 members dealt (none of them holding a share), at most
        t − 1 members can hold any earlier sharing of the app: the claimants are named (log, and the error
        if the ceremony then fails), left out of the dealers, and the ceremony goes on among the others
        under the quorum rule. Safe for the honest case: a sharing committed on fewer than t members cannot
        be used (no t members sign its public key, no CVM combines t partials under it), and one committed
        on t or more is always repaired, never replaced.

        Two-phase commit (review 7, R7-1): a commit seals a share TENTATIVE, served by nothing; each member
        that committed then settles it from its own poll of the members (`confirm`, sent after every
        commit; or its first need): promoted when t members hold those commitments, dropped when fewer than
        t can. A ceremony that meets tentative holders lets them settle first, then deals again once, so a
        coordinator that stopped between commits leaves nothing the next request does not finish."""
        settle = True
        left_out: dict[int, str] = {}  # member -> why it is not asked to deal in the next try
        accused: dict[int, set[int]] = {}  # dealer -> the members that named it in a failed finish
        for _ in range(self.n + 1):  # each withheld try leaves out one more member (or refuses): bounded
            try:
                if self._ceremony_once(epoch, app_id, settle=settle, left_out=left_out):
                    return
                settle = False
            except _Withheld as exc:
                self._leave_out(exc, left_out, accused)
                log.warning(
                    "env key of app %s: %s; trying again at once without members %s",
                    app_id.hex(),
                    exc,
                    sorted(left_out),
                )
        raise EnvKeyBusy(f"no env-key ceremony completed (retry shortly); left out: {left_out}")

    def _leave_out(self, exc: _Withheld, left_out: dict[int, str], accused: dict[int, set[int]]) -> None:
        """Who a failed `view`/`finish` leaves out of the next try (review 8, R8-1; review 9, R9-1).

        `accused` keeps this request's evidence across its tries: dealer -> the members that named it in
        a finish answer's `accused` field; a member that failed its own stage (or named itself, this node,
        a non-member or a member not dealing) is in its own set. Each accusation is true or a liar's, so
        the liars (with any member that really failed) hold an end of every one: the next try leaves out
        a SMALLEST such set (`_smallest_cover`), never this node (it knows its own stage). That set is
        never larger than the liars, so while q honest members are up, q remain: of a withholder and its
        one victim naming each other, one is left out, and should it be the victim, the withholder's next
        accusation (or the next member naming it) makes the withholder alone the smaller set and deals the
        victim in again (R9-1). No set leaves q: the next try ends in EnvKeyBusy (needs q); the tries of
        `_ceremony_run` are bounded. Availability only: who deals never weakens the view rule (every
        member refuses a view of fewer than ceremony_quorum dealers), so a quorum meets every t members."""
        dealing = set(range(1, self.n + 1)) - set(left_out)
        reasons: dict[int, str] = {}
        for i, reason in sorted(exc.failed.items()):
            named = exc.accused.get(i) if exc.stage == "finish" else None
            if i == self.index and named in (None, self.index):
                raise KmsUsageError(f"this member failed its own env-key ceremony stage: {exc}") from exc
            if named is None or named in (i, self.index) or named not in dealing:
                accused.setdefault(i, set()).add(i)  # its own failure, or a false accusation
                reasons[i] = f"failed its {exc.stage} ({reason[:120]})"
            else:
                accused.setdefault(named, set()).add(i)
        out = _smallest_cover(accused, self.index, self.n - 1)
        for i in out:
            if i not in reasons and i in accused.get(i, set()):  # failed by itself in an earlier try
                reasons[i] = left_out.get(i, "failed its stage in an earlier try")
            elif i not in reasons:
                who = sorted(accused.get(i, set()))
                reasons[i] = f"named by members {who} (withheld its sub-share from them, or they lie)"
        left_out.clear()
        left_out.update({i: reasons[i] for i in sorted(out)})

    def _ceremony_once(self, epoch: int, app_id: bytes, *, settle: bool, left_out: Mapping[int, str]) -> bool:
        """One try of `_ceremony_run` among the members not `left_out`; False when it stopped to let
        tentative holders settle first; _Withheld when `view` or `finish` failed on some member."""
        members = [i for i in range(1, self.n + 1) if i not in left_out]
        base: dict[str, object] = {"session": secrets.token_hex(16), "epoch": epoch, "app_id": app_id.hex()}
        dealt: list[int] = members
        try:
            deals, down = self._each({**base, "stage": "deal"}, members)
            # a dealing that is not t valid points is that member's failure, as a down member's (R11-2);
            # its open dealing is dropped at once (else it holds the app's ceremony slot there)
            bad = {i: _dealing_fault(a, self.t) for i, a in deals.items() if not a.held}
            bad = {i: why for i, why in bad.items() if why}
            if bad:
                self._abort(base, sorted(bad))
                for i, why in bad.items():
                    del deals[i]
                    down[i] = why
                log.warning(
                    "env key of app %s: malformed dealings left out: %s",
                    app_id.hex(),
                    "; ".join(f"member {i}: {w}" for i, w in sorted(bad.items())),
                )
            dealt = sorted(i for i, a in deals.items() if not a.held)
            claims = {i: a.commitments for i, a in deals.items() if a.held}
            tentative = sorted(i for i, a in deals.items() if a.held and a.tentative and i != self.index)
            if tentative and settle:
                # members hold tentative shares (a ceremony whose coordinator stopped between its commits
                # and its confirms): each settles its own first (promoted when t members hold it, dropped
                # when fewer than t can), then this runs once more with what they hold now (R7-1)
                self._abort(base, dealt)
                self._settle_others(base, tentative)
                return False
            if claims and len(dealt) < self.n - self.t + 1:
                self._abort(base, dealt)  # repair, never a second sharing of the app
                self._repair(epoch, app_id, [i for i in dealt if i != self.index])
                return True
            if claims:
                log.warning(
                    "env key of app %s: members %s claim to hold a sharing, at most %d members can (%s): "
                    "left out of this ceremony's dealers (a lying or orphaned holder)",
                    app_id.hex(),
                    sorted(claims),
                    self.t - 1,
                    "; ".join(f"{i}: {(cs or ['none'])[0][:16]}" for i, cs in sorted(claims.items())),
                )
            quorum = ceremony_quorum(self.t, self.n)
            if len(dealt) < quorum or self.index not in dealt:
                why = "; ".join(
                    [f"member {i}: {r}" for i, r in sorted(down.items())]
                    + [f"member {i}: left out, {r}" for i, r in sorted(left_out.items())]
                    + [f"member {i}: claims `held`, left out" for i in sorted(claims)]
                )
                raise EnvKeyBusy(
                    f"a new env key needs {quorum} of {self.n} members, {len(dealt)} answered "
                    f"(retry shortly){': ' + why if why else ''}"
                )
            self._ceremony_stages(base, deals, dealt)
            # every claimant settles, or (confirmed) polls again: its sharing is now superseded (R7-1, R8-2)
            self._settle_others(base, sorted(claims))
            return True
        except Exception:
            # best effort: every member drops its dealing of this session (else it would hold the app's
            # ceremony slot until CEREMONY_WINDOW_S); nothing was sealed unless commit ran
            self._abort(base, dealt)
            raise

    def _settle_others(self, base: dict[str, object], members: list[int]) -> None:
        """Best effort: `members` settle their tentative shares (each decides alone, from its own poll)."""
        if members:
            _, failed = self._each({**base, "stage": "confirm"}, members)
            for i, reason in sorted(failed.items()):
                log.warning("member %d did not settle its env share of app %s: %s", i, base["app_id"], reason)

    def _abort(self, base: dict[str, object], members: list[int]) -> None:
        if not members:
            return
        try:
            self._each({**base, "stage": "abort"}, members)
        except Exception:  # noqa: S110 - a member that cannot be told expires the dealing itself
            pass

    def _ceremony_stages(
        self, base: dict[str, object], deals: Mapping[int, api.PeerEnvDkgResponse], members: list[int]
    ) -> None:
        view = {str(i): deals[i].commitments for i in members}
        hashes, failed = self._each({**base, "stage": "view", "view": view}, members)
        if self.index in hashes:  # a hash other than this member's own: that member is at fault
            own = hashes[self.index].view_hash
            failed.update({i: "answered another view hash" for i, a in hashes.items() if a.view_hash != own})
        if failed:  # a member that refuses the view or hashes another (R8-1, R9-2): left out next try
            raise _Withheld("view", failed)
        peers = {str(i): u for i, u in self.peers.items()}
        finished, failed = self._each({**base, "stage": "finish", "peers": peers}, members)
        accused = {i: a.accused for i, a in finished.items() if a.accused is not None}
        failed.update({i: f"names dealer {d} (no valid sub-share from it)" for i, d in accused.items()})
        results = {i: tuple(a.commitments) for i, a in finished.items() if a.accused is None}
        agreed = results.get(self.index)
        if agreed is not None:  # this member finished: who finished with other commitments is at fault
            off = sorted(i for i, c in results.items() if c != agreed)
            failed.update({i: "finished with other commitments than this member" for i in off})
        if failed:  # a failed finish, a named dealer, other commitments (R8-1, R9-2): left out next try
            raise _Withheld("finish", failed, accused)
        assert agreed is not None  # this member finished (else it is in `failed`)
        self.stage(
            api.PeerEnvDkgRequest.model_validate({**base, "stage": "commit", "commitments": list(agreed)})
        )
        # this member sealed (tentative): a member whose commit fails now (crash, network) gets its share by
        # recovery (below, or on its own next request), never from a second ceremony
        others = [i for i in members if i != self.index]
        _, failed = self._each({**base, "stage": "commit", "commitments": list(agreed)}, others)
        # phase two: each member that committed settles its tentative share from its OWN poll of the
        # members (promoted only when t of them, itself included, hold these commitments; the coordinator's
        # word is not evidence); this node first (its app lock is held: called directly)
        epoch, app_id = int(str(base["epoch"])), bytes.fromhex(str(base["app_id"]))
        try:
            self.recover(epoch, app_id)
        except KmsUsageError as exc:
            raise EnvKeyBusy(
                f"the new env sharing is not confirmed: fewer than {self.t} members committed it ({exc})"
            ) from exc
        self._settle_others(base, [i for i in others if i not in failed])
        if failed:
            log.warning(
                "env key of app %s: commit failed on members %s (%s); repairing by share recovery",
                base["app_id"],
                sorted(failed),
                "; ".join(f"{i}: {r[:100]}" for i, r in sorted(failed.items())),
            )
            self._repair(epoch, app_id, sorted(failed))

    def _repair(self, epoch: int, app_id: bytes, lacking: list[int]) -> None:
        """This node's missing share (share recovery), then best effort the other `lacking` members' (each
        recovers its own share: a member is told to, never sent one)."""
        if self.store.get(epoch, app_id) is None:
            self.recover(epoch, app_id)
        if lacking:
            body: dict[str, object] = {
                "session": secrets.token_hex(16),
                "epoch": epoch,
                "app_id": app_id.hex(),
                "stage": "recover",
            }
            _, failed = self._each(body, lacking)
            for i, reason in sorted(failed.items()):
                log.warning("member %d did not recover its env share of app %s: %s", i, app_id.hex(), reason)

    # --- share recovery: the target's side (this node lacks its share of an existing sharing)

    def recover(self, epoch: int, app_id: bytes) -> tx.EnvKeyShare:
        """This member's share of the app's existing sharing, from t members that hold it (keys.share_repair
        enrollment over kms.peering), checked against the commitments t holders agree on, then sealed.
        The caller holds the app's lock."""
        rec = self.store.record(epoch, app_id)
        if rec is not None and rec[1]:
            return rec[0]
        self._check_epoch(epoch)
        claims, by_sharing, answered = self._poll(epoch, app_id)
        if rec is not None:  # this member's tentative share: promote, drop, or leave it (never serve it)
            silent = len(self.peers) - answered  # members that did not answer this poll
            promoted = self._settle(epoch, app_id, rec[0], claims, by_sharing, answered, silent)
            if promoted is not None:
                return promoted
        usable = {c: hs for c, hs in by_sharing.items() if len(hs) >= self.t}
        if len(usable) != 1:
            what = {i: c[0].hex()[:16] for c, hs in by_sharing.items() for i in hs}
            raise KmsUsageError(
                f"no env share of this app to recover: {self.t} members holding one sharing are needed, "
                f"the reachable holders are {what or 'none'}"
                + (" (two sharings: see docs/kms.md, recovery runbook)" if len(usable) > 1 else "")
            )
        sharing, holders = next(iter(usable.items()))
        faults: dict[int, str] = {}
        for attempt in range(2):  # a helper that fails is named and left out of a second attempt
            helpers = [h for h in holders if h not in faults][: self.t]
            if len(helpers) < self.t:
                break
            try:
                share = self._recover_from(epoch, app_id, sharing, helpers)
            except sr.RepairError as exc:
                faults[exc.party if exc.party is not None else -attempt - 1] = str(exc)
                continue
            except (KmsClientError, KmsDenied, KmsUsageError) as exc:
                party = next((h for h in helpers if f"member {h}" in str(exc)), -attempt - 1)
                faults[party] = str(exc)[:300]
                continue
            self.store.put(epoch, app_id, share)
            log.info("env share of app %s recovered from members %s", app_id.hex(), helpers)
            for i, reason in sorted(faults.items()):
                log.warning("share recovery of app %s: member %d failed or lied: %s", app_id.hex(), i, reason)
            return share
        detail = "; ".join(f"member {i}: {r}" for i, r in sorted(faults.items()))
        raise KmsUsageError(f"share recovery of this app's env share failed: {detail}")

    def _poll(
        self, epoch: int, app_id: bytes
    ) -> tuple[dict[_Sharing, list[int]], dict[_Sharing, list[int]], int]:
        """One `held` poll of every other member: who claims which commitments (sealed, either state), who
        of those says confirmed (the members that may help recover), and how many answered."""
        base: dict[str, object] = {"session": secrets.token_hex(16), "epoch": epoch, "app_id": app_id.hex()}
        answers, _ = self._each({**base, "stage": "held"}, sorted(self.peers))
        claims: dict[_Sharing, list[int]] = {}
        confirmed: dict[_Sharing, list[int]] = {}
        for i, a in sorted(answers.items()):
            if a.held and len(a.commitments) == self.t:
                cs = tuple(_hex32(c) for c in a.commitments)
                claims.setdefault(cs, []).append(i)
                if not a.tentative:
                    confirmed.setdefault(cs, []).append(i)
        return claims, confirmed, len(answers)

    def recheck(self, epoch: int, app_id: bytes) -> tx.EnvKeyShare | None:
        """This member's CONFIRMED share, polled again (review 8, R8-2): when its signature round failed,
        or a ceremony that met it as a claimant made the app's sharing without it. Dropped when another
        sharing superseded it (`_settle_confirmed`), then the app's sharing recovered (KmsUsageError when
        that fails: the member then holds nothing and recovers at its next need). Returns the share it
        holds now when it changed, None when it was kept (or there is no confirmed share, or it was
        polled less than RECHECK_S ago and kept). The caller holds the app's lock."""
        rec = self.store.record(epoch, app_id)
        if rec is None or not rec[1]:
            return None
        key, now = (epoch, app_id), self._clock()
        with self._lock:
            last = self._rechecked.get(key)
            if last is not None and 0 <= now - last < RECHECK_S:
                return None
            if len(self._rechecked) >= 4096:
                self._rechecked.clear()
            self._rechecked[key] = now
        claims, confirmed, answered = self._poll(epoch, app_id)
        if not self._settle_confirmed(epoch, app_id, rec[0], claims, confirmed, answered):
            return None
        with self._lock:
            self._rechecked.pop(key, None)
            self._answers.pop(key, None)
        return self.recover(epoch, app_id)

    def _settle_confirmed(
        self,
        epoch: int,
        app_id: bytes,
        mine: tx.EnvKeyShare,
        claims: Mapping[_Sharing, list[int]],
        confirmed: Mapping[_Sharing, list[int]],
        answered: int,
    ) -> bool:
        """Drops this member's CONFIRMED share `mine` (True) when another sharing superseded it (review 8,
        R8-2): at least n − t + 1 of the members that answered the poll do not claim its commitments, and
        exactly one other sharing has t CONFIRMED claimants (the one the caller then recovers). Against
        t − 1 liars: while t honest members that answer hold `mine` (the app's sharing), at most n − t
        members answer without it, so it is never dropped whatever the liars claim; the liars can only keep
        a dead sharing alive (docs/kms.md "Two-phase commit")."""
        own = mine.commitments
        not_own = answered - len(claims.get(own, []))
        ahead = [c for c, hs in confirmed.items() if c != own and len(hs) >= self.t]
        if not_own < self.n - self.t + 1 or len(ahead) != 1:
            return False
        self.store.drop_superseded(epoch, app_id, own)
        log.warning(
            "env share of app %s: this member's confirmed share (%s) dropped: %d members answered without "
            "it, members %s confirmed the app's sharing %s",
            app_id.hex(),
            own[0].hex()[:16],
            not_own,
            confirmed[ahead[0]],
            ahead[0][0].hex()[:16],
        )
        return True

    def _settle(
        self,
        epoch: int,
        app_id: bytes,
        mine: tx.EnvKeyShare,
        claims: Mapping[tuple[bytes, ...], list[int]],
        confirmed: Mapping[tuple[bytes, ...], list[int]],
        answered: int,
        silent: int = 0,
    ) -> tx.EnvKeyShare | None:
        """This member's tentative share `mine`, settled from one poll of the other members (`answered` of
        them answered; `claims`: who says it sealed which commitments, `confirmed`: of those, who says
        confirmed). Returns the share once promoted: t members hold its commitments, this one included,
        and no other sharing has t claimants. Drops it and returns None (the caller recovers the app's
        sharing, or a new ceremony makes one) when fewer than t members can hold it: n − t + 1 members
        answered without claiming it (an orphan), or another sharing has t CONFIRMED claimants and this one
        fewer than t claimants (superseded). Else it stays tentative and KmsUsageError: nothing is served
        from it, the next need polls again. t − 1 liars can delay this (a tie), and can lift an orphan to
        t claimants (docs/kms.md "Two-phase commit": what they can and cannot do).

        Also dropped (review 8, R8-3: a coordinator that committed on t − 1 members and went silent) when
        it is STALE: sealed more than CEREMONY_WINDOW_S ago (no ceremony is still under way for it) and the
        other members that may hold it (its claimants, in either state, plus the `silent` members that did
        not answer the poll) are fewer than t: without this member no t members can ever confirm it, so
        nothing is ever served from it."""
        own = mine.commitments
        count = {c: len(hs) + (1 if c == own else 0) for c, hs in claims.items()}
        count.setdefault(own, 1)
        big = sorted(c for c, k in count.items() if k >= self.t)
        if big == [own]:
            log.info("env share of app %s confirmed (%d members hold it)", app_id.hex(), count[own])
            return self.store.confirm(epoch, app_id, own)
        not_own = answered - len(claims.get(own, []))
        orphan = not_own >= self.n - self.t + 1
        ahead = [c for c, hs in confirmed.items() if c != own and len(hs) >= self.t]
        superseded = len(big) == 1 and big == ahead
        stale = (
            len(claims.get(own, [])) + silent < self.t
            and self._clock() - self.store.sealed_at(epoch, app_id) > CEREMONY_WINDOW_S
        )
        if count[own] < self.t and (orphan or superseded or stale):
            self.store.drop_tentative(epoch, app_id, own)
            log.warning(
                "env share of app %s: this member's tentative share (%s) dropped: %d holder(s) of %d needed, "
                "%d members answered without it%s%s",
                app_id.hex(),
                own[0].hex()[:16],
                count[own],
                self.t,
                not_own,
                f"; members {confirmed[big[0]]} confirmed the app's sharing" if superseded else "",
                f"; stale: older than {CEREMONY_WINDOW_S} s, {silent} member(s) silent" if stale else "",
            )
            return None
        what = {
            i: c[0].hex()[:16] + ("" if i in confirmed.get(c, []) else " (tentative)")
            for c, hs in claims.items()
            for i in hs
        }
        raise KmsUsageError(
            f"this member's tentative env share of the app ({own[0].hex()[:16]}, {count[own]} of the "
            f"{self.t} holders needed) is not settled: the other members claim {what or 'nothing'}"
        )

    def _recover_from(
        self, epoch: int, app_id: bytes, sharing: tuple[bytes, ...], helpers: list[int]
    ) -> tx.EnvKeyShare:
        g = tx.EDWARDS25519
        base: dict[str, object] = {
            "session": secrets.token_hex(16),
            "epoch": epoch,
            "app_id": app_id.hex(),
            "helpers": helpers,
        }
        splits = self._helpers_call({**base, "stage": "split"}, helpers)
        table: dict[int, dict[int, bytes]] = {}
        for i, a in splits.items():
            if tuple(_hex32(c) for c in a.commitments) != sharing:
                raise sr.RepairError("it holds another sharing than the one t members agree on", party=i)
            try:
                table[i] = {int(j): _hex32(d) for j, d in a.split.items()}
            except ValueError as exc:
                raise sr.RepairError("a malformed split", party=i) from exc
            sr.check_split(g, sharing, i, helpers, self.index, table[i])
        wire = {str(i): {str(j): d.hex() for j, d in row.items()} for i, row in table.items()}
        views = self._helpers_call({**base, "stage": "view", "table": wire}, helpers)
        if any(not a.view_hash for a in views.values()) or len({a.view_hash for a in views.values()}) != 1:
            raise KmsUsageError("the helpers hashed different tables")
        peers = {str(i): self.peers[i] for i in helpers}
        sums = self._helpers_call({**base, "stage": "sum", "table": wire, "peers": peers}, helpers)
        taus = {i: int.from_bytes(bytes.fromhex(a.sum), "little") for i, a in sums.items()}
        share = sr.repair_finish(g, sharing, self.index, table, taus)
        return tx.EnvKeyShare(self.index, self.t, share, sharing)

    def _helpers_call(
        self, body: dict[str, object], helpers: list[int]
    ) -> dict[int, api.PeerEnvRecoverResponse]:
        def one(i: int) -> api.PeerEnvRecoverResponse:
            url = self.peers.get(i)
            if url is None:
                raise KmsUsageError(f"member {i}: no URL known")
            try:
                a = self._connect(i, url).peer_call(
                    api.PATH_PEER_ENV_RECOVER, api.PeerEnvRecoverResponse, body
                )
            except (KmsClientError, KmsDenied) as exc:
                raise KmsUsageError(f"member {i}: share recovery step {body['stage']}: {exc}") from exc
            if a.index != i or a.stage != body["stage"]:
                raise KmsUsageError(f"member {i}: answered as another member or step")
            return a

        with ThreadPoolExecutor(max_workers=len(helpers)) as pool:
            futures = {i: pool.submit(one, i) for i in helpers}
            return {i: f.result() for i, f in futures.items()}

    # --- share recovery: a helper's side (the rule: docs/kms.md "Share recovery")

    def serve_recover(self, node: AdmittedNode, req: api.PeerEnvRecoverRequest) -> api.PeerEnvRecoverResponse:
        """One step of a share recovery whose target is the calling member `node` (admitted by kms.peering's
        rule: its own index only)."""
        if not isinstance(node, AdmittedNode):
            raise TypeError("share recovery only for an AdmittedNode")
        session, app_id = bytes.fromhex(req.session), bytes.fromhex(req.app_id)
        out = api.PeerEnvRecoverResponse(index=self.index, stage=req.stage)
        if req.stage == "split":
            target, helpers = node.index, tuple(req.helpers)
            # (2) the target is the caller, another member of this committee, not a helper
            if target == self.index or not 1 <= target <= self.n:
                raise AccessDenied(f"member {target} cannot be a recovery target here", step="recovery")
            # (3) exactly t distinct helpers of this committee, this node among them
            if (
                len(set(helpers)) != len(helpers)
                or len(helpers) != self.t
                or self.index not in helpers
                or target in helpers
                or any(not 1 <= h <= self.n for h in helpers)
            ):
                raise AccessDenied(
                    f"helpers: exactly t = {self.t} distinct members of 1..{self.n}, this one among them, "
                    "not the target",
                    step="recovery",
                )
            # (4) an epoch this node serves, an app KmsAuth registers, a sharing this node holds
            self._check_epoch(req.epoch)
            self._app_registered(app_id)
            share = self.store.get(req.epoch, app_id)
            if share is None:
                raise AccessDenied("this member holds no env share of this app", step="env")
            split = sr.repair_split(
                tx.EDWARDS25519, share.commitments, self.index, share.share, helpers, target
            )
            # (5) a fresh session (a replayed split is refused), one open recovery per (epoch, app, target),
            # bounded open recoveries and splits per minute, per target and for the node
            with self._lock:
                self._expire()
                if session in self._seen:
                    raise AccessDenied("this recovery session was already used (a replay)", step="recovery")
                # one open recovery per (epoch, app, target): the target's new attempt replaces its last
                key = (req.epoch, app_id, target)
                for s in [s for s, r in self._recoveries.items() if (r.epoch, r.app_id, r.target) == key]:
                    del self._recoveries[s]
                now = self._clock()
                mine = self._recovered_for.setdefault(target, collections.deque())
                for q in (self._recovered, mine):
                    while q and now - q[0] >= 60:
                        q.popleft()
                if len(mine) >= RECOVERIES_PER_TARGET:
                    raise EnvKeyBusy(
                        f"member {self.index}: too many share recoveries for member {target}: retry shortly"
                    )
                if (
                    len(self._recoveries) >= MAX_OPEN_RECOVERIES
                    or len(self._recovered) >= RECOVERIES_PER_MINUTE
                ):
                    raise EnvKeyBusy(f"member {self.index}: too many share recoveries: retry shortly")
                self._recovered.append(now)
                mine.append(now)
                self._seen[session] = None
                while len(self._seen) > _SEEN_RECOVERIES:
                    self._seen.popitem(last=False)
                self._recoveries[session] = _Recovery(
                    session, req.epoch, app_id, target, node.key_id, now, split
                )
            out.commitments = [c.hex() for c in share.commitments]
            out.split = {str(j): d.hex() for j, d in split.commitments.items()}
            return out
        # (6) view, sum: the open recovery of this session, for this epoch and app, from the same process
        rec = self._recovery(session, req.epoch, app_id)
        if node.index != rec.target or node.key_id != rec.target_key:
            raise AccessDenied("not the target of this recovery (another member or process)", step="recovery")
        try:
            table = {int(i): {int(j): _hex32(d) for j, d in row.items()} for i, row in req.table.items()}
        except ValueError as exc:
            raise KmsUsageError("table: helper -> helper -> point") from exc
        if req.stage == "view":
            named = set(rec.split.helpers)
            if rec.view_hash or set(table) != named or any(set(row) != named for row in table.values()):
                self._drop_recovery(session)
                raise AccessDenied(
                    "a second view, or a table not of this recovery's helpers", step="recovery"
                )
            if table[self.index] != rec.split.commitments:
                self._drop_recovery(session)
                raise AccessDenied("the relayed table alters this helper's own split", step="recovery")
            rec.table = table
            rec.view_hash = _recovery_hash(session, rec.epoch, rec.app_id, rec.target, table)
            out.view_hash = rec.view_hash
            return out
        if not rec.view_hash or rec.summed or table != rec.table:
            self._drop_recovery(session)
            raise AccessDenied("sum before view, a second sum, or another table", step="recovery")
        rec.summed = True
        urls = {**self.peers, **{int(i): u for i, u in req.peers.items() if int(i) != self.index}}
        try:
            pieces = self._fetch_pieces(rec, urls)
            tau = sr.repair_sum(tx.EDWARDS25519, self.index, pieces, rec.table)
        except (sr.RepairError, tx.ThresholdEcdhError) as exc:
            self._drop_recovery(session)
            raise KmsUsageError(f"member {self.index}: the recovery fails here: {exc}") from exc
        self._done_recovery(rec)
        out.sum = tx._scalar(tau).hex()
        return out

    def _fetch_pieces(self, rec: _Recovery, urls: Mapping[int, str]) -> dict[int, int]:
        others = [i for i in rec.split.helpers if i != self.index]
        got = self._secret_from_each(
            others,
            urls,
            api.PATH_PEER_ENV_PIECE,
            api.PeerEnvPieceResponse,
            session=rec.session.hex(),
            view_hash=rec.view_hash,
            fields=("helper", "piece"),
            fail=sr.RepairError,
            words=("helper", "piece", "helper or recovery"),
        )
        got[self.index] = rec.split.pieces[self.index]
        return got

    def _secret_from_each(
        self,
        others: list[int],
        urls: Mapping[int, str],
        path: str,
        model: type[Any],
        *,
        session: str,
        view_hash: str,
        fields: tuple[str, str],
        fail: Callable[..., Exception],
        words: tuple[str, str, str],
    ) -> dict[int, int]:
        """The secret scalar each of `others` sends this member for one session (a ceremony's sub-shares, a
        recovery's pieces), asked in parallel: `fields` name the answer's sender and value, `fail` is raised
        naming the party that has no URL, does not answer, or answers for another sender or session."""
        sender_field, value_field = fields
        who, what, other = words

        def one(i: int) -> int:
            url = urls.get(i)
            if url is None:
                raise fail(f"no URL for this {who}", party=i)
            try:
                answer = self._connect(i, url).peer_call(
                    path, model, {"session": session, "view_hash": view_hash}
                )
            except (KmsClientError, KmsDenied) as exc:
                raise fail(f"{what} not obtained: {exc}", party=i) from exc
            if getattr(answer, sender_field) != i or answer.session != session:
                raise fail(f"answered for another {other}", party=i)
            return int.from_bytes(bytes.fromhex(getattr(answer, value_field)), "little")

        with ThreadPoolExecutor(max_workers=max(1, len(others))) as pool:
            return dict(zip(others, pool.map(one, others), strict=True))

    def serve_piece(self, node: AdmittedNode, req: api.PeerEnvPieceRequest) -> tuple[int, bytes]:
        """Helper `node`'s piece δ_{me,node} of a recovery: to another helper of it, same table, once, to one
        boot-time key."""
        if not isinstance(node, AdmittedNode):
            raise TypeError("pieces only for an AdmittedNode")
        with self._lock:
            self._expire()
            rec = self._recoveries.get(bytes.fromhex(req.session))
            if rec is None:
                raise AccessDenied("no open share recovery with this session here", step="recovery")
            if node.index == self.index or node.index not in rec.split.helpers:
                raise AccessDenied(
                    f"member {node.index} is not another helper of this recovery", step="recovery"
                )
            if not rec.view_hash or not secrets.compare_digest(rec.view_hash, req.view_hash):
                raise AccessDenied(f"the table member {node.index} was relayed differs", step="recovery")
            if rec.bound.setdefault(node.index, node.key_id) != node.key_id or node.index in rec.served:
                raise AccessDenied(f"member {node.index}'s piece was already handed out", step="recovery")
            rec.served.add(node.index)
            piece = rec.split.pieces[node.index]
        self._done_recovery(rec)
        return self.index, tx._scalar(piece)

    def _recovery(self, session: bytes, epoch: int, app_id: bytes) -> _Recovery:
        with self._lock:
            self._expire()
            rec = self._recoveries.get(session)
        if rec is None or (rec.epoch, rec.app_id) != (epoch, app_id):
            raise AccessDenied(
                "no open share recovery with this session for this epoch and app (finished, failed, expired, "
                "or another app's)",
                step="recovery",
            )
        return rec

    def _done_recovery(self, rec: _Recovery) -> None:
        """The secret pieces stay only until this helper summed and every other helper fetched its piece."""
        with self._lock:
            if rec.summed and rec.served >= set(rec.split.helpers) - {self.index}:
                self._recoveries.pop(rec.session, None)

    def _drop_recovery(self, session: bytes) -> None:
        with self._lock:
            self._recoveries.pop(session, None)

    # --- the signature (dstack's shape) by t members

    def sign_shares(
        self, epoch: int, app_id: bytes, timestamp: int, sessions: list[bytes]
    ) -> tuple[bytes, list[tuple[te.Presignature, te.SignatureShare]]]:
        """This member's signature shares over the two digests it builds from its own sealed sharing."""
        self._app_registered(app_id)  # every member applies the env-key gate itself before it signs
        share = self.store.get(epoch, app_id)
        if share is None:
            raise AccessDenied("this member holds no env share of this app", step="env")
        if abs(timestamp - self._clock()) > TIMESTAMP_SKEW_S:
            raise AccessDenied("the timestamp is not within 60 s of this member's clock", step="request")
        signer = self._signer()
        if signer is None:
            raise AccessDenied("this member holds no threshold signing share", step="mode")
        pub = tx.x25519_public_key(share.commitments)
        if not sessions:  # a probe: the caller then asks for the unused presignatures (KmsService)
            return pub, []
        usable = set(env_usable(signer.pool.unused()))
        if not all(s in usable for s in sessions):
            raise AccessDenied("a presignature kept for app boots (env_usable)", step="presignature")
        digests = [legacy_digest(app_id, pub), env_encrypt_pubkey_digest(app_id, pub, timestamp)]
        try:
            out = [
                (signer.pool.public(s), signer.pool.sign(s, d))
                for s, d in zip(sessions, digests, strict=True)
            ]
        except KeysError as exc:
            raise AccessDenied(f"presignature refused: {exc}", step="presignature") from exc
        return pub, out

    def _sign(self, epoch: int, app_id: bytes, share: tx.EnvKeyShare) -> api.EnvEncryptPubKeyResponse:
        signer = self._signer()
        if signer is None:
            raise KmsUsageError("this node holds no threshold signing key: env public keys cannot be signed")
        pub = tx.x25519_public_key(share.commitments)
        group_key = signer.group_public_key
        t = signer.key.t
        faults: dict[int, str] = {}
        for _attempt in range(SIGN_ATTEMPTS):
            # which presignatures each member still holds unused (a probe to every other member), then two
            # that this node and t-1 of them hold, at random (two coordinators may still race for one: the
            # members refuse the second digest, and this node tries again)
            held = self._probe(epoch, app_id, faults)
            if len(self._burnt) > 4096:
                self._burnt.clear()
            mine = [u for u in env_usable(signer.pool.unused()) if u not in self._burnt]
            by_count = [u for u in mine if sum(u in h for h in held.values()) >= t - 1]
            if len(by_count) < 2:
                break
            sessions = _pick.sample(sorted(by_count), 2)
            signers = [i for i in sorted(held) if all(s in held[i] for s in sessions)]
            ts = int(self._clock())
            digests = [legacy_digest(app_id, pub), env_encrypt_pubkey_digest(app_id, pub, ts)]
            sigs = self._gather_signatures(epoch, app_id, pub, ts, sessions, digests, t, faults, signers)
            if sigs is not None:
                for sig, digest in zip(sigs, digests, strict=True):
                    rec = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
                    if rec.format(compressed=True) != group_key:
                        raise KmsUsageError(
                            "the combined env-key signature does not recover to the group key"
                        )
                return api.EnvEncryptPubKeyResponse(
                    public_key=pub.hex(), signature=sigs[0].hex(), timestamp=ts, signature_v1=sigs[1].hex()
                )
        detail = "; ".join(f"member {i}: {r}" for i, r in sorted(faults.items()))
        raise EnvKeyBusy(
            f"no {t} members signed the env public key (presignature pools exhausted or contended: "
            f"`teecloud kms presign`){': ' + detail if detail else ''}"
        )

    def _probe(self, epoch: int, app_id: bytes, faults: dict[int, str]) -> dict[int, set[bytes]]:
        """Every other member's unused presignatures (members that fail are left out, named in faults)."""
        body = {"epoch": epoch, "app_id": app_id.hex(), "timestamp": int(self._clock()), "sessions": []}

        def one(i: int) -> set[bytes] | None:
            try:
                answer = self._connect(i, self.peers[i]).peer_call(
                    api.PATH_PEER_ENV_SIGN, api.PeerEnvSignResponse, body
                )
                if answer.index != i:
                    raise ValueError("answered as another member")
                return {bytes.fromhex(u) for u in answer.unused}
            except (KmsClientError, KmsDenied, ValueError) as exc:
                faults[i] = str(exc)[:300]
                return None

        others = sorted(self.peers)
        with ThreadPoolExecutor(max_workers=max(1, len(others))) as pool:
            got = dict(zip(others, pool.map(one, others), strict=True))
        return {i: u for i, u in got.items() if u is not None}

    def _gather_signatures(
        self,
        epoch: int,
        app_id: bytes,
        pub: bytes,
        ts: int,
        sessions: list[bytes],
        digests: list[bytes],
        t: int,
        faults: dict[int, str],
        signers: list[int],
    ) -> list[bytes] | None:
        got: dict[int, list[tuple[te.Presignature, te.SignatureShare]]] = {}
        signer = self._signer()
        assert signer is not None
        try:
            got[self.index] = self.sign_shares(epoch, app_id, ts, sessions)[1]
        except AccessDenied as exc:
            faults[self.index] = exc.reason
            return None
        body = {
            "epoch": epoch,
            "app_id": app_id.hex(),
            "timestamp": ts,
            "sessions": [s.hex() for s in sessions],
        }
        for i in signers:
            if len(got) >= t:
                break
            try:
                answer = self._connect(i, self.peers[i]).peer_call(
                    api.PATH_PEER_ENV_SIGN, api.PeerEnvSignResponse, body
                )
                if answer.index != i or answer.public_key != pub.hex() or len(answer.shares) != 2:
                    raise ValueError("answered as another member, for another key, or not two shares")
                pairs: list[tuple[te.Presignature, te.SignatureShare]] = []
                for s, sess, digest in zip(answer.shares, sessions, digests, strict=True):
                    presig = te.Presignature(
                        index=i,
                        t=t,
                        session=sess,
                        big_r=bytes.fromhex(s.big_r),
                        group_public_key=signer.group_public_key,
                        kinv_share=None,
                        sigma_share=0,
                        kinv_commitments=tuple(bytes.fromhex(c) for c in s.kinv_commitments),
                        sigma_commitments=tuple(bytes.fromhex(c) for c in s.sigma_commitments),
                    )
                    mine = got[self.index][len(pairs)][0]
                    if s.session != sess.hex() or (presig.big_r, presig.kinv_commitments) != (
                        mine.big_r,
                        mine.kinv_commitments,
                    ):
                        raise ValueError("a share for another presignature")
                    share = te.SignatureShare(i, int(s.s, 16))
                    if not te.verify_signature_share(presig, digest, share):
                        raise ValueError("a signature share does not verify")
                    pairs.append((presig, share))
                got[i] = pairs
            except (KmsClientError, KmsDenied, ValueError, KeysError) as exc:
                faults[i] = str(exc)[:300]
                if "already signed another message" in str(exc):
                    self._burnt.update(sessions)
        if len(got) < t:
            self._burnt.update(sessions)  # this node bound them to this attempt's digests: never again
            return None
        out = []
        for k, digest in enumerate(digests):
            try:
                out.append(te.combine_signature(got[self.index][k][0], digest, [got[i][k][1] for i in got]))
            except KeysError as exc:
                faults[self.index] = f"combine: {exc}"
                return None
        return out

    # --- the CVM's partial (after the whole key-release rule, in KmsService)

    @staticmethod
    def check_ephemeral_key(ephemeral_key: bytes) -> bytes:
        """The Edwards point of a request's ephemeral key; KmsUsageError (400) for a malformed one: wrong
        length, top bit set, u >= p, off the curve (the twist), small order."""
        try:
            return tx.strict_ephemeral_point(ephemeral_key)
        except tx.ThresholdEcdhError as exc:
            raise KmsUsageError(f"ephemeral_key: {exc}") from exc

    def partial(self, epoch: int, app_id: bytes, ephemeral_key: bytes) -> api.ThresholdEnvPartialResponse:
        point = self.check_ephemeral_key(ephemeral_key)
        self._check_epoch(epoch)
        share = self.store.get(epoch, app_id)
        if share is None:  # never a ceremony at a boot; a sharing this member missed: share recovery
            try:
                with self._app_lock(epoch, app_id):
                    share = self.recover(epoch, app_id)
            except (KmsUsageError, KmsClientError, KmsDenied) as exc:
                raise AccessDenied(
                    f"no env key of this app under epoch {epoch} here (GetAppEnvEncryptPubKey makes it; "
                    f"recovery: {str(exc)[:300]})",
                    step="env",
                ) from exc
        p = tx.partial_decrypt(share, app_id, point)
        return api.ThresholdEnvPartialResponse(
            app_id=app_id.hex(),
            epoch=epoch,
            index=p.index,
            element=p.element.hex(),
            proof=p.proof.hex(),
            commitments=[c.hex() for c in share.commitments],
        )

    # --- bookkeeping

    def _ceremony(self, session: bytes, epoch: int, app_id: bytes) -> _Ceremony:
        with self._lock:
            self._expire()
            cer = self._open.get(session)
        if cer is None or (cer.epoch, cer.app_id) != (epoch, app_id):
            raise KmsUsageError("no open env-key ceremony with this session (failed, finished or expired)")
        return cer

    def _drop(self, session: bytes) -> None:
        with self._lock:
            self._open.pop(session, None)

    def _expire(self) -> None:
        now = self._clock()
        for s in [s for s, c in self._open.items() if now - c.opened_at > CEREMONY_WINDOW_S]:
            del self._open[s]
        for s in [s for s, r in self._recoveries.items() if now - r.opened_at > RECOVERY_WINDOW_S]:
            del self._recoveries[s]
