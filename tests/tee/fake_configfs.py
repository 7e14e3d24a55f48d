"""A fake configfs-tsm kernel: a real directory tree in tmp_path plus the kernel's side effects."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from teecloud.tee.configfs import TsmFs


class FakeTsmKernel(TsmFs):
    """mkdir populates the attributes; writing inblob bumps generation; reading outblob "generates" the
    report from the current inblob. `interfere` = number of outblob reads during which another writer
    bumps generation (simulating a concurrent process)."""

    def __init__(
        self,
        root: Path,
        provider: str,
        make_report: Callable[[bytes], bytes],
        *,
        interfere: int = 0,
        auxblob: bytes | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.provider = provider
        self.make_report = make_report
        self.interfere = interfere
        self.auxblob = auxblob
        self.outblob_reads = 0
        self.entries_created: list[Path] = []

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        self.entries_created.append(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "inblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")
        if self.auxblob is not None:
            (path / "auxblob").write_bytes(self.auxblob)

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        super().rmdir(path)

    def _bump(self, entry: Path) -> None:
        gen = int((entry / "generation").read_text())
        (entry / "generation").write_text(f"{gen + 1}\n")

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        if path.name == "inblob":
            self._bump(path.parent)

    def read(self, path: Path, limit: int = 1 << 20) -> bytes:
        if path.name == "outblob":
            self.outblob_reads += 1
            entry = path.parent
            report = self.make_report((entry / "inblob").read_bytes())
            if self.outblob_reads <= self.interfere:
                (entry / "inblob").write_bytes(b"other writer")
                self._bump(entry)
                report = self.make_report(b"other writer")
            path.write_bytes(report)
        return super().read(path, limit)
