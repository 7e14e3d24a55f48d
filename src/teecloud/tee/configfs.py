"""Linux configfs-tsm attestation reports (Documentation/ABI/testing/configfs-tsm-report, Linux >= 6.7).

    /sys/kernel/config/tsm/report/<name>/   created with mkdir; the kernel fills in the attributes
        inblob      (WO) up to 64 bytes of user data (report_data)
        outblob     (RO) the provider-specific report: a TDX quote, an SEV-SNP attestation report
        auxblob     (RO, optional) supplemental data (SEV-SNP: the certificate table)
        provider    (RO) "tdx_guest", "sev_guest", ...
        generation  (RO) incremented on every write to inblob or an option

Every process may share an entry, so a report is only trusted when `generation` after reading outblob is
exactly one more than before our write of inblob; otherwise another writer interleaved and we retry (a
bounded number of times). Entries we create are removed afterwards.

File access goes through `TsmFs` so tests can emulate the kernel's side effects on a temporary tree.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from teecloud.tee.errors import QuoteGenerationError, TeeUnavailable, TeeUsageError

__all__ = ["DEFAULT_TSM_REPORT_ROOT", "TsmFs", "TsmReport", "TsmReportResult", "tsm_provider"]

DEFAULT_TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_MAX_ATTEMPTS = 4
MAX_OUTBLOB_BYTES = 1 << 20  # TDX quotes are ~5 KB, SNP reports 1184 B; the cert table is a few KB


class TsmFs:
    """Plain file operations on the configfs tree (the real kernel does the work behind them)."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path, limit: int = MAX_OUTBLOB_BYTES) -> bytes:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise QuoteGenerationError(f"{path} is larger than {limit} bytes")
        return data

    def write(self, path: Path, data: bytes) -> None:
        # One write(2) of the whole blob: configfs binary attributes take the buffer as written.
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.write(fd, data) != len(data):
                raise QuoteGenerationError(f"short write to {path}")
        finally:
            os.close(fd)


@dataclass(frozen=True)
class TsmReportResult:
    outblob: bytes
    auxblob: bytes | None
    provider: str
    generation: int


def tsm_provider(root: Path = DEFAULT_TSM_REPORT_ROOT, fs: TsmFs | None = None) -> str | None:
    """The configfs-tsm provider name ("tdx_guest", "sev_guest"), or None when configfs-tsm is absent."""
    fs = fs or TsmFs()
    if not Path(root).is_dir():
        return None
    report = TsmReport(root, expected_provider=None, fs=fs)
    try:
        return report.provider()
    except (TeeUnavailable, QuoteGenerationError):
        return None


class TsmReport:
    """Get reports from configfs-tsm. `expected_provider` (e.g. "tdx_guest") is checked on every report."""

    def __init__(
        self,
        root: Path = DEFAULT_TSM_REPORT_ROOT,
        *,
        expected_provider: str | None,
        fs: TsmFs | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if max_attempts < 1:
            raise TeeUsageError("max_attempts must be at least 1")
        self.root = Path(root)
        self.expected_provider = expected_provider
        self.fs = fs or TsmFs()
        self.max_attempts = max_attempts

    def _make_entry(self) -> Path:
        if not self.root.is_dir():
            raise TeeUnavailable(
                f"configfs-tsm is not available ({self.root} does not exist; needs Linux >= 6.7 with "
                f"configfs mounted on /sys/kernel/config)"
            )
        entry = self.root / f"teecloud-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.fs.mkdir(entry)
        except OSError as exc:
            raise TeeUnavailable(f"cannot create a configfs-tsm report entry {entry}: {exc}") from exc
        return entry

    def _remove_entry(self, entry: Path) -> None:
        try:
            self.fs.rmdir(entry)
        except OSError:
            pass  # best effort: an entry left behind holds no secret

    def _read_generation(self, entry: Path) -> int:
        raw = self.fs.read(entry / "generation", 64).strip()
        try:
            return int(raw)
        except ValueError as exc:
            raise QuoteGenerationError(f"unreadable configfs-tsm generation {raw!r}") from exc

    def _read_provider(self, entry: Path) -> str:
        try:
            return self.fs.read(entry / "provider", 256).decode("ascii", "replace").strip()
        except OSError as exc:
            raise TeeUnavailable(f"cannot read the configfs-tsm provider: {exc}") from exc

    def provider(self) -> str:
        entry = self._make_entry()
        try:
            return self._read_provider(entry)
        finally:
            self._remove_entry(entry)

    def get(self, inblob: bytes, *, want_auxblob: bool = False) -> TsmReportResult:
        """Write `inblob` (<= 64 bytes), read the report; retry when another writer interleaved."""
        if len(inblob) > 64:
            raise TeeUsageError(f"configfs-tsm inblob is at most 64 bytes, got {len(inblob)}")
        entry = self._make_entry()
        try:
            provider = self._read_provider(entry)
            if self.expected_provider is not None and provider != self.expected_provider:
                raise TeeUnavailable(
                    f"configfs-tsm provider is {provider!r}, expected {self.expected_provider!r} "
                    f"(this is not the TEE that backend is for)"
                )
            for _attempt in range(self.max_attempts):
                try:
                    before = self._read_generation(entry)
                    self.fs.write(entry / "inblob", inblob)
                    outblob = self.fs.read(entry / "outblob")
                    auxblob = None
                    if want_auxblob and (entry / "auxblob").exists():
                        auxblob = self.fs.read(entry / "auxblob")
                    after = self._read_generation(entry)
                except OSError as exc:
                    raise QuoteGenerationError(f"configfs-tsm report failed: {exc}") from exc
                if after == before + 1:
                    if not outblob:
                        raise QuoteGenerationError("configfs-tsm returned an empty report")
                    return TsmReportResult(outblob, auxblob, provider, after)
            raise QuoteGenerationError(
                f"configfs-tsm report entry kept changing under us (generation moved during "
                f"{self.max_attempts} attempts): another process is writing to {entry}"
            )
        finally:
            self._remove_entry(entry)
