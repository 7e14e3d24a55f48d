"""The runtime's limits in one place (per call, per function, per request), as named constants."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import BadFunction

__all__ = ["MAX_FUNCTION_LIMITS", "CallLimits", "RuntimeLimits"]

# Fuel is wasmtime's instruction budget: one unit per executed WebAssembly operator (roughly). On this
# project's reference machine 1e9 units take ~1.3 s of one core (docs/functions.md): the CPU budget is
# counted in executed instructions, so it does not depend on how loaded the host is.
FUEL_PER_CPU_MS = 750_000


@dataclass(frozen=True)
class CallLimits:
    """What one invocation may use. A function's manifest may lower any of these, never raise them above
    MAX_FUNCTION_LIMITS."""

    cpu_fuel: int = 1_000_000_000  # instruction budget (see FUEL_PER_CPU_MS)
    wall_ms: int = 10_000  # the whole call, fetches included (Chainlink Functions: 10 s)
    memory_bytes: int = 64 << 20  # linear memory
    http_requests: int = 5  # fetches per call
    http_timeout_ms: int = 3_000  # one fetch (Chainlink Functions: 3 s)
    http_response_bytes: int = 256 << 10  # one fetch's body
    output_bytes: int = 4096  # the function's result
    input_bytes: int = 30 << 10  # the call's input (Chainlink Functions: 30 KB request)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise BadFunction(f"limit {f.name} must be a non-negative integer, got {v!r}")

    def lowered_by(self, requested: dict[str, Any]) -> CallLimits:
        """These limits lowered by a manifest's `limits` (unknown names and raises are refused)."""
        if not isinstance(requested, dict):
            raise BadFunction("limits must be an object")
        names = {f.name for f in fields(self)}
        out: dict[str, int] = {}
        for k, v in requested.items():
            if k not in names:
                raise BadFunction(f"unknown limit {k!r} (known: {', '.join(sorted(names))})")
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise BadFunction(f"limit {k} must be a positive integer")
            ceiling = getattr(self, k)
            if v > ceiling:
                raise BadFunction(f"limit {k}={v} is above the runtime's maximum {ceiling}")
            out[k] = v
        return replace(self, **out)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


MAX_FUNCTION_LIMITS = CallLimits()


@dataclass(frozen=True)
class RuntimeLimits:
    """What the runtime accepts at deploy time and keeps."""

    max_module_bytes: int = 4 << 20
    max_allowed_hosts: int = 16
    max_host_chars: int = 253 + 6
    max_secrets: int = 32
    max_secrets_blob: int = 64 << 10
    max_functions: int = 1024
    max_log_lines: int = 200  # kept per function (a ring)
    max_log_line_chars: int = 1024
    max_log_lines_per_call: int = 20
    max_cached_modules: int = 256
    max_result_ttl_s: int = 3600
    epoch_tick_ms: int = 5
