"""The re-wrap tool of a root rotation (issue 19): an app's gocryptfs volume moves from the previous epoch's
disk key to the new one without losing data, and a process killed between any two steps leaves a volume
that opens with the old key or with the new one (and the next boot finishes the move)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import teecloud
from teecloud.agent.errors import StorageError
from teecloud.agent.guest import GuestPaths, boot_guest, shutdown_guest
from teecloud.agent.storage import REWRAP_FILE, EncryptedVolume, check_prerequisites
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_threshold_rotate import HELLO, MIGRATING, Rotated, _app, _boot, rotated  # noqa: F401

pytestmark = pytest.mark.skipif(bool(check_prerequisites()), reason="gocryptfs/FUSE not available")

DATA = "written under epoch 1\n" * 100


def _volume(tmp_path: Path, name: str = "v") -> EncryptedVolume:
    return EncryptedVolume(tmp_path / name / "cipher", tmp_path / name / "mnt")


def _write(volume: EncryptedVolume, key: bytes) -> None:
    volume.mount(key)
    try:
        (volume.mount_point / "data").mkdir()
        (volume.mount_point / "data" / "file.txt").write_text(DATA)
    finally:
        volume.unmount()


def _opens(volume: EncryptedVolume, key: bytes) -> bool:
    try:
        volume.mount(key)
    except StorageError as exc:
        assert "does not open" in str(exc)
        return False
    try:
        assert (volume.mount_point / "data" / "file.txt").read_text() == DATA
    finally:
        volume.unmount()
    return True


def test_rewrap_moves_the_volume_to_the_new_key(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    v = _volume(tmp_path)
    _write(v, old)
    master_before = sorted(p.name for p in v.cipher_dir.rglob("*"))
    assert v.rewrap(old, new) is True
    assert _opens(v, new) and not _opens(v, old)
    # the data was not re-encrypted: the same ciphertext files, only gocryptfs.conf changed
    assert sorted(p.name for p in v.cipher_dir.rglob("*")) == master_before
    assert not (v.cipher_dir / REWRAP_FILE).exists()
    # already moved: the old key no longer opens it, nothing changes
    assert v.rewrap(old, new) is False
    assert _opens(v, new)
    # a key that never opened it changes nothing
    assert v.rewrap(os.urandom(32), os.urandom(32)) is False
    assert _opens(v, new)


def test_no_key_reaches_the_disk_or_argv(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    v = _volume(tmp_path)
    _write(v, old)
    v.rewrap(old, new)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            assert old.hex().encode() not in blob and new.hex().encode() not in blob


_CHILD = """
import os, signal, sys
from pathlib import Path
from teecloud.agent.storage import EncryptedVolume
cipher, mnt, stop_at = sys.argv[1], sys.argv[2], sys.argv[3]
old, new = (bytes.fromhex(x) for x in sys.stdin.read().split())
def step(name):
    if name == stop_at:
        os.kill(os.getpid(), signal.SIGKILL)
