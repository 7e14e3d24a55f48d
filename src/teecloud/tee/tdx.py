"""Real Intel TDX guest backend (Linux).

Quotes: configfs-tsm with provider "tdx_guest" (Linux >= 6.7; the kernel asks the host's quoting service).
Fallback on older kernels: /dev/tdx_guest TDX_CMD_GET_REPORT0 for the TDREPORT, then the host's Quote
Generation Service (QGS) over vsock, as Intel's libtdx_attest does.

RTMR extension: the tdx_guest sysfs measurement registers (Linux >= 6.16,
Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest): writing 48 bytes to
`measurements/rtmr<N>:sha384` performs TDG.MR.RTMR.EXTEND. The older `TDX_CMD_EXTEND_RTMR` ioctl was never
merged upstream, so it is not used: on kernels without the sysfs files extension fails with a clear error.

Event log: RTMR0-2 entries come from the firmware's CC event log (ACPI CCEL table); RTMR3 runtime events
are appended by `emit_event`, one dstack-format JSON object per line, to `event_log_path` under an flock so
the file order is the extension order across processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from teecloud.attestation.models import EventLogEntry
from teecloud.tee._ccel import parse_ccel
from teecloud.tee.configfs import DEFAULT_TSM_REPORT_ROOT, TsmFs, TsmReport
from teecloud.tee.errors import QuoteGenerationError, TeeError, TeeUnavailable, TeeUsageError
from teecloud.tee.simulated import RUNTIME_EVENT_TYPE, _check_event, _check_report_data, runtime_event_digest
from teecloud.tee.sysconfig import DEFAULT_SYS_CONFIG, HostToldIdentity

__all__ = ["TdxPlatform", "td_report_fields_from_quote"]

TSM_PROVIDER_TDX = "tdx_guest"
DEFAULT_MEASUREMENTS_DIR = Path("/sys/class/misc/tdx_guest/measurements")
DEFAULT_DEVICE = Path("/dev/tdx_guest")
DEFAULT_CCEL = Path("/sys/firmware/acpi/tables/data/CCEL")
DEFAULT_EVENT_LOG = Path("/run/log/teecloud/runtime_events.log")

# linux/tdx-guest.h: struct tdx_report_req { __u8 reportdata[64]; __u8 tdreport[1024]; };
# TDX_CMD_GET_REPORT0 = _IOWR('T', 1, struct tdx_report_req)
_TDREPORT_LEN = 1024
_TDX_CMD_GET_REPORT0 = (3 << 30) | ((64 + _TDREPORT_LEN) << 16) | (ord("T") << 8) | 1

# Intel DCAP qgs_msg_lib: QGS message protocol 1.0, framed by a 4-byte big-endian length over vsock.
QGS_VSOCK_CID = 2
QGS_VSOCK_PORT = 4050
_QGS_GET_QUOTE_REQ = 0
_QGS_GET_QUOTE_RESP = 1
_QGS_MAX_MSG = 1 << 20


def td_report_fields_from_quote(quote: bytes) -> dict[str, bytes]:
    """MRTD, RTMR0-3 and report_data of a TDX quote v4 or v5 (Intel TDX DCAP quote layout)."""
    if len(quote) < 48 + 584:
        raise QuoteGenerationError("TDX quote too short")
    (version,) = struct.unpack_from("<H", quote, 0)
    body = 48 if version == 4 else 48 + 6 if version == 5 else -1
    if body < 0 or len(quote) < body + 584:
        raise QuoteGenerationError(f"unsupported TDX quote version {version}")
    mrtd_at, rtmr_at, rd_at = body + 136, body + 328, body + 520
    out = {"mrtd": quote[mrtd_at : mrtd_at + 48], "report_data": quote[rd_at : rd_at + 64]}
    for i in range(4):
        out[f"rtmr{i}"] = quote[rtmr_at + 48 * i : rtmr_at + 48 * (i + 1)]
    return out


def _vsock_qgs_connect() -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise TeeUnavailable("this Python has no AF_VSOCK support, cannot reach the host's QGS")
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect((QGS_VSOCK_CID, QGS_VSOCK_PORT))
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise QuoteGenerationError("QGS closed the connection early")
        buf += chunk
    return bytes(buf)


def qgs_get_quote(td_report: bytes, connect: Callable[[], socket.socket] = _vsock_qgs_connect) -> bytes:
    """Ask the host's Quote Generation Service to turn a TDREPORT into a quote."""
    body = struct.pack("<II", len(td_report), 0) + td_report
    msg = struct.pack("<HHIII", 1, 0, _QGS_GET_QUOTE_REQ, 16 + len(body), 0) + body
    try:
        with connect() as s:
            s.sendall(struct.pack(">I", len(msg)) + msg)
            (size,) = struct.unpack(">I", _recv_exact(s, 4))
            if not 16 + 8 <= size <= _QGS_MAX_MSG:
                raise QuoteGenerationError(f"QGS reply has an invalid size {size}")
            resp = _recv_exact(s, size)
    except OSError as exc:
        raise TeeUnavailable(f"cannot reach the host's Quote Generation Service over vsock: {exc}") from exc
    major, _minor, msg_type, total, error = struct.unpack_from("<HHIII", resp, 0)
    if major != 1 or msg_type != _QGS_GET_QUOTE_RESP or total != size:
        raise QuoteGenerationError("QGS reply is not a GET_QUOTE response")
    if error:
        raise QuoteGenerationError(f"QGS failed to generate a quote (error 0x{error:x})")
    id_size, quote_size = struct.unpack_from("<II", resp, 16)
    start = 24 + id_size
    if start + quote_size != size or quote_size == 0:
        raise QuoteGenerationError("QGS reply sizes are inconsistent")
    return resp[start : start + quote_size]


