"""Argument normalisation shared by the chain modules: addresses, 32-byte values, JSON-RPC quantities."""

from __future__ import annotations

from typing import Any

from eth_utils.address import is_address, to_checksum_address

__all__ = ["to_address", "to_bytes32", "to_int"]


def to_address(a: str | bytes) -> str:
    """A checksummed 0x address from 20 bytes or hex text (with or without 0x); ValueError otherwise."""
    if isinstance(a, bytes | bytearray):
        if len(a) != 20:
            raise ValueError("an address is 20 bytes")
        return to_checksum_address("0x" + bytes(a).hex())
    if not isinstance(a, str) or not is_address(a):
        raise ValueError(f"not an address: {a!r}")
    return to_checksum_address(a)


def to_bytes32(h: str | bytes, what: str = "hash") -> bytes:
    if isinstance(h, str):
        try:
            h = bytes.fromhex(h.removeprefix("0x"))
        except ValueError:
            raise ValueError(f"{what} must be 32 bytes of hex") from None
    if len(h) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(h)


def to_int(v: Any) -> int:
    """A JSON-RPC quantity ("0x1a") or an int."""
    return int(v, 16) if isinstance(v, str) else int(v)
