"""On-chain approval of a compose hash, as deploy/upgrade need it, in plain words.

    pending_changes(chain, app_id, now)      every pending governance call of the app, decoded ("add compose
                                             hash 0x... to app shop"), with approvals so far or its ETA as a
                                             date and a countdown
    ensure_allowed(chain, app_id, hash, ...) is the hash allowed? If not: allow it directly (this signer owns
                                             the app), or find / start the governance call that will allow it,
                                             and with `commit` execute it once it may run

Chain time (the latest block's timestamp) decides whether a timelocked call may run, not this machine's
clock: a development chain moved forward with `teecloud chain advance-time` is ahead of it.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from teecloud.cloud.errors import DeployError

__all__ = [
    "AllowOutcome",
    "GovernanceSpec",
    "PendingChange",
    "ensure_allowed",
    "fmt_countdown",
    "pending_changes",
]


def fmt_countdown(seconds: int) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


def _iso(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _hex(v: Any) -> str:
    return "0x" + v.hex() if isinstance(v, bytes | bytearray) else str(v)


@dataclass
class PendingChange:
    """One governance call on its way (a multisig proposal, a timelocked call, or a multisig proposal to
    queue a call in the timelock)."""

    kind: str  # "multisig" | "timelock" | "multisig->timelock"
    governance: str
    ident: str  # proposal id (decimal) or timelock call id (0x hex)
    function: str  # the AppAuth function it will call ("add_compose_hash", ...), or "0x<selector>"
    args: tuple[Any, ...]
    approvals: int | None = None
    threshold: int | None = None
    eta: int | None = None
    now: int = 0

    @property
    def executable(self) -> bool:
        if self.kind == "timelock":
            return self.eta is not None and self.eta <= self.now
        return self.approvals is not None and self.threshold is not None and self.approvals >= self.threshold

    def change_text(self, app: str) -> str:
        texts = {
            "add_compose_hash": "add compose hash {} to app {}",
            "remove_compose_hash": "remove compose hash {} from app {}",
            "add_device": "allow device {} for app {}",
            "retire_instance": "retire instance {} of app {}",
        }
        if self.function in texts and self.args:
            return texts[self.function].format(_hex(self.args[0]), app)
        if self.function == "disable_upgrades":
            return f"disable upgrades of app {app} for good"
        args = ", ".join(_hex(a) for a in self.args)
        return f"call {self.function}({args}) on app {app}"

    def status_text(self) -> str:
        if self.kind == "timelock" and self.eta is not None:
            if self.eta <= self.now:
                return f"executable since {_iso(self.eta)} (chain time)"
            return f"executable from {_iso(self.eta)} (in {fmt_countdown(self.eta - self.now)}, chain time)"
        where = "to queue it in the timelock, then its delay" if self.kind == "multisig->timelock" else ""
        text = f"approvals {self.approvals}/{self.threshold}"
        if self.executable:
            text += ": enough, it can be executed"
        return text + (f" ({where})" if where else "")

    def describe(self, app: str) -> str:
        kind = "multisig" if self.kind.startswith("multisig") else "timelock"
        where = f"{self.kind} {self.governance}"
        return f"{kind} {self.ident}: {self.change_text(app)}; {self.status_text()} ({where})"

    def to_json(self, app: str) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "governance": self.governance,
            "id": self.ident,
            "function": self.function,
            "args": [_hex(a) for a in self.args],
            "change": self.change_text(app),
            "approvals": self.approvals,
            "threshold": self.threshold,
            "eta": self.eta,
            "eta_utc": _iso(self.eta) if self.eta is not None else None,
            "seconds_left": max(0, self.eta - self.now) if self.eta is not None else None,
            "executable": self.executable,
        }


def _decode_app_call(data: bytes) -> tuple[str, tuple[Any, ...]]:
    from teecloud.chain.connection import abi_of

    d = abi_of("AppAuth").decode_calldata(data)
    return d if d is not None else ("0x" + bytes(data[:4]).hex(), ())


def pending_changes(chain: Any, app_id: str, now: int | None = None) -> list[PendingChange]:
    """The app's pending governance calls, decoded down to the AppAuth call they make."""
    state = chain.app(app_id).state()
    now = chain.timestamp() if now is None else now
    out: list[PendingChange] = []
    for p in state.pending:
        fn, args = p.function, tuple(p.args)
        kind = p.kind
        if fn == "queue" and len(args) >= 3 and isinstance(args[2], bytes | bytearray):
            kind = "multisig->timelock"  # a multisig proposal to queue a call in the app's timelock
            fn, args = _decode_app_call(bytes(args[2]))
        out.append(
            PendingChange(kind, p.governance, p.ident, fn, args, p.approvals, p.threshold, p.eta, now=now)
        )
    return out


