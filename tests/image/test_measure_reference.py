"""The reference files of a built image (teecloud.image.reference, the hook `teecloud image build` runs
before its digests): measurement.tdx.cbor when the image's firmware is a TDVF, none for Debian's OVMF (no TDX
build in Debian 12), and the file, listed in sha256sum.txt as the build lists it, is what the KMS's
OS-image step (`kms up --os-images`) computes MRTD and RTMR1-2 from."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teecloud.cli import app
from teecloud.image.errors import ImageFormatError
from teecloud.image.measurement import MEASUREMENT_FILE, measure_tdx_image, parse
from teecloud.image.reference import write_reference_files
from teecloud.image.tdx import parse_tdvf, replay, rtmr1_events_of
from teecloud.kms.os_images import MeasuredOsImages
from tests.image.test_measure_rtmr0 import BFV, DSTACK_SECTIONS
from tests.image.test_tdx import _tdvf

KERNEL = Path("/var/cache/teecloud/guest-kernel/vmlinuz")
DEBIAN_OVMF = Path("/usr/share/ovmf/OVMF.fd")
DEBIAN_CODE_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
CMDLINE = "console=ttyS0 panic=1 quiet teecloud.verity=00ff:11:4096"


def image_dir(path: Path, firmware: bytes) -> tuple[Path, dict[str, object]]:
    """An image directory as `teecloud image build` lays it out before its digests."""
    if not KERNEL.is_file():
        pytest.fail(f"{KERNEL} is missing: run scripts/setup.sh")
    path.mkdir(parents=True)
    shutil.copyfile(KERNEL, path / "bzImage")
    (path / "initramfs.cpio.gz").write_bytes(b"\x1f\x8b" + bytes(7000))
    (path / "ovmf.fd").write_bytes(firmware)
    meta = {"bios": "ovmf.fd", "kernel": "bzImage", "initrd": "initramfs.cpio.gz", "cmdline": CMDLINE}
    (path / "metadata.json").write_text(json.dumps(meta))
    return path, meta


def digests(img: Path) -> bytes:
    """sha256sum.txt and digest.txt as build_image writes them; returns the os_image_hash."""
    names = sorted(p.name for p in img.iterdir())
    sums = "".join(f"{hashlib.sha256((img / n).read_bytes()).hexdigest()}  {n}\n" for n in names).encode()
    (img / "sha256sum.txt").write_bytes(sums)
    return hashlib.sha256(sums).digest()


def test_an_image_with_a_tdvf_carries_its_measurement_file(tmp_path: Path) -> None:
    tdvf = _tdvf([BFV, *DSTACK_SECTIONS], b"\xf4" * 0x2000)
    img, meta = image_dir(tmp_path / "images" / "build", tdvf)
    assert write_reference_files(img, meta) == {MEASUREMENT_FILE: "written"}
    m = parse((img / MEASUREMENT_FILE).read_bytes())
    assert m == measure_tdx_image(
        kernel=KERNEL.read_bytes(),
        initrd=(img / "initramfs.cpio.gz").read_bytes(),
        cmdline=CMDLINE,
        tdvf=tdvf,
    )
    # the KMS's directory names an image by its os_image_hash (a link to the build's directory will do)
    os_image_hash = digests(img)
    (tmp_path / "images" / os_image_hash.hex()).symlink_to(img)
    ref = MeasuredOsImages(tmp_path / "images")(os_image_hash)
    assert ref is not None
    assert ref["mrtd"] == m.mrtd_single_pass
    assert ref["rtmr1"] == replay(rtmr1_events_of(m.kernel_authenticode))
    assert ref["rtmr2"] == replay([m.cmdline_sha384, m.initrd_sha384])


def test_debians_combined_ovmf_is_a_tdvf(tmp_path: Path) -> None:
    """The image's default firmware: Debian 12's OVMF.fd (OvmfPkgX64 with TDX, edk2 2022.11) carries TDVF
    metadata (its BFV measured, its TD HOB at dstack's default 0x809000), so a default build is measured."""
    img, meta = image_dir(tmp_path / "img", DEBIAN_OVMF.read_bytes())
    assert write_reference_files(img, meta) == {MEASUREMENT_FILE: "written"}
    m = parse((img / MEASUREMENT_FILE).read_bytes())
    assert m.mrtd_single_pass != m.mrtd_two_pass
    sections = parse_tdvf(DEBIAN_OVMF.read_bytes())
    assert [s.kind for s in sections if s.attributes & 1] == [0]  # only the BFV is extended into MRTD
    assert [s.gpa for s in sections if s.kind == 2] == [0x809000]


def test_a_firmware_without_tdvf_metadata_gives_no_tdx_file_and_says_why(tmp_path: Path) -> None:
    img, meta = image_dir(tmp_path / "img", DEBIAN_CODE_4M.read_bytes())
    outcome = write_reference_files(img, meta)
    assert "not a TDVF" in outcome[MEASUREMENT_FILE] and not (img / MEASUREMENT_FILE).exists()


def test_a_tdvf_image_with_missing_or_foreign_files_is_refused(tmp_path: Path) -> None:
    img, meta = image_dir(tmp_path / "img", _tdvf([BFV, *DSTACK_SECTIONS], b"\xf4" * 0x2000))
    for change in ({"kernel": "../bzImage"}, {"initrd": "absent"}, {"cmdline": 5}, {"bios": None}):
        with pytest.raises(ImageFormatError):
            write_reference_files(img, {**meta, **change})
    assert not (img / MEASUREMENT_FILE).exists()


def test_build_refuses_a_tdvf_option_that_is_no_tdvf(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["image", "build", "--cache", str(tmp_path), "--tdvf", str(DEBIAN_CODE_4M)])
    assert r.exit_code == 1 and "not a TDX firmware" in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []
