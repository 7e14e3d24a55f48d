"""The boot grammar's optional `gpu-evidence` event: exactly once, between boot-nonce and boot-mr-done, 32
bytes; anywhere else, twice or malformed, the register is not a boot-time one."""

from __future__ import annotations

import hashlib

import pytest

from teecloud.attestation.boottime import (
    GPU_EVIDENCE_EVENT,
    BootMeasurement,
    check_boot_time,
    read_boot_measurement,
    replay_runtime_events,
)
from teecloud.attestation.errors import NotBootTime
from teecloud.attestation.models import AppInfo, VerifiedEvidence

APP_ID = bytes(range(20))
COMPOSE = hashlib.sha256(b"compose").digest()
INSTANCE = bytes(range(20, 40))
NONCE = b"challenge" * 4
GPU = hashlib.sha256(b"gpu evidence set").digest()


def _base(**kw: bytes | None) -> BootMeasurement:
    return BootMeasurement(app_id=APP_ID, compose_hash=COMPOSE, instance_id=INSTANCE, **kw)


def _evidence(events: list[tuple[str, bytes]], rtmr3: bytes | None = None) -> VerifiedEvidence:
    return VerifiedEvidence(
        tee="tdx",
        tcb_status="UpToDate",
        advisory_ids=(),
        measurements={"rtmr3": rtmr3 if rtmr3 is not None else replay_runtime_events(events)},
        report_data=bytes(64),
        debug=False,
        app_info=AppInfo(events=tuple(events)),
    )


def test_with_and_without_the_event_both_read_back_and_replay() -> None:
    for m in (_base(boot_nonce=NONCE), _base(boot_nonce=NONCE, gpu_evidence=GPU), _base(gpu_evidence=GPU)):
        events = list(m.events())
        assert read_boot_measurement(events) == m
        assert check_boot_time(_evidence(events)) == m
    with_gpu = _base(boot_nonce=NONCE, gpu_evidence=GPU)
    names = [n for n, _ in with_gpu.events()]
    assert names.index(GPU_EVIDENCE_EVENT) == names.index("boot-nonce") + 1
    assert names.index(GPU_EVIDENCE_EVENT) == names.index("boot-mr-done") - 1
    # the event is measured: the register differs with it, and with another digest
    assert with_gpu.rtmr3() != _base(boot_nonce=NONCE).rtmr3()
    assert with_gpu.rtmr3() != _base(boot_nonce=NONCE, gpu_evidence=bytes(32)).rtmr3()
    assert read_boot_measurement(list(_base(boot_nonce=NONCE).events())).gpu_evidence is None


def _with_gpu() -> list[tuple[str, bytes]]:
    return list(_base(boot_nonce=NONCE, gpu_evidence=GPU).events())


@pytest.mark.parametrize(
    "mutate",
    [
        # after boot-mr-done (a post-boot app could emit it)
        lambda ev: [e for e in ev if e[0] != GPU_EVIDENCE_EVENT] + [(GPU_EVIDENCE_EVENT, GPU)],
        # before boot-nonce
        lambda ev: [*ev[:4], (GPU_EVIDENCE_EVENT, GPU), ev[4], *ev[6:]],
        # twice
        lambda ev: [*ev[:6], (GPU_EVIDENCE_EVENT, GPU), *ev[6:]],
        # before compose-hash
        lambda ev: [*ev[:2], (GPU_EVIDENCE_EVENT, GPU), *(e for e in ev[2:] if e[0] != GPU_EVIDENCE_EVENT)],
    ],
    ids=["after-boot-mr-done", "before-boot-nonce", "twice", "before-compose-hash"],
)
def test_the_event_anywhere_else_or_twice_is_not_boot_time(mutate: object) -> None:
    events = mutate(_with_gpu())  # type: ignore[operator]
    with pytest.raises(NotBootTime):
        read_boot_measurement(events)
    # and the register replaying that log is refused too (the log explains, the register decides)
    with pytest.raises(NotBootTime):
        check_boot_time(_evidence(events))


@pytest.mark.parametrize("payload", [b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 48])
def test_the_payload_must_be_32_bytes(payload: bytes) -> None:
    events = [(n, payload if n == GPU_EVIDENCE_EVENT else p) for n, p in _with_gpu()]
    with pytest.raises(NotBootTime, match="gpu-evidence must be 32 bytes"):
        read_boot_measurement(events)


def test_a_log_that_claims_gpu_evidence_the_register_does_not_hold_is_refused() -> None:
    """A log saying gpu-evidence over a register extended without it (or with another digest)."""
    events = _with_gpu()
    for rtmr3 in (_base(boot_nonce=NONCE).rtmr3(), _base(boot_nonce=NONCE, gpu_evidence=bytes(32)).rtmr3()):
        with pytest.raises(NotBootTime, match="quoted RTMR3"):
            check_boot_time(_evidence(events, rtmr3=rtmr3))
