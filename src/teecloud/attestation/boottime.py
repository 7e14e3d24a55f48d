"""The boot-time rule: which RTMR3 values are "a CVM that is booting", decided on the register.

Keys are released only to a CVM that is booting. Whether a quote was taken at boot is decided on what the
quote signs — RTMR3 — never on labels the caller writes: from the claimed boot identity the expected RTMR3 is
recomputed from the boot grammar below, and it must equal the quoted RTMR3 exactly. Any other event anywhere
in RTMR3 (an app-emitted one, `key-provider`, `system-ready`, a second `boot-mr-done`, ...) gives another
register value and is refused, whatever the log says about it.

The boot grammar (written here once; docs/threat-model.md shows the same), every event a dstack runtime
event (teecloud.attestation.eventlog), each exactly once, in this order, nothing after it:

    1  system-preparing   empty payload
    2  app-id             20 bytes (the AppAuth contract's address)
    3  compose-hash       32 bytes (sha256 of the normalized app-compose.json)
    4  instance-id        20 bytes, or empty (an app without per-instance identity)
    5  boot-nonce         OPTIONAL: 1..BOOT_NONCE_MAX_BYTES bytes; what binds a key request to one boot
                          (the KMS's challenges, teecloud.kms.challenge); the KMS requires it for app keys
    6  gpu-evidence       OPTIONAL: 32 bytes, sha256 of the verified GPU evidence set (the GPU gate of
                          teecloud.agent.boot); the KMS requires it when the measured compose requires it
    7  boot-mr-done       empty payload
    8  os-image-hash      OPTIONAL: 32 bytes (KMS mode; dstack measures it after boot-mr-done)

`mr-kms` (measured by older dstack releases, gone at dstack HEAD) and anything else are not in the grammar.

    read_boot_measurement(events)  -> BootMeasurement   the claimed identity, read by position
    BootMeasurement.rtmr3()                             the register the grammar gives for it
    check_boot_time(evidence)      -> BootMeasurement   both, and the comparison with the quoted RTMR3

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from teecloud.attestation.errors import NotBootTime
from teecloud.attestation.eventlog import runtime_event_digest
from teecloud.attestation.models import VerifiedEvidence

__all__ = [
    "BOOT_MR_DONE_EVENT",
    "BOOT_NONCE_EVENT",
    "BOOT_NONCE_MAX_BYTES",
    "GPU_EVIDENCE_EVENT",
    "BootMeasurement",
    "check_boot_time",
    "read_boot_measurement",
    "replay_runtime_events",
]

BOOT_MR_DONE_EVENT = "boot-mr-done"
BOOT_NONCE_EVENT = "boot-nonce"
BOOT_NONCE_MAX_BYTES = 1024
GPU_EVIDENCE_EVENT = "gpu-evidence"
_RTMR_SIZE = 48


@dataclass(frozen=True)
class BootMeasurement:
    """A boot-time RTMR3, as its parts. `events()` is the grammar's sequence for them; `rtmr3()` its value."""

    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    boot_nonce: bytes | None = None
    os_image_hash: bytes | None = None
    gpu_evidence: bytes | None = None

    def __post_init__(self) -> None:
        _need(len(self.app_id) == 20, f"app-id must be 20 bytes, got {len(self.app_id)}")
        _need(len(self.compose_hash) == 32, f"compose-hash must be 32 bytes, got {len(self.compose_hash)}")
        _need(
            len(self.instance_id) in (0, 20),
            f"instance-id must be 20 bytes or empty, got {len(self.instance_id)}",
        )
        if self.boot_nonce is not None:
            _need(
                1 <= len(self.boot_nonce) <= BOOT_NONCE_MAX_BYTES,
                f"boot-nonce must be 1..{BOOT_NONCE_MAX_BYTES} bytes, got {len(self.boot_nonce)}",
            )
        if self.gpu_evidence is not None:
            _need(
                len(self.gpu_evidence) == 32,
                f"gpu-evidence must be 32 bytes, got {len(self.gpu_evidence)}",
            )
        if self.os_image_hash is not None:
            _need(
                len(self.os_image_hash) == 32,
                f"os-image-hash must be 32 bytes, got {len(self.os_image_hash)}",
            )

    def events(self) -> tuple[tuple[str, bytes], ...]:
        out = []
        for name, attr, _required in _GRAMMAR:
            value = b"" if attr is None else getattr(self, attr)
            if value is not None:  # an optional event this boot did not measure
                out.append((name, value))
        return tuple(out)

    def rtmr3(self) -> bytes:
        return replay_runtime_events(self.events())


