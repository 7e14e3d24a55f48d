"""Hex identifiers as users and wire formats write them: optional `0x`, any case, surrounding space.

    parse_hex(text, size=None, name="value")  -> bytes   exact size when given; bounded length either way
    parse_app_id(text)                        -> bytes   20 bytes (an AppAuth address)
    parse_hash(text, name="hash")             -> bytes   32 bytes (compose hash, OS image hash, ...)

One parser instead of ad-hoc `bytes.fromhex(x.removeprefix("0x"))` calls, so every id in every command and
API is read, bounded and refused the same way (`HexError`, a ValueError with the field's name).
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = ["MAX_HEX_CHARS", "HexError", "parse_app_id", "parse_hash", "parse_hex"]

MAX_HEX_CHARS = 1 << 20  # 512 KiB of bytes: far above any id; bounds what a caller can make us decode


class HexError(Error, ValueError):
    """Not hex, or not the expected size; the message names the field."""


def parse_hex(text: object, *, size: int | None = None, name: str = "value") -> bytes:
    if not isinstance(text, str):
        raise HexError(f"{name} must be a hex string")
    raw = text.strip()
    if raw[:2] in ("0x", "0X"):
        raw = raw[2:]
    if len(raw) > MAX_HEX_CHARS:
        raise HexError(f"{name} is longer than {MAX_HEX_CHARS} hex digits")
    want = f"{size} bytes of hex ({2 * size} hex digits)" if size is not None else "hex"
    try:
        value = bytes.fromhex(raw)
    except ValueError:
        raise HexError(f"{name} must be {want}, not {text[:80]!r}") from None
    if size is not None and len(value) != size:
        raise HexError(f"{name} must be {want}, got {len(value)} bytes")
    return value


def parse_app_id(text: object, *, name: str = "app_id") -> bytes:
    return parse_hex(text, size=20, name=name)


def parse_hash(text: object, *, name: str = "hash") -> bytes:
    return parse_hex(text, size=32, name=name)
