"""Root rotation in threshold mode (issue 19; docs/kms.md, "Rotation"): a new root epoch, made by a fresh
Joint-Feldman DKG (not a reshare: a new group key), beside the old ones.

    KeyEpochs, key_epochs   which root epochs an app's keys come from, read from its measured app-compose:
                            `"kms_key_epoch": N` (absent: FIRST_EPOCH) and, while it migrates its data,
                            `"kms_key_epoch_previous": M` (M < N)
    evaluation_epoch        a node's rule: the epoch a request names must be one of those (step `epoch`)
    RotationPlan            one rotation round: dealers (share-less `kms up --dealer` processes), the new
                            epoch, t, n and the group commitments the dealings sum to
    open_rotation           open that DKG round on the dealers' admin listeners (bearer token each), with
                            GJKR's complaint phase run as a rolling round (two boots per member)
    rotation_commitments    the commitments every one of the round's n nodes states it holds for the
                            epoch (the sums over QUAL), or why not: what `kms rotate-finish` records
    serving_groups          the committee KmsGroup activates for every epoch on chain
    refresh_committees      the same committees recorded again at their nodes' new addresses

Why the app-compose: an app's epoch changes its keys, so it must be a fact a node can check and the app's
owner decides, never the host's say-so. The app-compose is measured (its sha256 is the compose-hash in
RTMR3, which each node checks against what the CVM sends) and the owner allows each compose hash on chain
(AppAuth), so opting in is an ordinary, governed app upgrade; an app that does not opt in keeps its keys.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from teecloud import appcompose
from teecloud.keys import threshold as th
from teecloud.kms.errors import AccessDenied, KmsUsageError

__all__ = [
    "FIRST_EPOCH",
    "KEY_EPOCH_FIELD",
    "PREVIOUS_KEY_EPOCH_FIELD",
    "KeyEpochs",
    "RotationPlan",
    "evaluation_epoch",
    "key_epochs",
    "open_rotation",
    "refresh_committees",
    "rotation_commitments",
    "serving_groups",
]

KEY_EPOCH_FIELD = "kms_key_epoch"
PREVIOUS_KEY_EPOCH_FIELD = "kms_key_epoch_previous"
FIRST_EPOCH = 1  # every group's first DKG (teecloud up, threshold-init) makes epoch 1
MAX_EPOCH = (1 << 32) - 1  # the VOPRF inputs hold the epoch as u32
MAX_COMMITTEES = 4096  # a bound on reading KmsGroup's log


@dataclass(frozen=True)
class KeyEpochs:
    current: int = FIRST_EPOCH
    previous: int | None = None

    @property
    def allowed(self) -> tuple[int, ...]:
        return (self.current,) if self.previous is None else (self.previous, self.current)


def _epoch_field(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    # bool is an int in Python: "kms_key_epoch": true is refused, not read as epoch 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_EPOCH:
        raise appcompose.AppComposeError(f"app-compose.json: '{name}' must be an integer 1..{MAX_EPOCH}")
    return value


def key_epochs(app_compose: Mapping[str, Any]) -> KeyEpochs:
    """The root epochs this app's keys come from (module docstring). Raises AppComposeError."""
    current = _epoch_field(app_compose, KEY_EPOCH_FIELD)
    previous = _epoch_field(app_compose, PREVIOUS_KEY_EPOCH_FIELD)
    if current is None:
        if previous is not None:
            raise appcompose.AppComposeError(
                f"app-compose.json: '{PREVIOUS_KEY_EPOCH_FIELD}' needs '{KEY_EPOCH_FIELD}'"
            )
        return KeyEpochs()
    if previous is not None and previous >= current:
        raise appcompose.AppComposeError(
            f"app-compose.json: '{PREVIOUS_KEY_EPOCH_FIELD}' ({previous}) must be older than "
            f"'{KEY_EPOCH_FIELD}' ({current})"
        )
    return KeyEpochs(current, previous)


def key_epochs_of_text(app_compose: str) -> KeyEpochs:
    """key_epochs of a normalized app-compose.json text ('' -> the first epoch only)."""
    if not app_compose:
        return KeyEpochs()
    return key_epochs(appcompose.parse_app_compose(app_compose))


def evaluation_epoch(app_compose: str, requested: int | None) -> int:
    """A node's rule, after Authorizer.authorize_app (which checked that sha256(app_compose) is the measured
    compose-hash, when one is sent): the root epoch to evaluate under. `requested` None -> the app's current
    epoch; otherwise it must be one its measured compose names. A caller that sends no compose is on the
    first epoch only. Raises AccessDenied (step `epoch`)."""
    try:
        epochs = key_epochs_of_text(app_compose)
    except appcompose.AppComposeError as exc:
        raise AccessDenied(str(exc), step="epoch") from None
    epoch = epochs.current if requested is None else requested
    if epoch not in epochs.allowed:
        raise AccessDenied(
            f"the app's measured app-compose names root epochs {list(epochs.allowed)}, not {epoch} "
            f"(an app opts in to a new epoch with '{KEY_EPOCH_FIELD}' in its compose)",
            step="epoch",
        )
    return epoch


