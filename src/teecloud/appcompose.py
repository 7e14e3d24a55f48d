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

from teecloud import _json
from teecloud.errors import Error

__all__ = [
    "MAX_APP_COMPOSE_BYTES",
    "MAX_COMPOSE_BYTES",
    "AppComposeError",
    "compose_hash",
    "gpu_attestation_required",
    "normalize_app_compose",
    "parse_app_compose",
]

# The one compose size limit: the user's docker-compose file. app-compose.json carries it as a JSON string
# (escaping at most doubles it) beside small settings, so its own bound follows from it.
MAX_COMPOSE_BYTES = 256 * 1024
MAX_APP_COMPOSE_BYTES = 2 * MAX_COMPOSE_BYTES + 64 * 1024


class AppComposeError(Error, ValueError):
    """The app-compose.json is unusable; the message says why."""


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


def parse_app_compose(text: str | bytes) -> dict[str, Any]:
    """The app-compose document from its bytes: size-bounded, UTF-8 JSON, depth-bounded, an object, every
    string valid Unicode (so it has a compose hash). Raises AppComposeError."""
    # surrogatepass: a str holding a lone surrogate then fails the UTF-8 decode below with a clear error
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_APP_COMPOSE_BYTES:
        raise AppComposeError(f"app-compose.json is {len(raw)} bytes, above {MAX_APP_COMPOSE_BYTES}")
    try:
        # depth-bounded: a deeply nested document would otherwise raise RecursionError (or, with py-evm's
        # raised recursion limit, overflow the C stack) instead of a clear error; see teecloud._json.
        doc = _json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AppComposeError(f"app-compose.json is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise AppComposeError("app-compose.json must be a JSON object")
    try:  # a "\\ud800" escape decodes to a lone surrogate, which has no UTF-8 form and so no compose hash
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise AppComposeError(
            "app-compose.json has a string that is not valid Unicode (a lone surrogate escape)"
        ) from None
    if not isinstance(doc.get("runner", "docker-compose"), str):
        raise AppComposeError("app-compose.json: 'runner' must be a string")
    return doc


# --- gpu gate
GPU_ATTESTATION_FIELD = "gpu_attestation"


def gpu_attestation_required(app_compose: dict[str, Any]) -> bool:
    """Whether the compose requires the GPU gate at boot (`"gpu_attestation": "required"`; absent or
    `"none"`: not required). Part of the compose hash, so measured. Any other value raises AppComposeError."""
    value = app_compose.get(GPU_ATTESTATION_FIELD, "none")
    if value not in ("required", "none"):
        raise AppComposeError(
            f'app-compose.json: \'{GPU_ATTESTATION_FIELD}\' must be "required" or "none", '
            f"got {str(value)[:64]!r}"
        )
    return bool(value == "required")
