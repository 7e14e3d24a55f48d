"""RTMR0's three ACPI events computed from the tables QEMU itself builds for a VM shape.

TDVF measures QEMU's ACPI blobs as it downloads them over fw_cfg, before its table loader patches them
(OvmfPkg QemuFwCfgAcpiPlatformDxe; event type EV_PLATFORM_CONFIG_FLAGS, payload "ACPI DATA"): the fw_cfg
file `etc/table-loader` (QEMU's linker/loader commands, 128 bytes each, padded to 4 KiB), then each blob
an ALLOCATE command names — `etc/acpi/rsdp` and `etc/acpi/tables` — whole, as fw_cfg serves it. So the
three digests are SHA-384 of those three fw_cfg files (teecloud.image.tdx.AcpiDigests, in RTMR0's order).

    acpi_digests(fwcfg) -> AcpiDigests            the three files, checked, hashed
    dumper_initramfs(modules_dir=, busybox=) -> bytes   a guest that prints them (fw_cfg sysfs) on its serial
    dump_argv(shape_argv, kernel=, initrd=) -> argv      the VM's own QEMU argv, booting the dumper under TCG
    parse_dump(serial) -> {fw_cfg name: bytes}
    plain_q35_argv(vcpus=, memory_mb=, bios=) -> argv     dstack-vmm's no-TEE machine line, no devices
    qemu_acpi_files(shape_argv, kernel=, modules_dir=, busybox=) -> {fw_cfg name: bytes}   runs it (TCG)

The tables depend on the QEMU version, the machine options and every device (CPUs, memory, PCI devices,
the confidential-guest object) and on what the firmware programmed before its first read of them (QEMU
builds them once, on that read): the dump must run the same QEMU, with the VM's own device layout and
firmware, as the CVM. QEMU 7.2 (Debian 12) has no tdx-guest object, so the tables it builds are those of a
plain q35 VM of the shape, not a TD's; a TD's need the TDX-capable QEMU the host runs (docs/node.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import re
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from teecloud.image.errors import ImageFormatError
from teecloud.image.initramfs import Entry, build_initramfs
from teecloud.image.tdx import AcpiDigests
from teecloud.image.testguest import module_load_order

__all__ = [
    "DUMP_CMDLINE",
    "FWCFG_FILES",
    "acpi_digests",
    "dump_argv",
    "dumper_initramfs",
    "parse_dump",
    "plain_q35_argv",
    "qemu_acpi_files",
]

LOADER, RSDP, TABLES = "etc/table-loader", "etc/acpi/rsdp", "etc/acpi/tables"
FWCFG_FILES = (LOADER, RSDP, TABLES)
MAX_LOADER = 64 * 1024
MAX_TABLES = 2 * 1024 * 1024
MAX_SERIAL = 8 * 1024 * 1024  # the dump's console: base64 of at most ~2.1 MiB, and boot noise
DUMP_TIMEOUT = 300.0
DUMP_CMDLINE = "console=ttyS0 quiet loglevel=0 panic=-1"
_COMMAND = 128
_FILE_NAME = 56  # BiosLinkerLoaderEntry's file fields (QEMU hw/acpi/bios-linker-loader.c)
# command types: 0 = padding, 1 ALLOCATE, 2 ADD_POINTER, 3 ADD_CHECKSUM, 4 WRITE_POINTER
_ALLOCATE, _ADD_POINTER, _ADD_CHECKSUM, _WRITE_POINTER = 1, 2, 3, 4
_BEGIN = re.compile(r"@@ACPI-BEGIN ([A-Za-z/-]{1,40}) (\d{1,8})$")  # the firmware's screen codes may precede


def _name(raw: bytes) -> str:
    text = raw.split(b"\0", 1)[0]
    if not text or not re.fullmatch(rb"[A-Za-z0-9_./-]+", text):
        raise ImageFormatError(f"{LOADER}: a command names no fw_cfg file")
    return text.decode()


def _check_loader(loader: bytes) -> set[str]:
    """The fw_cfg files the loader allocates; every pointer and checksum names an allocated file."""
    if not 0 < len(loader) <= MAX_LOADER or len(loader) % _COMMAND:
        raise ImageFormatError(f"{LOADER} is {len(loader)} bytes, not a whole number of 128-byte commands")
    allocated: set[str] = set()
    for off in range(0, len(loader), _COMMAND):
        kind = struct.unpack_from("<I", loader, off)[0]
        body = loader[off + 4 : off + _COMMAND]
        if kind == 0:
            continue
        if kind == _ALLOCATE:
            allocated.add(_name(body[:_FILE_NAME]))
        elif kind in (_ADD_POINTER, _WRITE_POINTER):
            named = {_name(body[:_FILE_NAME]), _name(body[_FILE_NAME : 2 * _FILE_NAME])}
            if kind == _ADD_POINTER and not named <= allocated:
                raise ImageFormatError(f"{LOADER}: a pointer into a file not allocated before it")
        elif kind == _ADD_CHECKSUM:
            if _name(body[:_FILE_NAME]) not in allocated:
                raise ImageFormatError(f"{LOADER}: a checksum over a file not allocated before it")
        else:
            raise ImageFormatError(f"{LOADER}: unknown command type {kind}")
    return allocated


def acpi_digests(fwcfg: Mapping[str, bytes]) -> AcpiDigests:
    """RTMR0's ACPI digests from QEMU's three fw_cfg files (module docstring), after checking that they are
    what their names say: a loader that allocates the RSDP and the tables, an RSDP of ACPI revision 0 or 2,
    tables that start with an ACPI table header."""
    loader, rsdp, tables = (fwcfg.get(n, b"") for n in FWCFG_FILES)
    if not {RSDP, TABLES} <= _check_loader(loader):
        raise ImageFormatError(f"{LOADER} does not allocate {RSDP} and {TABLES}")
    if len(rsdp) not in (20, 36) or not rsdp.startswith(b"RSD PTR "):
        raise ImageFormatError(f"{RSDP} is not an ACPI RSDP (20 or 36 bytes, 'RSD PTR ')")
    if not 36 <= len(tables) <= MAX_TABLES or not re.fullmatch(rb"[A-Z0-9_]{4}", tables[:4]):
        raise ImageFormatError(f"{TABLES} does not start with an ACPI table header")
    return AcpiDigests(*(hashlib.sha384(b).digest() for b in (loader, rsdp, tables)))


_INIT = """#!/bin/busybox sh
# teecloud ACPI dumper (teecloud.image.acpi): prints QEMU's fw_cfg ACPI files, then powers off
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko; done
sleep 0.2
dump() {{
  echo "@@ACPI-BEGIN $1 $(wc -c < "$2")"; base64 "$2"; echo "@@ACPI-END $1"
}}
for f in etc/table-loader etc/acpi/rsdp etc/acpi/tables; do
  dump "$f" /sys/firmware/qemu_fw_cfg/by_name/$f/raw