@dataclass
class AllowOutcome:
    allowed: bool
    pending: PendingChange | None = None
    done: list[str] = field(default_factory=list)  # what this call did on chain, in words


def _for_hash(changes: list[PendingChange], compose_hash: bytes) -> list[PendingChange]:
    return [
        c
        for c in changes
        if c.function == "add_compose_hash" and c.args and bytes(c.args[0]) == bytes(compose_hash)
    ]


def ensure_allowed(
    chain: Any, app_id: str, compose_hash: bytes, *, propose: bool = True, commit: bool = False
) -> AllowOutcome:
    """Steps:
    (1) allowed on chain already: done
    (2) owned by this signer directly: add the hash (one transaction)
    (3) owned by another account: refuse, saying who owns the app and how to propose
    (4) governed: find the pending call that adds the hash, or start one (`propose`); with `commit`,
        execute it when it may run (a timelock's ETA passed, a multisig's approvals reached), then re-check
    """
    from teecloud.chain.errors import ChainError

    app = chain.app(app_id)
    hx = "0x" + compose_hash.hex()
    # (1)
    if chain.is_compose_hash_allowed(app_id, compose_hash):
        return AllowOutcome(True)
    owner = app.owner()
    kind = chain.governance_kind(owner)
    me = chain.address
    # (2)
    if kind == "account" and owner == me:
        chain.add_compose_hash(app_id, compose_hash)
        return AllowOutcome(True, done=[f"allowed compose hash {hx} for app 0x{app_id.removeprefix('0x')}"])
    # (3)
    if kind == "account":
        raise DeployError(
            f"compose hash {hx} is not allowed for app {app_id} and the app is owned by {owner}, not by this "
            f"signer ({me}): ask its owner to allow it (`teecloud app allow-hash {app_id} {hx}`)"
        )
    if kind not in ("multisig", "timelock"):
        raise DeployError(f"app {app_id} is owned by a contract teecloud cannot drive ({owner})")
    # (4)
    done: list[str] = []
    mine = _for_hash(pending_changes(chain, app_id), compose_hash)
    if not mine and propose:
        try:
            action = app.propose_add_compose_hash(compose_hash)
        except ChainError as exc:
            raise DeployError(
                f"cannot propose allowing compose hash {hx} for app {app_id} (owned by a {kind} {owner}): "
                f"{exc.diagnostics()}; an owner of the {kind} proposes with "
                f"`teecloud app upgrade propose {app_id} {hx}`"
            ) from exc
        done.append(f"proposed: add compose hash {hx} ({action.kind} {action.governance}, id {action.ident})")
        mine = _for_hash(pending_changes(chain, app_id), compose_hash)
    if commit:
        for change in mine:
            if not change.executable:
                continue
            gov = app.governance_of(change.ident)
            gov.execute(change.ident if change.ident.startswith("0x") else int(change.ident))
            done.append(f"executed {change.kind} {change.ident}")
            break
        if chain.is_compose_hash_allowed(app_id, compose_hash):
            return AllowOutcome(True, done=done)
        mine = _for_hash(pending_changes(chain, app_id), compose_hash)
    return AllowOutcome(False, mine[0] if mine else None, done)


MAX_OWNERS = 16  # Multisig.vy MAX_OWNERS
MAX_DELAY = 30 * 86400  # Timelock.vy MAX_DELAY


