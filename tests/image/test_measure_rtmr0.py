"""RTMR0 as TDVF measures it (teecloud.image.tdx: td_hob_witness, td_hob, rtmr0_events). Checked against:

- outside oracles: the TD HOB rebuilt from dstack's published TD-HOB witness (dstack-mr tdvf.rs test value
  80100904000609020b021010) for 64 GiB of RAM is the first RTMR0 event of a real dstack boot on TDX hardware
  (shared/vectors/tdx/dstack_quote_report.json, vm_config memory_size 64 GiB); the witness of a TDVF with that
  TDVF's TD_HOB/TEMP_MEM layout encodes to dstack's bytes; RTMR0's 13 computed events (with the log's ACPI
  digests, as lite verification takes them) are that log's, and replay to the quoted RTMR0;
- the specification only (TDVF Design Guide; QEMU's q35 RAM layout): the HOB below 2.75 GiB of RAM.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from teecloud.image import ImageFormatError
from teecloud.image.tdx import (
    TDVF_ATTR_MR_EXTEND,
    AcpiDigests,
    replay,
    rtmr0_events,
    sha384,
    td_hob,
    td_hob_witness,
)
from tests.image.test_tdx import _tdvf

DSTACK_WITNESS = bytes.fromhex("80100904000609020b021010")  # dstack-mr tdvf.rs witness test
# dstack's TDVF's TD_HOB / TEMP_MEM sections as that witness states them: (data, raw, gpa, size, kind, attr)
DSTACK_SECTIONS = [
    (0, 0, 0x800000, 0x6000, 3, 0),
    (0, 0, 0x809000, 0x2000, 2, 0),
    (0, 0, 0x80B000, 0x2000, 3, 0),
    (0, 0, 0x810000, 0x10000, 3, 0),
]
BFV = (0x0, 0x2000, 0xFFFFE000, 0x2000, 0, TDVF_ATTR_MR_EXTEND)


@pytest.fixture(scope="module")
def dstack_boot(vectors: Path) -> tuple[list[dict[str, Any]], bytes, dict[str, Any]]:
    report = json.loads((vectors / "tdx" / "dstack_quote_report.json").read_text())
    return json.loads(report["event_log"]), bytes.fromhex(report["quote"]), json.loads(report["vm_config"])


def _rtmr0_log(log: list[dict[str, Any]]) -> list[bytes]:
    return [bytes.fromhex(e["digest"]) for e in log if e["imr"] == 0]


def test_the_td_hob_of_a_real_dstack_boot(dstack_boot: Any) -> None:
    log, _, vm_config = dstack_boot
    assert vm_config["memory_size"] == 64 << 30
    assert sha384(td_hob(DSTACK_WITNESS, vm_config["memory_size"])) == _rtmr0_log(log)[0]
    # another memory size is another HOB
    assert sha384(td_hob(DSTACK_WITNESS, 32 << 30)) != _rtmr0_log(log)[0]


def test_the_witness_of_dstacks_tdvf_layout_is_dstacks() -> None:
    fw = _tdvf([BFV, *DSTACK_SECTIONS], b"\x90" * 0x2000)
    assert td_hob_witness(fw) == DSTACK_WITNESS


def test_rtmr0_events_replay_to_the_quoted_rtmr0(dstack_boot: Any) -> None:
    log, quote, vm_config = dstack_boot
    logged = _rtmr0_log(log)
    acpi = AcpiDigests(*logged[8:11])
    ours = rtmr0_events(sha384(td_hob(DSTACK_WITNESS, vm_config["memory_size"])), acpi)
    assert ours == logged
    assert replay(ours) == quote[48 + 328 : 48 + 376]  # DCAP quote v4: RTMR0 at body offset 328
    other = AcpiDigests(sha384(b"other tables"), acpi.rsdp, acpi.tables)
    assert replay(rtmr0_events(ours[0], other)) != replay(ours)


def test_the_hob_layout_below_and_above_2_75_gib() -> None:
    def ranges(mem: int) -> list[tuple[int, int, int]]:
        hob = td_hob(DSTACK_WITNESS, mem)
        assert struct.unpack_from("<HHI", hob, 0) == (1, 56, 0)
        assert struct.unpack_from("<Q", hob, 48)[0] == 0x809000 + len(hob) + 8  # EfiEndOfHobList
        out = []
        for off in range(56, len(hob), 48):
            kind, _attr, start, length = struct.unpack_from("<B3xIQQ", hob, off + 24)
            out.append((kind, start, length))
        return out

    accepted = [(0, 0x800000, 0x6000), (0, 0x809000, 0x2000), (0, 0x80B000, 0x2000), (0, 0x810000, 0x10000)]
    low = ranges(2 << 30)
    assert [r for r in low if r[0] == 0] == accepted
    assert low[-1] == (7, 0x820000, (2 << 30) - 0x820000)
    assert sum(r[2] for r in low) == 2 << 30
    high = ranges(4 << 30)
    assert high[-2:] == [(7, 0x820000, 0x80000000 - 0x820000), (7, 0x100000000, (4 << 30) - 0x80000000)]


@pytest.mark.parametrize(
    ("witness", "memory", "reason"),
    [
        (DSTACK_WITNESS[:-1], 2 << 30, "exactly"),
        (DSTACK_WITNESS + b"\x00", 2 << 30, "exactly"),
        (DSTACK_WITNESS[:-1] + b"\x90", 2 << 30, "truncated"),
        (b"\x80" * 12, 2 << 30, "too large|truncated"),
        (b"\x00\x00\x00", 2 << 30, "exactly"),  # no range
        (b"\x00\x00\x01\x00\x00", 2 << 30, "empty"),
        (b"\x00\x00\x01\xff\xff\x7f\x01", 2 << 30, "below 2 GiB"),
        (b"\x00\x00\x41" + b"\x01\x01" * 65, 2 << 30, "exactly"),
        (DSTACK_WITNESS, 1 << 20, "16 MiB"),
        (DSTACK_WITNESS, (2 << 30) + 1, "whole pages"),
        (b"\x00\x00\x01\x00\x80\x20", 16 << 20, "do not fit"),
    ],
)
def test_a_malformed_witness_or_shape_is_refused(witness: bytes, memory: int, reason: str) -> None:
    with pytest.raises(ImageFormatError, match=reason):
        td_hob(witness, memory)


def test_acpi_digests_are_sha384_sized() -> None:
    with pytest.raises(ImageFormatError):
        AcpiDigests(b"x", bytes(48), bytes(48))
    with pytest.raises(ImageFormatError):
        rtmr0_events(b"short", AcpiDigests(bytes(48), bytes(48), bytes(48)))
