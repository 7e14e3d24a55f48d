"""Facade of one app's AppAuth contract (its address is the app_id): reads, the owner's direct calls, and
changes started the way the app's owner requires (directly, as a multisig proposal, or timelocked)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._values import to_address, to_bytes32
from .api import AppState, GovernanceAction, PendingUpgrade
from .connection import ChainConnection, abi_of
from .errors import ChainError, NotDeployed
from .governance import Multisig, Timelock, governance_kind, submit_owner_call

if TYPE_CHECKING:
    from .kmsauth import KmsAuth

__all__ = ["AppAuth"]


class AppAuth:
    def __init__(self, conn: ChainConnection, app_id: str | bytes, *, kms: KmsAuth | None = None) -> None:
        self.conn = conn
        self.address = to_address(app_id)
        self._kms = kms

    def _call(self, fn: str, *args: Any) -> Any:
        return self.conn.call("AppAuth", self.address, fn, *args)

    def _send(self, fn: str, *args: Any) -> dict[str, Any]:
        return self.conn.transact("AppAuth", self.address, fn, *args)

    # --- reads -------------------------------------------------------------------------------------------

    def owner(self) -> str:
        return str(self._call("owner"))

    def owner_kind(self) -> str:
        return governance_kind(self.conn, self.owner())

    def is_compose_hash_allowed(self, compose_hash: bytes | str) -> bool:
        return bool(self._call("allowed_compose_hashes", to_bytes32(compose_hash, "compose hash")))

    def is_device_allowed(self, device_id: bytes | str) -> bool:
        return bool(self._call("allowed_device_ids", to_bytes32(device_id, "device id")))

    def is_instance_retired(self, instance_id: str | bytes) -> bool:
        return bool(self._call("retired_instances", to_address(instance_id)))

    def allow_any_device(self) -> bool:
        return bool(self._call("allow_any_device"))

    def require_tcb_up_to_date(self) -> bool:
        return bool(self._call("require_tcb_up_to_date"))

    def upgrades_disabled(self) -> bool:
        return bool(self._call("upgrades_disabled"))

    # --- the owner's direct calls ------------------------------------------------------------------------

    def add_compose_hash(self, compose_hash: bytes | str) -> dict[str, Any]:
        return self._send("add_compose_hash", to_bytes32(compose_hash, "compose hash"))

    def remove_compose_hash(self, compose_hash: bytes | str) -> dict[str, Any]:
        return self._send("remove_compose_hash", to_bytes32(compose_hash, "compose hash"))

    def retire_instance(self, instance_id: str | bytes) -> dict[str, Any]:
        """Retire an instance for good; is_app_allowed (and so the KMS) refuses it from the next block on."""
        return self._send("retire_instance", to_address(instance_id))

    def disable_upgrades(self) -> dict[str, Any]:
        return self._send("disable_upgrades")

    # --- changes the way the owner requires ----------------------------------------------------------------

    def propose_add_compose_hash(self, compose_hash: bytes | str) -> GovernanceAction:
        return self.propose("add_compose_hash", to_bytes32(compose_hash, "compose hash"))

    def propose_remove_compose_hash(self, compose_hash: bytes | str) -> GovernanceAction:
        return self.propose("remove_compose_hash", to_bytes32(compose_hash, "compose hash"))

    def propose_add_device(self, device_id: bytes | str) -> GovernanceAction:
        return self.propose("add_device", to_bytes32(device_id, "device id"))

    def propose_retire_instance(self, instance_id: str | bytes) -> GovernanceAction:
        return self.propose("retire_instance", to_address(instance_id))

    def propose(self, fn: str, *args: Any) -> GovernanceAction:
        """Start an AppAuth owner call (`fn` is one of its functions): directly (owner = this signer), as a
        multisig proposal, or queued in a timelock (whose admin may itself be a multisig)."""
        data = abi_of("AppAuth").encode_call(fn, *args)
        return submit_owner_call(self.conn, self.address, self.owner(), data, what=f"app {self.address}")

    def governance_of(self, ident: str) -> Multisig | Timelock:
        """The multisig or timelock that holds proposal `ident` (a decimal proposal id or a 0x call id)."""
        owner = self.owner()
        kind = governance_kind(self.conn, owner)
        if ident.startswith("0x"):
            if kind != "timelock":
                raise ValueError(f"app {self.address} is not owned by a timelock")
            return Timelock(self.conn, owner)
        if kind == "multisig":
            return Multisig(self.conn, owner)
        if kind == "timelock":
            admin = Timelock(self.conn, owner).admin()
            if governance_kind(self.conn, admin) == "multisig":
                return Multisig(self.conn, admin)
        raise ValueError(f"app {self.address} has no multisig ({kind} owner)")

    # --- the whole picture ---------------------------------------------------------------------------------

    def state(self) -> AppState:
        """Owner, governance, allowed hashes and devices, retired instances, pending changes, history."""
        app = self.address
        if not self.conn.code(app):
            raise ChainError(f"no app contract at {app}")
        owner = self.owner()
        kind = governance_kind(self.conn, owner)
        history: list[dict[str, Any]] = []
        hashes: dict[str, None] = {}
        devices: dict[str, None] = {}
        retired: list[str] = []
        for e in self.conn.events("AppAuth", app):
            history.append({"source": "app", **e})
            a = e["args"]
            if e["event"] == "ComposeHashAdded":
                hashes["0x" + bytes(a["compose_hash"]).hex()] = None
            elif e["event"] == "DeviceAdded":
                devices["0x" + bytes(a["device_id"]).hex()] = None
            elif e["event"] == "InstanceRetired":
                retired.append(str(a["instance_id"]))
        governance: dict[str, Any] = {"address": owner, "kind": kind}
        pending: list[PendingUpgrade] = []

        def decode(data: bytes) -> tuple[str, tuple[Any, ...]]:
            for abi in (abi_of("AppAuth"), abi_of("Timelock")):
                d = abi.decode_calldata(data)
                if d is not None:
                    return d
            return "0x" + bytes(data[:4]).hex(), ()

        def multisig_pending(address: str) -> None:
            ms = Multisig(self.conn, address)
            threshold = ms.threshold()
            governance["multisig"] = {"address": address, "owners": ms.owners(), "threshold": threshold}
            for e in self.conn.events("Multisig", address):
                history.append({"source": "multisig", **e})
                if e["event"] != "ProposalCreated":
                    continue
                pid = e["args"]["proposal_id"]
                _, _, executed, cancelled = self.conn.call("Multisig", address, "proposals", pid)
                if executed or cancelled:
                    continue
                fn, args = decode(e["args"]["data"])
                pending.append(
                    PendingUpgrade(
                        "multisig",
                        address,
                        str(pid),
                        e["args"]["target"],
                        fn,
                        args,
                        approvals=ms.approval_count(pid),
                        threshold=threshold,
                    )
                )

        def timelock_pending(address: str) -> None:
            tl = Timelock(self.conn, address)
            governance["timelock"] = {"address": address, "admin": tl.admin(), "min_delay": tl.min_delay()}
            for e in self.conn.events("Timelock", address):
                history.append({"source": "timelock", **e})
                if e["event"] != "CallQueued":
                    continue
                cid = bytes(e["args"]["call_id"])
                if self.conn.call("Timelock", address, "eta", cid) == 0:
                    continue
                fn, args = decode(e["args"]["data"])
                pending.append(
                    PendingUpgrade(
                        "timelock",
                        address,
                        "0x" + cid.hex(),
                        e["args"]["target"],
                        fn,
                        args,
                        eta=e["args"]["eta"],
                    )
                )

        if kind == "multisig":
            multisig_pending(owner)
        elif kind == "timelock":
            timelock_pending(owner)
            admin = governance["timelock"]["admin"]
            if governance_kind(self.conn, admin) == "multisig":
                multisig_pending(admin)
        history.sort(key=lambda e: (e["block"], e["log_index"]))
        registered = False
        if self._kms is not None:
            try:
                registered = self._kms.is_registered(app)
            except NotDeployed:
                pass
        return AppState(
            app_id=app,
            registered=registered,
            owner=owner,
            owner_kind=kind,
            governance=governance,
            allowed_compose_hashes=[h for h in hashes if self.is_compose_hash_allowed(h)],
            allowed_device_ids=[d for d in devices if self.is_device_allowed(d)],
            allow_any_device=self.allow_any_device(),
            require_tcb_up_to_date=self.require_tcb_up_to_date(),
            upgrades_disabled=self.upgrades_disabled(),
            pending=pending,
            history=history,
            retired_instances=retired,
        )
