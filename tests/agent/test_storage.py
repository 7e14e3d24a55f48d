"""gocryptfs volume: keyed by the disk key, ciphertext on disk, wrong key refused, destroy is final."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from teecloud.agent.errors import StorageError
from teecloud.agent.storage import EncryptedVolume, check_prerequisites

pytestmark = pytest.mark.skipif(bool(check_prerequisites()), reason="gocryptfs/FUSE not available")


@pytest.fixture
def volume(tmp_path: Path):
    v = EncryptedVolume(tmp_path / "cipher", tmp_path / "mnt")
    yield v
    v.unmount()


def _grep(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_data_is_ciphertext_on_disk_and_survives_remount(volume: EncryptedVolume) -> None:
    key = os.urandom(32)
    volume.mount(key)
    (volume.mount_point / "note.txt").write_text("plaintext-marker-42")
    volume.unmount()
    assert not volume.is_mounted()
    assert _grep(volume.cipher_dir, b"plaintext-marker-42") == []
    assert not (volume.cipher_dir / "note.txt").exists()
    volume.mount(key)
    assert (volume.mount_point / "note.txt").read_text() == "plaintext-marker-42"


def test_wrong_key_is_refused(volume: EncryptedVolume) -> None:
    volume.mount(os.urandom(32))
    volume.unmount()
    with pytest.raises(StorageError, match="does not open"):
        volume.mount(os.urandom(32))
    assert not volume.is_mounted()


def test_key_never_written_to_disk(volume: EncryptedVolume) -> None:
    key = os.urandom(32)
    volume.mount(key)
    volume.unmount()
    assert _grep(volume.cipher_dir, key.hex().encode()) == []
    assert _grep(volume.cipher_dir, key) == []


def test_destroy_is_final(volume: EncryptedVolume) -> None:
    key = os.urandom(32)
    volume.mount(key)
    (volume.mount_point / "x").write_text("gone")
    volume.destroy()
    assert not volume.cipher_dir.exists()
    volume.mount(key)  # the same key makes a new, empty volume
    assert list(volume.mount_point.iterdir()) == []


def test_refuses_a_non_empty_directory_without_config(volume: EncryptedVolume) -> None:
    volume.cipher_dir.mkdir(parents=True)
    (volume.cipher_dir / "junk").write_text("x")
    with pytest.raises(StorageError, match="not empty"):
        volume.mount(os.urandom(32))
