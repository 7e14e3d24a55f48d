"""A simulated Intel TDX platform that produces real DCAP v4 quotes under a local development root CA.

Unlike dstack's simulator (which patches report_data into a recorded quote, so the signature no longer
verifies), every quote made here verifies with the same code that checks hardware quotes, and with
`dcap_qvl.verify_with_root_ca`, when and only when the installation's dev root is trusted. Intel's root
never accepts them, and teecloud's verifier rejects them by default ("signed by a development root, not by
Intel").

State on disk, `data_home()/simulated-tee/` (one per installation):
    root_ca.der, root_ca.key.pem         the dev root CA (subject CN "teecloud Development Root CA <tag>")
    platform_ca.der, platform_ca.key.pem PCK platform CA (issues the PCK certificate, signs the PCK CRL)
    tcb_signing.der, tcb_signing.key.pem signs tcbInfo and qeIdentity
    pck.der, pck.key.pem                 PCK certificate (SGX extension: PPID, TCB, PCEID, FMSPC, type)
    attestation_key.pem                  the simulated QE's attestation key
    platform.json                        PPID, FMSPC, creation time
    collateral/<FMSPC>.json              fresh QuoteCollateralV3 JSON (derived; re-signed when stale)
The key set is created once, atomically (built in a temporary directory, then renamed into place), and is
never regenerated over existing files: incomplete or corrupt state raises SimulatedTeeStateError.

Measurements (per instance = per simulated CVM, in memory): MRTD and RTMR0-2 are derived from the OS image
hash (`os_image_hash` = sha256 of a small JSON manifest naming the image, the on-chain identifier), RTMR0-2
by extending digest-only event-log entries so the event log replays to them; RTMR0 also reads the VM shape
(cpu_count, memory_size). `reference_measurements(os_image_hash, ...)` gives the expected values for a
verifier (the KMS). RTMR3 starts at zero and grows with `emit_event` (dstack runtime events).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import struct
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud._fs import atomic_write, data_home
from teecloud.attestation.models import EventLogEntry
from teecloud.tee import _dcap_builder as dcap
from teecloud.tee.errors import SimulatedTeeStateError, TeeUsageError

__all__ = [
    "DEV_ROOT_CN_PREFIX",
    "RUNTIME_EVENT_TYPE",
    "SimulatedTdx",
    "os_image_hash_for",
    "reference_measurements",
    "runtime_event_digest",
    "simulated_os_image_reference",
]

DEV_ROOT_CN_PREFIX = dcap.DEV_ROOT_CN_PREFIX
RUNTIME_EVENT_TYPE = 0x08000001  # dstack cc-eventlog runtime event (imr 3)
STATE_DIR_NAME = "simulated-tee"
MAX_EVENT_NAME_BYTES = 256
MAX_EVENT_PAYLOAD_BYTES = 1 << 20
# Collateral is re-signed when it would expire within this margin (or was issued in the future).
COLLATERAL_REFRESH_MARGIN = dt.timedelta(days=7)

_KEY_FILES = {
    "root": ("root_ca.der", "root_ca.key.pem"),
    "platform": ("platform_ca.der", "platform_ca.key.pem"),
    "tcb": ("tcb_signing.der", "tcb_signing.key.pem"),
    "pck": ("pck.der", "pck.key.pem"),
}
_ATT_KEY_FILE = "attestation_key.pem"
_PLATFORM_FILE = "platform.json"
_PKI_FILES = (*[f for pair in _KEY_FILES.values() for f in pair], _ATT_KEY_FILE, _PLATFORM_FILE)

# TCG PC Client event types used for the simulated firmware/boot measurements (digest-only entries).
_EV_SEPARATOR = 0x4
_EV_EVENT_TAG = 0x6
_EV_PLATFORM_CONFIG_FLAGS = 0xA
_EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
_EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003


def os_image_hash_for(os_image: str) -> bytes:
    """sha256 of the simulated image's manifest (stands in for dstack's sha256(sha256sum.txt))."""
    manifest = {"kind": "teecloud-simulated-os-image", "name": os_image, "version": 1}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).digest()


def runtime_event_digest(name: str, payload: bytes) -> bytes:
    """dstack runtime event digest (v1): SHA384(le32(0x08000001) || ":" || name || ":" || payload)."""
    return hashlib.sha384(
        struct.pack("<I", RUNTIME_EVENT_TYPE) + b":" + name.encode() + b":" + payload
    ).digest()


def _extend(register: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(register + digest.ljust(48, b"\x00")).digest()


def _image_mrtd(os_image_hash: bytes) -> bytes:
    """Stand-in for the TDVF firmware measurement (MRTD): a function of the OS image only."""
    return hashlib.sha384(b"teecloud-sim:mrtd:" + os_image_hash).digest()


def _boot_measurements(
    os_image_hash: bytes, cpu_count: int, memory_size: int
) -> list[tuple[int, int, bytes]]:
    """Stand-ins for firmware (RTMR0: config, ACPI tables depending on CPU/memory), kernel (RTMR1) and
    command line + initrd (RTMR2); all a deterministic function of the OS image and VM shape. Only the
    RTMR0 ACPI entry reads the VM shape, as on TDX (QEMU builds the ACPI tables from it)."""

    def d(label: str, extra: bytes = b"") -> bytes:
        return hashlib.sha384(b"teecloud-sim:" + label.encode() + b":" + os_image_hash + extra).digest()

    shape = struct.pack("<IQ", cpu_count, memory_size)
    return [
        (0, _EV_EFI_VARIABLE_DRIVER_CONFIG, d("secure-boot-config")),
        (0, _EV_PLATFORM_CONFIG_FLAGS, d("acpi-tables", shape)),
        (0, _EV_SEPARATOR, d("separator-0")),
        (1, _EV_EFI_BOOT_SERVICES_APPLICATION, d("kernel")),
        (1, _EV_SEPARATOR, d("separator-1")),
        (2, _EV_EVENT_TAG, d("kernel-cmdline")),
        (2, _EV_EVENT_TAG, d("initrd")),
    ]


def _check_vm_shape(cpu_count: object, memory_size: object) -> tuple[int, int]:
    for name, value, limit in (("cpu_count", cpu_count, 0xFFFFFFFF), ("memory_size", memory_size, 2**64 - 1)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise TeeUsageError(f"{name} must be a positive integer of at most {limit}, not {value!r}")
    assert isinstance(cpu_count, int) and isinstance(memory_size, int)
    return cpu_count, memory_size


def reference_measurements(
    os_image_hash: bytes, *, cpu_count: int | None = None, memory_size: int | None = None
) -> dict[str, bytes]:
    """The registers a `SimulatedTdx` booted from the image `os_image_hash` (the on-chain identifier,
    `os_image_hash_for(name)`) has right after its boot measurements, before any runtime event.

    Always `mrtd`, `rtmr1` (kernel) and `rtmr2` (command line + initrd): they depend on the image only.
    `rtmr0` (firmware configuration, ACPI tables) also depends on the VM shape, so it is included only when
    both `cpu_count` and `memory_size` are given. RTMR3 is not a reference value (runtime events).
    This is the simulator's counterpart of dstack-mr for real images; it is the one place that formula
    lives (SimulatedTdx boots through the same helpers)."""
    if not isinstance(os_image_hash, bytes) or len(os_image_hash) != 32:
        raise TeeUsageError("os_image_hash must be 32 bytes")
    if (cpu_count is None) != (memory_size is None):
        raise TeeUsageError("give both cpu_count and memory_size (for rtmr0), or neither")
    with_shape = cpu_count is not None
    cpus, memory = _check_vm_shape(cpu_count, memory_size) if with_shape else (1, 1)
    rtmrs = [bytes(48) for _ in range(3)]
    for imr, _event_type, digest in _boot_measurements(os_image_hash, cpus, memory):
        rtmrs[imr] = _extend(rtmrs[imr], digest)
    out = {"mrtd": _image_mrtd(os_image_hash), "rtmr1": rtmrs[1], "rtmr2": rtmrs[2]}
    if with_shape:
        out["rtmr0"] = rtmrs[0]
    return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------------------------------------
# Persistent PKI


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _create_state(state_dir: Path, tcb: dcap.SimulatedTcb) -> None:
    """Create the PKI in a fresh temporary directory, then rename it into place (atomic for readers and
    for a concurrent creator: exactly one rename wins, the loser loads the winner's files)."""
    now = _now()
    identity = dcap.PlatformIdentity(ppid=secrets.token_bytes(16), fmspc=secrets.token_bytes(6))
    install_tag = secrets.token_hex(4)
    pki = dcap.build_pki(
        identity=identity,
        tcb=tcb,
        now=now,
        install_tag=install_tag,
        serials=[secrets.randbits(120) + 1 for _ in range(4)],
    )
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=state_dir.parent, prefix=f".{STATE_DIR_NAME}.", suffix=".tmp"))
    try:
        pairs = {
            "root": (pki.root_cert, pki.root_key),
            "platform": (pki.platform_cert, pki.platform_key),
            "tcb": (pki.tcb_cert, pki.tcb_key),
            "pck": (pki.pck_cert, pki.pck_key),
        }
        for role, (cert, key) in pairs.items():
            cert_file, key_file = _KEY_FILES[role]
            atomic_write(tmp / cert_file, cert.public_bytes(serialization.Encoding.DER), mode=0o644)
            atomic_write(tmp / key_file, _pem_key(key))
        atomic_write(tmp / _ATT_KEY_FILE, _pem_key(pki.attestation_key))
        platform = {
            "version": 1,
            "ppid": identity.ppid.hex(),
            "fmspc": identity.fmspc.hex().upper(),
            "install_tag": install_tag,
            "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "note": "teecloud simulated TDX platform: development only, NOT an Intel platform",
        }
        atomic_write(tmp / _PLATFORM_FILE, (json.dumps(platform, indent=2) + "\n").encode(), mode=0o644)
        os.chmod(tmp, 0o700)
        try:
            os.rename(tmp, state_dir)  # replaces an empty directory; fails if state_dir has content
        except OSError as exc:
            if not (state_dir / "root_ca.der").exists():
                raise _corrupt(state_dir, f"cannot create it: {exc}") from exc
            # Someone else created the state first: keep theirs.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _corrupt(state_dir: Path, detail: str) -> SimulatedTeeStateError:
    return SimulatedTeeStateError(
        f"the simulated TEE state in {state_dir} is incomplete or corrupt ({detail}); it was left untouched. "
        f"Move that directory aside to create a new development root CA on next use (quotes and collateral "
        f"made under the old root will then no longer verify)."
    )


