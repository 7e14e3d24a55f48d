"""Parse the TDX firmware event log (ACPI CCEL table data) into digest-only EventLogEntry values.

Format: TCG PC Client Platform Firmware Profile, "crypto agile" log: a first TCG_PCClientPCREvent (SHA-1
layout) carrying the "Spec ID Event03" header that lists the digest algorithms and sizes, then
TCG_PCR_EVENT2 records. In a TDX CC event log the index is the MR index (UEFI spec, EFI_CC_MEASUREMENT
protocol): 0 = MRTD, 1..4 = RTMR0..3, so dstack's `imr` is index - 1. Only SHA-384 digests are kept,
payloads are dropped (dstack keeps RTMR0-2 entries digest-only too).
"""

from __future__ import annotations

import struct

from teecloud.attestation.models import EventLogEntry
from teecloud.tee.errors import QuoteGenerationError

__all__ = ["parse_ccel"]

TPM_ALG_SHA384 = 0x000C
EV_NO_ACTION = 0x00000003
MAX_EVENTS = 10_000
MAX_EVENT_BYTES = 1 << 24


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise QuoteGenerationError(f"CCEL event log truncated at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])


def parse_ccel(data: bytes) -> list[EventLogEntry]:
    r = _Reader(data)
    # Header event (SHA-1 layout): index, type, 20-byte digest, size, Spec ID Event03.
    r.u32()
    r.u32()
    r.take(20)
    spec = _Reader(r.take(r.u32()))
    if spec.take(16) != b"Spec ID Event03\x00":
        raise QuoteGenerationError("CCEL event log does not start with a 'Spec ID Event03' header")
    spec.take(4 + 4)  # platformClass, version minor/major, errata, uintnSize
    sizes: dict[int, int] = {}
    for _ in range(spec.u32()):
        alg, size = spec.u16(), spec.u16()
        sizes[alg] = size
    if TPM_ALG_SHA384 not in sizes:
        raise QuoteGenerationError("CCEL event log has no SHA-384 digests")
    entries: list[EventLogEntry] = []
    while r.remaining() >= 8 and len(entries) < MAX_EVENTS:
        index, event_type = r.u32(), r.u32()
        if index == 0xFFFFFFFF or (index == 0 and event_type == 0):
            break  # end of the log (the table is padded)
        sha384 = b""
        for _ in range(r.u32()):
            alg = r.u16()
            if alg not in sizes:
                raise QuoteGenerationError(f"CCEL event uses an undeclared digest algorithm 0x{alg:04x}")
            digest = r.take(sizes[alg])
            if alg == TPM_ALG_SHA384:
                sha384 = digest
        size = r.u32()
        if size > MAX_EVENT_BYTES:
            raise QuoteGenerationError("CCEL event larger than 16 MiB")
        r.take(size)
        if event_type == EV_NO_ACTION or index == 0 or index > 4:
            continue  # not extended into an RTMR
        if not sha384:
            raise QuoteGenerationError("CCEL event without a SHA-384 digest")
        entries.append(EventLogEntry(imr=index - 1, event_type=event_type, digest=sha384))
    return entries