class TdxPlatform(HostToldIdentity):
    """A TDX guest (implements `teecloud.tee.base.TeePlatform`). Paths are parameters so tests can point
    them at a fake tree."""

    def __init__(
        self,
        *,
        tsm_root: Path = DEFAULT_TSM_REPORT_ROOT,
        measurements_dir: Path = DEFAULT_MEASUREMENTS_DIR,
        device: Path = DEFAULT_DEVICE,
        ccel_path: Path = DEFAULT_CCEL,
        event_log_path: Path = DEFAULT_EVENT_LOG,
        fs: TsmFs | None = None,
        qgs_connect: Callable[[], socket.socket] = _vsock_qgs_connect,
        sys_config: Path = DEFAULT_SYS_CONFIG,
    ) -> None:
        self.tsm_root = Path(tsm_root)
        self.measurements_dir = Path(measurements_dir)
        self.device = Path(device)
        self.ccel_path = Path(ccel_path)
        self.event_log_path = Path(event_log_path)
        self._tsm = TsmReport(self.tsm_root, expected_provider=TSM_PROVIDER_TDX, fs=fs)
        self._qgs_connect = qgs_connect
        self.sys_config_path = Path(sys_config)

    @property
    def kind(self) -> str:
        return "tdx"

    def sealing_secret(self) -> bytes:
        raise TeeUnavailable(
            "a TDX guest has no hardware sealing key: a KMS on TDX gets its keys from other KMS nodes "
            "(onboarding or a threshold share) and cannot seal them to this machine"
        )

    # -- quotes ---------------------------------------------------------------------------------------

    def quote(self, report_data: bytes) -> bytes:
        rd = _check_report_data(report_data)
        if self.tsm_root.is_dir():
            quote = self._tsm.get(rd).outblob
        elif self.device.exists():
            quote = qgs_get_quote(self.td_report(rd), self._qgs_connect)
        else:
            raise TeeUnavailable(
                f"no TDX quote interface: neither configfs-tsm ({self.tsm_root}) nor {self.device} exists"
            )
        # Defence in depth: the quote must carry exactly the report_data we asked for.
        if td_report_fields_from_quote(quote)["report_data"] != rd:
            raise QuoteGenerationError("the TDX quote does not carry the requested report_data")
        return quote

    def td_report(self, report_data: bytes) -> bytes:
        """The 1024-byte TDREPORT from /dev/tdx_guest (TDX_CMD_GET_REPORT0)."""
        import array

        rd = _check_report_data(report_data)
        buf = array.array("B", rd + bytes(_TDREPORT_LEN))
        try:
            fd = os.open(self.device, os.O_RDWR)
        except OSError as exc:
            raise TeeUnavailable(f"cannot open {self.device}: {exc}") from exc
        try:
            fcntl.ioctl(fd, _TDX_CMD_GET_REPORT0, buf, True)
        except OSError as exc:
            raise QuoteGenerationError(f"TDX_CMD_GET_REPORT0 failed: {exc}") from exc
        finally:
            os.close(fd)
        return buf.tobytes()[64:]

    # -- measurements ---------------------------------------------------------------------------------

    def _mr_file(self, name: str) -> Path:
        return self.measurements_dir / f"{name}:sha384"

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        if not isinstance(index, int) or not 0 <= index <= 3:
            raise TeeUsageError(f"RTMR index must be 0..3, not {index!r}")
        if not isinstance(digest, bytes | bytearray) or len(digest) > 48:
            raise TeeUsageError("an RTMR digest is at most 48 bytes")
        path = self._mr_file(f"rtmr{index}")
        if not path.exists():
            raise TeeUnavailable(
                f"cannot extend RTMR{index}: {path} does not exist (needs the tdx_guest measurement "
                f"registers in sysfs, Linux >= 6.16)"
            )
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, bytes(digest).ljust(48, b"\x00"))
            finally:
                os.close(fd)
        except PermissionError as exc:
            raise TeeError(f"RTMR{index} is not writable by this process/kernel: {exc}") from exc
        except OSError as exc:
            raise QuoteGenerationError(f"extending RTMR{index} failed: {exc}") from exc

    def emit_event(self, name: str, payload: bytes) -> None:
        _check_event(name, payload)
        digest = runtime_event_digest(name, bytes(payload))
        entry = EventLogEntry(3, RUNTIME_EVENT_TYPE, digest, name, bytes(payload))
        self.event_log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.event_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # extension order == line order, across processes
            self.extend_rtmr(3, digest)
            os.write(fd, (json.dumps(entry.to_json(), separators=(",", ":")) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    def runtime_events(self) -> list[EventLogEntry]:
        if not self.event_log_path.exists():
            return []
        out = []
        for n, line in enumerate(self.event_log_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(
                    EventLogEntry(
                        imr=int(d["imr"]),
                        event_type=int(d["event_type"]),
                        digest=bytes.fromhex(d["digest"]),
                        event=str(d["event"]),
                        event_payload=bytes.fromhex(d["event_payload"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise TeeError(f"{self.event_log_path} line {n} is not a valid event: {exc}") from exc
        return out

    def event_log(self) -> list[EventLogEntry]:
        boot: list[EventLogEntry] = []
        if self.ccel_path.exists():
            boot = parse_ccel(self.ccel_path.read_bytes())
        return boot + self.runtime_events()

    def measurements(self) -> dict[str, bytes]:
        names = ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"]
        if all(self._mr_file(n).exists() for n in names):
            out = {}
            for n in names:
                raw = self._mr_file(n).read_bytes()
                # sysfs gives the raw 48 bytes; accept a hex rendering too.
                out[n] = raw if len(raw) == 48 else bytes.fromhex(raw.decode().strip())
            return out
        fields = td_report_fields_from_quote(self.quote(hashlib.sha512(b"teecloud measurements").digest()))
        return {n: fields[n] for n in names}