def replay_runtime_events(events: Sequence[tuple[str, bytes]], *, start: bytes = bytes(_RTMR_SIZE)) -> bytes:
    """RTMR3 after extending these runtime events onto `start` (from zero by default; dstack's digest and
    extend rule)."""
    value = start
    for name, payload in events:
        value = hashlib.sha384(value + runtime_event_digest(name, payload)).digest()
    return value


def _need(ok: bool, reason: str) -> None:
    if not ok:
        raise NotBootTime(f"not a boot-time measurement: {reason}")


# The grammar, once: (event name, the BootMeasurement field holding its payload or None for an empty payload,
# required?) in order. Both directions (events() and read_boot_measurement) follow this table.
_GRAMMAR: tuple[tuple[str, str | None, bool], ...] = (
    ("system-preparing", None, True),
    ("app-id", "app_id", True),
    ("compose-hash", "compose_hash", True),
    ("instance-id", "instance_id", True),
    (BOOT_NONCE_EVENT, "boot_nonce", False),
    (GPU_EVIDENCE_EVENT, "gpu_evidence", False),
    (BOOT_MR_DONE_EVENT, None, True),
    ("os-image-hash", "os_image_hash", False),
)


def read_boot_measurement(events: Sequence[tuple[str, bytes]]) -> BootMeasurement:
    """The claimed boot identity, read by position from a verified RTMR3 event sequence that must be exactly
    the grammar (module docstring). Raises NotBootTime naming the first event that does not fit."""
    values: dict[str, bytes] = {}
    i = 0
    for name, _attr, required in _GRAMMAR:
        if i < len(events) and events[i][0] == name:
            values[name] = bytes(events[i][1])
            i += 1
        elif required:
            got = f"'{events[i][0][:64]}'" if i < len(events) else "the end of RTMR3"
            raise NotBootTime(
                f"not a boot-time measurement: RTMR3 event #{i} should be '{name}', found {got} "
                "(keys are released only to a CVM that is booting)"
            )
    if i != len(events):
        raise NotBootTime(
            f"not a boot-time measurement: RTMR3 goes on past the boot measurement ('{events[i][0][:64]}' "
            f"after '{events[i - 1][0][:64]}'); keys are released only while a CVM boots, never on a quote "
            "taken after it (a later quote may bind anyone's key)"
        )
    for name, attr, _required in _GRAMMAR:
        if attr is None:
            _need(values[name] == b"", f"'{name}' must have an empty payload")
    # every required event was read above; an optional one absent is None
    fields: dict[str, Any] = {attr: values.get(name) for name, attr, _ in _GRAMMAR if attr is not None}
    return BootMeasurement(**fields)


def check_boot_time(evidence: VerifiedEvidence) -> BootMeasurement:
    """The boot-time rule for verified evidence: (1) the claimed identity, read by position from the
    strictly verified RTMR3 log; (2) RTMR3 recomputed from the grammar for that identity; (3) it equals the
    quoted RTMR3. Raises NotBootTime. The log only names the claims; the decision is (3), on the register."""
    info = evidence.app_info
    if info is None:
        raise NotBootTime("the evidence carries no verified event log, so its RTMR3 cannot be explained")
    quoted = evidence.measurements.get("rtmr3")
    if quoted is None or len(quoted) != _RTMR_SIZE:
        raise NotBootTime("the evidence has no RTMR3 (only TDX quotes carry the boot measurement)")
    # (1)
    claimed = read_boot_measurement(info.events)
    # (2) + (3)
    if claimed.rtmr3() != quoted:
        raise NotBootTime(
            "not a boot-time measurement: the quoted RTMR3 is not the boot grammar's value for the claimed "
            "identity"
        )
    return claimed
