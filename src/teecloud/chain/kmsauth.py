"""Facade of KmsAuth: the app registry and AppAuth factory, the allowed OS images, the KMS's own
allowlist and published keys, and the two questions the KMS asks (is_app_allowed, is_kms_allowed)."""

from __future__ import annotations

from typing import Any

from ._values import to_address, to_bytes32
from .api import BlockRef, BootInfo, KmsInfo
from .connection import ChainConnection

__all__ = ["KmsAuth", "VerdictCache"]

Verdict = tuple[bool, str]


class VerdictCache:
    """is_app_allowed / is_kms_allowed verdicts, each valid only for the block it was read at, named by its
    hash: a reorg that replaces the head by another block at the same height is a miss."""

    MAX = 4096

    def __init__(self) -> None:
        self.enabled = True
        self._entries: dict[tuple[str, BootInfo], tuple[str, Verdict]] = {}

    def get(self, key: tuple[str, BootInfo], block_hash: str) -> Verdict | None:
        hit = self._entries.get(key)
        return hit[1] if hit is not None and hit[0] == block_hash else None

    def put(self, key: tuple[str, BootInfo], block_hash: str, verdict: Verdict) -> None:
        if len(self._entries) > self.MAX:
            self._entries.clear()
        self._entries[key] = (block_hash, verdict)


