"""Threshold mode, node side: one KMS node holds one Shamir share of the root VOPRF key of one epoch and
evaluates it only for a caller that passed this node's own key-release rule (teecloud.kms.authz: RA-TLS
evidence, boot time, OS image and VM shape, chain, this node's boot challenge).

    ThresholdShare          one node's share (epoch, index, t, n, share, the group's Feldman commitments)
    save_share, load_share  sealed to the node TEE's measurement (teecloud.kms.sealing); a loaded share is
                            checked against the commitments (a corrupted share is refused, never served)
    load_shares             every root epoch's share this node holds (a rotation adds an epoch beside the
                            old ones: teecloud.kms.rotation)
    ThresholdEvaluator      partial evaluations for an AuthorizedApp (teecloud.keys.threshold), per epoch
    local_joint_feldman     the Joint-Feldman DKG run with its messages passed in one process (dev / tests:
                            the process running it sees every share — see docs/kms.md, "ceremony")
    ResharePlan, ReshareDealer   an old node's side of a reshare round (teecloud.keys.threshold.reshare_*)
    dev_ceremony            that DKG, each share sealed into its node's data directory
                            (`<home>/kms-nodes/<i>/kms/`), the group record in `<home>/kms-nodes/group.json`

The client side (fan-out, proof checks, combination) is teecloud.kms.threshold_client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from teecloud._fs import atomic_write, atomic_write_json, data_home
from teecloud.keys import threshold as th
from teecloud.keys import threshold_ecdsa as te
from teecloud.kms import api
from teecloud.kms.authz import AuthorizedApp, AuthorizedKms
from teecloud.kms.bootstrap import KmsIdentity, kms_dir
from teecloud.kms.errors import AccessDenied, SealingError
from teecloud.kms.sealing import platform_sealing_secret, seal, sealing_key, unseal
from teecloud.kms.threshold_carry import MAX_CARRIED_PAGE, CarriedItem, carried_page
from teecloud.kms.threshold_env import ENV_DIR
from teecloud.kms.threshold_sign import (
    CA_SHARE_FILE,
    SIGNING_SHARE_FILE,
    ThresholdSigner,
    save_signing_share,
)
from teecloud.tee.base import TeePlatform

__all__ = [
    "GROUP_FILE",
    "RESHARE_WINDOW_S",
    "SHARE_FILE",
    "DkgPlan",
    "GroupRecord",
    "ReshareDealer",
    "ResharePlan",
    "ThresholdEvaluator",
    "ThresholdShare",
    "dealer_home",
    "dev_ceremony",
    "erase_share",
    "load_share",
    "load_shares",
    "local_joint_feldman",
    "node_home",
    "nodes_dir",
    "read_group",
    "save_share",
    "write_group",
]

SHARE_FILE = "threshold-share.sealed"  # the node's first share; a rotation's epochs go beside it:
_EPOCH_SHARE_FILE = "threshold-share.epoch-{epoch}.sealed"
_EPOCH_SHARE_GLOB = "threshold-share.epoch-*.sealed"
GROUP_FILE = "group.json"
PENDING_DKG_FILE = "dkg-pending.sealed"  # a rolling DKG round's member between its two boots
_GROUP_FORMAT = "teecloud-kms-threshold-group-v1"
_SHARE_FORMAT = "teecloud-kms-threshold-share-v1"


@dataclass(frozen=True)
class ThresholdShare:
    epoch: int
    index: int
    t: int
    n: int
    share: int
    commitments: tuple[bytes, ...]  # the group's: commitments[0] is the group public key

    def __post_init__(self) -> None:
        if not 1 <= self.t <= self.n <= th.MAX_NODES or not 1 <= self.index <= self.n:
            raise SealingError(f"threshold share: bad parameters (t={self.t}, n={self.n}, i={self.index})")
        if len(self.commitments) != self.t:
            raise SealingError("threshold share: the group has t commitments")
        if not th.verify_share(self.commitments, self.index, self.share):
            raise SealingError("threshold share: the share does not match the group's commitments (corrupt)")

    @property
    def group_public_key(self) -> bytes:
        return self.commitments[0]

    @property
    def public_share(self) -> bytes:
        return th.public_share(self.commitments, self.index)

    def to_json_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": _SHARE_FORMAT,
                "epoch": self.epoch,
                "index": self.index,
                "t": self.t,
                "n": self.n,
                "share": self.share.to_bytes(32, "little").hex(),
                "commitments": [c.hex() for c in self.commitments],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> ThresholdShare:
        try:
            doc = json.loads(data)
            if doc.get("format") != _SHARE_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            return cls(
                epoch=int(doc["epoch"]),
                index=int(doc["index"]),
                t=int(doc["t"]),
                n=int(doc["n"]),
                share=int.from_bytes(bytes.fromhex(doc["share"]), "little"),
                commitments=tuple(bytes.fromhex(c) for c in doc["commitments"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SealingError(f"sealed threshold share is malformed: {exc}") from exc


def _share_files(home: Path | None) -> list[Path]:
    d = kms_dir(home)
    return [p for p in [d / SHARE_FILE, *sorted(d.glob(_EPOCH_SHARE_GLOB))] if p.exists()]


def _held(
    tee: TeePlatform, identity: KmsIdentity, home: Path | None
) -> dict[int, tuple[Path, ThresholdShare]]:
    key = sealing_key(platform_sealing_secret(tee), identity.mr_aggregated)
    held: dict[int, tuple[Path, ThresholdShare]] = {}
    for path in _share_files(home):
        share = ThresholdShare.from_json_bytes(unseal(key, identity.mr_aggregated, path.read_bytes()))
        if share.epoch in held:
            raise SealingError(
                f"two sealed shares of root epoch {share.epoch} ({held[share.epoch][0]}, {path})"
            )
        held[share.epoch] = (path, share)
    return held


def save_share(
    share: ThresholdShare, tee: TeePlatform, identity: KmsIdentity, home: Path | None = None
) -> Path:
    """Seal `share` into the node's directory: over the sealed share of the same epoch (a failed, never
    recorded round's, or a reshare's), else beside the node's other epochs (a rotation keeps them)."""
    key = sealing_key(platform_sealing_secret(tee), identity.mr_aggregated)
    held = _held(tee, identity, home) if _share_files(home) else {}
    if share.epoch in held:
        path = held[share.epoch][0]
    elif not held:
        path = kms_dir(home) / SHARE_FILE
    else:
        path = kms_dir(home) / _EPOCH_SHARE_FILE.format(epoch=share.epoch)
    atomic_write(path, seal(key, identity.mr_aggregated, share.to_json_bytes()))
    return path


