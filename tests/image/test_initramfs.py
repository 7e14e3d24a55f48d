"""The reproducible initramfs (teecloud.image.initramfs): the same entries give the same bytes whatever the
order they are given in and whatever the clock says; SOURCE_DATE_EPOCH is every mtime; what goes in comes
out (read back by an independent newc reader: GNU cpio where installed, else ours); bad paths are refused."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from teecloud.image import ImageFormatError
from teecloud.image.initramfs import Entry, build_initramfs, read_newc
from teecloud.image.testguest import build_test_guest_initramfs, module_load_order

ENTRIES = {
    "init": Entry.file(b"#!/bin/sh\necho hi\n", 0o755),
    "etc/hostname": Entry.file(b"cvm\n"),
    "bin/sh": Entry.symlink("busybox"),
    "var/empty": Entry.directory(0o700),
}


def test_same_entries_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    a = build_initramfs(ENTRIES)
    b = build_initramfs(dict(reversed(list(ENTRIES.items()))))
    assert a == b
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    c = build_initramfs(ENTRIES)
    assert c != a and build_initramfs(ENTRIES) == c
    assert build_initramfs({**ENTRIES, "etc/hostname": Entry.file(b"cvm2\n")}) != a


def test_what_goes_in_comes_out_with_fixed_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    archive = build_initramfs(ENTRIES)
    entries = read_newc(archive)
    assert list(entries) == ["bin", "bin/sh", "etc", "etc/hostname", "init", "var", "var/empty"]
    assert entries["init"] == (0o100755, b"#!/bin/sh\necho hi\n")
    assert entries["bin/sh"] == (0o120777, b"busybox")
    raw = gzip.decompress(archive)
    assert raw.count(b"070701") == len(entries) + 1  # and the trailer
    for i in range(len(entries)):
        head = raw[raw.index(b"070701", i and raw.index(b"070701") + 1) :][:110]
        assert head[6 + 8 * 5 : 14 + 8 * 5] == b"%08X" % 1700000000  # mtime
        assert head[6 + 8 * 2 : 6 + 8 * 4] == b"0" * 16  # uid, gid
    cpio = shutil.which("cpio")
    if cpio:  # an independent reader, where GNU cpio is installed
        listing = subprocess.run([cpio, "-t"], input=raw, capture_output=True, check=True).stdout.decode()
        assert listing.split() == list(entries)


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../../b", "", "/"])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ImageFormatError, match="bad initramfs path"):
        build_initramfs({path: Entry.file(b"x")})


def test_bad_source_date_epoch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ImageFormatError, match="SOURCE_DATE_EPOCH"):
        build_initramfs(ENTRIES)


def test_read_newc_refuses_garbage() -> None:
    with pytest.raises(ImageFormatError):
        read_newc(b"\x1f\x8b" + b"\0" * 20)
    with pytest.raises(ImageFormatError, match="not a newc"):
        read_newc(b"070702" + b"0" * 200)


KERNEL_MODULES = Path("/var/cache/teecloud/guest-kernel/modules")


def test_the_test_guest_is_reproducible() -> None:
    if not KERNEL_MODULES.is_dir():
        pytest.fail(f"{KERNEL_MODULES} is missing: run scripts/setup.sh")
    a = build_test_guest_initramfs(modules_dir=KERNEL_MODULES)
    assert (
        hashlib.sha256(a).digest()
        == hashlib.sha256(build_test_guest_initramfs(modules_dir=KERNEL_MODULES)).digest()
    )
    order = [p.stem for p in module_load_order(KERNEL_MODULES)]
    # each module after what it needs (read from the modules' own modinfo)
    assert (
        order.index("virtio_ring")
        < order.index("virtio")
        < order.index("virtio_pci")
        < order.index("virtio_net")
    )
    assert order.index("fat") < order.index("vfat")
    files = read_newc(a)
    assert "init" in files and files["bin/busybox"][0] == 0o100755
