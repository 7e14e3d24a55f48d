"""A reproducible initramfs: a cpio archive in the kernel's "newc" format (Documentation/driver-api/
early-userspace/buffer-format.rst), gzip-compressed, whose bytes depend only on its entries.

Reproducible as dstack's image build needs it (the initrd is measured into RTMR2 / the SNP kernel-hashes
page): entries sorted by path, parents before children; every mtime SOURCE_DATE_EPOCH (default 0), owner
0:0, inode numbers in entry order, no device numbers; gzip with mtime 0 and no file name.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from teecloud.image.errors import ImageFormatError

__all__ = ["Entry", "build_initramfs", "read_newc", "source_date_epoch"]

MAX_ENTRIES = 100_000
MAX_TOTAL = 2 * 1024 * 1024 * 1024
_MAGIC = b"070701"


@dataclass(frozen=True)
class Entry:
    """A file (`data`), a directory (`data is None`, mode S_IFDIR) or a symlink (`link`)."""

    mode: int
    data: bytes | None = None
    link: str | None = None

    @classmethod
    def file(cls, data: bytes, mode: int = 0o644) -> Entry:
        return cls(stat.S_IFREG | mode, data=data)

    @classmethod
    def directory(cls, mode: int = 0o755) -> Entry:
        return cls(stat.S_IFDIR | mode)

    @classmethod
    def symlink(cls, target: str) -> Entry:
        return cls(stat.S_IFLNK | 0o777, link=target)


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH (reproducible-builds.org) or 0."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not value.isdigit() or int(value) >= 1 << 32:
        raise ImageFormatError(f"SOURCE_DATE_EPOCH must be a non-negative integer below 2^32, got {value!r}")
    return int(value)


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, name: bytes) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, 0, 0, len(name) + 1, 0)
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad4(n: int) -> bytes:
    return bytes(-n % 4)


def build_initramfs(entries: Mapping[str, Entry], *, mtime: int | None = None, level: int = 9) -> bytes:
    """The gzip-compressed newc archive of `entries` (paths relative to the root, no `..`); the parent
    directories of every path are added when missing."""
    if len(entries) > MAX_ENTRIES:
        raise ImageFormatError(f"an initramfs holds at most {MAX_ENTRIES} entries")
    mtime = source_date_epoch() if mtime is None else mtime
    tree: dict[str, Entry] = {}
    for raw, entry in entries.items():
        path = PurePosixPath(raw.lstrip("/"))
        if not path.parts or ".." in path.parts or path.is_absolute():
            raise ImageFormatError(f"bad initramfs path {raw!r}")
        for parent in list(path.parents)[:-1]:
            tree.setdefault(str(parent), Entry.directory())
        tree[str(path)] = entry
    out = io.BytesIO()
    total = 0
    for ino, name in enumerate(sorted(tree, key=lambda p: PurePosixPath(p).parts), start=1):
        e = tree[name]
        body = e.link.encode() if e.link is not None else (e.data or b"")
        total += len(body)
        if total > MAX_TOTAL:
            raise ImageFormatError("the initramfs is larger than 2 GiB")
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        head = _header(ino, e.mode, nlink, mtime, len(body), name.encode())
        out.write(head + name.encode() + b"\0")
        out.write(_pad4(len(head) + len(name) + 1))
        out.write(body + _pad4(len(body)))
    trailer = _header(0, 0, 1, 0, 0, b"TRAILER!!!") + b"TRAILER!!!\0"
    out.write(trailer + _pad4(len(trailer)))
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=level) as gz:
        gz.write(out.getvalue())
    return buf.getvalue()


def read_newc(archive: bytes, *, max_bytes: int = MAX_TOTAL) -> dict[str, tuple[int, bytes]]:
    """Path -> (mode, data) of a (gzip-compressed or plain) newc archive: to check what was built."""
    if archive[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(archive)) as gz:
                archive = gz.read(max_bytes + 1)
        except (OSError, EOFError) as exc:
            raise ImageFormatError(f"not a gzip stream: {exc}") from None
        if len(archive) > max_bytes:
            raise ImageFormatError("the archive is too large")
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        head = archive[pos : pos + 110]
        if len(head) < 110 or head[:6] != _MAGIC:
            raise ImageFormatError(f"not a newc cpio header at offset {pos}")
        try:
            f = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ImageFormatError(f"bad cpio header at offset {pos}") from None
        mode, size, namesize = f[1], f[6], f[11]
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode("utf-8", "replace")
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        data = archive[pos : pos + size]
        if len(data) != size:
            raise ImageFormatError("the archive is truncated")
        pos += size + (-size % 4)
        out[name] = (mode, data)
        if len(out) > MAX_ENTRIES:
            raise ImageFormatError("too many entries")