def save_pending_round(
    data: bytes, tee: TeePlatform, identity: KmsIdentity, home: Path | None = None
) -> None:
    """Seal a rolling DKG round's member state (kms.threshold_client.PendingDkg: sub-shares, board
    tokens) into the node's directory, like a share; one round at a time (a newer round's replaces it)."""
    key = sealing_key(platform_sealing_secret(tee), identity.mr_aggregated)
    atomic_write(kms_dir(home) / PENDING_DKG_FILE, seal(key, identity.mr_aggregated, data))


def load_pending_round(tee: TeePlatform, identity: KmsIdentity, home: Path | None = None) -> bytes | None:
    """The sealed pending round's state, None when there is none (SealingError when it does not unseal)."""
    path = kms_dir(home) / PENDING_DKG_FILE
    if not path.exists():
        return None
    key = sealing_key(platform_sealing_secret(tee), identity.mr_aggregated)
    return unseal(key, identity.mr_aggregated, path.read_bytes())


def erase_pending_round(home: Path | None = None) -> None:
    (kms_dir(home) / PENDING_DKG_FILE).unlink(missing_ok=True)


def erase_share(home: Path | None = None) -> bool:
    """Remove this node's sealed shares, of every epoch (after a reshare moved the key to a new committee).
    Each blob is sealed to this build's measurement; erasing them and the process's copy
    (KmsService.retire_share) leaves the node nothing to combine. Returns whether there was one."""
    files = _share_files(home)
    # everything a reshare carries goes with it: the group's signing and CA key shares, every env share
    carried = [
        kms_dir(home) / SIGNING_SHARE_FILE,
        kms_dir(home) / CA_SHARE_FILE,
        kms_dir(home) / PENDING_DKG_FILE,
    ]
    carried += sorted((kms_dir(home) / ENV_DIR).glob("*.sealed"))
    for path in [*files, *carried]:
        path.unlink(missing_ok=True)
    return bool(files)