done
dump installed/DSDT /sys/firmware/acpi/tables/DSDT
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
log=/sys/kernel/security/tpm0/binary_bios_measurements
[ -r $log ] && cat $log > /tpm-log && dump installed/tpm-log /tpm-log
echo "@@ACPI-DONE"
poweroff -f
"""


def dumper_initramfs(*, modules_dir: Path, busybox: Path) -> bytes:
    """A guest (busybox and the kernel's qemu_fw_cfg module) that prints the three fw_cfg files, the DSDT
    the firmware installed and, when the VM has a TPM, the firmware's TCG event log (cross-checks), base64
    between markers on its console."""
    if not busybox.is_file():
        raise ImageFormatError(f"{busybox} is missing (Debian package busybox-static)")
    kos = module_load_order(modules_dir, ("qemu_fw_cfg",))
    entries = {
        "bin/busybox": Entry.file(busybox.read_bytes(), 0o755),
        "init": Entry.file(_INIT.format(modules=" ".join(p.stem for p in kos)).encode(), 0o755),
    }
    for d in ("proc", "sys", "dev"):
        entries[d] = Entry.directory()
    for p in kos:
        entries[f"lib/modules/{p.name}"] = Entry.file(p.read_bytes())
    return build_initramfs(entries, level=6)


# options of the VM's argv that the dump replaces or drops (boot files, consoles, control sockets, KVM)
_DROPPED = {
    "-kernel",
    "-initrd",
    "-append",
    "-serial",
    "-chardev",
    "-qmp",
    "-monitor",
    "-daemonize",
    "-pidfile",
}


def dump_argv(shape_argv: Sequence[str], *, kernel: Path, initrd: Path) -> list[str]:
    """The VM's QEMU argv (its machine, CPUs, memory, devices and firmware: what the tables depend on) with
    the dumper as the boot files, the console on stdio, under TCG."""
    # the console's chardevs go with -serial; others (a TPM's socket) are devices of the shape and stay
    consoles = {v.removeprefix("chardev:") for o, v in itertools.pairwise(shape_argv) if o == "-serial"}
    argv = list(shape_argv[:1])
    i = 1
    while i < len(shape_argv):
        opt = shape_argv[i]
        value = shape_argv[i + 1] if i + 1 < len(shape_argv) else ""
        chardev_id = dict(p.split("=", 1) for p in value.split(",") if "=" in p).get("id")
        if opt == "-chardev" and chardev_id not in consoles:
            argv += [opt, value]
            i += 2
            continue
        if opt in _DROPPED:
            i += 1 if opt == "-daemonize" else 2
            continue
        if opt == "-accel":
            i += 2
            continue
        argv.append(opt)
        i += 1
    append = DUMP_CMDLINE
    return [
        *argv,
        "-accel",
        "tcg",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
    ]


def parse_dump(serial: str) -> dict[str, bytes]:
    """The files between the dumper's markers; each must decode to the size it announced."""
    if "@@ACPI-DONE" not in serial:
        raise ImageFormatError("the ACPI dumper did not finish (no @@ACPI-DONE on its console)")
    out: dict[str, bytes] = {}
    lines = serial.replace("\r", "").split("\n")
    i = 0
    while i < len(lines):
        m = _BEGIN.search(lines[i].strip())
        i += 1
        if m is None:
            continue
        name, size = m.group(1), int(m.group(2))
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != f"@@ACPI-END {name}":
            body.append(lines[i].strip())
            i += 1
        try:
            data = base64.b64decode("".join(body), validate=True)
        except (binascii.Error, ValueError):
            raise ImageFormatError(f"the dump of {name} is not base64") from None
        if len(data) != size:
            raise ImageFormatError(f"the dump of {name} has {len(data)} bytes, announced {size}")
        out[name] = data
    return out


def plain_q35_argv(*, vcpus: int, memory_mb: int, bios: Path, qemu: str = "qemu-system-x86_64") -> list[str]:
    """A VM shape with no devices: the machine line dstack-vmm gives a no-TEE VM (q35, split irqchip, no
    HPET), its CPUs, memory and firmware."""
    if not 1 <= vcpus <= 512 or not 64 <= memory_mb <= 4 << 20:
        raise ImageFormatError("vcpus must be in 1..512 and memory in 64 MiB..4 TiB")
    return [
        qemu,
        "-machine",
        "q35,kernel-irqchip=split,hpet=off",
        "-smp",
        str(vcpus),
        "-m",
        str(memory_mb),
        "-bios",
        str(bios),
        "-nographic",
        "-nodefaults",
    ]


def qemu_acpi_files(
    shape_argv: Sequence[str],
    *,
    kernel: Path,
    modules_dir: Path,
    busybox: Path,
    timeout: float = DUMP_TIMEOUT,
) -> dict[str, bytes]:
    """Boot the dumper in the VM's shape under TCG (seconds; bounded by `timeout` and MAX_SERIAL of console)
    and return what it printed: the three fw_cfg files and the DSDT the firmware installed."""
    with tempfile.TemporaryDirectory(prefix="teecloud-acpi-") as tmp:
        initrd = Path(tmp) / "dumper.cpio.gz"
        initrd.write_bytes(dumper_initramfs(modules_dir=modules_dir, busybox=busybox))
        argv = dump_argv(shape_argv, kernel=kernel, initrd=initrd)
        try:
            proc = subprocess.run(
                argv, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise ImageFormatError(f"the ACPI dump VM did not finish in {timeout:.0f} s") from None
        except OSError as exc:
            raise ImageFormatError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if len(proc.stdout) > MAX_SERIAL:
        raise ImageFormatError(f"the ACPI dump VM printed more than {MAX_SERIAL} bytes")
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip()[-300:]
        raise ImageFormatError(f"QEMU exited with status {proc.returncode}: {why}")
    return parse_dump(proc.stdout.decode("utf-8", "replace"))
