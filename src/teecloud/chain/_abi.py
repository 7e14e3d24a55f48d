"""Typed call encoding and log decoding from a contract ABI (eth_abi does the encoding itself)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi.abi import decode, encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

__all__ = ["ContractAbi", "decode_revert"]


def _type(item: dict[str, Any]) -> str:
    t: str = item["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_type(c) for c in item["components"]) + ")" + t[len("tuple") :]
    return t


def _norm(value: Any, abi_type: str) -> Any:
    """Decoded values made friendly: checksummed addresses, lists instead of tuples for arrays."""
    if abi_type == "address":
        return to_checksum_address(value)
    if abi_type.endswith("[]"):
        return [_norm(v, abi_type[:-2]) for v in value]
    if abi_type.startswith("("):
        inner = _split(abi_type[1:-1])
        return tuple(_norm(v, t) for v, t in zip(value, inner, strict=True))
    return value


def _split(types: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in types:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    if cur:
        out.append(cur)
    return out


@dataclass(frozen=True)
class Function:
    name: str
    selector: bytes
    inputs: list[str]
    outputs: list[str]
    mutable: bool


@dataclass(frozen=True)
class Event:
    name: str
    topic: bytes
    fields: list[tuple[str, str, bool]]  # (name, type, indexed)


class ContractAbi:
    def __init__(self, abi: list[dict[str, Any]]) -> None:
        self.functions: dict[str, Function] = {}
        self.by_selector: dict[bytes, Function] = {}
        self.events: dict[bytes, Event] = {}
        self.events_by_name: dict[str, Event] = {}
        for item in abi:
            if item["type"] == "function":
                ins = [_type(i) for i in item["inputs"]]
                fn = Function(
                    name=item["name"],
                    selector=keccak(text=f"{item['name']}({','.join(ins)})")[:4],
                    inputs=ins,
                    outputs=[_type(o) for o in item["outputs"]],
                    mutable=item.get("stateMutability") not in ("view", "pure"),
                )
                self.functions[fn.name] = fn
                self.by_selector[fn.selector] = fn
            elif item["type"] == "event":
                fields = [(i["name"], _type(i), bool(i["indexed"])) for i in item["inputs"]]
                ev = Event(
                    name=item["name"],
                    topic=keccak(text=f"{item['name']}({','.join(t for _, t, _ in fields)})"),
                    fields=fields,
                )
                self.events[ev.topic] = ev
                self.events_by_name[ev.name] = ev

    def fn(self, name: str) -> Function:
        try:
            return self.functions[name]
        except KeyError:
            raise ValueError(f"no function {name!r} in this contract") from None

    def encode_call(self, name: str, *args: Any) -> bytes:
        fn = self.fn(name)
        if len(args) != len(fn.inputs):
            raise TypeError(f"{name} takes {len(fn.inputs)} arguments, got {len(args)}")
        return fn.selector + encode(fn.inputs, list(args))

    def decode_output(self, name: str, data: bytes) -> Any:
        fn = self.fn(name)
        values = decode(fn.outputs, data)
        out = tuple(_norm(v, t) for v, t in zip(values, fn.outputs, strict=True))
        return out[0] if len(out) == 1 else out

    def decode_calldata(self, data: bytes) -> tuple[str, tuple[Any, ...]] | None:
        fn = self.by_selector.get(bytes(data[:4]))
        if fn is None:
            return None
        try:
            values = decode(fn.inputs, bytes(data[4:]))
        except Exception:  # hostile or foreign calldata: shown undecoded
            return None
        return fn.name, tuple(_norm(v, t) for v, t in zip(values, fn.inputs, strict=True))

    def decode_log(self, log: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        topics = [bytes.fromhex(t.removeprefix("0x")) for t in log.get("topics", [])]
        if not topics or topics[0] not in self.events:
            return None
        ev = self.events[topics[0]]
        data = bytes.fromhex(log.get("data", "0x").removeprefix("0x"))
        plain = [(n, t) for n, t, idx in ev.fields if not idx]
        values = decode([t for _, t in plain], data) if plain else ()
        out: dict[str, Any] = {}
        it = iter(values)
        ti = 1
        for n, t, idx in ev.fields:
            if idx:
                out[n] = _norm(decode([t], topics[ti])[0], t) if t in _STATIC else topics[ti]
                ti += 1
            else:
                out[n] = _norm(next(it), t)
        return ev.name, out


_STATIC = {"address", "bytes32", "uint256", "bool", "int256", "uint8", "uint64"}

_ERROR_SELECTOR = keccak(text="Error(string)")[:4]


def decode_revert(data: bytes) -> str:
    """Reason string of a revert (Solidity/Vyper `Error(string)`), or '' when there is none."""
    if data[:4] == _ERROR_SELECTOR:
        try:
            return str(decode(["string"], data[4:])[0])
        except Exception:
            return ""
    return ""