def load_share(tee: TeePlatform, identity: KmsIdentity, home: Path | None = None) -> ThresholdShare | None:
    """The node's newest epoch's share (None when it holds none)."""
    shares = load_shares(tee, identity, home)
    return shares[max(shares)] if shares else None


def load_shares(
    tee: TeePlatform, identity: KmsIdentity, home: Path | None = None
) -> dict[int, ThresholdShare]:
    """Every root epoch's share this node holds, by epoch; each unsealed and Feldman-checked (one that does
    not unseal or check fails the start: a node never serves a corrupt share, nor silently drops one)."""
    return {epoch: share for epoch, (_, share) in _held(tee, identity, home).items()}


class ThresholdEvaluator:
    """This node's operation on its shares: partial VOPRF evaluations, only for an AuthorizedApp (which only
    teecloud.kms.authz.Authorizer makes, after the whole key-release rule), under one root epoch it holds.
    `share` is the newest epoch's; `older` the epochs a rotation keeps (data written under them stays
    readable); which epoch an app may have is the caller's rule (teecloud.kms.rotation.evaluation_epoch)."""

    def __init__(
        self,
        share: ThresholdShare,
        *,
        gateway_app_id: str = "",
        signer: ThresholdSigner | None = None,
        older: Sequence[ThresholdShare] = (),
    ) -> None:
        """`signer`: this node's share of the group's signing key and its presignatures
        (teecloud.kms.threshold_sign); without one, the node evaluates but never signs."""
        self._share = share
        self._shares = {s.epoch: s for s in older}
        if share.epoch in self._shares or len(self._shares) != len(older):
            raise SealingError("threshold evaluator: one share per root epoch")
        if any(e > share.epoch for e in self._shares):
            raise SealingError("threshold evaluator: `share` is the newest epoch's")
        self._shares[share.epoch] = share
        self.gateway_app_id = gateway_app_id
        self.signer = signer

    @property
    def epoch(self) -> int:
        return self._share.epoch

    @property
    def epochs(self) -> tuple[int, ...]:
        return tuple(sorted(self._shares))

    @property
    def index(self) -> int:
        return self._share.index

    @property
    def group_public_key(self) -> bytes:
        return self._share.group_public_key

    @property
    def n(self) -> int:
        """The newest epoch's committee size."""
        return self._share.n

    @property
    def commitments(self) -> tuple[bytes, ...]:
        """The newest epoch's Feldman commitments (the committee kms.peering admits members of)."""
        return self._share.commitments

    @property
    def group_keys(self) -> dict[int, bytes]:
        """epoch -> that epoch's group public key, for every epoch this node holds."""
        return {e: s.group_public_key for e, s in sorted(self._shares.items())}

    def share_of(self, epoch: int) -> ThresholdShare | None:
        return self._shares.get(epoch)

    def evaluate(self, app: AuthorizedApp, epoch: int | None = None) -> api.ThresholdEvaluateResponse:
        """Partials under root epoch `epoch` (None: the newest); an epoch this node holds no share of is
        refused (step `epoch`), never answered with another epoch's."""
        if not isinstance(app, AuthorizedApp):
            raise TypeError("partial evaluations only for an AuthorizedApp")
        bi = app.boot_info
        s = self._share if epoch is None else self._shares.get(epoch)
        if s is None:
            raise AccessDenied(
                f"this node holds no share of root epoch {epoch} (it holds epochs "
                f"{', '.join(map(str, self.epochs))})",
                step="epoch",
            )
        inputs = th.app_contexts(s.epoch, bi.app_id, bi.instance_id)
        partials = [th.partial_evaluate(s.index, s.share, x) for x in inputs]
        return api.ThresholdEvaluateResponse(
            app_id=bi.app_id.hex(),
            instance_id=bi.instance_id.hex(),
            epoch=s.epoch,
            index=s.index,
            partials=[
                api.ThresholdPartial(input=x.hex(), element=p.element.hex(), proof=p.proof.hex())
                for x, p in zip(inputs, partials, strict=True)
            ],
            gateway_app_id=self.gateway_app_id,
            os_image_hash=bi.os_image_hash.hex(),
            presignatures=[p.hex() for p in self.signer.pool.unused()[:16]] if self.signer else [],
        )


