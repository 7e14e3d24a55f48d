"""Stand-in TDX quote + event-log verifier, used by ratls.verify_ratls_cert only while
teecloud.attestation.verifier.verify_tdx_with_event_log is absent. When the attestation package's
`dcap.verify_dcap_quote` and `eventlog` exist, `verify_composed` chains those instead; the last resort,
`verify_tdx_with_event_log_fallback`, is described below.

It verifies the quote with dcap-qvl (against the given development root, or Intel's root), parses the
TD report (Intel TDX DCAP Quoting Library API, quote v4/v5 layout: 48-byte header, 584-byte TD 1.0 report
body), rejects debug TDs and any TCB status other than UpToDate, checks every RTMR3 event digest against its
payload and replays the log into RTMR0..3.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import dcap_qvl

from teecloud.attestation.errors import (
    EventLogMismatch,
    MalformedEvidence,
    PolicyViolation,
    SignatureInvalid,
    TcbNotAcceptable,
)
from teecloud.attestation.models import AppInfo, Step, VerifiedEvidence

__all__ = ["parse_event_log_json", "replay", "runtime_event_digest", "verify_tdx_with_event_log_fallback"]

RUNTIME_EVENT_TYPE = 0x08000001
_HEADER = 48
_BODY = 584


def runtime_event_digest(name: str, payload: bytes) -> bytes:
    return hashlib.sha384(
        struct.pack("<I", RUNTIME_EVENT_TYPE) + b":" + name.encode() + b":" + payload
    ).digest()


def parse_event_log_json(text: str) -> list[dict[str, Any]]:
    try:
        entries = json.loads(text or "[]")
    except ValueError as exc:
        raise MalformedEvidence(f"event log is not JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise MalformedEvidence("event log is not a JSON array")
    out = []
    for i, e in enumerate(entries):
        try:
            imr = int(e["imr"])
            digest = bytes.fromhex(e["digest"])
            payload = bytes.fromhex(e.get("event_payload", "") or "")
            out.append(
                {
                    "imr": imr,
                    "event_type": int(e["event_type"]),
                    "digest": digest,
                    "event": str(e.get("event", "")),
                    "payload": payload,
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvidence(f"event log entry {i} is malformed: {exc}") from exc
        if not 0 <= imr <= 3:
            raise MalformedEvidence(f"event log entry {i} has imr {imr}")
    return out


def replay(entries: list[dict[str, Any]]) -> list[bytes]:
    rtmrs = [b"\x00" * 48 for _ in range(4)]
    for e in entries:
        d = e["digest"].ljust(48, b"\x00")
        rtmrs[e["imr"]] = hashlib.sha384(rtmrs[e["imr"]] + d).digest()
    return rtmrs


def verify_tdx_with_event_log_fallback(
    quote: bytes,
    collateral: bytes,
    event_log: str,
    *,
    now: int,
    dev_root_der: bytes | None,
    policy: Any = None,
) -> VerifiedEvidence:
    del policy  # the stand-in applies the default policy only
    try:
        coll = dcap_qvl.QuoteCollateralV3.from_json(
            collateral.decode() if isinstance(collateral, bytes) else collateral
        )
    except Exception as exc:  # dcap-qvl raises ValueError/RuntimeError variants
        raise MalformedEvidence(f"collateral does not parse: {exc}") from exc
    try:
        if dev_root_der is not None:
            report = dcap_qvl.verify_with_root_ca(quote, coll, dev_root_der, now)
        else:
            report = dcap_qvl.verify(quote, coll, now)
    except Exception as exc:  # dcap-qvl reports every failure as an exception with a message
        raise SignatureInvalid(f"quote does not verify: {exc}") from exc
    status = str(report.status)
    if status != "UpToDate":
        raise TcbNotAcceptable(f"TCB status {status} is below the floor UpToDate")
    version = int.from_bytes(quote[0:2], "little")
    start = _HEADER + (6 if version == 5 else 0)
    body = quote[start : start + _BODY]
    if len(body) != _BODY:
        raise MalformedEvidence("quote too short for a TD report")
    td_attributes = body[120:128]
    if td_attributes[0] & 1:
        raise PolicyViolation("debug TD: td_attributes.DEBUG is set")
    ms = {
        "mrtd": body[136:184],
        "rtmr0": body[328:376],
        "rtmr1": body[376:424],
        "rtmr2": body[424:472],
        "rtmr3": body[472:520],
    }
    report_data = body[520:584]
    entries = parse_event_log_json(event_log)
    for i, e in enumerate(entries):
        if (
            e["imr"] == 3
            and e["event_type"] == RUNTIME_EVENT_TYPE
            and runtime_event_digest(e["event"], e["payload"]) != e["digest"]
        ):
            raise EventLogMismatch(f"event {i} ({e['event']}) digest does not match its payload")
    replayed = replay(entries)
    for idx in range(4):
        if any(e["imr"] == idx for e in entries) or idx == 3:
            if replayed[idx] != ms[f"rtmr{idx}"]:
                raise EventLogMismatch(f"event log does not replay to RTMR{idx}")
    ev = {e["event"]: e["payload"] for e in entries if e["imr"] == 3}
    app_info = AppInfo(
        app_id=ev.get("app-id", b""),
        compose_hash=ev.get("compose-hash", b""),
        instance_id=ev.get("instance-id", b""),
        key_provider_info=ev.get("key-provider", b""),
        os_image_hash=ev.get("os-image-hash", b""),
        device_id=hashlib.sha256(bytes(report.ppid)).digest(),
        events=tuple((e["event"], e["payload"]) for e in entries if e["imr"] == 3),
    )
    return VerifiedEvidence(
        tee="tdx-simulated" if dev_root_der is not None else "tdx",
        tcb_status=status,
        advisory_ids=tuple(report.advisory_ids),
        measurements=ms,
        report_data=report_data,
        debug=False,
        simulated=dev_root_der is not None,
        device_id=app_info.device_id,
        steps=(Step("quote_verified", True, "dcap-qvl"), Step("event_log_verified", True, "replayed")),
        app_info=app_info,
    )


def verify_composed(
    quote: bytes,
    collateral: bytes,
    event_log: str,
    *,
    now: int,
    dev_root_der: bytes | None,
    policy: Any = None,
) -> VerifiedEvidence:
    """Quote via teecloud.attestation.dcap, event log via teecloud.attestation.eventlog, then the policy
    (its `check(evidence) -> list[Step]` when given, else: no debug TD, TCB UpToDate)."""
    import dataclasses

    from teecloud.attestation import dcap, eventlog

    evidence = dcap.verify_dcap_quote(quote, collateral, now=now, dev_root_der=dev_root_der)
    entries = eventlog.parse_event_log(event_log or "[]")
    rtmrs = [evidence.measurements[f"rtmr{i}"] for i in range(4)]
    eventlog.verify_event_log(entries, rtmrs)
    app_info = eventlog.derive_app_info(evidence.measurements, entries, device_id=evidence.device_id)
    evidence = dataclasses.replace(
        evidence,
        app_info=app_info,
        steps=(*evidence.steps, Step("event_log_verified", True, f"{len(entries)} events replayed")),
    )
    if policy is not None and hasattr(policy, "check"):
        failed = [st for st in policy.check(evidence) if not st.ok]
        if failed:
            raise PolicyViolation(failed[0].reason, step=failed[0].name)
    else:
        if evidence.debug:
            raise PolicyViolation("debug TD: td_attributes.DEBUG is set")
        if evidence.tcb_status != "UpToDate":
            raise TcbNotAcceptable(f"TCB status {evidence.tcb_status} is below the floor UpToDate")
    return evidence