class KmsAuth:
    def __init__(
        self, conn: ChainConnection, address: str | bytes, *, cache: VerdictCache | None = None
    ) -> None:
        self.conn = conn
        self.address = to_address(address)
        self.cache = cache if cache is not None else VerdictCache()

    def _call(self, fn: str, *args: Any, block: str | dict[str, Any] = "latest") -> Any:
        return self.conn.call("KmsAuth", self.address, fn, *args, block=block)

    def _send(self, fn: str, *args: Any) -> dict[str, Any]:
        return self.conn.transact("KmsAuth", self.address, fn, *args)

    # --- what the KMS asks -----------------------------------------------------------------------------

    def _check(self, fn: str, boot_info: BootInfo, at: int | BlockRef | None = None) -> Verdict:
        """The verdict at block `at` (a BlockRef: that block by hash, EIP-1898; an int: the block with that
        number), or at the head. A head verdict is asked at the head's hash and reused only while the head
        is that same block (same hash: never across a reorg, even one at the same height). A verdict at a
        given block is not cached here."""
        if isinstance(at, BlockRef):
            return self._verdict(fn, boot_info, at.rpc_id())
        if at is not None:
            if type(at) is not int or at < 0:
                raise ValueError(f"block number must be an int >= 0, not {at!r}")
            return self._verdict(fn, boot_info, hex(at))
        if not self.cache.enabled:
            return self._verdict(fn, boot_info, "latest")
        key = (fn, boot_info)
        head = self.conn.head()
        hit = self.cache.get(key, head.hash)
        if hit is not None:
            return hit
        verdict = self._verdict(fn, boot_info, head.rpc_id())
        self.cache.put(key, head.hash, verdict)
        return verdict

    def _verdict(self, fn: str, boot_info: BootInfo, block: str | dict[str, Any]) -> Verdict:
        ok, reason = self._call(fn, boot_info.to_abi(), block=block)
        return (bool(ok), str(reason))

    def is_app_allowed(self, boot_info: BootInfo, *, at: int | BlockRef | None = None) -> Verdict:
        """Registered app, allowed OS image, then the app's own AppAuth rules (retired instance, TCB, compose
        hash, device). `at`: ask at that block (default: the head)."""
        return self._check("is_app_allowed", boot_info, at)

    def is_kms_allowed(self, boot_info: BootInfo, *, at: int | BlockRef | None = None) -> Verdict:
        """TCB UpToDate, allowed OS image, KMS measurement and device."""
        return self._check("is_kms_allowed", boot_info, at)

    def is_app_deployed(self, app_id: str | bytes, *, at: int | BlockRef | None = None) -> Verdict:
        """Did this KmsAuth create `app_id` itself, from its app blueprint (deploy_and_register_app)? A
        contract registered by hand (register_app), this KmsAuth, the blueprint or an app another KmsAuth
        deployed: no. The threshold KMS makes env keys only for such apps (docs/kms.md, env-key gate).
        `at`: ask at that block (default: the head); not cached here (the chain gate caches)."""
        if isinstance(at, BlockRef):
            block: str | dict[str, Any] = at.rpc_id()
        elif at is not None:
            if type(at) is not int or at < 0:
                raise ValueError(f"block number must be an int >= 0, not {at!r}")
            block = hex(at)
        else:
            block = "latest"
        if self._call("deployed_apps", to_address(app_id), block=block) is True:
            return True, "deployed by KmsAuth from its app blueprint"
        if self._call("registered_apps", to_address(app_id), block=block) is not True:
            return False, "the app is not registered in KmsAuth"
        return False, (
            "KmsAuth did not deploy this contract from its app blueprint (a contract registered by hand, "
            "KmsAuth itself, the blueprint, or an app of another KmsAuth)"
        )

    # --- the blocks the questions are asked at (for the chain gate's finality window) --------------------

    def block_by_hash(self, block_hash: str) -> BlockRef:
        return self.conn.block_by_hash(block_hash)

    def check_chain_id(self) -> None:
        self.conn.check_chain_id()

    # --- apps --------------------------------------------------------------------------------------------

    def register_app(
        self,
        owner: str | bytes,
        compose_hash: bytes | str,
        *,
        allow_any_device: bool = True,
        device_id: bytes | str | None = None,
        require_tcb_up_to_date: bool = False,
        disable_upgrades: bool = False,
    ) -> str:
        """Deploy an AppAuth (from the blueprint) and register it, in one transaction; -> app_id."""
        receipt = self._send(
            "deploy_and_register_app",
            to_address(owner),
            disable_upgrades,
            require_tcb_up_to_date,
            allow_any_device,
            to_bytes32(device_id, "device_id") if device_id else b"\0" * 32,
            to_bytes32(compose_hash, "compose hash"),
        )
        return str(self.conn.event_of(receipt, "KmsAuth", "AppDeployed")["app_id"])

    def register_existing_app(self, app_id: str | bytes) -> dict[str, Any]:
        return self._send("register_app", to_address(app_id))

    def is_registered(self, app_id: str | bytes) -> bool:
        return bool(self._call("registered_apps", to_address(app_id)))

    # --- the owner's allowlists --------------------------------------------------------------------------

    def add_os_image(self, os_image_hash: bytes | str) -> dict[str, Any]:
        return self._send("add_os_image_hash", to_bytes32(os_image_hash, "OS image hash"))

    def remove_os_image(self, os_image_hash: bytes | str) -> dict[str, Any]:
        return self._send("remove_os_image_hash", to_bytes32(os_image_hash, "OS image hash"))

    def add_kms_mr(self, mr_aggregated: bytes | str) -> dict[str, Any]:
        return self._send("add_kms_aggregated_mr", to_bytes32(mr_aggregated, "measurement"))

    def add_kms_device(self, device_id: bytes | str) -> dict[str, Any]:
        return self._send("add_kms_device", to_bytes32(device_id, "device_id"))

    def set_gateway_app_id(self, app_id: str | bytes) -> dict[str, Any]:
        return self._send("set_gateway_app_id", to_address(app_id))

    # --- the KMS's published keys ------------------------------------------------------------------------

    def set_info(
        self, k256_pubkey: bytes, ca_pubkey: bytes, quote_hash: bytes | str = b"\0" * 32
    ) -> dict[str, Any]:
        return self._send("set_kms_info", k256_pubkey, ca_pubkey, to_bytes32(quote_hash))

    def k256_pubkey_hash(self) -> bytes:
        """keccak256 of the KMS root k256 key, set with it: what FunctionResultVerifier compares a result's
        root key against (one storage slot instead of the key's three)."""
        return bytes(self._call("kms_k256_pubkey_hash"))

    def info(self) -> KmsInfo:
        return KmsInfo(
            k256_pubkey=bytes(self._call("kms_k256_pubkey")),
            ca_pubkey=bytes(self._call("kms_ca_pubkey")),
            quote_hash=bytes(self._call("kms_quote_hash")),
            gateway_app_id=str(self._call("gateway_app_id")),
        )
