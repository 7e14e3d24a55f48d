"""The per-image measurement file (teecloud.image.measurement): expected MRTD/RTMR0-2 from vm_config without
the image, checked against a real dstack boot on TDX hardware (the material taken from that boot's log and
quote, the registers recomputed and compared with the quoted ones); the file's round trip and strict parsing
(hand-written attacks and every single-byte mutation); the binding to os_image_hash through sha256sum.txt."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest

from teecloud import vmconfig
from teecloud.image import ImageFormatError, MeasurementUnavailable
from teecloud.image.measurement import (
    MEASUREMENT_FILE,
    TdxImageMeasurement,
    acpi_digests_of,
    bind,
    encode,
    expected_tdx_registers,
    measure_tdx_image,
    parse,
)
from teecloud.image.tdx import mrtd, replay, rtmr1_events, rtmr2_events, sha384
from tests.image.test_measure_rtmr0 import BFV, DSTACK_SECTIONS, DSTACK_WITNESS
from tests.image.test_tdx import GUEST_KERNEL, _tdvf

IMAGE = "ab" * 32


def config(memory: int, **extra: Any) -> vmconfig.VmConfig:
    return vmconfig.parse({"os_image_hash": IMAGE, "cpu_count": 2, "memory_size": memory, **extra})


@pytest.fixture(scope="module")
def real_boot(vectors: Path) -> dict[str, Any]:
    report = json.loads((vectors / "tdx" / "dstack_quote_report.json").read_text())
    log = json.loads(report["event_log"])
    quote = bytes.fromhex(report["quote"])
    body = 48  # DCAP quote v4 header; MRTD at body + 136, RTMR0..3 at body + 328
    return {
        "imr": {i: [bytes.fromhex(e["digest"]) for e in log if e["imr"] == i] for i in range(3)},
        "mrtd": quote[body + 136 : body + 184],
        "rtmr": [quote[body + 328 + 48 * i : body + 376 + 48 * i] for i in range(3)],
        "vm_config": vmconfig.parse(report["vm_config"]),
    }


def _from_real_boot(boot: dict[str, Any]) -> TdxImageMeasurement:
    """The material dstack's image for that boot would carry: kernel, command line and initrd digests as its
    log shows them, its MRTD as the single-pass candidate (QEMU 9.2.1), dstack's TD-HOB witness."""
    return TdxImageMeasurement(
        cmdline_sha384=boot["imr"][2][0],
        kernel_authenticode=boot["imr"][1][0],
        initrd_sha384=boot["imr"][2][1],
        mrtd_single_pass=boot["mrtd"],
        mrtd_two_pass=sha384(b"another page order"),
        td_hob_witness=DSTACK_WITNESS,
    )


def test_expected_registers_are_the_quoted_ones_of_a_real_boot(real_boot: dict[str, Any]) -> None:
    m = parse(encode(_from_real_boot(real_boot)))
    acpi = acpi_digests_of(real_boot["imr"][0])
    got = expected_tdx_registers(m, real_boot["vm_config"], acpi)
    assert not got.two_pass
    assert got.registers() == {
        "mrtd": real_boot["mrtd"],
        "rtmr0": real_boot["rtmr"][0],
        "rtmr1": real_boot["rtmr"][1],
        "rtmr2": real_boot["rtmr"][2],
    }
    assert list(got.events["rtmr0"]) == real_boot["imr"][0]
    # the same image with another shape or QEMU is another set of registers
    other = vmconfig.parse({**json.loads(real_boot["vm_config"].to_json()), "memory_size": 32 << 30})
    assert expected_tdx_registers(m, other, acpi).rtmr0 != real_boot["rtmr"][0]
    qemu8 = vmconfig.parse({**json.loads(real_boot["vm_config"].to_json()), "qemu_version": "8.2.2"})
    assert expected_tdx_registers(m, qemu8, acpi).mrtd == m.mrtd_two_pass


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    if not GUEST_KERNEL.is_file():
        pytest.fail(f"{GUEST_KERNEL} is missing: run scripts/setup.sh (it fetches Debian's cloud kernel)")
    kernel = GUEST_KERNEL.read_bytes()
    tdvf = _tdvf([BFV, *DSTACK_SECTIONS], b"\xf4" * 0x2000)
    initrd = b"\x1f\x8b" + bytes(70000)
    return {"kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 panic=1", "tdvf": tdvf}


