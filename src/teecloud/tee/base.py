"""The platform interface every TEE backend implements (simulated, tdx, sev_snp)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from teecloud.attestation.models import EventLogEntry

__all__ = ["TeePlatform"]


@runtime_checkable
class TeePlatform(Protocol):
    """A backend that PRODUCES evidence about the environment it runs in.

    kind          "tdx-simulated", "tdx" or "sev_snp".
    quote(rd)     hardware-signed evidence binding `report_data` (<= 64 bytes, zero-padded, never hashed);
                  for TDX a DCAP v4 quote.
    extend_rtmr   extend RTMR `index` with a 48-byte digest (shorter digests are zero-padded).
    emit_event    RTMR3 runtime event: digest = SHA384(le32(0x08000001) ‖ ":" ‖ name ‖ ":" ‖ payload),
                  extend RTMR3, append the entry to the event log.
    event_log     every entry so far, dstack JSON-compatible (RTMR0-2 digests, RTMR3 with payloads).
    measurements  {"mrtd": .., "rtmr0": .., .., "rtmr3": ..} current values (48 bytes each).
    os_image_hash the booted OS image's hash (32 bytes), b"" when the platform does not know it.
    device_id     dstack's device id (TDX: sha256(PPID)), b"" when unknown.
    vm_config()   dstack-types VmConfig of this CVM (os_image_hash, cpu_count, memory_size, ...), {} when
                  unknown; a KMS uses it to pick the RTMR0 reference (teecloud.vmconfig).
    sealing_secret()  32+ bytes only this platform can derive (a KMS seals its state under a key derived
                  from it and its own measurement); raises TeeUnavailable where the platform offers none.
    """

    @property
    def kind(self) -> str: ...

    def quote(self, report_data: bytes) -> bytes: ...

    def extend_rtmr(self, index: int, digest: bytes) -> None: ...

    def emit_event(self, name: str, payload: bytes) -> None: ...

    def event_log(self) -> list[EventLogEntry]: ...

    def measurements(self) -> dict[str, bytes]: ...

    @property
    def os_image_hash(self) -> bytes: ...

    @property
    def device_id(self) -> bytes: ...

    def vm_config(self) -> dict[str, Any]: ...

    def sealing_secret(self) -> bytes: ...