@dataclass(frozen=True)
class RotationPlan:
    """One rotation round (module docstring). `dealers`: index -> {url, server_ca_pubkey} of each running
    share-less dealer; `commitments`: the new group's (the sum of the dealers' C_j), which every node that
    joins must end with and `kms rotate-finish` records; `member_tokens`: one one-time token per member
    (the dealers hold only their sha256 and hand share j only to the boot presenting token j)."""

    session: bytes
    epoch: int
    t: int
    n: int
    dealers: Mapping[int, Mapping[str, str]]
    commitments: tuple[bytes, ...]
    member_tokens: Mapping[int, bytes]
    # GJKR's complaint phase as a rolling round: each member posts its statement at one boot and decides
    # QUAL at its next (kms.threshold_client.post_dkg_statement / finish_dkg); `commitments` is then the
    # group when no dealer is disqualified, and the nodes' agreed commitments are what is recorded
    complaint_round: bool = False

    def to_json(self) -> dict[str, Any]:
        # the DKG plan format `kms up --join-dkg` reads, plus the kind and the expected commitments
        return {
            "kind": "rotate",
            "session": self.session.hex(),
            "epoch": self.epoch,
            "t": self.t,
            "n": self.n,
            "dealers": {str(i): dict(d) for i, d in sorted(self.dealers.items())},
            "commitments": [c.hex() for c in self.commitments],
            "member_tokens": {str(j): tok.hex() for j, tok in sorted(self.member_tokens.items())},
            "complaint_round": self.complaint_round,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RotationPlan:
        try:
            if doc.get("kind") != "rotate":
                raise ValueError("not a rotation plan (kind)")
            plan = cls(
                session=bytes.fromhex(doc["session"]),
                epoch=int(doc["epoch"]),
                t=int(doc["t"]),
                n=int(doc["n"]),
                dealers={
                    int(i): {"url": str(d["url"]), "server_ca_pubkey": str(d["server_ca_pubkey"])}
                    for i, d in doc["dealers"].items()
                },
                commitments=tuple(bytes.fromhex(c) for c in doc["commitments"]),
                member_tokens={int(j): bytes.fromhex(tok) for j, tok in doc["member_tokens"].items()},
                complaint_round=doc.get("complaint_round", False) is True,  # JSON true only
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KmsUsageError(f"rotation plan: {exc}") from exc
        if (
            len(plan.session) != 16
            or not 1 <= plan.t <= plan.n <= th.MAX_NODES
            or len(plan.commitments) != plan.t
        ):
            raise KmsUsageError("rotation plan: inconsistent session, t, n or commitments")
        if not 1 <= plan.epoch <= MAX_EPOCH:
            raise KmsUsageError("rotation plan: the epoch is 1..2^32-1")
        if set(plan.member_tokens) != set(range(1, plan.n + 1)):
            raise KmsUsageError("rotation plan: one member token per index 1..n")
        return plan


# (dealer index, path, body) -> the JSON answer; the CLI posts with each dealer's bearer token
AdminPost = Callable[[int, str, dict[str, Any]], dict[str, Any]]


def open_rotation(
    epoch: int,
    t: int,
    n: int,
    dealers: Mapping[int, Mapping[str, Any]],
    admin_post: AdminPost,
    *,
    group_key_on_chain: Callable[[int], bytes | None],
    complaint_round: bool = True,
) -> RotationPlan:
    """Open a DKG round for root epoch `epoch` on every dealer (dealer i's endpoint file `dealers[i]`; their
    admin listeners through `admin_post(i, path, body)`), each dealing a fresh random secret in its memory.
    Refused when the chain already records a group key for `epoch` (a rotation makes a new one; a reshare
    keeps one) or `epoch` is not newer than every recorded epoch (rotation is forward only). With
    `complaint_round` (the default) the round runs GJKR's complaint phase as a rolling round: every node
    restarts on the plan twice, one at a time (RotationPlan.complaint_round)."""
    if not 1 < epoch <= MAX_EPOCH:
        raise KmsUsageError("a rotation makes epoch 2 or later (the first DKG makes epoch 1)")
    if not 1 <= t <= n <= th.MAX_NODES or len(dealers) < t:
        raise KmsUsageError(f"need 1 <= t <= n <= {th.MAX_NODES} and at least t dealers")
    if group_key_on_chain(epoch) is not None:
        raise KmsUsageError(f"KmsGroup already records a group key for epoch {epoch}: rotate to a new epoch")
    if group_key_on_chain(epoch - 1) is None:
        raise KmsUsageError(f"KmsGroup records no group for epoch {epoch - 1}: rotate to the next epoch only")
    session = secrets.token_bytes(16)
    tokens = {j: secrets.token_bytes(32) for j in range(1, n + 1)}
    hashes = {str(j): hashlib.sha256(tok).hexdigest() for j, tok in tokens.items()}
    dealings = []
    for i in sorted(dealers):
        answer = admin_post(
            i,
            "/dkg/open",
            {
                "session": session.hex(),
                "epoch": epoch,
                "dealer": i,
                "dealers": sorted(dealers),
                "t": t,
                "n": n,
                "member_token_hashes": hashes,
                "complaint_round": complaint_round,
            },
        )
        try:
            commitments = tuple(bytes.fromhex(c) for c in answer["commitments"])
            if int(answer["dealer"]) != i or len(commitments) != t:
                raise ValueError("answered as another dealer or with another t")
        except (ValueError, KeyError, TypeError) as exc:
            raise KmsUsageError(f"dealer {i} answered the DKG opening wrongly: {exc}") from exc
        dealings.append(th.Dealing(i, commitments, {}))
    try:
        group = th.sum_commitments(dealings)
    except th.ThresholdError as exc:
        raise KmsUsageError(f"the dealers' commitments do not combine: {exc}") from exc
    return RotationPlan(
        session,
        epoch,
        t,
        n,
        {
            i: {"url": str(d["url"]), "server_ca_pubkey": str(d["server_ca_pubkey"])}
            for i, d in dealers.items()
        },
        group,
        tokens,
        complaint_round,
    )


def rotation_commitments(
    plan: RotationPlan, endpoints: Mapping[int, Mapping[str, Any]]
) -> tuple[tuple[bytes, ...] | None, list[str]]:
    """What `kms rotate-finish` records for the plan's epoch: the Feldman commitments every node 1..n
    states in its endpoint file that it holds for the epoch, all the same (a rolling round's members decide
    QUAL one by one: this is where their agreement is checked — a dealer that showed members different
    answers leaves them with different commitments, and nothing is recorded). Without a complaint phase
    they must also be the plan's. Returns (commitments, []) or (None, why each node does not count)."""
    stated: dict[int, tuple[bytes, ...]] = {}
    missing: list[str] = []
    for j in range(1, plan.n + 1):
        ep = endpoints.get(j)
        if ep is None:
            missing.append(f"node {j}: not serving")
            continue
        try:
            stated[j] = tuple(bytes.fromhex(c) for c in ep["commitments"][str(plan.epoch)])
        except (KeyError, TypeError, ValueError, AttributeError):
            why = ep.get("join_error") or "not restarted with --join-dkg on this plan"
            missing.append(f"node {j}: does not serve epoch {plan.epoch} ({why})")
    if missing:
        return None, missing
    groups = set(stated.values())
    if len(groups) != 1:
        return None, [
            f"the nodes hold different groups for epoch {plan.epoch} (a dealer showed members different "
            "answers, or a member decided on other boards): "
            + "; ".join(f"node {j}: {c[0].hex()[:16] if c else '-'}…" for j, c in sorted(stated.items()))
        ]
    commitments = groups.pop()
    if len(commitments) != plan.t:
        return None, [f"the nodes state {len(commitments)} commitments, not t = {plan.t}"]
    if not plan.complaint_round and commitments != plan.commitments:
        return None, ["the nodes hold another group than the plan states"]
    return commitments, []


def serving_groups(kms_group: Any) -> dict[int, Any]:
    """epoch -> the KmsGroup committee serving it (teecloud.chain.kmsgroup.Committee), for every epoch that
    has an active committee: what a client of a rotated group trusts (never a node's say-so)."""
    from teecloud.chain.errors import ChainStateError

    epochs: set[int] = set()
    for cid in range(1, MAX_COMMITTEES + 1):
        try:
            epochs.add(kms_group.committee(cid).epoch)
        except ChainStateError:
            break
    out = {}
    for e in sorted(epochs):
        committee = kms_group.active(e)
        if committee is not None:
            out[e] = committee
    return out


def refresh_committees(kms_group: Any, endpoints: Mapping[int, Mapping[str, Any]]) -> dict[int, Any]:
    """After the nodes restarted (a rotation restarts every node; local nodes get new ports): every epoch
    whose serving committee's members all run here again, each stating in its endpoint file that it holds
    the epoch under the chain's group key, but at another address, is recorded again as the same
    committee (same t and commitments; KmsGroup refuses another key) at the new addresses and activated.
    Returns the serving committees by epoch (serving_groups)."""
    from teecloud.chain.kmsgroup import CommitteeMember

    served = serving_groups(kms_group)
    for epoch, committee in served.items():
        members = []
        for m in committee.members:
            ep = endpoints.get(m.index)
            if ep is None:
                break
            epochs = ep.get("epochs")
            if not isinstance(epochs, Mapping) or epochs.get(str(epoch)) != committee.group_public_key.hex():
                break
            members.append(
                CommitteeMember(
                    m.index,
                    bytes.fromhex(str(ep["mr_aggregated"])),
                    bytes.fromhex(str(ep["device_id"])),
                    str(ep["url"]),
                )
            )
        else:
            if tuple(members) != committee.members:
                cid = kms_group.record_committee(epoch, committee.t, committee.commitments, members)
                kms_group.activate(cid)
                served[epoch] = kms_group.committee(cid)
    return served
