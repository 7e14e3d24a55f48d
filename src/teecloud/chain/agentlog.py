"""Facade of AgentLog (docs/ai.md, examples/ai-agent): decisions recorded by each agent under its own
address. The connection's signer is the agent (its KMS-derived wallet key)."""

from __future__ import annotations

from typing import Any

from ._values import to_address, to_bytes32
from .connection import ChainConnection

__all__ = ["MAX_MEMO_BYTES", "AgentLog"]

MAX_MEMO_BYTES = 256


class AgentLog:
    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(address)

    @classmethod
    def deploy(cls, conn: ChainConnection) -> AgentLog:
        return cls(conn, conn.deploy_contract("AgentLog"))

    def with_connection(self, conn: ChainConnection) -> AgentLog:
        return AgentLog(conn, self.address)

    def record(self, decision_hash: bytes, memo: str = "") -> tuple[int, dict[str, Any]]:
        """Record a decision under the signer's address: (its sequence number, the transaction receipt)."""
        if len(memo.encode()) > MAX_MEMO_BYTES:
            raise ValueError(f"a memo is at most {MAX_MEMO_BYTES} bytes")
        receipt = self.conn.transact(
            "AgentLog", self.address, "record", to_bytes32(decision_hash, "decision"), memo
        )
        return int(self.conn.event_of(receipt, "AgentLog", "Decision")["seq"]), receipt

    def count(self, agent: str | bytes) -> int:
        return int(self.conn.call("AgentLog", self.address, "count", to_address(agent)))

    def last_decision(self, agent: str | bytes) -> bytes:
        return bytes(self.conn.call("AgentLog", self.address, "last_decision", to_address(agent)))

    def decisions(self, agent: str | bytes | None = None) -> list[dict[str, Any]]:
        """Decision events in chain order (of one agent when given)."""
        events = self.conn.events("AgentLog", self.address, names=["Decision"])
        if agent is None:
            return events
        who = to_address(agent).lower()
        return [e for e in events if str(e["args"]["agent"]).lower() == who]
