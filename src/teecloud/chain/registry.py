"""Facades of NodeRegistry, the node marketplace: the operator and challenger side (NodeRegistry: nodes,
stake, slashing, pull payments) and the user side (Escrow: deployment escrows and usage records)."""

from __future__ import annotations

from typing import Any

from ._values import to_address, to_bytes32
from .api import BlockRef, DeploymentEscrow, NodeInfo, Slash
from .connection import ChainConnection

__all__ = ["DEFAULT_NODE_PARAMS", "Escrow", "NodeRegistry"]

DEFAULT_NODE_PARAMS = {
    "min_stake": 10**17,
    "unstake_delay": 7 * 86400,
    "close_delay": 86400,
    "challenger_reward_bps": 2000,
}


class _Registry:
    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(address)

    def _call(self, fn: str, *args: Any, at: int | BlockRef | None = None) -> Any:
        """Ask at the head, or at block `at` (a BlockRef: that block by hash, EIP-1898; an int: by number)."""
        if isinstance(at, BlockRef):
            block: str | dict[str, Any] = at.rpc_id()
        elif at is None:
            block = "latest"
        elif type(at) is int and at >= 0:
            block = hex(at)
        else:
            raise ValueError(f"block number must be an int >= 0, not {at!r}")
        return self.conn.call("NodeRegistry", self.address, fn, *args, block=block)

    def _send(self, fn: str, *args: Any, value: int = 0) -> dict[str, Any]:
        return self.conn.transact("NodeRegistry", self.address, fn, *args, value=value)

    def _event(self, receipt: dict[str, Any], name: str) -> dict[str, Any]:
        return self.conn.event_of(receipt, "NodeRegistry", name)

    def withdrawable(self, account: str | bytes) -> int:
        """What `account` can collect with withdraw() (rewards, unstaked stake, slash rewards, refunds)."""
        return int(self._call("withdrawable", to_address(account)))

    def withdraw(self) -> int:
        """Collect everything credited to the signer; -> wei paid out."""
        return int(self._event(self._send("withdraw"), "Withdrawn")["amount"])


class NodeRegistry(_Registry):
    """Operators, challengers and the registry's owner."""

    def node_count(self, *, at: int | BlockRef | None = None) -> int:
        return int(self._call("node_count", at=at))

    def node(self, node_id: int, *, at: int | BlockRef | None = None) -> NodeInfo:
        fields = self._call("nodes", int(node_id), at=at)
        return NodeInfo(int(node_id), *fields)

    def require_node(self, node_id: int) -> NodeInfo:
        """node(node_id), or ValueError naming how many nodes there are."""
        count = self.node_count()
        if not 0 <= node_id < count:
            raise ValueError(f"no such node: {node_id} (this registry has {count})")
        return self.node(node_id)

    def nodes(self) -> list[NodeInfo]:
        return [self.node(i) for i in range(self.node_count())]

    def register_node(
        self,
        *,
        tee_kind: str,
        device_id: bytes | str,
        attestation_hash: bytes | str,
        capacity: int,
        price_per_hour: int,
        stake: int,
    ) -> int:
        """The signer becomes the node's operator; -> node id."""
        r = self._send(
            "register_node",
            tee_kind,
            to_bytes32(device_id, "device_id"),
            to_bytes32(attestation_hash, "attestation hash"),
            int(capacity),
            int(price_per_hour),
            value=int(stake),
        )
        return int(self._event(r, "NodeRegistered")["node_id"])

    def stake(self, node_id: int, amount: int) -> dict[str, Any]:
        return self._send("stake", int(node_id), value=int(amount))

    def request_unstake(self, node_id: int, amount: int) -> dict[str, Any]:
        return self._send("request_unstake", int(node_id), int(amount))

    def withdraw_unstaked(self, node_id: int) -> dict[str, Any]:
        return self._send("withdraw_unstaked", int(node_id))

    def claim(self, deployment_id: int, served_seconds: int, signature: bytes) -> int:
        """Operator: be paid for served time with a usage record the deployment's usage signer signed."""
        r = self._send("claim", int(deployment_id), int(served_seconds), signature)
        return int(self._event(r, "UsageClaimed")["paid"])

    def set_challenger(self, challenger: str | bytes, allowed: bool = True) -> dict[str, Any]:
        return self._send("set_challenger", to_address(challenger), allowed)

    def slash(self, node_id: int, amount: int, evidence_hash: bytes | str) -> Slash:
        r = self._send("slash", int(node_id), int(amount), to_bytes32(evidence_hash, "evidence hash"))
        e = self._event(r, "Slashed")
        return Slash(
            node_id=int(e["node_id"]),
            challenger=str(e["challenger"]),
            amount=int(e["amount"]),
            reward=int(e["reward"]),
            evidence_hash=bytes(e["evidence_hash"]),
        )


class Escrow(_Registry):
    """Users: deployment escrows at a node's price, usage records, closing."""

    def count(self) -> int:
        return int(self._call("deployment_count"))

    def deployment(self, deployment_id: int) -> DeploymentEscrow:
        return DeploymentEscrow(int(deployment_id), *self._call("deployments", int(deployment_id)))

    def require_deployment(self, deployment_id: int) -> DeploymentEscrow:
        count = self.count()
        if not 0 <= deployment_id < count:
            raise ValueError(f"no such deployment: {deployment_id} (this registry has {count})")
        return self.deployment(deployment_id)

    def deployments(
        self, *, node_id: int | None = None, party: str | bytes | None = None
    ) -> list[DeploymentEscrow]:
        """Every deployment, optionally only those on `node_id` or whose user or usage signer is `party`."""
        who = to_address(party) if party else None
        rows = []
        for i in range(self.count()):
            d = self.deployment(i)
            if node_id is not None and d.node_id != node_id:
                continue
            if who is not None and who not in (d.user, d.usage_signer):
                continue
            rows.append(d)
        return rows

    def open(self, node_id: int, amount: int, usage_signer: str | bytes | None = None) -> int:
        """Lock `amount` for a deployment on `node_id` at its current price; -> deployment id."""
        signer = to_address(usage_signer) if usage_signer else self.conn.require_signer().address
        r = self._send("open_deployment", int(node_id), signer, value=int(amount))
        return int(self._event(r, "DeploymentOpened")["deployment_id"])

    def fund(self, deployment_id: int, amount: int) -> dict[str, Any]:
        return self._send("fund_deployment", int(deployment_id), value=int(amount))

    def usage_digest(self, deployment_id: int, served_seconds: int) -> bytes:
        return bytes(self._call("usage_digest", int(deployment_id), int(served_seconds)))

    def sign_usage(self, deployment_id: int, served_seconds: int) -> bytes:
        """The signer (a deployment's usage signer) signs a cumulative usage record."""
        return self.conn.sign_message(self.usage_digest(deployment_id, served_seconds))

    def request_close(self, deployment_id: int) -> dict[str, Any]:
        return self._send("request_close", int(deployment_id))

    def withdraw_escrow(self, deployment_id: int) -> int:
        """After the close delay: take back what is left; -> wei refunded (credited, then withdraw())."""
        r = self._send("withdraw_escrow", int(deployment_id))
        return int(self._event(r, "EscrowWithdrawn")["amount"])
