"""Facade of KmsGroup: the threshold KMS's committees on chain (group key and share commitments per root
epoch, members, which committee serves) and their membership log (docs/kms.md, "Threshold mode")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._values import to_bytes32
from .api import BlockRef
from .connection import ChainConnection
from .errors import ChainError, ChainStateError

__all__ = ["Committee", "CommitteeMember", "GroupCa", "KmsGroup"]

MAX_NODES = 64
MAX_URL = 256
MAX_FINALITY_DEPTH = 1024  # as the chain gate's (teecloud.peer)
SIGNING_KEY_SIZE = 33  # SEC1 compressed secp256k1
CA_KEY_SIZE = 33  # SEC1 compressed P-256


@dataclass(frozen=True)
class CommitteeMember:
    index: int  # the share index, 1..64
    mr_aggregated: bytes  # the node's KMS measurement (what KmsAuth.isKmsAllowed was asked about)
    device_id: bytes
    url: str  # where it serves (https://...)

    def __post_init__(self) -> None:
        if not 1 <= self.index <= MAX_NODES:
            raise ValueError(f"member index must be 1..{MAX_NODES}, not {self.index}")
        to_bytes32(self.mr_aggregated, "measurement")
        to_bytes32(self.device_id, "device id")
        if len(self.url.encode()) > MAX_URL:
            raise ValueError(f"member URL above {MAX_URL} bytes")

    def to_abi(self) -> tuple[int, bytes, bytes, str]:
        return (self.index, bytes(self.mr_aggregated), bytes(self.device_id), self.url)


@dataclass(frozen=True)
class Committee:
    committee_id: int
    epoch: int
    t: int
    commitments: tuple[bytes, ...]  # Feldman commitments, commitments[0] = the group public key
    members: tuple[CommitteeMember, ...]
    recorded_at_block: int
    # share index -> sha256(SPKI) of the member's current boot-time peer key, for members that have one
    peer_keys: dict[int, bytes] = field(default_factory=dict, compare=False)

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def group_public_key(self) -> bytes:
        return self.commitments[0]

    @property
    def urls(self) -> dict[int, str]:
        return {m.index: m.url for m in self.members}


@dataclass(frozen=True)
class GroupCa:
    """The group's P-256 CA key of an epoch and the sha256 of its root CA certificate's DER, as recorded."""

    ca_key: bytes  # 33 bytes SEC1 compressed
    root_cert_hash: bytes  # sha256(DER of the root CA certificate)


class KmsGroup:
    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = address

    def _call(self, fn: str, *args: Any, at: BlockRef | None = None) -> Any:
        if at is None:
            return self.conn.call("KmsGroup", self.address, fn, *args)
        return self.conn.call("KmsGroup", self.address, fn, *args, block=at.rpc_id())

    def _send(self, fn: str, *args: Any) -> dict[str, Any]:
        return self.conn.transact("KmsGroup", self.address, fn, *args)

    def record_committee(
        self, epoch: int, t: int, commitments: tuple[bytes, ...] | list[bytes], members: list[CommitteeMember]
    ) -> int:
        """Record a DKG's or a reshare's committee (owner only); -> its committee id. It serves once
        `activate`d. Reverts when a reshare would change the epoch's group key."""
        receipt = self._send(
            "record_committee",
            int(epoch),
            int(t),
            [to_bytes32(c, "commitment") for c in commitments],
            [m.to_abi() for m in sorted(members, key=lambda m: m.index)],
        )
        return int(self.conn.event_of(receipt, "KmsGroup", "CommitteeRecorded")["committee_id"])

    def activate(self, committee_id: int) -> dict[str, Any]:
        return self._send("activate", int(committee_id))

    def record_signing_key(self, epoch: int, key: bytes) -> dict[str, Any]:
        """Record the epoch's threshold signing key (owner only, once, after the epoch's committee)."""
        if len(key) != SIGNING_KEY_SIZE or key[0] not in (2, 3):
            raise ValueError("a signing key is a 33-byte SEC1 compressed secp256k1 point")
        return self._send("record_signing_key", int(epoch), bytes(key))

    def record_ca(self, epoch: int, key: bytes, root_cert_hash: bytes) -> dict[str, Any]:
        """Record the epoch's group CA key (P-256, compressed) and the sha256 of its root CA certificate's
        DER (owner only, once, after the epoch's committee)."""
        if len(key) != CA_KEY_SIZE or key[0] not in (2, 3):
            raise ValueError("a CA key is a 33-byte SEC1 compressed P-256 point")
        return self._send("record_ca", int(epoch), bytes(key), to_bytes32(root_cert_hash, "root hash"))

    def record_peer_keys(self, committee_id: int, keys: dict[int, bytes]) -> dict[str, Any]:
        """Record members' current boot-time peer keys (sha256 of each SPKI) by share index (owner only):
        members of that committee admit member i under this key only (docs/kms.md, "one live process per
        share index")."""
        indices = sorted(keys)
        return self._send(
            "record_peer_keys",
            int(committee_id),
            indices,
            [to_bytes32(keys[i], "peer key") for i in indices],
        )

    def final_block(self, depth: int) -> BlockRef:
        """The block `depth` blocks below the head (after the chain-id check), found by walking parent
        hashes down from the head, so that a question asked at it is asked of the head's own fork: a record
        read there has `depth` blocks on top of it (a reorg shorter than that cannot change it)."""
        if type(depth) is not int or not 0 <= depth <= MAX_FINALITY_DEPTH:
            raise ValueError(f"finality depth must be 0..{MAX_FINALITY_DEPTH} blocks, not {depth!r}")
        block = self.conn.checked_head()
        if block.number < depth:
            raise ChainStateError(
                f"the chain is {block.number} blocks long, fewer than the finality depth {depth}"
            )
        for _ in range(depth):
            parent = self.conn.block_by_hash(block.parent_hash)
            if parent.number != block.number - 1:
                raise ChainError(f"block {block.number}'s parent came back as block {parent.number}")
            block = parent
        return block

    def committee(self, committee_id: int, *, at: BlockRef | None = None) -> Committee:
        if not 1 <= committee_id <= int(self._call("committee_count", at=at)):
            raise ChainStateError(f"no KMS committee {committee_id} on chain")
        members = tuple(
            CommitteeMember(int(i), bytes(mr), bytes(dev), str(url))
            for i, mr, dev, url in self._call("members", committee_id, at=at)
        )
        keys = [bytes(k) for k in self._call("peer_keys", committee_id, at=at)]
        return Committee(
            peer_keys={m.index: k for m, k in zip(members, keys, strict=True) if k != bytes(32)},
            committee_id=committee_id,
            epoch=int(self._call("committee_epoch", committee_id, at=at)),
            t=int(self._call("committee_t", committee_id, at=at)),
            commitments=tuple(bytes(c) for c in self._call("commitments", committee_id, at=at)),
            members=members,
            recorded_at_block=int(self._call("committee_block", committee_id, at=at)),
        )

    def active(self, epoch: int, *, at: BlockRef | None = None) -> Committee | None:
        """The committee serving `epoch` (at block `at`, default the head), None when none is active."""
        cid = int(self._call("active", int(epoch), at=at))
        return self.committee(cid, at=at) if cid else None

    def group_key(self, epoch: int, *, at: BlockRef | None = None) -> bytes | None:
        key = bytes(self._call("group_key", int(epoch), at=at))
        return None if key == bytes(32) else key

    def signing_key(self, epoch: int, *, at: BlockRef | None = None) -> bytes | None:
        """The epoch's threshold signing key (33 bytes), None when none is recorded."""
        key = bytes(self._call("signing_key", int(epoch), at=at))
        if not key:
            return None
        if len(key) != SIGNING_KEY_SIZE or key[0] not in (2, 3):  # the contract allows nothing else
            raise ChainStateError("KmsGroup's signing key is not a 33-byte compressed point")
        return key

    def group_ca(self, epoch: int, *, at: BlockRef | None = None) -> GroupCa | None:
        """The epoch's group CA key and root certificate hash, None when none is recorded."""
        key = bytes(self._call("ca_key", int(epoch), at=at))
        if not key:
            return None
        if len(key) != CA_KEY_SIZE or key[0] not in (2, 3):  # the contract allows nothing else
            raise ChainStateError("KmsGroup's CA key is not a 33-byte compressed point")
        return GroupCa(key, bytes(self._call("ca_root_hash", int(epoch), at=at)))

    def history(self) -> list[dict[str, Any]]:
        """The membership log: every CommitteeRecorded / MemberRecorded / CommitteeActivated, in chain order
        ({event, args, block, tx, log_index, address})."""
        return list(self.conn.events("KmsGroup", self.address))
