"""Facade of ReceiptRoots (docs/ai.md "Receipt roots on chain"): the latest signed head of each app's
receipt log, per receipt-signing address."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._values import to_address, to_bytes32
from .connection import ChainConnection

__all__ = ["ReceiptRoots", "RootOnChain"]


@dataclass(frozen=True)
class RootOnChain:
    tree_size: int  # 0: nothing published
    root: bytes
    published_at: int


class ReceiptRoots:
    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(address)

    @classmethod
    def deploy(cls, conn: ChainConnection, kms_auth: str | bytes | None = None) -> ReceiptRoots:
        """`kms_auth`: the KmsAuth whose KMS root publish_verified checks (None: publish only)."""
        return cls(
            conn, conn.deploy_contract("ReceiptRoots", to_address(kms_auth) if kms_auth else "0x" + "00" * 20)
        )

    def kms_auth(self) -> str:
        return str(self.conn.call("ReceiptRoots", self.address, "kms_auth"))

    def publish_verified(
        self, app_id: bytes, tree_size: int, root: bytes, signature: bytes, proof: dict[str, bytes]
    ) -> dict[str, Any]:
        """Submit a head with its signing key's GetKey chain (`proof`: signing_key, app_signature, app_key,
        kms_signature, kms_root_key; keys x‖y), checked on chain up to KmsAuth's KMS root."""
        return self.conn.transact(
            "ReceiptRoots",
            self.address,
            "publish_verified",
            to_address(app_id),
            tree_size,
            to_bytes32(root),
            signature,
            proof["signing_key"],
            proof["app_signature"],
            proof["app_key"],
            proof["kms_signature"],
            proof["kms_root_key"],
        )

    def verified_head(self, app_id: bytes) -> RootOnChain:
        size, root, at = self.conn.call("ReceiptRoots", self.address, "verified_heads", to_address(app_id))
        return RootOnChain(int(size), bytes(root), int(at))

    def publish(self, app_id: bytes, tree_size: int, root: bytes, signature: bytes) -> dict[str, Any]:
        """Submit a signed head (any signer pays the gas); ContractReverted with the reason otherwise."""
        return self.conn.transact(
            "ReceiptRoots",
            self.address,
            "publish",
            to_address(app_id),
            tree_size,
            to_bytes32(root),
            signature,
        )

    def head(self, app_id: bytes, signer: str | bytes) -> RootOnChain:
        size, root, at = self.conn.call(
            "ReceiptRoots", self.address, "heads", to_address(app_id), to_address(signer)
        )
        return RootOnChain(int(size), bytes(root), int(at))

    def head_digest(self, app_id: bytes, tree_size: int, root: bytes) -> bytes:
        return bytes(
            self.conn.call("ReceiptRoots", self.address, "head_digest", to_address(app_id), tree_size, root)
        )
