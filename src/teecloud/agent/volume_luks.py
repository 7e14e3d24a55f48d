"""A CVM's encrypted data disk inside a VM (the qemu backend): LUKS2 on the VM's data disk, keyed by the KMS
disk key, ext4 inside, as dstack's guest opens its data disk.

The key (dstack's `disk_crypt_key`, hex-encoded as dstack's LUKS passphrase) reaches `cryptsetup` through a
pipe on stdin (`--key-file=-`), never through a file or argv. The host only ever sees the disk's ciphertext:
the key exists in the KMS and in the guest's memory.

First use: a disk whose first 64 KiB are all zero (a fresh qcow2) is formatted (`luksFormat --type luks2`)
and given an ext4 filesystem; a disk that is neither LUKS nor blank is refused (never formatted over). The
disk key is a uniformly random 256-bit secret, so the key derivation is PBKDF2 at its minimum iteration count
(argon2's memory-hard stretching is made for human passwords and would cost seconds of a TCG boot).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from teecloud.agent.errors import StorageError

__all__ = ["STORAGE_FS", "LuksVolume"]

# the `storage-fs` event's payload for this volume: dstack's value for its LUKS2 + ext4 data disk
STORAGE_FS = "ext4"
MAPPER_NAME = "teecloud-data"
BLANK_PROBE = 64 * 1024
PBKDF2_ITERATIONS = 1000


def _key_pipe(key: bytes) -> int:
    """A pipe's read end holding `key` as hex (dstack's passphrase form), for `--key-file=/dev/fd/N`."""
    r, w = os.pipe()
    try:
        os.write(w, key.hex().encode())  # 128 bytes at most here: far below a pipe's buffer
    finally:
        os.close(w)
    return r


class LuksVolume:
    """The Volume of a VM's data disk (`device`), mounted at `mount_point` once opened with the disk key."""

    def __init__(self, device: Path, mount_point: Path, *, name: str = MAPPER_NAME) -> None:
        self.device = Path(device)
        self.mount_point = Path(mount_point)
        self.name = name

    @property
    def mapper(self) -> Path:
        return Path("/dev/mapper") / self.name

    def _run(
        self,
        argv: list[str],
        what: str,
        *,
        key: bytes | None = None,
        timeout: float = 300,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        try:
            r = subprocess.run(
                argv,
                input=key.hex().encode() if key is not None else None,
                capture_output=True,
                timeout=timeout,
                check=False,
                pass_fds=pass_fds,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StorageError(f"{what}: {exc}") from None
        if r.returncode != 0:
            raise StorageError(
                f"{what} failed ({argv[0]} exit {r.returncode}): {r.stderr.decode(errors='replace')[-500:]}"
            )

    def is_luks(self) -> bool:
        r = subprocess.run(["cryptsetup", "isLuks", str(self.device)], capture_output=True, timeout=60)
        return r.returncode == 0

    def is_blank(self) -> bool:
        with self.device.open("rb") as f:
            return not any(f.read(BLANK_PROBE))

    def is_mounted(self) -> bool:
        target = str(self.mount_point)
        try:
            with open("/proc/self/mountinfo") as f:
                return any(len(line.split()) > 4 and line.split()[4] == target for line in f)
        except OSError:
            return False

    def format(self, key: bytes) -> None:
        """LUKS2 on a blank disk (first BLANK_PROBE bytes zero), keyed by `key`; anything else is refused."""
        if len(key) < 16:
            raise StorageError("the disk key is too short")
        if not self.is_blank():
            raise StorageError(
                f"{self.device} is neither a LUKS volume nor blank; refusing to format over its data"
            )
        self._run(
            [
                "cryptsetup",
                "luksFormat",
                "--batch-mode",
                "--type=luks2",
                "--pbkdf=pbkdf2",
                f"--pbkdf-force-iterations={PBKDF2_ITERATIONS}",
                "--key-file=-",
                str(self.device),
            ],
            "formatting the data disk (LUKS2)",
            key=key,
        )

    def opens_with(self, key: bytes) -> bool:
        """Whether `key` opens a keyslot (`cryptsetup open --test-passphrase`: no mapping is made)."""
        r = subprocess.run(
            ["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(self.device)],
            input=key.hex().encode(),
            capture_output=True,
            timeout=300,
            check=False,
        )
        return r.returncode == 0

    def rewrap(self, previous_key: bytes, key: bytes) -> None:
        """Move the volume from `previous_key` to `key` (a root rotation): `luksAddKey` (the new key in a
        second keyslot, authorized by the old one), then `luksRemoveKey` of the old one. The data's volume key
        stays; a crash in between leaves a disk that opens with either key. Both keys through pipes."""
        if len(key) < 16 or len(previous_key) < 16:
            raise StorageError("the disk key is too short")
        old_fd, new_fd = _key_pipe(previous_key), _key_pipe(key)
        try:
            self._run(
                [
                    "cryptsetup",
                    "luksAddKey",
                    f"--key-file=/dev/fd/{old_fd}",
                    str(self.device),
                    f"/dev/fd/{new_fd}",
                ],
                "adding the new disk key",
                pass_fds=(old_fd, new_fd),
            )
        finally:
            os.close(old_fd)
            os.close(new_fd)
        old_fd = _key_pipe(previous_key)
        try:
            self._run(
                [
                    "cryptsetup",
                    "luksRemoveKey",
                    "--batch-mode",
                    f"--key-file=/dev/fd/{old_fd}",
                    str(self.device),
                ],
                "removing the previous disk key",
                pass_fds=(old_fd,),
            )
        finally:
            os.close(old_fd)

    def mount(self, key: bytes, *, previous_key: bytes | None = None) -> None:
        """Open the disk with `key` (formatting a blank disk first; re-wrapping one still under
        `previous_key`, the previous root epoch's disk key) and mount its ext4 at mount_point."""
        if len(key) < 16:
            raise StorageError("the disk key is too short")
        if not self.device.exists():
            raise StorageError(f"the data disk {self.device} is missing")
        fresh = False
        if not self.is_luks():
            self.format(key)
            fresh = True
        elif previous_key is not None and not self.opens_with(key) and self.opens_with(previous_key):
            self.rewrap(previous_key, key)
        if not self.mapper.exists():
            r = subprocess.run(
                ["cryptsetup", "open", "--type=luks2", "--key-file=-", str(self.device), self.name],
                input=key.hex().encode(),
                capture_output=True,
                timeout=300,
                check=False,
            )
            if r.returncode == 2:  # cryptsetup: "no key available with this passphrase"
                raise StorageError("the disk key does not open this data disk")
            if r.returncode != 0:
                raise StorageError(
                    f"opening the data disk failed: {r.stderr.decode(errors='replace')[-500:]}"
                )
        if fresh:
            self._run(["mkfs.ext4", "-q", "-F", str(self.mapper)], "creating the ext4 filesystem")
        self.mount_point.mkdir(parents=True, exist_ok=True, mode=0o755)
        if not self.is_mounted():
            self._run(
                ["mount", "-t", "ext4", str(self.mapper), str(self.mount_point)], "mounting the data disk"
            )

    def ensure_dirs(self, relative: list[str]) -> None:
        """Create directories in the volume (plain relative paths, ordinary names, no symlink on the path)."""
        for rel in relative:
            parts = rel.split("/")
            if any(p in ("", ".", "..") or "\x00" in p for p in parts):
                raise StorageError(f"volume path {rel!r} is not a plain relative path")
            path = self.mount_point
            for part in parts:
                path = path / part
                if path.is_symlink():
                    raise StorageError(f"volume path {rel!r}: {part!r} is a symbolic link")
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno == errno.EROFS:
                    raise StorageError("the data disk is read-only") from exc
                raise StorageError(f"cannot create {rel} in the volume: {exc}") from exc

    def unmount(self) -> None:
        """Unmount the filesystem and close the LUKS mapping (the key leaves the kernel's memory)."""
        if self.is_mounted():
            self._run(["umount", str(self.mount_point)], "unmounting the data disk")
        if self.mapper.exists():
            self._run(["cryptsetup", "close", self.name], "closing the data disk")

    def shred(self) -> None:
        """Erase the LUKS keyslots (`cryptsetup erase`): the volume key is gone, the ciphertext is noise."""
        if self.is_luks():
            self._run(["cryptsetup", "erase", "--batch-mode", str(self.device)], "erasing the keyslots")
