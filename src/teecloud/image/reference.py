"""The reference-measurement files of a built image (`teecloud image build`'s last step before its digests):
what a verifier needs to check a CVM of the image without its files, listed in sha256sum.txt so that they
bind to its os_image_hash as dstack's do.

    write_reference_files(image_dir, metadata) -> {file name: reason}

- measurement.tdx.cbor (teecloud.image.measurement) when the image's firmware (`bios`) is a TDVF: it
  carries TDVF metadata (TDVF Design Guide 11). Debian 12's `ovmf` ships no IntelTdx build, but its
  combined /usr/share/ovmf/OVMF.fd (the image's default firmware) is OvmfPkgX64 with TDX support built in
  (edk2's "Config-A", since edk2-stable202205) and carries that metadata, so the default image gets the file;
  the split OVMF_CODE*.fd do not (their metadata points past the code volume, or is absent). `teecloud image
  build --tdvf F` takes another firmware (e.g. an IntelTdx build) as the image's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from teecloud.image.errors import ImageFormatError
from teecloud.image.measurement import MEASUREMENT_FILE, encode, measure_tdx_image
from teecloud.image.tdx import parse_tdvf

__all__ = ["write_reference_files"]


def write_reference_files(image_dir: Path, metadata: Mapping[str, object]) -> dict[str, str]:
    """Write the measurement files the image's firmware allows into `image_dir` (before sha256sum.txt is
    computed); returns, per file name, "written" or why it was not. Raises ImageFormatError when the
    firmware is a TDVF whose kernel or metadata cannot be measured."""

    def read(key: str) -> bytes:
        name = metadata.get(key)
        if not isinstance(name, str) or "/" in name or not (image_dir / name).is_file():
            raise ImageFormatError(f"metadata.json: {key} names no file of the image")
        return (image_dir / name).read_bytes()

    firmware = read("bios")
    try:
        parse_tdvf(firmware)
    except ImageFormatError as exc:
        return {MEASUREMENT_FILE: f"not written: the image's firmware is not a TDVF ({exc})"}
    cmdline = metadata.get("cmdline")
    if not isinstance(cmdline, str):
        raise ImageFormatError("metadata.json: cmdline is not text")
    m = measure_tdx_image(kernel=read("kernel"), initrd=read("initrd"), cmdline=cmdline, tdvf=firmware)
    (image_dir / MEASUREMENT_FILE).write_bytes(encode(m))
    return {MEASUREMENT_FILE: "written"}