@dataclass(frozen=True)
class GovernanceSpec:
    """Who will own a new app (or take over an existing one): a multisig of `owners` needing `threshold`
    approvals, and/or a timelock of `delay` seconds (administered by the multisig when both are given)."""

    owners: tuple[str, ...] = ()
    threshold: int | None = None
    delay: int | None = None

    @classmethod
    def build(
        cls, *, multisig: str | None, threshold: int | None, timelock: int | None
    ) -> GovernanceSpec | None:
        from eth_utils.address import is_address, to_checksum_address

        from teecloud.cloud.errors import InvalidOption

        if multisig is None and threshold is not None:
            raise InvalidOption("--threshold goes with --multisig OWNER1,OWNER2,...")
        owners: list[str] = []
        if multisig is not None:
            items = [a.strip() for a in multisig.split(",") if a.strip()]
            if not items:
                raise InvalidOption("--multisig needs comma-separated owner addresses (0x + 40 hex digits)")
            if len(items) > MAX_OWNERS:
                raise InvalidOption(f"--multisig takes at most {MAX_OWNERS} owners")
            for a in items:
                if not is_address(a):
                    shown = a if len(a) <= 50 else a[:50] + "..."
                    raise InvalidOption(f"--multisig: {shown!r} is not an address (0x + 40 hex digits)")
                owners.append(str(to_checksum_address(a)))
            if len(set(owners)) != len(owners):
                raise InvalidOption("--multisig lists an owner twice")
            if threshold is None:
                raise InvalidOption("--multisig needs --threshold K (approvals needed, 1 to the owner count)")
            if not 1 <= threshold <= len(owners):
                raise InvalidOption(f"--threshold must be between 1 and {len(owners)} (the owner count)")
        if timelock is not None and not 0 < timelock <= MAX_DELAY:
            raise InvalidOption(f"--timelock must be between 1 and {MAX_DELAY} seconds (30 days)")
        if not owners and timelock is None:
            return None
        return cls(tuple(owners), threshold, timelock)

    def create(self, chain: Any) -> tuple[str, list[str]]:
        """Deploy the governance contracts -> (the owner the app gets, what was deployed in words)."""
        done: list[str] = []
        owner = chain.address
        if self.owners:
            owner = chain.deploy_multisig(list(self.owners), int(self.threshold or 0))
            done.append(f"multisig {owner}: {self.threshold}-of-{len(self.owners)} {', '.join(self.owners)}")
        if self.delay is not None:
            owner = chain.deploy_timelock(owner, self.delay)
            done.append(f"timelock {owner}: delay {self.delay} s ({fmt_countdown(self.delay)})")
        return owner, done


@dataclass
class TransferOutcome:
    """Where a move of an app under a new owner stands."""

    new_owner: str
    done: list[str] = field(default_factory=list)
    accepted: bool = False
    pending: PendingChange | None = None  # the new owner's acceptance, on its way


def _accept_pending(chain: Any, app_id: str, new_owner: str) -> list[PendingChange]:
    now = chain.timestamp()
    app = chain.app(app_id)
    data = _accept_calldata()
    found: list[PendingChange] = []
    kind = chain.governance_kind(new_owner)
    if kind == "timelock":
        tl = chain.timelock(new_owner)
        for e in chain.events("Timelock", new_owner, names=["CallQueued"]):
            a = e["args"]
            cid = bytes(a["call_id"])
            if a["target"] != app.address or bytes(a["data"]) != data:
                continue
            if chain.call("Timelock", new_owner, "eta", cid) == 0:
                continue
            found.append(
                PendingChange(
                    "timelock",
                    tl.address,
                    "0x" + cid.hex(),
                    "accept_ownership",
                    (),
                    eta=int(a["eta"]),
                    now=now,
                )
            )
    elif kind == "multisig":
        ms = chain.multisig(new_owner)
        for p in ms.proposals():
            if p.target == app.address and p.data == data and not p.executed and not p.cancelled:
                found.append(
                    PendingChange(
                        "multisig",
                        ms.address,
                        str(p.proposal_id),
                        "accept_ownership",
                        (),
                        approvals=p.approvals,
                        threshold=p.threshold,
                        now=now,
                    )
                )
    return found


def _accept_calldata() -> bytes:
    from teecloud.chain.connection import abi_of

    return bytes(abi_of("AppAuth").encode_call("accept_ownership"))