def local_joint_feldman(t: int, n: int, *, epoch: int = 1) -> list[ThresholdShare]:
    """Joint-Feldman among n simulated dealers in this process (teecloud.keys.threshold): every dealer
    shares a random secret, every receiver checks each share against its dealer's commitments; the group
    key is the sum of the dealers' C_0. The result is the same as the networked ceremony's, but whoever
    runs this sees all shares: dev and tests only (docs/kms.md)."""
    dealings = [th.deal(None, t, n, dealer=d) for d in range(1, n + 1)]
    group = th.sum_commitments(dealings)
    out = []
    for r in range(1, n + 1):
        total, complaints = th.joint_feldman(dealings, r, {d.dealer: d.shares[r] for d in dealings})
        if complaints:  # pragma: no cover (honest in-process dealers)
            raise SealingError(f"DKG: receiver {r} complains about dealers {complaints}")
        out.append(ThresholdShare(epoch, r, t, n, total, group))
    return out


def group_commitments(shares: Sequence[ThresholdShare]) -> tuple[bytes, ...]:
    """The group commitments the shares agree on (all of them must)."""
    groups = {s.commitments for s in shares}
    if len(groups) != 1:
        raise SealingError("threshold shares disagree on the group commitments")
    return groups.pop()


def nodes_dir(home: Path | None = None) -> Path:
    return (home or data_home()) / "kms-nodes"


def node_home(index: int, home: Path | None = None) -> Path:
    """Node `index`'s own data directory (its sealed state, share, audit log, admin token)."""
    if not 1 <= index <= th.MAX_NODES:
        raise SealingError(f"node index must be 1..{th.MAX_NODES}")
    return nodes_dir(home) / str(index)


@dataclass(frozen=True)
class GroupRecord:
    epoch: int
    t: int
    n: int
    commitments: tuple[bytes, ...]
    # the group's secp256k1 signing key (teecloud.kms.threshold_sign), b"" for a group without one
    signing_key: bytes = b""
    # the group's root CA certificate (PEM; key: the group's P-256 CA key), "" for a group without one
    ca_root_cert: str = ""


