"""Facades of the governance contracts: Multisig (M-of-N proposals) and Timelock (announced, delayed calls),
and how to tell which one an address is."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ._values import to_address, to_bytes32
from .api import GovernanceAction, MultisigProposal, TimelockCall
from .connection import ChainConnection
from .errors import ChainError

__all__ = [
    "Multisig",
    "Timelock",
    "deploy_multisig",
    "deploy_timelock",
    "governance_kind",
    "submit_owner_call",
]


def governance_kind(conn: ChainConnection, address: str | bytes) -> str:
    """'account' (no code), 'multisig', 'timelock' or 'contract' (one teecloud does not know how to drive)."""
    if not conn.code(address):
        return "account"
    for kind, contract, fn in (("multisig", "Multisig", "threshold"), ("timelock", "Timelock", "min_delay")):
        try:
            conn.call(contract, address, fn)
            return kind
        except ChainError:
            continue
    return "contract"


def deploy_multisig(conn: ChainConnection, owners: Iterable[str | bytes], threshold: int) -> Multisig:
    return Multisig(conn, conn.deploy_contract("Multisig", [to_address(o) for o in owners], int(threshold)))


def deploy_timelock(conn: ChainConnection, admin: str | bytes, min_delay: int) -> Timelock:
    return Timelock(conn, conn.deploy_contract("Timelock", to_address(admin), int(min_delay)))


def submit_owner_call(
    conn: ChainConnection, target: str, owner: str, data: bytes, *, what: str
) -> GovernanceAction:
    """Start an owner-only call `data` on `target` the way its `owner` requires: directly (owner = this
    signer), as a multisig proposal, or queued in a timelock (whose admin may itself be a multisig).
    `what` names the target in errors ("app 0x..", "function 0x..")."""
    kind = governance_kind(conn, owner)
    me = conn.require_signer().address
    if kind == "account":
        if owner != me:
            raise ChainError(f"{what} is owned by {owner}, not by this signer ({me})")
        r = conn.send(target, data)
        return GovernanceAction("direct", owner, tx=r["transactionHash"])
    if kind == "multisig":
        return GovernanceAction("multisig", owner, Multisig(conn, owner).propose(target, data))
    if kind == "timelock":
        tl = Timelock(conn, owner)
        admin = tl.admin()
        if governance_kind(conn, admin) == "multisig":
            pid = Multisig(conn, admin).propose(owner, tl.queue_calldata(target, data))
            return GovernanceAction("multisig->timelock", admin, pid, timelock=owner)
        cid = tl.queue(target, data)
        return GovernanceAction("timelock", owner, cid, eta=tl.queued(cid).eta)
    raise ChainError(f"{what} is owned by a contract teecloud does not know how to drive ({owner})")


class Multisig:
    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(address)

    def _call(self, fn: str, *args: Any) -> Any:
        return self.conn.call("Multisig", self.address, fn, *args)

    def owners(self) -> list[str]:
        return list(self._call("get_owners"))

    def threshold(self) -> int:
        return int(self._call("threshold"))

    def approval_count(self, proposal_id: int) -> int:
        return int(self._call("approval_count", int(proposal_id)))

    def propose(self, target: str | bytes, data: bytes, value: int = 0) -> int:
        """-> proposal id (the proposer's approval is counted)."""
        r = self.conn.transact("Multisig", self.address, "propose", to_address(target), value, data)
        return int(self.conn.event_of(r, "Multisig", "ProposalCreated")["proposal_id"])

    def approve(self, proposal_id: int) -> dict[str, Any]:
        return self.conn.transact("Multisig", self.address, "approve", int(proposal_id))

    def cancel(self, proposal_id: int) -> dict[str, Any]:
        return self.conn.transact("Multisig", self.address, "cancel", int(proposal_id))

    def proposal(self, proposal_id: int) -> MultisigProposal:
        for e in self.conn.events("Multisig", self.address, names=["ProposalCreated"]):
            a = e["args"]
            if a["proposal_id"] == int(proposal_id):
                _call_hash, _proposer, executed, cancelled = self._call("proposals", int(proposal_id))
                return MultisigProposal(
                    proposal_id=int(proposal_id),
                    proposer=a["proposer"],
                    target=a["target"],
                    value=int(a["value"]),
                    data=bytes(a["data"]),
                    executed=bool(executed),
                    cancelled=bool(cancelled),
                    approvals=self.approval_count(proposal_id),
                    threshold=self.threshold(),
                )
        raise ChainError(f"no proposal {proposal_id} in multisig {self.address}")

    def proposals(self) -> list[MultisigProposal]:
        ids = [
            e["args"]["proposal_id"]
            for e in self.conn.events("Multisig", self.address, names=["ProposalCreated"])
        ]
        return [self.proposal(i) for i in ids]

    def execute(self, proposal_id: int) -> dict[str, Any]:
        """Run a proposal with enough approvals (exactly the call that was proposed)."""
        p = self.proposal(proposal_id)
        return self.conn.transact(
            "Multisig", self.address, "execute", int(proposal_id), p.target, p.value, p.data
        )


class Timelock:
    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(address)

    def admin(self) -> str:
        return str(self.conn.call("Timelock", self.address, "admin"))

    def min_delay(self) -> int:
        return int(self.conn.call("Timelock", self.address, "min_delay"))

    def queue_calldata(
        self, target: str | bytes, data: bytes, *, value: int = 0, delay: int | None = None
    ) -> bytes:
        """The calldata of `queue(...)` for this target call (what a multisig admin proposes)."""
        from .connection import abi_of

        d = self.min_delay() if delay is None else int(delay)
        return abi_of("Timelock").encode_call("queue", to_address(target), value, data, os.urandom(32), d)

    def queue(
        self,
        target: str | bytes,
        data: bytes,
        *,
        value: int = 0,
        delay: int | None = None,
        salt: bytes | None = None,
    ) -> str:
        """-> the call id (0x hex)."""
        d = self.min_delay() if delay is None else int(delay)
        r = self.conn.transact(
            "Timelock", self.address, "queue", to_address(target), value, data, salt or os.urandom(32), d
        )
        return "0x" + bytes(self.conn.event_of(r, "Timelock", "CallQueued")["call_id"]).hex()

    def queued(self, call_id: str | bytes) -> TimelockCall:
        cid = to_bytes32(call_id, "call id")
        for e in reversed(self.conn.events("Timelock", self.address, names=["CallQueued"])):
            a = e["args"]
            if bytes(a["call_id"]) == cid:
                return TimelockCall(
                    call_id=cid,
                    target=a["target"],
                    value=int(a["value"]),
                    data=bytes(a["data"]),
                    salt=bytes(a["salt"]),
                    eta=int(a["eta"]),
                    pending_eta=int(self.conn.call("Timelock", self.address, "eta", cid)),
                    done=bool(self.conn.call("Timelock", self.address, "done", cid)),
                )
        raise ChainError(f"no queued call 0x{cid.hex()} in timelock {self.address}")

    def execute(self, call_id: str | bytes) -> dict[str, Any]:
        q = self.queued(call_id)
        return self.conn.transact("Timelock", self.address, "execute", q.target, q.value, q.data, q.salt)

    def cancel(self, call_id: str | bytes) -> dict[str, Any]:
        return self.conn.transact("Timelock", self.address, "cancel", to_bytes32(call_id, "call id"))
