"""Strict readers for untrusted JSON objects: each raises MalformedInput naming the field."""

from __future__ import annotations

from typing import Any

from teecloud.ai.errors import MalformedInput

__all__ = ["get_bool", "get_hex", "get_int", "get_obj", "get_str"]


def get_obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedInput(f"{where} must be a JSON object")
    return value


def get_str(obj: dict[str, Any], key: str, *, max_len: int = 256) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise MalformedInput(f"{key!r} must be a non-empty string of at most {max_len} characters")
    return value


def get_hex(obj: dict[str, Any], key: str, *, size: int | None = None, max_size: int = 4096) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > 2 * max_size + 2:
        raise MalformedInput(f"{key!r} must be a hex string")
    text = value[2:] if value.startswith("0x") else value
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise MalformedInput(f"{key!r} is not hex") from None
    if size is not None and len(raw) != size:
        raise MalformedInput(f"{key!r} must be {size} bytes, got {len(raw)}")
    return raw


def get_int(obj: dict[str, Any], key: str, *, lo: int = 0, hi: int = 2**53 - 1) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MalformedInput(f"{key!r} must be an integer in [{lo}, {hi}]")
    return value


def get_bool(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key)
    if not isinstance(value, bool):
        raise MalformedInput(f"{key!r} must be true or false")
    return value