def test_measure_then_expect_agrees_with_the_calculators(image: dict[str, Any]) -> None:
    m = measure_tdx_image(**image)
    assert parse(encode(m)) == m
    assert m.td_hob_witness == DSTACK_WITNESS
    acpi = acpi_digests_of([sha384(bytes([i])) for i in range(13)])
    for memory in (2 << 30, 0xB0000000, 8 << 30):
        got = expected_tdx_registers(m, config(memory), acpi)
        r1 = rtmr1_events(image["kernel"], initrd_size=len(image["initrd"]), memory_bytes=memory)
        assert got.rtmr1 == replay(r1), memory
        assert got.rtmr2 == replay(rtmr2_events(image["cmdline"], image["initrd"]))
        assert got.mrtd == mrtd(image["tdvf"])
    assert expected_tdx_registers(m, config(2 << 30, qemu_version="8.0.0"), acpi).mrtd == mrtd(
        image["tdvf"], two_pass=True
    )


@pytest.mark.parametrize("memory", [1 << 30, 3 << 29, (2 << 30) + 4096, 0xB0000000 - 4096])
def test_a_memory_size_the_kernel_hash_does_not_cover_is_refused(memory: int) -> None:
    m = TdxImageMeasurement(*([bytes(48)] * 5), td_hob_witness=DSTACK_WITNESS)
    with pytest.raises(MeasurementUnavailable, match=r"2 GiB or >= 2\.75 GiB"):
        expected_tdx_registers(m, config(memory), acpi_digests_of([bytes(48)] * 13))


@pytest.mark.parametrize("version", ["7.2.0", "nine", "9", 9, "9.1.0-rc1"])
def test_an_unknown_qemu_version_is_refused(version: object) -> None:
    m = TdxImageMeasurement(*([bytes(48)] * 5), td_hob_witness=DSTACK_WITNESS)
    with pytest.raises(MeasurementUnavailable, match=r"QEMU|qemu_version"):
        acpi = acpi_digests_of([bytes(48)] * 13)
        expected_tdx_registers(m, config(2 << 30, qemu_version=version), acpi)


def test_an_rtmr0_log_of_another_layout_is_refused() -> None:
    with pytest.raises(MeasurementUnavailable, match="has 17 events, not the 13"):
        acpi_digests_of([bytes(48)] * 17)  # OVMF edk2-stable202505's layout


# -- strict parsing --------------------------------------------------------------------------------------

GOOD = TdxImageMeasurement(
    cmdline_sha384=sha384(b"c"),
    kernel_authenticode=sha384(b"k"),
    initrd_sha384=sha384(b"i"),
    mrtd_single_pass=sha384(b"1"),
    mrtd_two_pass=sha384(b"2"),
    td_hob_witness=DSTACK_WITNESS,
)


def _doc() -> dict[str, Any]:
    return dict(cbor2.loads(encode(GOOD)))


def _with(**changes: Any) -> bytes:
    return cbor2.dumps({**_doc(), **changes}, canonical=True)


