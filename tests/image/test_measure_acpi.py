"""RTMR0's ACPI events from the tables QEMU builds (teecloud.image.acpi): the three fw_cfg files TDVF
measures, dumped by a guest booted in the VM's shape under TCG, checked and hashed.

What is checked against what:
- the RSDP event's form (the 20-byte fw_cfg RSDP, checksum 0, "BOCHS ", revision 0, the RSDT's offset in
  the tables blob) against a real TD: one such RSDP hashes to the acpi-rsdp event of the real dstack boot's
  RTMR0 log (shared/vectors/tdx/dstack_quote_report.json), whose quote signs the replayed RTMR0;
- the dump against the firmware: the DSDT that OVMF installed (the guest's /sys/firmware/acpi/tables/DSDT)
  is the dumped tables blob's DSDT with only its checksum byte set by the loader;
- the loader and tables events against the OVMF source's rule only (the whole fw_cfg file, before
  patching): the real boot's tables come from a TDX QEMU 9.2.1 with its devices, which QEMU 7.2 cannot
  build, so no digest of them is reproduced here.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from teecloud.image.acpi import (
    FWCFG_FILES,
    acpi_digests,
    dump_argv,
    parse_dump,
    plain_q35_argv,
    qemu_acpi_files,
)
from teecloud.image.errors import ImageFormatError
from teecloud.image.tdx import AcpiDigests
from teecloud.image.testguest import busybox_path

KERNEL = Path("/var/cache/teecloud/guest-kernel/vmlinuz")
MODULES = Path("/var/cache/teecloud/guest-kernel/modules")
OVMF = Path("/usr/share/ovmf/OVMF.fd")


def _rsdp(rsdt_offset: int) -> bytes:
    return b"RSD PTR \x00BOCHS \x00" + struct.pack("<I", rsdt_offset)


def _cmd(kind: int, *files: str, tail: bytes = b"") -> bytes:
    body = b"".join(f.encode().ljust(56, b"\0") for f in files) + tail
    return (struct.pack("<I", kind) + body).ljust(128, b"\0")


LOADER = (
    _cmd(1, "etc/acpi/tables", tail=struct.pack("<IB", 64, 1))
    + _cmd(1, "etc/acpi/rsdp", tail=struct.pack("<IB", 16, 2))
    + _cmd(2, "etc/acpi/rsdp", "etc/acpi/tables", tail=struct.pack("<IB", 16, 4))
    + _cmd(3, "etc/acpi/rsdp", tail=struct.pack("<III", 8, 0, 20))
).ljust(4096, b"\0")
TABLES = b"FACS" + struct.pack("<I", 64) + bytes(56) + b"DSDT" + bytes(200)
FILES = {"etc/table-loader": LOADER, "etc/acpi/rsdp": _rsdp(64), "etc/acpi/tables": TABLES}


def test_the_rsdp_event_of_a_real_td_is_the_fwcfg_rsdp(vectors: Path) -> None:
    report = json.loads((vectors / "tdx" / "dstack_quote_report.json").read_text())
    rtmr0 = [bytes.fromhex(e["digest"]) for e in json.loads(report["event_log"]) if e["imr"] == 0]
    matches = [off for off in range(0x4000) if hashlib.sha384(_rsdp(off)).digest() == rtmr0[9]]
    assert matches == [0x2612]  # that TD's RSDT sits at 0x2612 in its tables blob


def test_the_digests_are_sha384_of_the_whole_files() -> None:
    d = acpi_digests(FILES)
    assert (d.loader, d.rsdp, d.tables) == tuple(hashlib.sha384(FILES[n]).digest() for n in FWCFG_FILES)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("etc/table-loader", b"", "128-byte commands"),
        ("etc/table-loader", LOADER[:100], "128-byte commands"),
        ("etc/table-loader", _cmd(9).ljust(4096, b"\0"), "unknown command type"),
        (
            "etc/table-loader",
            (_cmd(1, "etc/acpi/tables") + _cmd(1, "etc/x")).ljust(4096, b"\0"),
            "does not allocate",
        ),
        ("etc/table-loader", _cmd(2, "etc/acpi/rsdp", "etc/acpi/tables").ljust(4096, b"\0"), "not allocated"),
        ("etc/table-loader", _cmd(3, "etc/acpi/rsdp").ljust(4096, b"\0"), "not allocated"),
        ("etc/table-loader", _cmd(1, "etc/a\nb").ljust(4096, b"\0"), "names no fw_cfg file"),
        ("etc/table-loader", bytes(128 * 1024), "128-byte commands"),
        ("etc/acpi/rsdp", b"RSD PTR " + bytes(11), "RSDP"),
        ("etc/acpi/rsdp", b"XSD PTR " + bytes(12), "RSDP"),
        ("etc/acpi/tables", b"\0" * 64, "table header"),
        ("etc/acpi/tables", b"DSDT", "table header"),
    ],
)
def test_files_that_are_not_what_their_names_say_are_refused(name: str, value: bytes, reason: str) -> None:
    with pytest.raises(ImageFormatError, match=reason):
        acpi_digests({**FILES, name: value})


def test_the_dump_is_parsed_strictly() -> None:
    b64 = base64.b64encode(_rsdp(0x2612)).decode()
    good = f"\x1b[2J@@ACPI-BEGIN etc/acpi/rsdp 20\r\n{b64}\n@@ACPI-END etc/acpi/rsdp\n@@ACPI-DONE\n"
    assert parse_dump(good) == {"etc/acpi/rsdp": _rsdp(0x2612)}
    for bad in (
        good.replace("@@ACPI-DONE", ""),
        good.replace(" 20\r", " 21\r"),
        good.replace(b64[:4], "!!!!"),
    ):
        with pytest.raises(ImageFormatError):
            parse_dump(bad)


def test_the_dump_boots_the_vms_own_argv_under_tcg() -> None:
    vm = ["qemu-system-x86_64", "-accel", "kvm", "-machine", "q35", "-kernel", "bz", "-initrd", "i"]
    vm += [
        "-append",
        "x",
        "-serial",
        "chardev:com0",
        "-chardev",
        "pty,id=com0",
        "-qmp",
        "unix:q",
        "-daemonize",
    ]
    vm += ["-device", "virtio-net-pci,netdev=n0", "-smp", "4"]
    argv = dump_argv(vm, kernel=Path("/k"), initrd=Path("/d"))
    assert argv[:7] == [
        "qemu-system-x86_64",
        "-machine",
        "q35",
        "-device",
        "virtio-net-pci,netdev=n0",
        "-smp",
        "4",
    ]
    assert argv[7:] == [
        "-accel",
        "tcg",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        "/k",
        "-initrd",
        "/d",
        "-append",
        "console=ttyS0 quiet loglevel=0 panic=-1",
    ]


@pytest.mark.slow
def test_qemu_builds_the_tables_the_firmware_installs_and_they_follow_the_shape() -> None:
    """Two TCG boots of the dumper (run under the e2e lock): plain q35 with OVMF, 1 and 2 vCPUs."""
    for need in (KERNEL, MODULES, OVMF):
        if not need.exists():
            pytest.fail(f"{need} is missing: run scripts/setup.sh")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/setup.sh")
    digests = {}
    for vcpus in (1, 2):
        shape = plain_q35_argv(vcpus=vcpus, memory_mb=2048, bios=OVMF)
        files = qemu_acpi_files(shape, kernel=KERNEL, modules_dir=MODULES, busybox=busybox_path())
        d = acpi_digests(files)
        tables, installed = files["etc/acpi/tables"], files["installed/DSDT"]
        at = tables.find(installed[:9])
        assert at > 0, "the installed DSDT is not in the dumped tables blob"
        raw = tables[at : at + len(installed)]
        assert [i for i in range(len(installed)) if raw[i] != installed[i]] == [9]  # the checksum byte only
        rsdt = struct.unpack_from("<I", files["etc/acpi/rsdp"], 16)[0]
        assert tables[rsdt : rsdt + 4] == b"RSDT"  # the RSDP points at the RSDT in the blob, as in a TD's
        digests[vcpus] = d
    assert digests[1].tables != digests[2].tables  # the MADT (and the DSDT's CPUs) follow the vCPU count


def test_the_acpi_command_refuses_a_bad_shape_before_booting(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app

    for args in (["--vcpus", "0"], ["--memory", "lots"], ["--measurement", str(tmp_path / "absent")]):
        r = CliRunner().invoke(app, ["image", "acpi", *args])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("golden", ["plain-small", "tdx-large", "sev-snp-small"])
def test_the_dump_keeps_every_device_of_the_backends_command_line(golden: str) -> None:
    """The qemu backend's own argv (its golden files, tests/node/data/qemu): everything the tables depend on
    stays (machine, CPUs, memory, firmware, drives, devices, objects, shares), only the boot files, the
    console, the QMP socket and the accelerator change."""
    vm = (Path(__file__).parent.parent / "node" / "data" / "qemu" / f"{golden}.argv").read_text().split("\n")
    vm = [a for a in vm if a]
    argv = dump_argv(vm, kernel=Path("/k"), initrd=Path("/d"))
    dropped = {"-kernel", "-initrd", "-append", "-chardev", "-serial", "-qmp", "-accel"}
    kept = [
        (vm[i], vm[i + 1]) for i in range(1, len(vm) - 1) if vm[i].startswith("-") and vm[i] not in dropped
    ]
    kept = [(opt, value) for opt, value in kept if not value.startswith("-")]
    pairs = list(itertools.pairwise(argv))
    assert all(pair in pairs for pair in kept)
    assert {"-nographic", "-nodefaults"} <= set(argv)
    assert argv.count("-kernel") == argv.count("-initrd") == argv.count("-serial") == 1
    assert "-qmp" not in argv and "-chardev" not in argv and argv[argv.index("-accel") + 1] == "tcg"


def _tcg2_events(log: bytes) -> list[tuple[int, int, dict[int, bytes], bytes]]:
    """(PCR, event type, {algorithm: digest}, event data) of a TCG2 crypto-agile event log (TCG PC Client
    Platform Firmware Profile 10.2: a SHA-1-format first event, then TCG_PCR_EVENT2 records)."""
    sizes = {0x4: 20, 0xB: 32, 0xC: 48, 0xD: 64, 0x12: 32}
    off = 32 + struct.unpack_from("<I", log, 28)[0]
    out = []
    while off + 12 <= len(log):
        pcr, kind, count = struct.unpack_from("<III", log, off)
        off += 12
        digests = {}
        for _ in range(count):
            alg = struct.unpack_from("<H", log, off)[0]
            digests[alg] = log[off + 2 : off + 2 + sizes[alg]]
            off += 2 + sizes[alg]
        size = struct.unpack_from("<I", log, off)[0]
        out.append((pcr, kind, digests, log[off + 4 : off + 4 + size]))
        off += 4 + size
    return out


@pytest.mark.slow
def test_debians_ovmf_logs_rtmr0s_fixed_events_as_its_file_says(tmp_path: Path) -> None:
    """What Debian's OVMF.fd (a built image's firmware) measures, seen through its TCG event log in a VM
    with a software TPM (swtpm; no TDX host here): SecureBoot, PK, KEK, db, dbx, the separator, BootOrder
    and Boot0000 are exactly the digests of teecloud's RTMR0 model for what `secure_boot_variable` reads
    from the firmware file ("00": Debian's logs the variable as one byte 00, where dstack's firmware logs it
    absent, and the model for "absent" differs in that event only), and it logs no ACPI DATA event outside
    a TD. The kernel, command line and initrd events are teecloud's RTMR1/RTMR2 calculators' values, digest
    for digest."""
    import subprocess

    from teecloud.image.acpi import DUMP_CMDLINE, dumper_initramfs
    from teecloud.image.ovmf import secure_boot_variable
    from teecloud.image.tdx import efi_variable_digest, rtmr0_fixed_events, rtmr1_events, rtmr2_events

    swtpm = shutil.which("swtpm")
    if swtpm is None:
        pytest.fail("swtpm is missing: run scripts/setup.sh")
    sock = tmp_path / "swtpm.sock"
    proc = subprocess.Popen(
        [
            swtpm,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={tmp_path}",
            "--ctrl",
            f"type=unixio,path={sock}",
            "--terminate",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        shape = plain_q35_argv(vcpus=1, memory_mb=2048, bios=OVMF)
        shape += ["-chardev", f"socket,id=chrtpm,path={sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm"]
        shape += ["-device", "tpm-tis,tpmdev=tpm0"]
        files = qemu_acpi_files(shape, kernel=KERNEL, modules_dir=MODULES, busybox=busybox_path())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    acpi_digests(files)
    events = _tcg2_events(files["installed/tpm-log"])
    sha384 = [(pcr, kind, d[0xC]) for pcr, kind, d, _ in events]
    detected = secure_boot_variable(OVMF.read_bytes())
    assert detected == "00"
    fixed = rtmr0_fixed_events(detected)
    variables = [d for pcr, kind, d in sha384 if (pcr, kind) == (7, 0x80000001)]
    assert variables == [fixed["secure-boot"], fixed["pk"], fixed["kek"], fixed["db"], fixed["dbx"]]
    guid = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
    assert variables[0] == efi_variable_digest(guid, "SecureBoot", b"\x00")
    assert variables[0] != rtmr0_fixed_events("absent")["secure-boot"]  # dstack's firmware's event
    assert (7, 4, fixed["separator"]) in sha384
    assert [d for pcr, kind, d in sha384 if (pcr, kind) == (1, 0x80000002)] == [
        fixed["boot-order"],
        fixed["boot0000"],
    ]
    assert not [e for e in events if e[1] == 0xA]  # no EV_PLATFORM_CONFIG_FLAGS (ACPI DATA) outside a TD
    # RTMR1 and RTMR2 as teecloud computes them for the kernel, initrd and command line this VM booted
    # (QEMU 7.2 patched the kernel's setup header for 2 GiB and this initrd) are what the firmware measured
    # into PCR 4/5 (RTMR1 in a TD) and PCR 9 (RTMR2): the kernel's Authenticode hash and the fixed events,
    # the command line and the initrd
    initrd = dumper_initramfs(modules_dir=MODULES, busybox=busybox_path())  # reproducible: the VM's bytes
    r1 = rtmr1_events(KERNEL.read_bytes(), initrd_size=len(initrd), memory_bytes=2048 << 20)
    boot = [d for pcr, kind, d in sha384 if pcr in (4, 5) and kind != 4]
    assert boot == [r1[0], r1[1], r1[3], r1[4]] and r1[2] == fixed["separator"]
    assert [d for pcr, kind, d in sha384 if pcr == 9] == rtmr2_events(DUMP_CMDLINE, initrd)


@pytest.mark.slow
def test_the_acpi_command_prints_the_digests_and_rtmr0(tmp_path: Path) -> None:
    """`teecloud image acpi` on a built image's measurement file (Debian's OVMF is a TDVF): the digests of
    the dumped files, and RTMR0 = the replay of the model's 13 events with them."""
    from typer.testing import CliRunner

    from teecloud.cli import app
    from teecloud.image.measurement import encode, measure_tdx_image, parse
    from teecloud.image.tdx import replay, rtmr0_events, sha384, td_hob

    m = measure_tdx_image(
        kernel=KERNEL.read_bytes(),
        initrd=b"\x1f\x8b" + bytes(100),
        cmdline="console=ttyS0",
        tdvf=OVMF.read_bytes(),
    )
    (tmp_path / "m.cbor").write_bytes(encode(m))
    r = CliRunner().invoke(
        app, ["image", "acpi", "--vcpus", "2", "--memory", "2G", "--measurement", str(tmp_path / "m.cbor")]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["sizes"]["etc/acpi/rsdp"] == 20 and doc["sizes"]["etc/table-loader"] % 128 == 0
    digests = tdx_acpi(doc)
    hob = sha384(td_hob(parse(encode(m)).td_hob_witness, 2 << 30))
    assert m.secure_boot == "00"  # Debian's OVMF, detected from the file
    assert doc["rtmr0"] == replay(rtmr0_events(hob, digests, secure_boot="00")).hex()


def tdx_acpi(doc: dict[str, object]) -> AcpiDigests:
    return AcpiDigests(*(bytes.fromhex(str(doc[k])) for k in ("acpi_loader", "acpi_rsdp", "acpi_tables")))
