"""Compile the Vyper contracts in-process, once: results are cached under data_home()/cache/vyper/,
keyed by sha256 of (compiler version, contract name, source)."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from teecloud._fs import atomic_write_json, data_home

__all__ = ["CONTRACT_NAMES", "CompiledContract", "compiled", "source_of"]

CONTRACT_NAMES = (
    "AppAuth",
    "KmsAuth",
    "Multisig",
    "Timelock",
    "NodeRegistry",
    "KmsGroup",
    # teecloud.functions (docs/functions.md): one registry per function, the shared result verifier, the
    # on-chain request/callback oracle, and an example consumer that accepts one function's results
    "FunctionRegistry",
    "FunctionResultVerifier",
    "FunctionOracle",
    "FunctionPriceFeed",
    # confidential AI (docs/ai.md): the AI agent example's decision log; published receipt-log roots
    "AgentLog",
    "ReceiptRoots",
)
_memo: dict[str, CompiledContract] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class CompiledContract:
    name: str
    abi: list[dict[str, Any]]
    bytecode: bytes  # init code
    blueprint_bytecode: bytes  # ERC-5202 blueprint init code (deploy it, then create_from_blueprint)


def source_of(name: str) -> str:
    if name not in CONTRACT_NAMES:
        raise ValueError(f"unknown contract {name!r}")
    return (resources.files("teecloud.chain") / "contracts" / f"{name}.vy").read_text(encoding="utf-8")


def _cache_dir() -> Path:
    return data_home() / "cache" / "vyper"


def compiled(name: str) -> CompiledContract:
    import vyper

    source = source_of(name)
    key = hashlib.sha256(f"{vyper.__version__}\0{name}\0{source}".encode()).hexdigest()
    with _lock:
        if key in _memo:
            return _memo[key]
        path = _cache_dir() / f"{name}-{key[:24]}.json"
        out: dict[str, Any] | None = None
        if path.is_file():
            try:
                out = json.loads(path.read_text())
                if out.get("key") != key:
                    out = None
            except (OSError, ValueError):
                out = None  # a damaged cache entry is simply rebuilt
        if out is None:
            res = vyper.compile_code(source, output_formats=["abi", "bytecode", "blueprint_bytecode"])
            out = {
                "key": key,
                "abi": res["abi"],
                "bytecode": res["bytecode"],
                "blueprint_bytecode": res["blueprint_bytecode"],
            }
            atomic_write_json(path, out, mode=0o644)
        c = CompiledContract(
            name=name,
            abi=out["abi"],
            bytecode=bytes.fromhex(out["bytecode"].removeprefix("0x")),
            blueprint_bytecode=bytes.fromhex(out["blueprint_bytecode"].removeprefix("0x")),
        )
        _memo[key] = c
        return c
