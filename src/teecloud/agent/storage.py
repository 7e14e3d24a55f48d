"""A CVM's encrypted persistent disk: a gocryptfs directory keyed by the KMS disk key.

The cipher directory lives in the instance directory on the host disk; the plaintext view is a FUSE mount
under the node's runtime directory (tmpfs), bind-mounted into the app's containers as their volumes. The
key (dstack's `disk_crypt_key`, hex-encoded as dstack does for its LUKS passphrase) reaches gocryptfs
through a pipe on stdin (`-passfile /dev/stdin`), never through a file or argv. Without the key, the
directory is ciphertext; after `destroy()` (the cipher directory and its gocryptfs.conf, which holds the
master key wrapped by the disk key, are deleted) the data is gone for good.

The disk key is a uniformly random 256-bit secret, so gocryptfs's scrypt stretching (made for human
passwords) is set to its minimum to keep boots fast.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from teecloud.agent.errors import StorageError

__all__ = ["EncryptedVolume", "check_prerequisites"]

GOCRYPTFS_WRONG_PASSWORD = 12
SCRYPT_N_LOG2 = 10


def check_prerequisites() -> list[str]:
    """What is missing for encrypted storage, each with an install hint (empty list: all present)."""
    missing = []
    if shutil.which("gocryptfs") is None:
        missing.append("gocryptfs is not installed: apt-get install gocryptfs")
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        missing.append("the FUSE tools are not installed: apt-get install fuse3")
    if not os.path.exists("/dev/fuse"):
        missing.append(
            "/dev/fuse is missing: load the module (modprobe fuse), or in a container run with "
            "--device /dev/fuse --cap-add SYS_ADMIN"
        )
    return missing


def _unescape_mountinfo(path: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal (proc(5)).
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


class EncryptedVolume:
    def __init__(self, cipher_dir: Path, mount_point: Path) -> None:
        self.cipher_dir = Path(cipher_dir)
        self.mount_point = Path(mount_point)

    @property
    def initialized(self) -> bool:
        return (self.cipher_dir / "gocryptfs.conf").exists()

    def is_mounted(self) -> bool:
        target = str(self.mount_point.resolve()) if self.mount_point.exists() else str(self.mount_point)
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                        return True
        except OSError:
            return False
        return False

    def _run(self, args: list[str], key: bytes, what: str) -> None:
        if shutil.which("gocryptfs") is None:
            raise StorageError("gocryptfs is not installed: apt-get install gocryptfs")
        # stdout/stderr go to a file, not a pipe: the daemonized gocryptfs inherits them and would keep a
        # pipe open (and subprocess waiting) for as long as the volume stays mounted.
        with tempfile.TemporaryFile() as errfile:
            r = subprocess.run(
                ["gocryptfs", "-q", "-nosyslog", "-passfile", "/dev/stdin", *args],
                input=key.hex().encode() + b"\n",
                stdout=subprocess.DEVNULL,
                stderr=errfile,
                timeout=60,
            )
            errfile.seek(0)
            stderr = errfile.read(4096).decode(errors="replace")
        if r.returncode == GOCRYPTFS_WRONG_PASSWORD:
            raise StorageError(f"{what}: the disk key does not open this volume")
        if r.returncode != 0:
            raise StorageError(f"{what} failed (gocryptfs exit {r.returncode}): {stderr[-500:]}")

    def mount(self, key: bytes) -> None:
        """Create the volume on first use, then mount it (a stale mount from a dead process is replaced)."""
        if len(key) < 16:
            raise StorageError("the disk key is too short")
        if self.is_mounted():
            self.unmount()
        self.cipher_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.initialized:
            if any(self.cipher_dir.iterdir()):
                raise StorageError(
                    f"{self.cipher_dir} is not empty but has no gocryptfs.conf; refusing to reuse"
                )
            self._run(
                ["-init", "-scryptn", str(SCRYPT_N_LOG2), str(self.cipher_dir)], key, "creating the volume"
            )
        self.mount_point.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = [str(self.cipher_dir), str(self.mount_point)]
        if os.geteuid() == 0:
            args = ["-allow_other", *args]  # containers may run as any uid
        self._run(args, key, "mounting the volume")

    def unmount(self) -> None:
        if not self.is_mounted():
            return
        for tool in ("fusermount3", "fusermount"):
            if shutil.which(tool):
                r = subprocess.run([tool, "-u", str(self.mount_point)], capture_output=True, timeout=30)
                if r.returncode == 0:
                    return
                # busy (a container still holds it) or dead (ENOTCONN): detach lazily
                r = subprocess.run([tool, "-u", "-z", str(self.mount_point)], capture_output=True, timeout=30)
                if r.returncode == 0:
                    return
                raise StorageError(f"cannot unmount {self.mount_point}: {r.stderr.decode().strip()}")
        raise StorageError("fusermount3 is missing: apt-get install fuse3")

    def ensure_dirs(self, relative: list[str]) -> None:
        """Create the volumes' backing directories. Each is a plain relative path of ordinary names, and no
        component may be a symlink: the runtime (dockerd) follows these paths on the host each time it
        mounts them, so a symlink put there by an app would mount a host path into it."""
        root = self.mount_point
        for rel in relative:
            parts = rel.split("/")  # as written: PurePosixPath would drop a "." component
            if any(p in ("", ".", "..") or "\x00" in p for p in parts):
                raise StorageError(f"volume path {rel!r} is not a plain relative path")
            path = root
            for part in parts:
                path = path / part
                if path.is_symlink():
                    raise StorageError(
                        f"volume path {rel!r}: {part!r} is a symbolic link; refusing to mount it (an app may "
                        "not point its volumes at paths outside its encrypted disk)"
                    )
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    raise StorageError("the encrypted volume's process died; restart the CVM") from exc
                raise StorageError(f"cannot create {rel} in the volume: {exc}") from exc

    def shred(self) -> None:
        """Delete the ciphertext, gocryptfs.conf (the master key wrapped by the disk key) first: once it is
        gone nothing in the directory can be decrypted again, even if deleting the rest fails. Works mounted
        or not (a mount that would not detach keeps serving only what its process still holds in memory)."""
        try:
            (self.cipher_dir / "gocryptfs.conf").unlink(missing_ok=True)
            if self.cipher_dir.exists():
                shutil.rmtree(self.cipher_dir)
        except OSError as exc:
            raise StorageError(f"cannot delete the encrypted volume {self.cipher_dir}: {exc}") from exc

    def destroy(self) -> None:
        """Unmount and delete the ciphertext: without gocryptfs.conf nothing can be decrypted again."""
        self.unmount()
        self.shred()
        if self.mount_point.exists() and not self.is_mounted():
            shutil.rmtree(self.mount_point, ignore_errors=True)
