"""The SEV-SNP measurement file (measurement.snp.cbor) and the launch measurement computed from it for a VM
shape (teecloud.image.snp), against two independent values:

- sev-snp-measure's own command-line tool (the pinned oracle), given the image's files themselves, for the
  OVMF SEV layout built in test_measure_snp (no SNP firmware with kernel hashes is installed here);
- the MEASUREMENT of a real SEV-SNP attestation report: dstack's fixture of a live dstack CVM (image
  dstack-nvidia-0.6.0.a2 on an AMD EPYC Milan host, 2 vCPUs EPYC-v4, guest features 1), whose launch
  inputs dstack publishes beside the report (Dstack-TEE/dstack @ 312dc60,
  dstack/dstack-mr/src/sev.rs `REAL_MEASUREMENT_DOC`, Apache-2.0; the report is
  dstack/dstack-attest/tests/sev_snp_attestation.bin, its measurement 7f51e17f… signed by the chip's VCEK).
  These are the hashes and addresses of that image, as facts; the report itself is not copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import cbor2
import pytest

from teecloud.image.errors import ImageFormatError, MeasurementUnavailable
from teecloud.image.snp import (
    SnpImageMeasurement,
    SnpSection,
    SnpShape,
    encode_snp,
    expected_snp_measurement,
    measure_snp_image,
    parse_snp,
    parse_snp_shape,
)

from .test_measure_snp import oracle, sev_firmware

# the launch inputs of dstack's real SEV-SNP fixture (module docstring)
REAL_CMDLINE = (
    "console=ttyS0 init=/init panic=1 net.ifnames=0 biosdevname=0 mce=off oops=panic pci=noearly "
    "pci=nommconf random.trust_cpu=y random.trust_bootloader=n tsc=reliable no-kvmclock "
    "dstack.rootfs_hash=ca5adaef0ac3a36108035925763b48a5818f634e700fbaab561d419fd30d7121 "
    "dstack.rootfs_size=490713088"
)
REAL = SnpImageMeasurement(
    cmdline=REAL_CMDLINE,
    ovmf_hash=bytes.fromhex(
        "ffb57e393469a497c0e3b07bd1c97d8611e555f464d14491837665893ac642b263a71f9507ff100a847897fe0c3f8c6f"
    ),
    kernel_sha256=bytes.fromhex("dd9ea274ce9a07090b22e8284b0c841b65c021c2d15ca57d0f16731089dd226c"),
    initrd_sha256=bytes.fromhex("5f844c4a2ca5a3d0711b3db38293b21ba929bb8e0b3c5bc1a779a57f69221c19"),
    hashes_table_gpa=8457216,
    reset_eip=8433668,
    sections=(
        SnpSection(8388608, 36864, 1),
        SnpSection(8429568, 12288, 1),
        SnpSection(8441856, 4096, 2),
        SnpSection(8445952, 4096, 3),
        SnpSection(8450048, 4096, 4),
        SnpSection(8458240, 61440, 1),
        SnpSection(8454144, 4096, 16),
    ),
)
REAL_MEASUREMENT = bytes.fromhex(
    "7f51e17f72a04d5422cb2c00998166536019a217376f3aa45a630e59c805a599847ff250dbffcd07e1ba639771d6f05d"
)
REAL_SHAPE = SnpShape(vcpus=2, vcpu_type="EPYC-v4", guest_features=1)


def test_a_real_reports_measurement_is_recomputed_from_its_image_material() -> None:
    assert expected_snp_measurement(REAL, REAL_SHAPE) == REAL_MEASUREMENT
    assert expected_snp_measurement(parse_snp(encode_snp(REAL)), REAL_SHAPE) == REAL_MEASUREMENT


@pytest.mark.parametrize(
    "change",
    [
        {"vcpus": 1},
        {"vcpus": 4},
        {"vcpu_type": "EPYC-Milan"},
        {"guest_features": 0x3},
    ],
)
def test_another_shape_gives_another_measurement(change: dict[str, object]) -> None:
    shape = SnpShape(**{"vcpus": 2, "vcpu_type": "EPYC-v4", "guest_features": 1, **change})  # type: ignore[arg-type]
    assert expected_snp_measurement(REAL, shape) != REAL_MEASUREMENT


@pytest.mark.parametrize("field", ["cmdline", "ovmf_hash", "kernel_sha256", "initrd_sha256", "reset_eip"])
def test_another_image_gives_another_measurement(field: str) -> None:
    value = getattr(REAL, field)
    if isinstance(value, str):
        other: object = value.replace("rootfs_size=490713088", "rootfs_size=490713089")
    elif isinstance(value, bytes):
        other = bytes([value[0] ^ 1]) + value[1:]
    else:
        other = value + 16
    m = SnpImageMeasurement(**{**REAL.__dict__, field: other})
    assert expected_snp_measurement(m, REAL_SHAPE) != REAL_MEASUREMENT


@pytest.mark.parametrize(
    ("cmdline", "vcpus", "vcpu_type"),
    [("console=ttyS0 init=/init", 1, "EPYC-v4"), ("console=ttyS0 x=1", 3, "EPYC-Milan")],
)
def test_the_file_gives_the_oracles_value_for_the_images_files(
    tmp_path: Path, cmdline: str, vcpus: int, vcpu_type: str
) -> None:
    paths = {"ovmf": sev_firmware(), "kernel": b"MZ kernel" * 4000, "initrd": b"\x1f\x8b initrd" * 3000}
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    m = measure_snp_image(
        ovmf=tmp_path / "ovmf", kernel=paths["kernel"], initrd=paths["initrd"], cmdline=cmdline
    )
    ours = expected_snp_measurement(parse_snp(encode_snp(m)), SnpShape(vcpus, vcpu_type))
    want = oracle(tmp_path / "ovmf", tmp_path / "kernel", tmp_path / "initrd", cmdline, vcpus, vcpu_type)
    assert ours == want


def test_firmware_without_kernel_hashes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MeasurementUnavailable, match="kernel-hashes"):
        SnpImageMeasurement(**{**REAL.__dict__, "sections": REAL.sections[:-1]})
    (tmp_path / "plain.fd").write_bytes(b"\0" * 0x10000)
    with pytest.raises(ImageFormatError, match="not an SEV-SNP firmware"):
        measure_snp_image(ovmf=tmp_path / "plain.fd", kernel=b"k", initrd=b"i", cmdline="")


def _doc() -> dict[str, object]:
    return dict(cbor2.loads(encode_snp(REAL)))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("reset_eip"), "exactly"),
        (lambda d: d.update(extra=1), "exactly"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(version=True), "version"),
        (lambda d: d.update(ovmf_hash=b"\0" * 47), "ovmf_hash"),
        (lambda d: d.update(kernel_sha256="00" * 32), "kernel_sha256"),
        (lambda d: d.update(reset_eip=1 << 32), "reset_eip"),
        (lambda d: d.update(hashes_table_gpa=0), "hashes_table_gpa"),
        (lambda d: d.update(hashes_table_gpa=0x900C00), "hash table"),
        (lambda d: d.update(sections=[[8388608, 36864, 7], [8454144, 4096, 16]]), "section type"),
        (lambda d: d.update(sections=[[8388608, 100, 1], [8454144, 4096, 16]]), "whole 4 KiB"),
        (lambda d: d.update(sections=[[8388608, 1 << 40, 1], [8454144, 4096, 16]]), "section pages"),
        (lambda d: d.update(sections=[[8454144, 8192, 16]]), "one page"),
        (lambda d: d.update(sections=[[8454144, 4096, 16]] * 65), "sections"),
        (lambda d: d.update(sections=[[8454144, 4096]]), "gpa, size, type"),
        (lambda d: d.update(cmdline="x" * 5000), "cmdline"),
    ],
)
def test_a_malformed_file_is_refused_with_its_reason(mutate: object, reason: str) -> None:
    doc = _doc()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises((ImageFormatError, MeasurementUnavailable), match=reason):
        parse_snp(cbor2.dumps(doc, canonical=True))


def test_non_canonical_or_oversized_bytes_are_refused() -> None:
    data = encode_snp(REAL)
    assert parse_snp(data) == REAL
    with pytest.raises(ImageFormatError, match="deterministic"):
        parse_snp(cbor2.dumps(dict(reversed(_doc().items())), canonical=False))
    for bad in (b"", data + b"\0", b"\xff" * 9000, b"\x9f"):
        with pytest.raises(ImageFormatError):
            parse_snp(bad)


def test_the_shape_document_as_dstack_names_it() -> None:
    text = json.dumps({"vcpus": 2, "vcpu_type": "EPYC-v4", "guest_features": 1})
    assert parse_snp_shape(text) == REAL_SHAPE
    both = parse_snp_shape({**json.loads(text), "checksum_file": "YQ==", "measurement": "Yg=="})
    assert (both.checksum_file, both.measurement) == (b"a", b"b")
    bad: list[object] = [
        "{",
        [],
        {"vcpus": 2, "vcpu_type": "EPYC-v4"},
        {**json.loads(text), "extra": 1},
        {**json.loads(text), "measurement": "Yg=="},
        {**json.loads(text), "checksum_file": "!!", "measurement": "Yg=="},
        {**json.loads(text), "vcpus": 0},
        {**json.loads(text), "vcpus": True},
        {**json.loads(text), "vcpu_type": "host"},
        {**json.loads(text), "guest_features": 0},
        "x" * 10000,
    ]
    for value in bad:
        with pytest.raises(ImageFormatError):
            parse_snp_shape(value)
