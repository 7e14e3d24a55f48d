"""Data exchanged with the chain: BootInfo (what the KMS asks about) and read-only views of contract state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AppState",
    "BlockRef",
    "BootInfo",
    "DeploymentEscrow",
    "GovernanceAction",
    "KmsInfo",
    "MultisigProposal",
    "NodeInfo",
    "PendingUpgrade",
    "Slash",
    "TimelockCall",
]

# The Solidity ABI type of the contracts' BootInfo struct (AppAuth.vy / KmsAuth.vy).
BOOT_INFO_ABI_TYPE = "(address,bytes32,address,bytes32,bytes32,bytes32,bytes32,string,string[])"
MAX_TCB_STATUS = 32
MAX_ADVISORY_ID = 64
MAX_ADVISORIES = 64


_HASH_HEX = frozenset("0123456789abcdef")


def _block_hash(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) != 66 or value[:2] != "0x" or not set(value[2:]) <= _HASH_HEX:
        raise ValueError(f"{what} must be 0x and 64 lower-case hex digits, not {value!r:.80}")
    return value


@dataclass(frozen=True)
class BlockRef:
    """One block, named by number and hash. The hash pins the fork: a question asked at a BlockRef is asked
    of that block's state only (EIP-1898 `{"blockHash": ...}`), never of whatever block holds that number
    when the question arrives."""

    number: int
    hash: str  # 0x + 64 lower-case hex digits
    parent_hash: str

    def __post_init__(self) -> None:
        if type(self.number) is not int or self.number < 0:
            raise ValueError(f"block number must be an int >= 0, not {self.number!r}")
        _block_hash(self.hash, "block hash")
        _block_hash(self.parent_hash, "parent hash")

    def rpc_id(self) -> dict[str, Any]:
        """The EIP-1898 block parameter naming this block (and only it: an endpoint that does not know the
        hash, or holds it off its canonical chain, answers an error)."""
        return {"blockHash": self.hash, "requireCanonical": True}


def _fixed(name: str, value: bytes, size: int) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        raise ValueError(f"boot_info.{name} must be {size} bytes")
    return bytes(value)


@dataclass(frozen=True)
class BootInfo:
    """What a booting CVM proved about itself (verified quote + replayed event log), as the contracts see it.

    Field names and meaning follow dstack's AppBootInfo. instance_id may be 20 zero bytes (no instance id).
    """

    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    device_id: bytes
    mr_aggregated: bytes
    mr_system: bytes
    os_image_hash: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name, size in (("app_id", 20), ("instance_id", 20)):
            _fixed(name, getattr(self, name), size)
        for name in ("compose_hash", "device_id", "mr_aggregated", "mr_system", "os_image_hash"):
            _fixed(name, getattr(self, name), 32)
        if not isinstance(self.tcb_status, str) or len(self.tcb_status.encode()) > MAX_TCB_STATUS:
            raise ValueError(f"boot_info.tcb_status must be a string of at most {MAX_TCB_STATUS} bytes")
        if len(self.advisory_ids) > MAX_ADVISORIES or any(
            not isinstance(a, str) or len(a.encode()) > MAX_ADVISORY_ID for a in self.advisory_ids
        ):
            raise ValueError(
                f"boot_info.advisory_ids: at most {MAX_ADVISORIES} strings of {MAX_ADVISORY_ID} bytes"
            )
        object.__setattr__(self, "advisory_ids", tuple(self.advisory_ids))

    def to_abi(self) -> tuple[Any, ...]:
        """The struct as an ABI tuple (eth_abi encodes `bytes` as an address when it has 20 bytes)."""
        return (
            "0x" + self.app_id.hex(),
            self.compose_hash,
            "0x" + self.instance_id.hex(),
            self.device_id,
            self.mr_aggregated,
            self.mr_system,
            self.os_image_hash,
            self.tcb_status,
            list(self.advisory_ids),
        )


@dataclass(frozen=True)
class PendingUpgrade:
    """A governance call on its way: a multisig proposal or a timelock-queued call."""

    kind: str  # "multisig" | "timelock"
    governance: str  # address of the multisig or timelock
    ident: str  # proposal id (decimal) or call id (0x hex)
    target: str
    function: str  # decoded function name, or "0x<selector>"
    args: tuple[Any, ...]
    eta: int | None = None  # timelock: unix time from which it may run
    approvals: int | None = None  # multisig: current approvals
    threshold: int | None = None


@dataclass
class AppState:
    app_id: str
    registered: bool
    owner: str
    owner_kind: str  # "account" | "multisig" | "timelock" | "contract"
    governance: dict[str, Any]
    allowed_compose_hashes: list[str]
    allowed_device_ids: list[str]
    allow_any_device: bool
    require_tcb_up_to_date: bool
    upgrades_disabled: bool
    pending: list[PendingUpgrade]
    history: list[dict[str, Any]]
    retired_instances: list[str] = field(default_factory=list)  # instance ids the KMS refuses for good


@dataclass(frozen=True)
class KmsInfo:
    """What KmsAuth publishes about the KMS: its root public keys, the hash of its quote, the gateway app."""

    k256_pubkey: bytes
    ca_pubkey: bytes
    quote_hash: bytes
    gateway_app_id: str


@dataclass(frozen=True)
class GovernanceAction:
    """How a change to an app was started, the way its owner requires.

    kind: "direct" (applied now; `tx` is its transaction), "multisig" (proposal `ident`), "timelock" (call id
    `ident`, executable from `eta`) or "multisig->timelock" (a multisig proposal `ident` to queue it in
    `timelock`)."""

    kind: str
    governance: str  # the owner that decides: this signer, a multisig or a timelock
    ident: int | str | None = None
    eta: int | None = None
    timelock: str | None = None
    tx: str | None = None

    @property
    def applied(self) -> bool:
        return self.kind == "direct"

    def as_dict(self) -> dict[str, Any]:
        """The older dict shape: {"kind", "governance", "id", and "eta" / "timelock" / "tx" when set}."""
        out: dict[str, Any] = {"kind": self.kind, "governance": self.governance, "id": self.ident}
        for name in ("eta", "timelock", "tx"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class MultisigProposal:
    proposal_id: int
    proposer: str
    target: str
    value: int
    data: bytes
    executed: bool
    cancelled: bool
    approvals: int
    threshold: int


@dataclass(frozen=True)
class TimelockCall:
    call_id: bytes
    target: str
    value: int
    data: bytes
    salt: bytes
    eta: int  # as queued
    pending_eta: int  # 0 once executed or cancelled
    done: bool


@dataclass(frozen=True)
class NodeInfo:
    """A worker node in NodeRegistry (its `nodes(node_id)` struct)."""

    node_id: int
    operator: str
    tee_kind: str
    device_id: bytes
    attestation_hash: bytes
    capacity: int
    price_per_hour: int  # wei per CVM-hour
    stake: int
    unstaking: int
    unstake_ready_at: int
    active: bool
    slashed_total: int


@dataclass(frozen=True)
class DeploymentEscrow:
    """A deployment's escrow in NodeRegistry (its `deployments(deployment_id)` struct)."""

    deployment_id: int
    user: str
    usage_signer: str
    node_id: int
    price_per_hour: int
    balance: int
    served_seconds: int
    paid: int
    close_ready_at: int  # 0 until a close is requested

    def state(self, now: int) -> str:
        if self.close_ready_at == 0:
            return "open"
        if self.balance == 0:
            return "closed"
        return "closable" if self.close_ready_at <= now else f"closing (in {self.close_ready_at - now} s)"


@dataclass(frozen=True)
class Slash:
    node_id: int
    challenger: str
    amount: int
    reward: int
    evidence_hash: bytes
