"""dstack event logs: parse strictly, replay into RTMR0-3, and read what ran from the RTMR3 runtime events.

Format (as dstack's guest agent writes it): a JSON array of `{imr, event_type, digest, event,
event_payload}` with hex digest and payload. Only the quote's registers are signed; every field of the log
is a claim, accepted only when it is exactly understood (an allowlist, never a denylist):
  - strict JSON: no duplicate keys (Python keeps the last value, other readers the first, and the KMS and
    dstack's tools must never read different logs), no NaN/Infinity;
  - each entry has exactly the five fields; `imr` an integer 0..3; `event_type` an integer (u32); `digest`
    exactly 48 bytes as lowercase hex; `event_payload` lowercase hex; `event` a string;
  - an RTMR3 entry is a dstack runtime event (`event_type = 0x08000001`) whose digest is recomputed from its
    name (which may not contain ':', so each digest has one reading) and payload; an RTMR3 entry of any
    other type is refused, whatever its digest:

    digest = SHA384( le32(0x08000001) || ":" || event || ":" || payload )
    RTMR   = SHA384( RTMR || digest ), starting from 48 zero bytes

Entries for RTMR0-2 come from the firmware's CCEL (TCG PC Client event log); only their digests are
replayed, and they decide nothing: RTMR0-2 are judged by comparing the quoted registers with reference values.

Identity events (`app-id`, `compose-hash`, `instance-id`, `key-provider`, `os-image-hash`) are taken from
the events before `system-ready` only, for display. Key release does not read them as labels: it recomputes
the whole boot-time RTMR3 from the boot grammar (teecloud.attestation.boottime) and compares registers.
"""

from __future__ import annotations

import hashlib
import json
import re
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


_FIELDS = frozenset({"imr", "event_type", "digest", "event", "event_payload"})
_DIGEST_HEX = re.compile(r"[0-9a-f]{96}")
_PAYLOAD_HEX = re.compile(r"(?:[0-9a-f]{2})*")
MAX_EVENT_NAME_BYTES = 1024


def _refuse(reason: str) -> MalformedEvidence:
    return MalformedEvidence(f"event log: {reason}", step="event_log_verified")


def parse_event_log(data: str | bytes, *, limits: VerifierLimits = DEFAULT_LIMITS) -> list[EventLogEntry]:
    """Parse a dstack JSON event log strictly (module docstring). Raises MalformedEvidence
    (step event_log_verified) naming the first entry and field that is not exactly understood."""
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
        raise _refuse(f"{len(data)} bytes, over the {limits.max_event_log_size}-byte limit")
    try:
        raw = _json.loads(data, strict=True)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _refuse(f"not strict JSON ({exc})") from exc
    if not isinstance(raw, list):
        raise _refuse("must be a JSON array of entries")
    if len(raw) > limits.max_event_log_entries:
        raise _refuse(f"{len(raw)} entries, over the limit of {limits.max_event_log_entries}")
    return tuple(_entry(i, item, limits) for i, item in enumerate(raw))


