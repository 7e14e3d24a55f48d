"""JSON from untrusted sources, with a nesting-depth bound checked before the parser sees it.

Why: importing py-evm (`eth`, pulled in by the embedded chain) raises the interpreter's recursion limit to
100,000, and CPython's C JSON decoder then overflows the C stack on `[[[[...` long before it hits that
limit: one hostile request would kill a KMS or node process. The pre-scan is linear and allocation-free.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["DEFAULT_MAX_DEPTH", "JsonTooDeep", "check_depth", "loads"]

DEFAULT_MAX_DEPTH = 64

# A JSON string (with escapes) or a bracket; strings are skipped so brackets inside them don't count.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JsonTooDeep(ValueError):
    """The document nests deeper than allowed (a ValueError, like json.JSONDecodeError)."""


def check_depth(data: str | bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    if not isinstance(data, str | bytes | bytearray):
        raise TypeError(f"JSON must be str or bytes, not {type(data).__name__}")
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return  # cannot nest deeper than the number of openers
    depth = 0
    for m in _TOKENS.finditer(raw):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise JsonTooDeep(f"JSON nests deeper than {max_depth} levels")
        elif tok in (b"]", b"}"):
            depth -= 1


def loads(data: str | bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """json.loads for untrusted input; raises ValueError (JsonTooDeep or JSONDecodeError) on bad input."""
    check_depth(data, max_depth)
    return json.loads(data)
