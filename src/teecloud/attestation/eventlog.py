"""dstack event logs: parse, replay into RTMR0-3, and read what ran from the RTMR3 runtime events.

Format (as dstack's guest agent writes it): a JSON array of `{imr, event_type, digest, event,
event_payload}` with hex digest and payload. Entries for RTMR0-2 come from the firmware's CCEL (TCG PC
Client event log); only their digests are replayed. Entries for RTMR3 are dstack runtime events
(`event_type = 0x08000001`) whose digest is recomputed from name and payload:

    digest = SHA384( le32(0x08000001) || ":" || event || ":" || payload )
    RTMR   = SHA384( RTMR || digest zero-padded to 48 bytes ), starting from 48 zero bytes

Identity events (`app-id`, `compose-hash`, `instance-id`, `key-provider`, `os-image-hash`) are taken from
the events before `system-ready` only: after it, the app itself may emit events, and an app-emitted
`compose-hash` must not be able to pose as the measured one. A duplicate identity event before
`system-ready` rejects the log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from teecloud import _json
from teecloud.attestation._cache import BoundedCache, named_cache
from teecloud.attestation._limits import DEFAULT_LIMITS, VerifierLimits
from teecloud.attestation.errors import EventLogMismatch, MalformedEvidence
from teecloud.attestation.models import AppInfo, EventLogEntry

__all__ = [
    "IDENTITY_EVENTS",
    "RUNTIME_EVENT_TYPE",
    "SYSTEM_READY_EVENT",
    "derive_app_info",
    "event_log_to_json",
    "extract_app_info",
    "mr_aggregated",
    "parse_event_log",
    "replay_rtmrs",
    "runtime_event_digest",
    "verify_event_log",
]

RUNTIME_EVENT_TYPE = 0x08000001
SYSTEM_READY_EVENT = "system-ready"
# event name -> AppInfo field
IDENTITY_EVENTS: Mapping[str, str] = {
    "app-id": "app_id",
    "compose-hash": "compose_hash",
    "instance-id": "instance_id",
    "key-provider": "key_provider_info",
    "os-image-hash": "os_image_hash",
}
_RTMR_SIZE = 48
_PREFIX = RUNTIME_EVENT_TYPE.to_bytes(4, "little") + b":"


def runtime_event_digest(name: str, payload: bytes) -> bytes:
    """The 48-byte digest dstack extends into RTMR3 for a runtime event (dstack cc-eventlog, V1 digest)."""
    return hashlib.sha384(_PREFIX + name.encode("utf-8") + b":" + bytes(payload)).digest()


def _hex(value: Any, what: str, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise MalformedEvidence(f"event log: {what} must be a hex string", step="event_log_verified")
    if len(value) > 2 * max_bytes:
        raise MalformedEvidence(f"event log: {what} is over {max_bytes} bytes", step="event_log_verified")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise MalformedEvidence(f"event log: {what} is not valid hex", step="event_log_verified") from exc


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MalformedEvidence(
            f"event log: {what} must be an integer in {lo}..{hi}", step="event_log_verified"
        )
    return value


def parse_event_log(data: str | bytes, *, limits: VerifierLimits = DEFAULT_LIMITS) -> list[EventLogEntry]:
    """Parse a dstack JSON event log. Raises MalformedEvidence (step event_log_verified)."""
    if not isinstance(data, str | bytes):
        raise MalformedEvidence("event log must be JSON text", step="event_log_verified")
    key = (data, limits)
    hit = _PARSED.get(key)
    if hit is None:
        # A pure function of the text, cached: a CVM presents the same log with every quote it sends
        # (RA-TLS handshakes, key requests), and decoding it costs more than replaying it. Entries hold
        # about as many bytes as the text (digests and payloads decoded from hex, plus object overhead).
        hit = _parse(data, limits)
        _PARSED.put(key, hit, 2 * len(data) + 200 * len(hit))
    return list(hit)


_PARSED: BoundedCache[tuple[str | bytes, VerifierLimits], tuple[EventLogEntry, ...]] = named_cache(
    "eventlog.parsed"
)


def _parse(data: str | bytes, limits: VerifierLimits) -> tuple[EventLogEntry, ...]:
    if len(data) > limits.max_event_log_size:
        raise MalformedEvidence(
            f"event log is {len(data)} bytes, over the {limits.max_event_log_size}-byte limit",
            step="event_log_verified",
        )
    try:
        raw = _json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MalformedEvidence(f"event log is not JSON: {exc}", step="event_log_verified") from exc
    if not isinstance(raw, list):
        raise MalformedEvidence("event log must be a JSON array of entries", step="event_log_verified")
    if len(raw) > limits.max_event_log_entries:
        raise MalformedEvidence(
            f"event log has {len(raw)} entries, over the limit of {limits.max_event_log_entries}",
            step="event_log_verified",
        )
    entries: list[EventLogEntry] = []
    max_payload_hex = 2 * limits.max_event_payload_size
    fromhex = bytes.fromhex
    for i, item in enumerate(raw):
        # Fast path for well-formed entries; anything unexpected is re-checked by _entry for its message.
        if type(item) is dict:
            imr, et, dg = item.get("imr"), item.get("event_type"), item.get("digest")
            ev, pl = item.get("event", ""), item.get("event_payload", "")
            if (
                type(imr) is int
                and 0 <= imr <= 3
                and type(et) is int
                and 0 <= et <= 0xFFFFFFFF
                and type(dg) is str
                and 0 < len(dg) <= 2 * _RTMR_SIZE
                and type(ev) is str
                and type(pl) is str
                and len(pl) <= max_payload_hex
            ):
                try:
                    entries.append(EventLogEntry(imr, et, fromhex(dg), ev, fromhex(pl)))
                    continue
                except ValueError:
                    pass
        entries.append(_entry(i, item, limits))
    return tuple(entries)


def _entry(i: int, item: Any, limits: VerifierLimits) -> EventLogEntry:
    """One entry, checked field by field so the error names what is wrong."""
    if not isinstance(item, dict):
        raise MalformedEvidence(f"event log entry #{i} is not an object", step="event_log_verified")
    where = f"entry #{i}"
    event = item.get("event", "")
    if not isinstance(event, str):
        raise MalformedEvidence(f"event log: {where}.event must be a string", step="event_log_verified")
    digest = _hex(item.get("digest"), f"{where}.digest", _RTMR_SIZE)
    if not digest:
        raise MalformedEvidence(f"event log: {where}.digest is empty", step="event_log_verified")
    return EventLogEntry(
        imr=_int(item.get("imr"), f"{where}.imr", 0, 3),
        event_type=_int(item.get("event_type"), f"{where}.event_type", 0, 0xFFFFFFFF),
        digest=digest,
        event=event,
        event_payload=_hex(
            item.get("event_payload", ""), f"{where}.event_payload", limits.max_event_payload_size
        ),
    )


def event_log_to_json(entries: Sequence[EventLogEntry]) -> str:
    """Serialize entries the way dstack does (compact JSON array, hex digest and payload)."""
    return json.dumps([e.to_json() for e in entries], separators=(",", ":"))


def _extend(rtmr: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(rtmr + digest.ljust(_RTMR_SIZE, b"\x00")).digest()


def replay_rtmrs(entries: Sequence[EventLogEntry]) -> list[bytes]:
    """Replay every entry's digest into its register; returns [RTMR0, RTMR1, RTMR2, RTMR3]."""
    rtmrs = [bytes(_RTMR_SIZE)] * 4
    sha384 = hashlib.sha384
    for e in entries:
        d = e.digest
        rtmrs[e.imr] = sha384(
            rtmrs[e.imr] + (d if len(d) == _RTMR_SIZE else d.ljust(_RTMR_SIZE, b"\x00"))
        ).digest()
    return rtmrs