def _entry(i: int, item: Any, limits: VerifierLimits) -> EventLogEntry:
    """One entry, accepted only when every field is exactly what dstack writes (an allowlist of fields,
    types and encodings); the error names the entry and the field."""
    where = f"entry #{i}"
    if type(item) is not dict:
        raise _refuse(f"{where} is not an object")
    if item.keys() != _FIELDS:
        extra, missing = sorted(item.keys() - _FIELDS), sorted(_FIELDS - item.keys())
        what = "; ".join(
            part
            for part in (
                f"unknown field(s) {', '.join(repr(k[:32]) for k in extra[:4])}" if extra else "",
                f"missing field(s) {', '.join(missing)}" if missing else "",
            )
            if part
        )
        raise _refuse(f"{where}: {what} (an entry has exactly {', '.join(sorted(_FIELDS))})")
    imr, event_type, digest, event, payload = (
        item["imr"],
        item["event_type"],
        item["digest"],
        item["event"],
        item["event_payload"],
    )
    if type(imr) is not int or not 0 <= imr <= 3:
        raise _refuse(f"{where}.imr must be an integer 0..3")
    if type(event_type) is not int or not 0 <= event_type <= 0xFFFFFFFF:
        raise _refuse(f"{where}.event_type must be an integer 0..0xffffffff")
    if type(digest) is not str or not _DIGEST_HEX.fullmatch(digest):
        raise _refuse(f"{where}.digest must be exactly 48 bytes as 96 lowercase hex digits")
    if type(payload) is not str or len(payload) > 2 * limits.max_event_payload_size:
        raise _refuse(f"{where}.event_payload must be hex of at most {limits.max_event_payload_size} bytes")
    if not _PAYLOAD_HEX.fullmatch(payload):
        raise _refuse(f"{where}.event_payload must be lowercase hex with an even number of digits")
    if type(event) is not str:
        raise _refuse(f"{where}.event must be a string")
    try:
        name_bytes = event.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _refuse(f"{where}.event is not valid Unicode text") from exc
    if len(name_bytes) > MAX_EVENT_NAME_BYTES:
        raise _refuse(f"{where}.event is over {MAX_EVENT_NAME_BYTES} bytes")
    entry = EventLogEntry(imr, event_type, bytes.fromhex(digest), event, bytes.fromhex(payload))
    if imr == 3:
        # RTMR3 holds only dstack runtime events, and each one's digest is a fact recomputed from its name
        # and payload: an RTMR3 entry of any other type would be a digest nobody can explain.
        if ":" in event:
            # The digest's preimage is type ‖ ":" ‖ name ‖ ":" ‖ payload: a name holding ':' makes one digest
            # readable as two (name, payload) pairs. dstack's and teecloud's emitters refuse such names.
            raise _refuse(f"{where}.event: an RTMR3 event name may not contain ':'")
        if event_type != RUNTIME_EVENT_TYPE:
            raise _refuse(
                f"{where} is in RTMR3 with event_type 0x{event_type:08x}; RTMR3 holds only runtime events "
                f"(0x{RUNTIME_EVENT_TYPE:08x})"
            )
        if runtime_event_digest(event, entry.event_payload) != entry.digest:
            raise EventLogMismatch(f"{_label(i, entry)}: its digest does not match its name and payload")
    return entry


def event_log_to_json(entries: Sequence[EventLogEntry]) -> str:
    """Serialize entries the way dstack does (compact JSON array, hex digest and payload)."""
    return json.dumps([e.to_json() for e in entries], separators=(",", ":"))


def _extend(rtmr: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(rtmr + digest).digest()


def replay_rtmrs(entries: Sequence[EventLogEntry]) -> list[bytes]:
    """Replay every entry's digest into its register; returns [RTMR0, RTMR1, RTMR2, RTMR3]."""
    rtmrs = [bytes(_RTMR_SIZE)] * 4
    sha384 = hashlib.sha384
    for e in entries:
        rtmrs[e.imr] = sha384(rtmrs[e.imr] + e.digest).digest()
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
    # (1): every RTMR3 entry is a runtime event carrying its preimage (entries built in code, not parsed, are
    # held to the same rule as parsed ones); a digest that does not match it is a tampered event.
    for i, e in enumerate(entries):
        if len(e.digest) != _RTMR_SIZE or not 0 <= e.imr <= 3:
            raise MalformedEvidence(
                f"{_label(i, e)}: a digest of {len(e.digest)} bytes (exactly 48 are accepted)",
                step="event_log_verified",
            )
        if e.imr == 3 and e.event_type != RUNTIME_EVENT_TYPE:
            raise MalformedEvidence(
                f"{_label(i, e)}: RTMR3 holds only runtime events (0x{RUNTIME_EVENT_TYPE:08x})",
                step="event_log_verified",
            )
        if e.imr == 3 and runtime_event_digest(e.event, e.event_payload) != e.digest:
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
    (before `system-ready`), and RTMR0's digests in order. Does not replay: call `verify_event_log` for
    evidence (which holds every RTMR3 entry to the runtime-event rule, so every RTMR3 entry read here is
    one)."""
    found: dict[str, bytes] = {}
    events: list[tuple[str, bytes]] = []
    ready = False
    rtmr0_log: list[bytes] = []
    for i, e in enumerate(entries):
        if e.imr == 0:
            rtmr0_log.append(e.digest)
        if e.imr != 3:
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
    return AppInfo(events=tuple(events), rtmr0_log=tuple(rtmr0_log), **found)


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
