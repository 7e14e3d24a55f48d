"""JSON from untrusted sources, with a nesting-depth bound checked before the parser sees it.

Why: importing py-evm (`eth`, pulled in by the embedded chain) raises the interpreter's recursion limit to
100,000, and CPython's C JSON decoder then overflows the C stack on `[[[[...` long before it hits that
limit: one hostile request would kill a KMS or node process. The pre-scan is linear and allocation-free.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate, repeat
from operator import sub
from typing import Any

__all__ = ["DEFAULT_MAX_DEPTH", "JsonNotStrict", "JsonTooDeep", "check_depth", "loads"]

DEFAULT_MAX_DEPTH = 64

# Only quotes and brackets matter once escapes are gone; strings (now plain "...") are then removed, and
# of the brackets left, openers count 2 and closers 0: the running sum of (value - 1) is the depth.
_KEEP = b'"[]{}'
_NOT_KEPT = bytes(b for b in range(256) if b not in _KEEP)
_STRING = re.compile(rb'"[^"]*"')
_BRACKETS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


class JsonTooDeep(ValueError):
    """The document nests deeper than allowed (a ValueError, like json.JSONDecodeError)."""


def check_depth(data: str | bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    if not isinstance(data, str | bytes | bytearray):
        raise TypeError(f"JSON must be str or bytes, not {type(data).__name__}")
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return  # cannot nest deeper than the number of openers
    # C-level work only (replace, translate, one regex over quotes and brackets, map, accumulate): a 20 KB
    # document in tens of microseconds. In JSON a backslash occurs only inside strings, and escapes read
    # left to right: dropping every pair of backslashes, then every escaped quote, leaves each string "...".
    raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_KEPT)
    brackets = _STRING.sub(b"", raw).translate(_BRACKETS)
    if brackets and max(accumulate(map(sub, brackets, repeat(1)))) > max_depth:
        raise JsonTooDeep(f"JSON nests deeper than {max_depth} levels")


class JsonNotStrict(ValueError):
    """The document uses JSON that readers disagree on: a duplicate key (Python keeps the last value, other
    readers the first) or a non-standard constant (NaN, Infinity)."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JsonNotStrict(f"duplicate key {key[:64]!r}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise JsonNotStrict(f"non-standard JSON constant {name}")


def loads(data: str | bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, strict: bool = False) -> Any:
    """json.loads for untrusted input; raises ValueError (JsonTooDeep, JsonNotStrict or JSONDecodeError) on
    bad input. `strict`: refuse duplicate keys and NaN/Infinity, so that every reader reads the same
    document (for evidence whose fields a trust decision reads)."""
    check_depth(data, max_depth)
    if strict:
        return json.loads(data, object_pairs_hook=_unique, parse_constant=_no_constant)
    return json.loads(data)
