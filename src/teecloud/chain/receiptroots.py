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
    def deploy(cls, conn: ChainConnection) -> ReceiptRoots:
        return cls(conn, conn.deploy_contract("ReceiptRoots"))

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