def _label(i: int, e: EventLogEntry) -> str:
    name = f" '{e.event}'" if e.event else ""
    return f"event #{i}{name} (RTMR{e.imr}, type 0x{e.event_type:08x})"


def verify_event_log(entries: Sequence[EventLogEntry], rtmrs: Sequence[bytes]) -> AppInfo:
    """Check that `entries` replay to the quote's `rtmrs` (RTMR0..3) and return what RTMR3 says ran.

    Steps:
      (1) every runtime event's digest is recomputed from its name and payload;
      (2) each register is replayed and compared with the quote; the first event that breaks it is named;
      (3) the identity events are read (see the module docstring).
    Raises EventLogMismatch (or MalformedEvidence for registers of the wrong size).
    """
    if len(rtmrs) != 4 or any(len(r) != _RTMR_SIZE for r in rtmrs):
        raise MalformedEvidence("expected four 48-byte RTMR values from the quote", step="event_log_verified")
    # (1): runtime events carry their preimage; a digest that does not match it is a tampered event.
    for i, e in enumerate(entries):
        if e.event_type == RUNTIME_EVENT_TYPE and runtime_event_digest(e.event, e.event_payload) != e.digest:
            raise EventLogMismatch(f"{_label(i, e)}: its digest does not match its name and payload")
    # (2): replay, and on a mismatch replay that register again to find where the quote stops.
    replayed = replay_rtmrs(entries)
    for imr in range(4):
        quoted = bytes(rtmrs[imr])
        if replayed[imr] != quoted:
            _explain_mismatch(entries, imr, quoted)
    # (3): read the identity events.
    return extract_app_info(entries)