def _load_state(state_dir: Path) -> tuple[dcap.Pki, dcap.PlatformIdentity]:
    missing = [f for f in _PKI_FILES if not (state_dir / f).is_file()]
    if missing:
        raise _corrupt(state_dir, "missing " + ", ".join(missing))
    try:
        loaded: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}
        for role, (cert_file, key_file) in _KEY_FILES.items():
            cert = x509.load_der_x509_certificate((state_dir / cert_file).read_bytes())
            key = serialization.load_pem_private_key((state_dir / key_file).read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
                raise ValueError(f"{key_file} is not a P-256 private key")
            if cert.public_key() != key.public_key():
                raise ValueError(f"{key_file} does not match {cert_file}")
            loaded[role] = (cert, key)
        att = serialization.load_pem_private_key((state_dir / _ATT_KEY_FILE).read_bytes(), password=None)
        if not isinstance(att, ec.EllipticCurvePrivateKey) or not isinstance(att.curve, ec.SECP256R1):
            raise ValueError(f"{_ATT_KEY_FILE} is not a P-256 private key")
        root, platform, tcb_cert, pck = (loaded[r][0] for r in ("root", "platform", "tcb", "pck"))
        cn = root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if not cn or not str(cn[0].value).startswith(DEV_ROOT_CN_PREFIX):
            raise ValueError(
                f"root_ca.der is not a teecloud development root (CN must start {DEV_ROOT_CN_PREFIX!r})"
            )
        root.verify_directly_issued_by(root)
        platform.verify_directly_issued_by(root)
        tcb_cert.verify_directly_issued_by(root)
        pck.verify_directly_issued_by(platform)
        meta = json.loads((state_dir / _PLATFORM_FILE).read_text())
        identity = dcap.PlatformIdentity(ppid=bytes.fromhex(meta["ppid"]), fmspc=bytes.fromhex(meta["fmspc"]))
        if len(identity.ppid) != 16 or len(identity.fmspc) != 6:
            raise ValueError("platform.json: ppid must be 16 bytes and fmspc 6 bytes")
        ext = pck.extensions.get_extension_for_oid(x509.ObjectIdentifier(dcap.SGX_EXTENSION_OID)).value
        raw_ext = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
        if identity.ppid not in raw_ext or identity.fmspc not in raw_ext:
            raise ValueError("platform.json does not match the PCK certificate's SGX extension")
    except SimulatedTeeStateError:
        raise
    except Exception as exc:  # any parse/verify failure is reported, never "repaired"
        raise _corrupt(state_dir, f"{type(exc).__name__}: {exc}") from exc
    pki = dcap.Pki(
        root_key=loaded["root"][1],
        root_cert=root,
        platform_key=loaded["platform"][1],
        platform_cert=platform,
        tcb_key=loaded["tcb"][1],
        tcb_cert=tcb_cert,
        pck_key=loaded["pck"][1],
        pck_cert=pck,
        attestation_key=att,
    )
    return pki, identity


def open_state(state_dir: Path, tcb: dcap.SimulatedTcb) -> tuple[dcap.Pki, dcap.PlatformIdentity]:
    """Load the installation's simulated platform, creating it on first use (never over existing files)."""
    present = [f for f in _PKI_FILES if (state_dir / f).exists()]
    if not present:
        if state_dir.exists() and any(state_dir.iterdir()):
            raise _corrupt(state_dir, "the directory exists with other content but no dev root")
        _create_state(state_dir, tcb)
    return _load_state(state_dir)


# ---------------------------------------------------------------------------------------------------------


SEALING_SECRET_FILE = "kms-sealing-secret"  # noqa: S105 (a file name)


def simulated_sealing_secret(state_dir: Path) -> bytes:
    """The sealing secret of the simulated platform whose state is `state_dir`, created once (two processes
    racing keep the first one's), never re-created: a corrupt file is an error, not a new secret."""
    path = state_dir / SEALING_SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        atomic_write(tmp, secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # fails if another process created it first: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    data = path.read_bytes()
    if len(data) != 32:
        raise SimulatedTeeStateError(
            f"{path} is corrupt ({len(data)} bytes, expected 32); refusing to re-create it"
        )
    return data


class SimulatedTdx:
    """A simulated TDX CVM (implements `teecloud.tee.base.TeePlatform`).

    `home` is the teecloud data directory (default `data_home()`). Knobs for negative tests elsewhere:
    `debug` sets the TD attributes DEBUG bit, `tcb="OutOfDate"` makes quotes meet only the OutOfDate TCB
    level, `revoked_pck` lists the PCK certificate in the PCK CRL of `collateral()`.
    """

    kind_name = "tdx-simulated"

    def __init__(
        self,
        home: Path | None = None,
        *,
        os_image: str = "teecloud-sim-os-0.1",
        debug: bool = False,
        tcb: Literal["UpToDate", "OutOfDate"] | str = "UpToDate",
        revoked_pck: bool = False,
        cpu_count: int = 2,
        memory_size: int = 2 * 1024**3,
    ) -> None:
        if tcb not in ("UpToDate", "OutOfDate"):
            raise TeeUsageError(f"tcb must be 'UpToDate' or 'OutOfDate', not {tcb!r}")
        if not os_image or len(os_image) > 256:
            raise TeeUsageError("os_image must be a non-empty name of at most 256 characters")
        self._home = Path(home) if home is not None else data_home()
        self._state_dir = self._home / STATE_DIR_NAME
        self._tcb = dcap.SimulatedTcb()
        self._pki, self._identity = open_state(self._state_dir, self._tcb)
        self._builder = dcap.QuoteBuilder(self._pki, self._tcb)
        self._debug = debug
        self._out_of_date = tcb == "OutOfDate"
        self._revoked = revoked_pck
        self._os_image = os_image
        self._os_image_hash = os_image_hash_for(os_image)
        self._cpu_count, self._memory_size = _check_vm_shape(cpu_count, memory_size)
        self._lock = threading.Lock()
        self._collateral_lock = threading.Lock()
        self._revoked_collateral: tuple[dt.datetime, bytes] | None = None
        self._cached_collateral: tuple[dt.datetime, bytes] | None = None
        self._mrtd = _image_mrtd(self._os_image_hash)
        self._rtmrs = [bytes(48) for _ in range(4)]
        self._log: list[EventLogEntry] = []
        for imr, event_type, digest in self._boot_measurements():
            self._rtmrs[imr] = _extend(self._rtmrs[imr], digest)
            self._log.append(EventLogEntry(imr=imr, event_type=event_type, digest=digest))

    def _boot_measurements(self) -> list[tuple[int, int, bytes]]:
        """The firmware/kernel/initrd measurements of this CVM (see `reference_measurements`). A subclass
        may override it to simulate a CVM that booted something other than its claimed image."""
        return _boot_measurements(self._os_image_hash, self._cpu_count, self._memory_size)

    # -- TeePlatform ----------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.kind_name

    def quote(self, report_data: bytes) -> bytes:
        """A TDX DCAP quote v4 binding `report_data` (<= 64 bytes, zero-padded, never hashed)."""
        report_data = _check_report_data(report_data)
        with self._lock:
            rtmrs = list(self._rtmrs)
        td_report = self._builder.td_report(
            report_data=report_data,
            mrtd=self._mrtd,
            rtmrs=rtmrs,
            debug=self._debug,
            out_of_date=self._out_of_date,
        )
        return self._builder.quote(td_report)

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        """Extend RTMR `index` (0-3) without an event-log entry (callers that want a replayable log use
        `emit_event`)."""
        if not isinstance(index, int) or not 0 <= index <= 3:
            raise TeeUsageError(f"RTMR index must be 0..3, not {index!r}")
        if not isinstance(digest, bytes | bytearray) or len(digest) > 48:
            raise TeeUsageError("an RTMR digest is at most 48 bytes")
        with self._lock:
            self._rtmrs[index] = _extend(self._rtmrs[index], bytes(digest))

    def emit_event(self, name: str, payload: bytes) -> None:
        _check_event(name, payload)
        digest = runtime_event_digest(name, bytes(payload))
        entry = EventLogEntry(
            imr=3, event_type=RUNTIME_EVENT_TYPE, digest=digest, event=name, event_payload=bytes(payload)
        )
        with self._lock:
            self._rtmrs[3] = _extend(self._rtmrs[3], digest)
            self._log.append(entry)

    def event_log(self) -> list[EventLogEntry]:
        with self._lock:
            return list(self._log)

    def measurements(self) -> dict[str, bytes]:
        with self._lock:
            rtmrs = list(self._rtmrs)
        return {"mrtd": self._mrtd, **{f"rtmr{i}": r for i, r in enumerate(rtmrs)}}

    # -- simulated-platform extras -------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    @property
    def os_image(self) -> str:
        return self._os_image

    @property
    def os_image_hash(self) -> bytes:
        return self._os_image_hash

    @property
    def ppid(self) -> bytes:
        return self._identity.ppid

    @property
    def device_id(self) -> bytes:
        """dstack's TDX device_id: sha256(PPID)."""
        return hashlib.sha256(self._identity.ppid).digest()

    @property
    def fmspc(self) -> str:
        return self._identity.fmspc.hex().upper()

    @property
    def debug(self) -> bool:
        return self._debug

    def sealing_secret(self) -> bytes:
        """This simulated platform's sealing secret: 32 random bytes in its state directory, created on
        first use and never overwritten. Only as strong as the host's file permissions (docs/kms.md)."""
        return simulated_sealing_secret(self._state_dir)

    def dev_root_der(self) -> bytes:
        return self._pki.root_cert.public_bytes(serialization.Encoding.DER)

    def vm_config(self) -> dict[str, Any]:
        """dstack-types VmConfig-shaped description of this simulated CVM."""
        return {
            "spec_version": 1,
            "os_image_hash": self._os_image_hash.hex(),
            "cpu_count": self._cpu_count,
            "memory_size": self._memory_size,
            "qemu_single_pass_add_pages": False,
            "pic": False,
            "pci_hole64_size": 0,
            "num_gpus": 0,
            "num_nvswitches": 0,
            "hugepages": False,
            "hotplug_off": True,
            "qemu_version": "simulated",
        }

    def collateral_path(self) -> Path:
        """Where the current collateral is kept (a `<FMSPC>.json` file, as a PCCS-compatible store reads)."""
        return self._state_dir / "collateral" / f"{self.fmspc}.json"

    def collateral(self, *, now: int | None = None) -> bytes:
        """QuoteCollateralV3 JSON valid at `now` (default: the current time) for at least
        COLLATERAL_REFRESH_MARGIN; re-signed with the same keys when stale."""
        at = dt.datetime.fromtimestamp(now, dt.UTC) if now is not None else _now()
        with self._collateral_lock:
            if self._revoked:
                if self._revoked_collateral and _fresh(self._revoked_collateral[0], at):
                    return self._revoked_collateral[1]
                issue = dcap.collateral_issue_time(at)
                data = self._build_collateral(issue, revoke=True)
                self._revoked_collateral = (issue, data)
                return data
            if self._cached_collateral and _fresh(self._cached_collateral[0], at):
                return self._cached_collateral[1]
            path = self.collateral_path()
            try:
                data = path.read_bytes()
                issue = _collateral_issue(data)
                if _fresh(issue, at) and self._collateral_matches(data):
                    self._cached_collateral = (issue, data)
                    return data
            except (OSError, ValueError, KeyError):
                pass  # missing or unreadable derived file: rebuild it below
            issue = dcap.collateral_issue_time(at)
            data = self._build_collateral(issue, revoke=False)
            if now is None:
                atomic_write(path, data, mode=0o644)
                self._cached_collateral = (issue, data)
            return data

    def _build_collateral(self, issue: dt.datetime, *, revoke: bool) -> bytes:
        col = dcap.build_collateral(
            self._pki,
            fmspc=self._identity.fmspc,
            tcb=self._tcb,
            issue=issue,
            revoke_pck=revoke,
            crl_number=int(issue.timestamp()),
        )
        return (json.dumps(col, indent=2) + "\n").encode()

    def _collateral_matches(self, data: bytes) -> bool:
        root_pem = self._pki.root_cert.public_bytes(serialization.Encoding.PEM).decode()
        col = json.loads(data)
        return isinstance(col, dict) and root_pem in str(col.get("tcb_info_issuer_chain", ""))


def _fresh(issue: dt.datetime, at: dt.datetime) -> bool:
    return issue <= at and at + COLLATERAL_REFRESH_MARGIN <= issue + dcap.COLLATERAL_VALIDITY


def _collateral_issue(data: bytes) -> dt.datetime:
    col = json.loads(data)
    info = json.loads(col["tcb_info"])
    return dt.datetime.strptime(info["issueDate"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes | bytearray | memoryview):
        raise TeeUsageError("report_data must be bytes")
    rd = bytes(report_data)
    if len(rd) > 64:
        raise TeeUsageError(f"report_data is at most 64 bytes, got {len(rd)}")
    return rd.ljust(64, b"\x00")


def _check_event(name: str, payload: bytes) -> None:
    if not isinstance(name, str) or not name:
        raise TeeUsageError("an event name must be a non-empty string")
    if len(name.encode()) > MAX_EVENT_NAME_BYTES:
        raise TeeUsageError(f"an event name is at most {MAX_EVENT_NAME_BYTES} bytes")
    # The digest joins name and payload with ":", so a ":" in the name would make two different
    # (name, payload) pairs measure the same.
    if ":" in name or not name.isprintable():
        raise TeeUsageError(f"event name {name!r} must be printable and must not contain ':'")
    if not isinstance(payload, bytes | bytearray):
        raise TeeUsageError("an event payload must be bytes")
    if len(payload) > MAX_EVENT_PAYLOAD_BYTES:
        raise TeeUsageError(f"an event payload is at most {MAX_EVENT_PAYLOAD_BYTES} bytes")


def simulated_os_image_reference(
    os_image_hash: bytes,
    *,
    cpu_count: int | None = None,
    memory_size: int | None = None,
    vm_config: object = None,
    rtmr0_log: Sequence[bytes] = (),
) -> dict[str, bytes] | None:
    """Reference MRTD, RTMR1 and RTMR2 of a simulated OS image — and RTMR0 for a VM shape (cpu_count,
    memory_size) — in the shape a KMS takes (`KmsService(os_image_reference=...)`), so the KMS holds no copy
    of the simulator's formula. Real images get theirs from their measurement files
    (teecloud.kms.os_images.MeasuredOsImages). None for a malformed hash or shape (the caller refuses).
    `vm_config` and `rtmr0_log` (what a KMS passes with the shape) are not needed: the simulator's RTMR0
    is a function of the shape."""
    if len(os_image_hash) != 32:
        return None
    try:
        return reference_measurements(os_image_hash, cpu_count=cpu_count, memory_size=memory_size)
    except TeeUsageError:
        return None
