"""RFC 8785 JSON Canonicalization Scheme through the `rfc8785` package, errors mapped to MalformedInput."""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from teecloud.ai.errors import MalformedInput

__all__ = ["jcs", "jcs_sha256"]


def jcs(value: Any) -> bytes:
    """The RFC 8785 canonical bytes of a JSON value (UTF-8, sorted keys, ECMAScript number form)."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise MalformedInput(f"value cannot be canonicalized (RFC 8785): {exc}") from exc


def jcs_sha256(value: Any) -> bytes:
    return hashlib.sha256(jcs(value)).digest()
