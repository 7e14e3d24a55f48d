"""The compose hash of an app-compose.json: what AppAuth allows and what boot measures into RTMR3.

compose_hash = sha256 of the normalized JSON: keys sorted recursively, separators "," and ":", UTF-8
(ensure_ascii=False), None-valued object fields dropped. This is the deterministic form used by the dstack
SDKs (`get_compose_hash`); dstack itself hashes the exact file bytes, so a file written in this normalized
form hashes the same under both.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["compose_hash", "normalize_app_compose"]


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def normalize_app_compose(app_compose: dict[str, Any]) -> bytes:
    if not isinstance(app_compose, dict):
        raise ValueError("app-compose must be a JSON object")
    text = json.dumps(
        _drop_none(app_compose), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def compose_hash(app_compose: dict[str, Any]) -> bytes:
    """32-byte sha256 of the normalized app-compose JSON."""
    return hashlib.sha256(normalize_app_compose(app_compose)).digest()
