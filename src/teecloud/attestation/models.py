"""Typed results of verification.

Only the verifier functions of this package construct a `VerifiedEvidence`; the KMS and the gateway accept
nothing else. Measurements are named as the vendor names them (`mrtd`, `rtmr0`..`rtmr3`, `mr_enclave`,
`measurement`, `pcr0`..), values are raw bytes here and lowercase hex in `to_json()`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AppInfo",
    "EventLogEntry",
    "Step",
    "TeeKind",
    "VerificationResult",
    "VerifiedEvidence",
]


class TeeKind(enum.StrEnum):
    TDX = "tdx"
    SGX = "sgx"
    SNP = "snp"
    NITRO = "nitro"
    NVIDIA = "nvidia"


@dataclass(frozen=True)
class Step:
    """One verification step and its outcome, e.g. Step("quote_verified", True, "signature ok")."""

    name: str
    ok: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "reason": self.reason}


@dataclass(frozen=True)
class EventLogEntry:
    """One dstack event-log entry {imr, event_type, digest, event, event_payload}; payload kept for RTMR3."""

    imr: int
    event_type: int
    digest: bytes
    event: str = ""
    event_payload: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {
            "imr": self.imr,
            "event_type": self.event_type,
            "digest": self.digest.hex(),
            "event": self.event,
            "event_payload": self.event_payload.hex(),
        }


@dataclass(frozen=True)
class AppInfo:
    """What a replayed dstack event log says ran (RTMR3 boot events), plus values derived from the quote."""

    app_id: bytes = b""
    compose_hash: bytes = b""
    instance_id: bytes = b""
    key_provider_info: bytes = b""
    os_image_hash: bytes = b""
    device_id: bytes = b""
    mr_system: bytes = b""
    mr_aggregated: bytes = b""
    events: tuple[tuple[str, bytes], ...] = ()
    # RTMR0's event digests in log order (replayed to the quoted RTMR0 when the log was verified): a verifier
    # of a real OS image reads the firmware's ACPI events from them (teecloud.image.measurement)
    rtmr0_log: tuple[bytes, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id.hex(),
            "compose_hash": self.compose_hash.hex(),
            "instance_id": self.instance_id.hex(),
            "key_provider_info": self.key_provider_info.decode("utf-8", "replace"),
            "os_image_hash": self.os_image_hash.hex(),
            "device_id": self.device_id.hex(),
            "mr_system": self.mr_system.hex(),
            "mr_aggregated": self.mr_aggregated.hex(),
            "events": [{"event": n, "payload": p.hex()} for n, p in self.events],
        }


@dataclass(frozen=True)
class VerifiedEvidence:
    """Evidence whose signatures, certificate chain and TCB evaluation have passed.

    `tee` is the TeeKind value, suffixed "-simulated" when the chain ends at a teecloud development root
    (e.g. "tdx-simulated"). `fields` holds every other parsed field of the report (hex strings / ints),
    for display and for policy rules. `steps` are the steps that produced it, in order.
    """

    tee: str
    tcb_status: str
    advisory_ids: tuple[str, ...]
    measurements: dict[str, bytes]
    report_data: bytes
    debug: bool
    simulated: bool = False
    device_id: bytes = b""
    fields: dict[str, Any] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()
    app_info: AppInfo | None = None

    @property
    def kind(self) -> TeeKind:
        return TeeKind(self.tee.removesuffix("-simulated"))


@dataclass(frozen=True)
class VerificationResult:
    """The verdict shown to a user: `is_valid`, the failing `reason` (or "ok"), and every step."""

    is_valid: bool
    tee: str
    reason: str
    steps: tuple[Step, ...]
    evidence: VerifiedEvidence | None = None
    tcb_status: str = ""
    advisory_ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        ev = self.evidence
        return {
            "is_valid": self.is_valid,
            "tee": self.tee,
            "reason": self.reason,
            "tcb_status": self.tcb_status or (ev.tcb_status if ev else ""),
            "advisory_ids": list(self.advisory_ids or (ev.advisory_ids if ev else ())),
            "measurements": {k: v.hex() for k, v in ev.measurements.items()} if ev else {},
            "report_data": ev.report_data.hex() if ev else "",
            "debug": ev.debug if ev else None,
            "simulated": ev.simulated if ev else None,
            "device_id": ev.device_id.hex() if ev else "",
            "fields": ev.fields if ev else {},
            "app_info": ev.app_info.to_json() if ev and ev.app_info else None,
            "steps": [s.to_json() for s in self.steps],
        }
