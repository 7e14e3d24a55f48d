"""The compose hash of an app-compose.json: what AppAuth allows on chain and what boot measures into RTMR3.

One implementation for every component (chain CLI, deploy, node, agent): the deterministic JSON text that
`dstack_sdk.get_compose_hash` hashes — top-level None (and NaN/inf) fields dropped, keys sorted
recursively, separators "," and ":", non-ASCII kept (UTF-8), nested NaN/inf -> null. dstack itself hashes
the exact file bytes, so a file written in this normalized form hashes the same under both.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

__all__ = ["compose_hash", "normalize_app_compose"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def normalize_app_compose(app_compose: dict[str, Any]) -> str:
    if not isinstance(app_compose, dict):
        raise ValueError("app-compose must be a JSON object")
    top = {k: v for k, v in _clean(app_compose).items() if v is not None}
    if isinstance(top.get("docker_config"), dict):
        top["docker_config"] = {k: v for k, v in top["docker_config"].items() if v is not None}
    return json.dumps(top, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def compose_hash(app_compose: dict[str, Any]) -> bytes:
    """32-byte sha256 of the normalized app-compose JSON."""
    return hashlib.sha256(normalize_app_compose(app_compose).encode("utf-8")).digest()