def _explain_mismatch(entries: Sequence[EventLogEntry], imr: int, quoted: bytes) -> None:
    indexed = [(i, e) for i, e in enumerate(entries) if e.imr == imr]
    value = bytes(_RTMR_SIZE)
    prefixes = [value]
    for _, e in indexed:
        value = _extend(value, e.digest)
        prefixes.append(value)
    if quoted in prefixes:
        k = prefixes.index(quoted)
        i, e = indexed[k]
        raise EventLogMismatch(
            f"RTMR{imr} does not match the quote: the quote covers only the first {k} of the log's "
            f"{len(indexed)} RTMR{imr} events; {_label(i, e)} and every later one are not in the quote"
        )
    first = f"; its first event is {_label(*indexed[0])}" if indexed else ""
    raise EventLogMismatch(
        f"RTMR{imr} does not match the quote: replaying the log's {len(indexed)} RTMR{imr} events gives "
        f"{value.hex()[:16]}…, the quote has {quoted.hex()[:16]}…; an event was altered, removed or "
        f"reordered{first}"
    )


def extract_app_info(entries: Sequence[EventLogEntry]) -> AppInfo:
    """Read app_id, compose_hash, instance_id, key-provider and os-image-hash from the RTMR3 runtime events
    (before `system-ready`). Does not replay: call `verify_event_log` for evidence."""
    found: dict[str, bytes] = {}
    events: list[tuple[str, bytes]] = []
    ready = False
    for i, e in enumerate(entries):
        if e.imr != 3 or e.event_type != RUNTIME_EVENT_TYPE:
            continue
        events.append((e.event, e.event_payload))
        if e.event == SYSTEM_READY_EVENT:
            ready = True
        if ready or e.event not in IDENTITY_EVENTS:
            continue
        field = IDENTITY_EVENTS[e.event]
        if field in found:
            raise EventLogMismatch(
                f"{_label(i, e)}: a second '{e.event}' event before '{SYSTEM_READY_EVENT}'"
            )
        found[field] = e.event_payload
    return AppInfo(events=tuple(events), **found)


def derive_app_info(
    measurements: Mapping[str, bytes],
    entries: Sequence[EventLogEntry],
    *,
    device_id: bytes = b"",
    app_info: AppInfo | None = None,
) -> AppInfo:
    """AppInfo from the event log plus dstack's derived values (dstack-attest `decode_mr_tdx_from_quote`):

        mr_system     = sha256(MRTD || RTMR0 || RTMR1 || RTMR2 || (sha256(key_provider_info) or 32 zeros))
        mr_aggregated = sha256(MRTD || RTMR0..3 [|| mr_config_id || mr_owner || mr_owner_config])

    where the last three are appended when any of them is non-zero. Measurements come from the verified
    quote; call only after `verify_event_log` succeeded for the same entries (pass its result as
    `app_info` to skip reading the entries again).
    """
    app = app_info if app_info is not None else extract_app_info(entries)
    needed = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
    if not all(n in measurements for n in needed):
        return replace(app, device_id=device_id)
    base = b"".join(measurements[n] for n in needed[:4])
    kp = app.key_provider_info
    mr_system = hashlib.sha256(base + (hashlib.sha256(kp).digest() if kp else bytes(32))).digest()
    return replace(app, mr_system=mr_system, mr_aggregated=mr_aggregated(measurements), device_id=device_id)


def mr_aggregated(measurements: Mapping[str, bytes]) -> bytes:
    """dstack's mr_aggregated = sha256(MRTD || RTMR0..3 [|| mr_config_id || mr_owner || mr_owner_config]),
    the last three appended when any of them is non-zero (reference/dstack.md §4). The one implementation:
    the verifier, the guest agent's Info and the KMS's own identity all use it."""
    base = b"".join(measurements[n] for n in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"))
    config = b"".join(measurements.get(n, b"") for n in ("mr_config_id", "mr_owner", "mr_owner_config"))
    return hashlib.sha256(base + (config if any(config) else b"")).digest()