def read_group(home: Path | None = None) -> GroupRecord | None:
    path = nodes_dir(home) / GROUP_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SealingError(f"{path} is unreadable: {exc}") from exc
    try:
        if doc.get("format") != _GROUP_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        rec = GroupRecord(
            int(doc["epoch"]),
            int(doc["t"]),
            int(doc["n"]),
            tuple(bytes.fromhex(c) for c in doc["commitments"]),
            bytes.fromhex(doc.get("signing_key", "")),
            str(doc.get("ca_root_cert", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SealingError(f"{path} is malformed: {exc}") from exc
    if rec.signing_key and len(rec.signing_key) != 33:
        raise SealingError(f"{path}: the signing key is 33 bytes")
    if len(rec.commitments) != rec.t or not 1 <= rec.t <= rec.n <= th.MAX_NODES:
        raise SealingError(f"{path}: inconsistent t, n and commitments")
    return rec


def write_group(rec: GroupRecord, home: Path | None = None) -> None:
    """The group record (public): what clients of this installation trust (teecloud up reads it)."""
    atomic_write_json(
        nodes_dir(home) / GROUP_FILE,
        {
            "format": _GROUP_FORMAT,
            "epoch": rec.epoch,
            "t": rec.t,
            "n": rec.n,
            "commitments": [c.hex() for c in rec.commitments],
            **({"signing_key": rec.signing_key.hex()} if rec.signing_key else {}),
            **({"ca_root_cert": rec.ca_root_cert} if rec.ca_root_cert else {}),
        },
        mode=0o644,
    )


def dealer_home(index: int, home: Path | None = None) -> Path:
    """A share-less DKG dealer's own data directory (its identity, audit log, admin token)."""
    if not 1 <= index <= th.MAX_NODES:
        raise SealingError(f"dealer index must be 1..{th.MAX_NODES}")
    return nodes_dir(home) / f"dealer-{index}"


def dev_ceremony(
    tee: TeePlatform,
    identity: KmsIdentity,
    t: int,
    n: int,
    *,
    epoch: int = 1,
    home: Path | None = None,
) -> tuple[GroupRecord, bool]:
    """Development key ceremony: local_joint_feldman, share i sealed (to this KMS build's measurement) into
    node i's directory; when n >= 2t-1 also a Joint-Feldman secp256k1 signing key (kms.threshold_sign)
    made in this process (which sees every share: development only), but no presignatures: those live only
    in the memory of the running node process whose round made them (R4-4; `teecloud up` makes them); then
    the group record written last (atomically): a crash leaves no group, and a re-run with the same t and n
    is a no-op. Returns (the group, created)."""
    existing = read_group(home)
    if existing is not None:
        if (existing.t, existing.n) != (t, n):
            raise SealingError(
                f"a {existing.t}-of-{existing.n} group already exists in {nodes_dir(home)}; "
                "changing t or n is a reshare (not done), not a new ceremony"
            )
        return existing, False
    shares = local_joint_feldman(t, n, epoch=epoch)
    for s in shares:
        save_share(s, tee, identity, node_home(s.index, home))
    signing_key = b""
    if n >= 2 * t - 1:
        keys = te.dkg_local(t, n)
        for k in keys:
            save_signing_share(k, tee, identity, node_home(k.index, home))
        signing_key = keys[0].group_public_key
    rec = GroupRecord(epoch, t, n, group_commitments(shares), signing_key)
    write_group(rec, home)
    return rec, True


# ------------------------------------------------------------------------------------------ resharing

RESHARE_WINDOW_S = 600


@dataclass(frozen=True)
class ResharePlan:
    """One reshare round (the same key to a new committee): the old group's commitments, the t_old old
    nodes that deal (fixed for the round, so every new node sums the same dealings), the new t and n.
    `session` (16 random bytes) names the round; a node's dealing exists only in its memory for that round."""

    session: bytes
    epoch: int
    old_commitments: tuple[bytes, ...]
    dealers: tuple[int, ...]
    t_new: int
    n_new: int

    def __post_init__(self) -> None:
        t_old = len(self.old_commitments)
        if len(self.session) != 16:
            raise SealingError("reshare plan: the session is 16 bytes")
        if len(set(self.dealers)) != t_old or any(not 1 <= d <= th.MAX_NODES for d in self.dealers):
            raise SealingError(f"reshare plan: exactly t_old = {t_old} distinct old dealers")
        if not 1 <= self.t_new <= self.n_new <= th.MAX_NODES:
            raise SealingError("reshare plan: need 1 <= t_new <= n_new <= 64")


@dataclass(frozen=True)
class DkgPlan:
    """One dealerless key generation round (Joint-Feldman): `dealers` (all n node indices) each deal a fresh
    random secret; new node j's share is the sum of the sub-shares it receives; the group key is the sum of
    the dealers' C_0. No process ever holds the group secret."""

    session: bytes
    epoch: int
    dealers: tuple[int, ...]
    t_new: int
    n_new: int
    # GJKR's complaint phase (dealers' DkgBoard): all n_new members join together; without it (a rolling
    # rotation joins one node at a time) a complaint fails the round
    complaint_round: bool = False

    def __post_init__(self) -> None:
        if len(self.session) != 16:
            raise SealingError("DKG plan: the session is 16 bytes")
        if not 1 <= self.t_new <= self.n_new <= th.MAX_NODES:
            raise SealingError("DKG plan: need 1 <= t <= n <= 64")
        if len(set(self.dealers)) != len(self.dealers) or not self.t_new <= len(self.dealers) <= th.MAX_NODES:
            raise SealingError("DKG plan: at least t distinct dealers")


@dataclass
class _Round:
    plan: ResharePlan | DkgPlan
    dealer: int
    dealing: th.Dealing
    opened_at: float
    served: set[tuple[int, int]]  # (new index, page offset): each page goes out once
    member_token_hashes: dict[int, bytes] | None = None  # reshare rounds: index -> sha256(member token)
    carried: list[CarriedItem] = field(default_factory=list)  # reshare rounds: kms.threshold_carry
    # DKG rounds with a complaint phase: index -> the token handed out with its sub-share, its statement
    # (the dealers it complains against) and its confirmation digest
    board_tokens: dict[int, bytes] = field(default_factory=dict)
    complaints: dict[int, tuple[int, ...]] = field(default_factory=dict)
    confirms: dict[int, bytes] = field(default_factory=dict)


def _token_hashes(member_token_hashes: Mapping[int, bytes], n_new: int) -> dict[int, bytes]:
    hashes = {int(j): bytes(h) for j, h in member_token_hashes.items()}
    if set(hashes) != set(range(1, n_new + 1)) or any(len(h) != 32 for h in hashes.values()):
        raise SealingError(f"round plan: one 32-byte member token hash per new index 1..{n_new}")
    return hashes


class ReshareDealer:
    """A node's side of a reshare or DKG round: `open` (a reshare of this node's share) or `open_dkg` (a
    fresh random secret, for a node that holds no share yet) makes this node's dealing for a plan, in memory
    only: a node that restarts mid-round has no dealing, and the round fails cleanly — no new share can be
    completed from a mix. `deal_for` hands new node `index` its sub-share, once, to an AuthorizedKms only
    (boot-time evidence of a KMS build KmsAuth allows), within RESHARE_WINDOW_S of opening."""

    def __init__(
        self,
        share: ThresholdShare | None,
        *,
        clock: Callable[[], float] = time.time,
        older: Sequence[ThresholdShare] = (),
        carry: Callable[[int, int, int, int], list[CarriedItem]] | None = None,
        page_size: int = MAX_CARRIED_PAGE,
    ) -> None:
        """`older`: a rotated node's older epochs' shares; a reshare plan names the epoch it moves.
        `carry(epoch, index, t_new, n_new)`: this node's re-dealings of every other sharing it holds of the
        epoch (kms.threshold_carry: env keys, the group's signing and CA keys), dealt with the root share.
        `page_size`: at most this many carried sharings per ReshareDeal answer (1..MAX_CARRIED_PAGE)."""
        if not 1 <= page_size <= MAX_CARRIED_PAGE:
            raise ValueError(f"a page holds 1..{MAX_CARRIED_PAGE} carried sharings")
        self.carry = carry
        self.page_size = page_size
        self._share = share
        self._by_epoch = {s.epoch: s for s in (*older, *([share] if share is not None else []))}
        self._clock = clock
        self._rounds: dict[bytes, _Round] = {}
        self._lock = threading.Lock()

    def _store(
        self,
        plan: ResharePlan | DkgPlan,
        dealer: int,
        make: Callable[[], th.Dealing],
        member_token_hashes: dict[int, bytes] | None = None,
        carry: Callable[[], list[CarriedItem]] | None = None,
    ) -> tuple[bytes, ...]:
        with self._lock:
            now = self._clock()
            for k in [k for k, r in self._rounds.items() if now - r.opened_at > RESHARE_WINDOW_S]:
                del self._rounds[k]
            existing = self._rounds.get(plan.session)
            if existing is not None:
                if (
                    existing.plan != plan
                    or existing.dealer != dealer
                    or existing.member_token_hashes != member_token_hashes
                ):
                    raise SealingError("this session is already open with another plan")
                return existing.dealing.commitments
            dealing = make()
            carried = carry() if carry is not None else []
            self._rounds[plan.session] = _Round(
                plan, dealer, dealing, now, set(), member_token_hashes, carried
            )
            return dealing.commitments

    def open(self, plan: ResharePlan, member_token_hashes: Mapping[int, bytes]) -> tuple[bytes, ...]:
        """`member_token_hashes`: for each new index 1..n_new, sha256 of a one-time token only that new member
        holds (the operator hands each new node its own): a sub-share goes only to its named member, not to
        whichever allowed KMS boot asks first (review 3, R3-5)."""
        hashes = _token_hashes(member_token_hashes, plan.n_new)
        s = self._by_epoch.get(plan.epoch, self._share)
        if s is None:
            raise SealingError("reshare plan: this node holds no share")
        if plan.old_commitments != s.commitments or plan.epoch != s.epoch:
            raise SealingError("reshare plan: not this node's group (commitments or epoch differ)")
        if s.index not in plan.dealers:
            raise SealingError(f"reshare plan: node {s.index} is not one of its dealers")
        carry = self.carry
        return self._store(
            plan,
            s.index,
            lambda: th.reshare_deal(s.index, s.share, plan.t_new, plan.n_new),
            hashes,
            None if carry is None else lambda: carry(plan.epoch, s.index, plan.t_new, plan.n_new),
        )

    def open_dkg(
        self, plan: DkgPlan, dealer: int, member_token_hashes: Mapping[int, bytes] | None = None
    ) -> tuple[bytes, ...]:
        """`member_token_hashes` (a rotation's round): as for `open`."""
        if self._share is not None:
            raise SealingError("DKG: this node already holds a share (a new key is a new node set or epoch)")
        if dealer not in plan.dealers:
            raise SealingError(f"DKG plan: {dealer} is not one of its dealers")
        hashes = None if member_token_hashes is None else _token_hashes(member_token_hashes, plan.n_new)
        return self._store(plan, dealer, lambda: th.deal(None, plan.t_new, plan.n_new, dealer=dealer), hashes)

    def deal_for(
        self,
        kms: AuthorizedKms,
        session: bytes,
        index: int,
        member_token: bytes | None = None,
        offset: int = 0,
    ) -> api.ReshareDealResponse:
        """One page of new member `index`'s answer: at offset 0 its root sub-share and the first carried
        sharings, at a later offset (after page 0 went out, below the total) the carried sharings from there;
        each page once."""
        if not isinstance(kms, AuthorizedKms):
            raise TypeError("sub-shares only for an AuthorizedKms")
        with self._lock:
            r = self._rounds.get(session)
            if r is None or self._clock() - r.opened_at > RESHARE_WINDOW_S:
                raise AccessDenied(
                    "no open reshare round with this session here (never opened, expired, or this node "
                    "restarted since: open a new round)",
                    step="reshare",
                )
            if not 1 <= index <= r.plan.n_new:
                raise AccessDenied(f"share index {index} is not in 1..{r.plan.n_new}", step="reshare")
            if r.member_token_hashes is not None and not (
                member_token is not None
                and hmac.compare_digest(hashlib.sha256(member_token).digest(), r.member_token_hashes[index])
            ):
                raise AccessDenied(
                    f"not the new member this round names for share {index} (no or another member token)",
                    step="reshare",
                )
            total = len(r.carried)
            if offset < 0 or (offset and not (offset < total and (index, 0) in r.served)):
                raise AccessDenied(
                    f"no page of share {index} at offset {offset} (the round carries {total} sharings; "
                    "page 0 comes first)",
                    step="reshare",
                )
            if (index, offset) in r.served:
                what = f"share {index}" if offset == 0 else f"the page at {offset} of share {index}"
                raise AccessDenied(f"{what} of this round was already handed out", step="reshare")
            r.served.add((index, offset))
            board_token = b""
            if offset == 0 and isinstance(r.plan, DkgPlan) and r.plan.complaint_round:
                board_token = r.board_tokens.setdefault(index, secrets.token_bytes(32))
            return api.ReshareDealResponse(
                session=session.hex(),
                dealer=r.dealer,
                commitments=[c.hex() for c in r.dealing.commitments],
                subshare=self._subshare(r, index).to_bytes(32, "little").hex() if offset == 0 else "",
                carried=carried_page(r.carried, index, offset, page_size=self.page_size),
                offset=offset,
                carried_total=total,
                board_token=board_token.hex(),
            )

    def _subshare(self, r: _Round, index: int) -> int:
        """What this dealer sends member `index` (a test's cheating dealer overrides it)."""
        return r.dealing.shares[index]

    def _answers(self, r: _Round, complainers: list[int]) -> dict[int, int]:
        """This dealer's answer to the complaints against it (a test's cheating dealer overrides it)."""
        return th.gjkr_answers(r.dealing, complainers, r.plan.t_new)

    def board(
        self,
        kms: AuthorizedKms,
        session: bytes,
        index: int,
        board_token: bytes,
        complaints: Sequence[int] | None = None,
        confirm: bytes | None = None,
    ) -> api.DkgBoardResponse:
        """A DKG round's complaint phase on this dealer's board (GJKR, J. Cryptology 2007, Fig. 2 steps
        1(b)-(c)): member `index` (the boot that took its sub-share: `board_token`) posts its statement
        (`complaints`: the dealers it complains against, possibly none), later its `confirm` digest, each
        once (the same again is a no-op; another is refused), and reads the board. Once every member's
        statement is in, this dealer answers the complaints against it by revealing those sub-shares (at
        most t-1 of them: beyond that it is disqualified anyway and reveals nothing)."""
        if not isinstance(kms, AuthorizedKms):
            raise TypeError("the DKG board only for an AuthorizedKms")
        with self._lock:
            # (1): an open round of this session with a complaint phase, posted to by the member who took
            # sub-share `index` (bound by the token handed out with it; another round's token is refused)
            r = self._rounds.get(session)
            if r is None or self._clock() - r.opened_at > RESHARE_WINDOW_S:
                raise AccessDenied(
                    "no open DKG round with this session here (never opened, expired, or this node "
                    "restarted since)",
                    step="dkg",
                )
            plan = r.plan
            if not isinstance(plan, DkgPlan) or not plan.complaint_round:
                raise AccessDenied("this round has no complaint phase", step="dkg")
            expected = r.board_tokens.get(index)
            if expected is None or not hmac.compare_digest(expected, board_token):
                raise AccessDenied(
                    f"not the member that took share {index} of this round (no or another board token)",
                    step="dkg",
                )
            # (2): the statement, once; its dealers must be the round's
            if complaints is not None:
                against = tuple(sorted(set(complaints)))
                if len(against) != len(complaints) or not set(against) <= set(plan.dealers):
                    raise AccessDenied("a complaint names a dealer twice or one not in the round", step="dkg")
                if r.complaints.setdefault(index, against) != against:
                    raise AccessDenied(f"member {index} already posted another statement", step="dkg")
            # (3): the confirmation, once, after the statement
            if confirm is not None:
                if index not in r.complaints:
                    raise AccessDenied("a confirmation comes after the statement", step="dkg")
                if r.confirms.setdefault(index, bytes(confirm)) != confirm:
                    raise AccessDenied(f"member {index} already posted another confirmation", step="dkg")
            # (4): the answers, once every member's statement is in
            answers: dict[int, int] = {}
            if len(r.complaints) == plan.n_new:
                against_me = sorted(j for j, a in r.complaints.items() if r.dealer in a)
                if against_me:
                    answers = self._answers(r, against_me)
            return api.DkgBoardResponse(
                session=session.hex(),
                dealer=r.dealer,
                complaints={str(j): list(a) for j, a in sorted(r.complaints.items())},
                answers={str(j): v.to_bytes(32, "little").hex() for j, v in sorted(answers.items())},
                confirms={str(j): c.hex() for j, c in sorted(r.confirms.items())},
            )