EncryptedVolume(Path(cipher), Path(mnt)).rewrap(old, new, after_step=step)
"""


@pytest.mark.parametrize(
    ("killed_after", "old_opens"), [("copied", True), ("rewrapped", True), ("replaced", False)]
)
def test_a_rewrap_killed_between_steps_leaves_one_working_key(
    tmp_path: Path, killed_after: str, old_opens: bool
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    v = _volume(tmp_path)
    _write(v, old)
    src = str(Path(teecloud.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(v.cipher_dir), str(v.mount_point), killed_after],
        input=f"{old.hex()} {new.hex()}".encode(),
        env={**os.environ, "PYTHONPATH": src},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-1000:]
    # exactly one of the two keys opens the volume, with every byte of the data
    assert _opens(v, old) is old_opens
    assert _opens(v, new) is not old_opens
    # the next boot (new key, previous key while migrating) finishes the move; the leftover copy is gone
    v.mount(new, previous_key=old)
    try:
        assert (v.mount_point / "data" / "file.txt").read_text() == DATA
    finally:
        v.unmount()
    assert not (v.cipher_dir / REWRAP_FILE).exists()
    assert not _opens(v, old)


@pytest.mark.slow
def test_data_written_under_epoch_1_is_readable_after_rotation_and_rewrap(
    tmp_path: Path,
    teecloud_home: Path,
    world: World,
    rotated: Rotated,  # noqa: F811
) -> None:
    """The keys come from the threshold nodes: the volume written with the app's epoch-1 disk key, the
    root rotated, the app opts in with a migrating compose: its boot derives both epochs' disk keys and the
    mount re-wraps the volume, which then opens with the epoch-2 key alone."""
    app_id = _app(world)
    v = _volume(tmp_path)
    before = _boot(teecloud_home, rotated.provider(rotated=False), HELLO, app_id)
    _write(v, before.keys.disk_crypt_key)
    rotated.rotate([1, 2, 3, 4, 5])
    # not opted in: the same key still opens it after the rotation
    assert _opens(v, _boot(teecloud_home, rotated.provider(), HELLO, app_id).keys.disk_crypt_key)
    migrating = _boot(teecloud_home, rotated.provider(), MIGRATING, app_id)
    assert migrating.previous_keys is not None
    new_key = migrating.keys.disk_crypt_key
    assert new_key != before.keys.disk_crypt_key
    v.mount(new_key, previous_key=migrating.previous_keys.disk_crypt_key)
    try:
        assert (v.mount_point / "data" / "file.txt").read_text() == DATA
    finally:
        v.unmount()
    assert _opens(v, new_key) and not _opens(v, before.keys.disk_crypt_key)
    # a later boot that still migrates finds the move done and just mounts
    again = _boot(teecloud_home, rotated.provider(), MIGRATING, app_id)
    assert again.previous_keys is not None
    v.mount(again.keys.disk_crypt_key, previous_key=again.previous_keys.disk_crypt_key)
    v.unmount()
    assert _opens(v, new_key)


@pytest.mark.slow
def test_the_guest_boot_of_a_migrating_app_rewraps_its_volume(
    tmp_path: Path,
    teecloud_home: Path,
    world: World,
    rotated: Rotated,  # noqa: F811
) -> None:
    """The guest half of a CVM's boot (agent.guest.boot_guest, what the Docker runtime runs) with threshold
    keys: the volume written by the app on epoch 1 is re-wrapped at the mount of its migrating boot, the
    previous epoch's keys are dropped once mounted, and its data is there."""
    app_id = _app(world)
    paths = GuestPaths(
        dstack_sock=tmp_path / "run" / "dstack.sock",
        tappd_sock=tmp_path / "run" / "tappd.sock",
        env_file=tmp_path / "run" / "env",
        cipher_dir=tmp_path / "disk" / "cipher",
        mount_point=tmp_path / "run" / "mnt",
    )
    (tmp_path / "run").mkdir()

    def boot_once(provider: Any, compose: dict[str, Any]) -> Any:
        tee = SimulatedTdx(teecloud_home)
        return boot_guest(
            tee=tee,
            app_compose=json.dumps(compose).encode(),
            app_id=app_id,
            instance_id=b"\x01" * 20,
            key_provider=provider,
            encrypted_env=None,
            paths=paths,
            render_env=lambda env: b"".join(f"{k}={v}\n".encode() for k, v in env.items()),
            extra_events=[("os-image-hash", tee.os_image_hash)],
        )

    guest = boot_once(rotated.provider(rotated=False), HELLO)
    (paths.mount_point / "db").write_text(DATA)
    epoch1_key = guest.state.keys.disk_crypt_key
    assert shutdown_guest(guest, paths) == []
    rotated.rotate([1, 2, 3, 4, 5])
    guest = boot_once(rotated.provider(), MIGRATING)
    try:
        assert (paths.mount_point / "db").read_text() == DATA
        assert guest.state.previous_keys is None  # dropped once the volume is mounted
        epoch2_key = guest.state.keys.disk_crypt_key
        assert epoch2_key != epoch1_key
    finally:
        assert shutdown_guest(guest, paths) == []
    v = EncryptedVolume(paths.cipher_dir, tmp_path / "check")
    v.mount(epoch2_key)
    assert (v.mount_point / "db").read_text() == DATA
    v.unmount()
    with pytest.raises(StorageError, match="does not open"):
        v.mount(epoch1_key)