def _without(key: str) -> bytes:
    doc = _doc()
    del doc[key]
    return cbor2.dumps(doc, canonical=True)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "1..8192"),
        (bytes(9000), "1..8192"),
        (b"\xff\x00", "map of exactly"),  # a lone break marker
        (b"\x1c", "not CBOR"),  # reserved additional information
        (b"\xbf\x61", "not CBOR"),  # truncated
        (cbor2.dumps([1, 2]), "map of exactly"),
        (_with(extra=1), "map of exactly"),
        (_without("td_hob_witness"), "map of exactly"),
        (_with(version=3), "version 3"),
        (_with(version=2), "map of exactly"),  # version 2 states secure_boot
        (_with(secure_boot="00"), "map of exactly"),  # version 1 has no secure_boot
        (_with(version=2, secure_boot="absent"), "'absent' is version 1"),
        (_with(version=2, secure_boot="01"), "secure_boot '01'"),
        (_with(version=2, secure_boot=b"\x00"), "secure_boot"),
        (_with(version=True), "version True"),
        (_with(ovmf_variant="stable202505"), "OVMF variant"),
        (_with(kernel_authenticode=bytes(32)), "kernel_authenticode must be 48 bytes"),
        (_with(initrd_sha384="00" * 48), "initrd_sha384 must be 48 bytes"),
        (_with(mrtd={"single_pass": bytes(48)}), "mrtd must be a map"),
        (_with(mrtd={"single_pass": bytes(48), "two_pass": bytes(48), "x": 0}), "mrtd must be a map"),
        (_with(td_hob_witness=b"\x80"), "witness"),
        (_with(td_hob_witness="80100904"), "td_hob_witness must be bytes"),
        (encode(GOOD) + b"\x00", "not CBOR|deterministic"),
        (b"\xa8" + encode(GOOD)[1:] + cbor2.dumps("version") + b"\x01", "deterministic"),  # a repeated key
        (cbor2.dumps(dict(reversed(_doc().items())), canonical=False), "deterministic"),
        (cbor2.dumps(cbor2.CBORTag(55799, _doc()), canonical=True), "deterministic"),
        (cbor2.dumps(cbor2.CBORTag(24, encode(GOOD)), canonical=True), "map of exactly"),
    ],
)
def test_malformed_measurement_files_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ImageFormatError, match=reason):
        parse(data)


def test_the_firmwares_secure_boot_variable_is_version_2_and_dstacks_stays_version_1() -> None:
    """A firmware that logs SecureBoot = 00 (Debian's OVMF) gets a version-2 file stating it; dstack's
    layout (absent) keeps version 1's bytes, so files written before are read as they were."""
    assert cbor2.loads(encode(GOOD))["version"] == 1 and "secure_boot" not in cbor2.loads(encode(GOOD))
    debian = dataclasses.replace(GOOD, secure_boot="00")
    data = encode(debian)
    assert data == _with(version=2, secure_boot="00")
    assert parse(data) == debian and parse(data) != GOOD
    with pytest.raises(ImageFormatError, match="secure_boot must be one of"):
        dataclasses.replace(GOOD, secure_boot="01")  # type: ignore[arg-type]


def test_every_single_byte_mutation_is_refused_or_parses_to_another_measurement() -> None:
    good = encode(GOOD)
    for i in range(len(good)):
        for flip in (0x01, 0x80, 0xFF):
            mutated = good[:i] + bytes([good[i] ^ flip]) + good[i + 1 :]
            try:
                m = parse(mutated)
            except ImageFormatError:
                continue
            assert m != GOOD and encode(m) == mutated, (i, flip)


# -- binding to os_image_hash ------------------------------------------------------------------------------


def _image_files(measurement: bytes, *, extra: str = "") -> tuple[bytes, bytes]:
    sums = (
        f"{hashlib.sha256(b'kernel').hexdigest()}  bzImage\n"
        f"{hashlib.sha256(measurement).hexdigest()}  {MEASUREMENT_FILE}\n{extra}"
    ).encode()
    return hashlib.sha256(sums).digest(), sums


def test_bind_follows_digest_txt_and_sha256sum_txt() -> None:
    data = encode(GOOD)
    os_image_hash, sums = _image_files(data)
    assert bind(os_image_hash, sums, data) == GOOD
    with pytest.raises(ImageFormatError, match="its sha256 differs"):
        bind(bytes(32), sums, data)
    other = encode(TdxImageMeasurement(*([bytes(48)] * 5), td_hob_witness=DSTACK_WITNESS))
    with pytest.raises(ImageFormatError, match="not the one OS image"):
        bind(os_image_hash, sums, other)
    for bad, reason in [
        (b"", "lists no"),
        (b"xyz  bzImage\n", "malformed"),
        (sums + sums.splitlines(keepends=True)[0], "repeated"),
        (b"\xff", "ASCII"),
    ]:
        with pytest.raises(ImageFormatError, match=reason):
            bind(hashlib.sha256(bad).digest(), bad, data)
