"""A CVM's encrypted persistent disk: a gocryptfs directory keyed by the KMS disk key.

The cipher directory lives in the instance directory on the host disk; the plaintext view is a FUSE mount
under the node's runtime directory (tmpfs), bind-mounted into the app's containers as their volumes. The
key (dstack's `disk_crypt_key`, hex-encoded as dstack does for its LUKS passphrase) reaches gocryptfs
through a pipe on stdin (`-passfile /dev/stdin`), never through a file or argv. Without the key, the
directory is ciphertext; after `destroy()` (the cipher directory and its gocryptfs.conf, which holds the
master key wrapped by the disk key, are deleted) the data is gone for good.

The disk key is a uniformly random 256-bit secret, so gocryptfs's scrypt stretching (made for human
passwords) is set to its minimum to keep boots fast.

Re-wrap (a root rotation, teecloud.kms.rotation; docs/kms.md "Rotation"): the volume's master key, which
encrypts the data, stays; only its wrapping in gocryptfs.conf moves from the previous epoch's disk key to the
new one (`gocryptfs -passwd`, on a copy of the conf that then replaces it atomically), so no data is
re-encrypted and a crash at any point leaves the volume opening with the old key or with the new one. The
LUKS2 analogue is `cryptsetup luksAddKey` (new key in a second keyslot) then `luksKillSlot` of the old one.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from teecloud.agent.errors import StorageError

__all__ = ["EncryptedVolume", "check_prerequisites"]

GOCRYPTFS_WRONG_PASSWORD = 12
SCRYPT_N_LOG2 = 10
CONF_FILE = "gocryptfs.conf"
REWRAP_FILE = "gocryptfs.conf.rewrap"  # the copy a re-wrap changes, then renames over CONF_FILE
REWRAP_TIMEOUT_S = 60


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

    def mount(self, key: bytes, *, previous_key: bytes | None = None) -> None:
        """Create the volume on first use, then mount it (a stale mount from a dead process is replaced).
        `previous_key`: the app migrates to a new root epoch; a volume still wrapped under the previous
        epoch's disk key is re-wrapped to `key` first (rewrap)."""
        if len(key) < 16:
            raise StorageError("the disk key is too short")
        if self.is_mounted():
            self.unmount()
        self.cipher_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.cipher_dir / REWRAP_FILE).unlink(missing_ok=True)  # an interrupted re-wrap's copy
        if previous_key is not None and self.initialized:
            self.rewrap(previous_key, key)
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

    def rewrap(
        self, old_key: bytes, new_key: bytes, *, after_step: Callable[[str], None] | None = None
    ) -> bool:
        """Wrap the volume's master key under `new_key` instead of `old_key`, on an unmounted volume. Returns
        False when `old_key` does not open it (already re-wrapped, e.g. by a run that crashed after (4);
        mounting with the new key then tells). Steps, each leaving a volume that opens:
          (1) drop a leftover copy of an interrupted run;
          (2) copy gocryptfs.conf to gocryptfs.conf.rewrap (fsync'ed);
          (3) `gocryptfs -passwd -config` on the copy: gocryptfs checks old_key and re-wraps under new_key;
          (4) rename the copy over gocryptfs.conf and fsync the directory: the one atomic switch.
        Until (4) the old key opens the volume, after it the new one. `after_step(name)` is called after
        (2) "copied", (3) "rewrapped" and (4) "replaced" (tests kill the process there)."""
        if len(new_key) < 16 or len(old_key) < 16:
            raise StorageError("the disk key is too short")
        if self.is_mounted():
            raise StorageError("re-wrapping needs the volume unmounted")
        conf, copy = self.cipher_dir / CONF_FILE, self.cipher_dir / REWRAP_FILE
        if not conf.exists():
            raise StorageError(f"{self.cipher_dir} holds no gocryptfs volume to re-wrap")
        # (1)
        copy.unlink(missing_ok=True)
        # (2)
        try:
            data = conf.read_bytes()
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot copy {conf} to re-wrap it: {exc}") from exc
        if after_step:
            after_step("copied")
        # (3)
        if not self._passwd(copy, old_key, new_key):
            copy.unlink(missing_ok=True)
            return False
        if after_step:
            after_step("rewrapped")
        # (4)
        try:
            os.replace(copy, conf)
            dfd = os.open(self.cipher_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise StorageError(f"cannot replace {conf} with its re-wrapped copy: {exc}") from exc
        if after_step:
            after_step("replaced")
        return True

    def _passwd(self, config: Path, old_key: bytes, new_key: bytes) -> bool:
        """`gocryptfs -passwd` on `config`: it reads the old and then the new password from the same
        -passfile, so that file is a FIFO in a private directory, written once per read: the old key, then
        (once gocryptfs says it wants the new password, i.e. it has read and closed the FIFO) the new key.
        No key is ever on disk or in argv. False when the old key does not open the config."""
        if shutil.which("gocryptfs") is None:
            raise StorageError("gocryptfs is not installed: apt-get install gocryptfs")
        deadline = time.monotonic() + REWRAP_TIMEOUT_S
        with tempfile.TemporaryDirectory(prefix="teecloud-rewrap-") as private:
            fifo = Path(private) / "key"
            os.mkfifo(fifo, 0o600)
            proc = subprocess.Popen(
                [
                    "gocryptfs",
                    "-nosyslog",
                    "-passwd",
                    "-config",
                    str(config),
                    "-passfile",
                    str(fifo),
                    str(self.cipher_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            watchdog = threading.Timer(REWRAP_TIMEOUT_S, proc.kill)
            watchdog.start()
            output = b""
            try:
                assert proc.stdout is not None
                _feed_fifo(fifo, old_key, proc, deadline)
                while b"new password" not in output:
                    line = proc.stdout.readline()
                    if not line:
                        break
                    output += line[-512:]
                if b"new password" in output:
                    _feed_fifo(fifo, new_key, proc, deadline)
                    output += proc.stdout.read(4096)
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = -1
            finally:
                watchdog.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        if rc == GOCRYPTFS_WRONG_PASSWORD:
            return False
        if rc != 0:
            text = output.decode(errors="replace")
            raise StorageError(f"re-wrapping the volume failed (gocryptfs exit {rc}): {text[-500:]}")
        return True

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


def _feed_fifo(fifo: Path, key: bytes, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Write the hex key and a newline to the FIFO once gocryptfs opens it for reading, then close it (the
    reader sees the end of the file). O_NONBLOCK: opening a FIFO with no reader fails (ENXIO) instead of
    blocking forever when gocryptfs exited before reading."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise StorageError(f"cannot pass the key to gocryptfs: {exc}") from exc
        if proc.poll() is not None or time.monotonic() > deadline:
            return  # gocryptfs ended (its exit code says why) or hangs (the caller's timeout ends it)
        time.sleep(0.01)
    try:
        os.write(fd, key.hex().encode() + b"\n")
    finally:
        os.close(fd)
