"""The node's entry in NodeRegistry: its TEE kind, device ID and a hash of its attestation.

The attestation is a quote from the node's platform whose report_data binds the operator's address and the
chain (`sha512("teecloud-node:" ‖ chain_key ‖ ":" ‖ operator)`); its sha256 goes on chain, the quote itself is
kept in <node home>/registration.json so anyone can ask for it and check it against the hash. Registration is
done once per chain (idempotent); the node id is remembered in the same file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from teecloud._fs import atomic_write_json
from teecloud.node.instance import node_home

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_PRICE_PER_HOUR", "ensure_registered", "node_report_data"]

DEFAULT_CAPACITY = 8
DEFAULT_PRICE_PER_HOUR = 10**12  # wei
TEE_KIND_MAX = 16  # NodeRegistry stores String[16]


def node_report_data(chain_key: str, operator: str) -> bytes:
    return hashlib.sha512(f"teecloud-node:{chain_key}:{operator.lower()}".encode()).digest()


def ensure_registered(
    chain: Any,
    platform: Any,
    *,
    home: Path | None = None,
    capacity: int = DEFAULT_CAPACITY,
    price_per_hour: int = DEFAULT_PRICE_PER_HOUR,
    stake: int | None = None,
) -> int:
    """Register this node in NodeRegistry unless already registered on this chain; returns the node id."""
    path = node_home(home) / "registration.json"
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        records = {}
    if not isinstance(records, dict):
        records = {}
    entry = records.get(chain.chain_key)
    if isinstance(entry, dict) and isinstance(entry.get("node_id"), int):
        return int(entry["node_id"])
    operator = str(chain.address)
    quote = platform.quote(node_report_data(chain.chain_key, operator))
    attestation_hash = hashlib.sha256(quote).digest()
    device_id = bytes(platform.device_id or b"\0" * 32)
    if stake is None:
        from teecloud.chain.client import DEFAULT_NODE_PARAMS

        stake = int(DEFAULT_NODE_PARAMS["min_stake"])
    node_id = chain.register_node(
        tee_kind=str(platform.kind)[:TEE_KIND_MAX],
        device_id=device_id,
        attestation_hash=attestation_hash,
        capacity=capacity,
        price_per_hour=price_per_hour,
        stake=stake,
    )
    records[chain.chain_key] = {
        "node_id": node_id,
        "operator": operator,
        "tee_kind": platform.kind,
        "device_id": device_id.hex(),
        "attestation_hash": attestation_hash.hex(),
        "quote": quote.hex(),
    }
    atomic_write_json(path, records, mode=0o644)
    return int(node_id)
