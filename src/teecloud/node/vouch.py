"""The node vouches for where its CVMs are reachable: a statement signed by the node's operator key.

A CVM names its own endpoint addresses when it registers with a gateway; inside the gateway's backend
networks it could name another instance's address. So the node that launched it signs what it launched and
where it forwarded the CVM's ports, and the gateway routes only to addresses both stand behind:

    launch seed   instance_id_seed = sha256("teecloud:launch-seed/v1:" ‖ operator (20 B) ‖ nonce (32 B))
                  instance_id      = sha256(instance_id_seed ‖ app_id)[:20]   (dstack's derivation, unchanged)
                  so the attested instance_id commits to the operator that launched the CVM: another node
                  cannot vouch for it (it would need a nonce giving the same instance_id under its address)
    statement     {"purpose": "teecloud:node-vouch/v1", "node_id", "operator", "app_id", "instance_id",
                   "launch_nonce", "endpoints": [{"port", "host", "host_port"}, ...] (sorted by port),
                   "issued_at", "expires_at"}
    digest        sha256(canonical JSON: keys sorted, separators "," ":", ASCII; the values are integers and
                  ASCII strings only, for which this is RFC 8785 JCS)
    signature     EIP-191 personal signature of the digest by the operator's chain key (65 B r‖s‖v), the
                  account NodeRegistry records as `nodes(node_id).operator`

The gateway (`teecloud.gateway.vouch`) recovers the signer, checks NodeRegistry, recomputes the instance_id
from the launch nonce, the validity window and that the statement is not older than one it already took.
This module is the node side: the seed and the signer; no I/O but the instance's own files.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "DEFAULT_VOUCH_LIFETIME_S",
    "VOUCH_PURPOSE",
    "NodeVoucher",
    "launch_seed",
    "new_launch_nonce",
    "operator_bytes",
    "vouch_digest",
]

VOUCH_PURPOSE = "teecloud:node-vouch/v1"
_SEED_PREFIX = b"teecloud:launch-seed/v1:"
DEFAULT_VOUCH_LIFETIME_S = 120  # a registration round is ≤ 30 s; the gateway accepts at most 600 s


def operator_bytes(operator: str) -> bytes:
    """An Ethereum address `0x` + 40 hex digits -> its 20 bytes; ValueError otherwise."""
    if not isinstance(operator, str) or len(operator) != 42 or not operator.startswith("0x"):
        raise ValueError(f"not an address: {operator!r}")
    return bytes.fromhex(operator[2:])


def new_launch_nonce() -> bytes:
    return secrets.token_bytes(32)


def launch_seed(operator: str, nonce: bytes) -> bytes:
    """The instance_id_seed of a CVM launched by `operator` (see the module docstring)."""
    if len(nonce) != 32:
        raise ValueError("the launch nonce is 32 bytes")
    return hashlib.sha256(_SEED_PREFIX + operator_bytes(operator) + nonce).digest()


def vouch_digest(statement: dict[str, Any]) -> bytes:
    """sha256 of the statement's canonical JSON (integers and ASCII strings only: RFC 8785 JCS)."""
    return hashlib.sha256(
        json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).digest()


class NodeVoucher:
    """Signs vouch statements for the CVMs this node launched.

    sign(digest) -> 65-byte EIP-191 signature by the operator key (ChainConnection.sign_message);
    launch(instance_id hex) -> (app_id, launch nonce) as recorded at launch (`Node.launch_record`; raises
    ValueError for an instance this node did not launch with a nonce: it then vouches for nothing)."""

    def __init__(
        self,
        *,
        node_id: int,
        operator: str,
        sign: Callable[[bytes], bytes],
        launch: Callable[[str], tuple[bytes, bytes]],
        lifetime_s: int = DEFAULT_VOUCH_LIFETIME_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        operator_bytes(operator)
        self.node_id = int(node_id)
        self.operator = operator.lower()
        self.sign = sign
        self.launch = launch
        self.lifetime_s = int(lifetime_s)
        self.clock = clock

    def vouch(self, instance: str, endpoints: Sequence[tuple[int, str, int]]) -> dict[str, Any]:
        """The signed statement for an instance (id hex) and its (app port, host ip, host port) endpoints:
        the wire form the gateway's `NodeVouch` reads. ValueError for an instance this node did not launch."""
        instance_id = bytes.fromhex(instance)
        app_id, nonce = self.launch(instance)
        if hashlib.sha256(launch_seed(self.operator, nonce) + app_id).digest()[:20] != instance_id:
            raise ValueError(f"instance {instance_id.hex()[:12]} was not launched by this node")
        now = int(self.clock())
        statement: dict[str, Any] = {
            "purpose": VOUCH_PURPOSE,
            "node_id": self.node_id,
            "operator": self.operator,
            "app_id": app_id.hex(),
            "instance_id": instance_id.hex(),
            "launch_nonce": nonce.hex(),
            "endpoints": [
                {"port": int(p), "host": str(h), "host_port": int(hp)} for p, h, hp in sorted(set(endpoints))
            ],
            "issued_at": now,
            "expires_at": now + self.lifetime_s,
        }
        sig = self.sign(vouch_digest(statement))
        return {**statement, "signature": sig.hex()}
