"""The qemu guest's data-disk volume (teecloud.agent.volume_luks.LuksVolume), on disk-image files with the
host's cryptsetup (no device-mapper needed: format, keyslot tests and refusals). Opening, ext4 and the
ciphertext-on-the-host check run inside a VM: tests/node/test_qemu_boot.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from teecloud.agent.errors import StorageError
from teecloud.agent.volume_luks import LuksVolume

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup-bin not installed")

KEY = bytes(range(32))


def _disk(path: Path, head: bytes = b"", size: int = 32 * 1024 * 1024) -> Path:
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def test_a_blank_disk_is_formatted_luks2_and_opens_with_the_disk_key_only(tmp_path: Path) -> None:
    vol = LuksVolume(_disk(tmp_path / "hda.img"), tmp_path / "mnt")
    assert vol.is_blank() and not vol.is_luks()
    vol.format(KEY)
    assert vol.is_luks() and not vol.is_blank()
    dump = subprocess.run(["cryptsetup", "luksDump", str(vol.device)], capture_output=True, text=True)
    assert "Version:       \t2" in dump.stdout and "pbkdf2" in dump.stdout
    assert vol.opens_with(KEY)
    assert not vol.opens_with(bytes(32)) and not vol.opens_with(KEY[::-1])
    # the key reached cryptsetup on stdin (as hex, dstack's passphrase form): neither form is in the header
    data = vol.device.read_bytes()
    assert KEY not in data and KEY.hex().encode() not in data


def test_a_disk_that_is_neither_luks_nor_blank_is_never_formatted(tmp_path: Path) -> None:
    disk = _disk(tmp_path / "hda.img", head=b"\x53\xef" + os.urandom(4000))  # someone's data
    before = disk.read_bytes()
    vol = LuksVolume(disk, tmp_path / "mnt")
    with pytest.raises(StorageError, match="neither a LUKS volume nor blank"):
        vol.mount(KEY)
    with pytest.raises(StorageError, match="neither a LUKS volume nor blank"):
        vol.format(KEY)
    assert disk.read_bytes() == before


def test_short_keys_and_missing_disks_are_refused(tmp_path: Path) -> None:
    vol = LuksVolume(_disk(tmp_path / "hda.img"), tmp_path / "mnt")
    for call in (vol.mount, vol.format):
        with pytest.raises(StorageError, match="too short"):
            call(b"k" * 15)
    assert vol.is_blank()  # nothing written
    with pytest.raises(StorageError, match="is missing"):
        LuksVolume(tmp_path / "absent.img", tmp_path / "mnt").mount(KEY)


def test_volume_directories_are_plain_relative_paths_without_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    root.mkdir()
    vol = LuksVolume(tmp_path / "unused.img", root)
    vol.ensure_dirs(["docker/volumes/a", "b"])
    assert (root / "docker" / "volumes" / "a").is_dir() and (root / "b").is_dir()
    for bad in ("../x", "a/./b", "/abs", "a//b", ""):
        with pytest.raises(StorageError, match="plain relative path"):
            vol.ensure_dirs([bad])
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(StorageError, match="symbolic link"):
        vol.ensure_dirs(["link/x"])
    assert not (tmp_path / "x").exists()


def test_a_rotation_rewraps_the_disk_to_the_new_key_and_the_old_key_no_longer_opens_it(
    tmp_path: Path,
) -> None:
    vol = LuksVolume(_disk(tmp_path / "hda.img"), tmp_path / "mnt")
    vol.format(KEY)
    new = bytes(range(100, 132))
    vol.rewrap(KEY, new)
    assert vol.opens_with(new) and not vol.opens_with(KEY)
    with pytest.raises(StorageError, match="adding the new disk key"):
        vol.rewrap(KEY, bytes(32))  # the old key no longer authorizes anything
    assert vol.opens_with(new)
    with pytest.raises(StorageError, match="too short"):
        vol.rewrap(new, b"short")