def transfer_ownership(
    chain: Any, app_id: str, *, spec: GovernanceSpec | None = None, to: str | None = None, commit: bool = True
) -> TransferOutcome:
    """Move an app this signer owns under a new owner (AppAuth's two steps: transfer_ownership, then the new
    owner calls accept_ownership). Steps:
      (1) the new owner: `to`, or a multisig/timelock deployed from `spec`; re-running finds the transfer
          already started (AppAuth.pending_owner) instead of deploying again
      (2) transfer_ownership(new owner), from this signer (the current, direct owner)
      (3) the new owner's accept_ownership: a multisig proposal (executed at once when this signer's
          approval reaches the threshold), or a call queued in the timelock (executable after its delay; with
          `commit`, executed once it may run)"""
    app = chain.app(app_id)
    me = chain.address
    owner = app.owner()
    pending_owner = str(chain.call("AppAuth", app.address, "pending_owner"))
    done: list[str] = []
    # (1)
    zero = "0x" + "00" * 20
    if pending_owner.lower() != zero and spec is None and to is None:
        new_owner = pending_owner
    elif (
        pending_owner.lower() != zero and (to is None or to.lower() == pending_owner.lower()) and spec is None
    ):
        new_owner = pending_owner
    else:
        if chain.governance_kind(owner) != "account" or owner != me:
            raise DeployError(
                f"app {app.address} is owned by {owner} ({chain.governance_kind(owner)}), not by this signer "
                f"({me}): only its owner can move it (under a multisig or timelock, propose "
                "`transfer_ownership` through it)"
            )
        if to is not None:
            from teecloud.ids import parse_app_id

            new_owner = "0x" + parse_app_id(to, name="--to").hex()
        elif spec is not None:
            new_owner, made = spec.create(chain)
            done += made
        else:
            raise DeployError(
                "give the new owner: --to ADDRESS, --multisig OWNERS --threshold K, or --timelock"
            )
        # (2)
        app.conn.transact("AppAuth", app.address, "transfer_ownership", new_owner)
        done.append(f"transfer_ownership({new_owner}) sent: the new owner must accept")
    out = TransferOutcome(new_owner=str(new_owner), done=done)
    if app.owner().lower() == str(new_owner).lower():
        out.accepted = True
        return out
    # (3)
    kind = chain.governance_kind(new_owner)
    data = _accept_calldata()
    pending = _accept_pending(chain, app_id, new_owner)
    if not pending:
        if kind == "timelock":
            tl = chain.timelock(new_owner)
            admin = tl.admin()
            if chain.governance_kind(admin) == "multisig":
                pid = chain.multisig(admin).propose(new_owner, tl.queue_calldata(app.address, data))
                done.append(
                    f"proposed in multisig {admin} (id {pid}): queue accept_ownership in the timelock"
                )
            elif admin == me:
                cid = tl.queue(app.address, data)
                done.append(f"queued accept_ownership in timelock {new_owner} (call id {cid})")
            else:
                raise DeployError(
                    f"timelock {new_owner} is administered by {admin}: it must queue accept_ownership"
                )
        elif kind == "multisig":
            ms = chain.multisig(new_owner)
            if me not in ms.owners():
                raise DeployError(
                    f"this signer is not an owner of multisig {new_owner}: one of its owners proposes "
                    "accept_ownership"
                )
            pid = ms.propose(app.address, data)
            done.append(f"proposed accept_ownership in multisig {new_owner} (id {pid})")
        else:
            raise DeployError(
                f"the new owner {new_owner} is an account: it accepts with AppAuth.accept_ownership() itself"
            )
        pending = _accept_pending(chain, app_id, new_owner)
    if commit:
        for p in pending:
            if p.executable:
                gov = chain.timelock(p.governance) if p.kind == "timelock" else chain.multisig(p.governance)
                gov.execute(p.ident if p.kind == "timelock" else int(p.ident))
                done.append(f"executed the acceptance ({p.kind} {p.ident})")
                break
    out.accepted = app.owner().lower() == str(new_owner).lower()
    if not out.accepted:
        pending = _accept_pending(chain, app_id, new_owner)
        out.pending = pending[0] if pending else None
    return out
