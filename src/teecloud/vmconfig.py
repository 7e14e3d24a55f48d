"""dstack's VmConfig (dstack-types): how a CVM describes its VM — the OS image, CPU count, memory size and
QEMU settings that RTMR0 (firmware configuration, ACPI tables) depends on. The one home of the format.

    parse(text | mapping) -> VmConfig    untrusted input: bounded in size and fields, then typed
    to_json(mapping) -> str              compact JSON with sorted keys, as a CVM sends it
    of(tee) -> str                       a TEE platform's vm_config() as JSON ("" when it has none)

Unknown fields are kept (`VmConfig.extra`), so a config round-trips.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from teecloud.errors import Error

__all__ = ["MAX_VM_CONFIG_BYTES", "MAX_VM_CONFIG_KEYS", "VmConfig", "VmConfigError", "of", "parse", "to_json"]

MAX_VM_CONFIG_BYTES = 4096
MAX_VM_CONFIG_KEYS = 64
_U32_MAX, _U64_MAX = 0xFFFFFFFF, 2**64 - 1


class VmConfigError(Error, ValueError):
    """A vm_config that is missing, oversized or malformed; the message says which part."""


@dataclass(frozen=True)
class VmConfig:
    os_image_hash: bytes
    cpu_count: int
    memory_size: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return to_json(
            {
                **self.extra,
                "os_image_hash": self.os_image_hash.hex(),
                "cpu_count": self.cpu_count,
                "memory_size": self.memory_size,
            }
        )


def parse(value: object) -> VmConfig:
    """A vm_config as JSON text (as dstack sends it) or an already-decoded mapping."""
    if value is None or value == "":
        raise VmConfigError(
            "the request carries no vm_config, so the VM shape (CPU count, memory) that RTMR0 depends "
            "on is unknown and the firmware configuration cannot be checked"
        )
    if isinstance(value, str | bytes):
        if len(value) > MAX_VM_CONFIG_BYTES:
            raise VmConfigError(
                f"vm_config is {len(value)} characters; at most {MAX_VM_CONFIG_BYTES} are accepted"
            )
        try:
            doc = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise VmConfigError(f"vm_config is not JSON: {str(exc)[:100]}") from exc
    else:
        doc = value
    if not isinstance(doc, Mapping):
        raise VmConfigError("vm_config is not a JSON object")
    if len(doc) > MAX_VM_CONFIG_KEYS:
        raise VmConfigError(f"vm_config has more than {MAX_VM_CONFIG_KEYS} fields")
    image = doc.get("os_image_hash")
    raw = image.lower().removeprefix("0x") if isinstance(image, str) and len(image) <= 66 else ""
    try:
        image_hash = bytes.fromhex(raw)
    except ValueError:
        image_hash = b""
    if len(image_hash) != 32:
        raise VmConfigError("vm_config.os_image_hash must be 32 bytes of hex")
    shape: list[int] = []
    for name, limit in (("cpu_count", _U32_MAX), ("memory_size", _U64_MAX)):
        number = doc.get(name)
        if not isinstance(number, int) or isinstance(number, bool) or not 0 < number <= limit:
            raise VmConfigError(f"vm_config.{name} must be a positive integer of at most {limit}")
        shape.append(number)
    extra = {k: v for k, v in doc.items() if k not in ("os_image_hash", "cpu_count", "memory_size")}
    return VmConfig(image_hash, shape[0], shape[1], extra)


def to_json(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), separators=(",", ":"), sort_keys=True) if config else ""


def of(tee: Any) -> str:
    """The TEE's vm_config() as JSON; "" when it has none (a KMS that checks OS images then refuses: it
    cannot check RTMR0 without the VM shape)."""
    config = tee.vm_config() if callable(getattr(tee, "vm_config", None)) else None
    return to_json(config) if isinstance(config, Mapping) else ""
