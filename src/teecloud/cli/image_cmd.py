"""`teecloud image`: guest OS images for the qemu backend.

    teecloud image build [--cache DIR] [--out DIR] [--force] [--lock packages.txt] [--tdvf F]

builds the guest image from Debian packages (teecloud.image.build; cached by recipe hash) and prints its
directory, os_image_hash and recipe hash as JSON. `--tdvf` makes a TDX firmware (OVMF IntelTdx; Debian 12
ships none) the image's firmware, and the image then carries measurement.tdx.cbor (teecloud.image.reference)
for `teecloud kms up --os-images`.

    teecloud image acpi [--vcpus N] [--memory 2G] [--bios F] [--measurement measurement.tdx.cbor]

prints RTMR0's three ACPI digests computed from the tables this host's QEMU builds for a plain q35 VM of
that shape (teecloud.image.acpi: a short TCG boot), and with a measurement file the whole RTMR0.

    teecloud image measure --kernel K --initrd I --cmdline C --memory 2G [--tdvf F [--out FILE]]
                           [--ovmf-sev F --vcpus N [--vcpu-type T] [--snp-out FILE]]

prints, as JSON, the TDX RTMR1 and RTMR2 a TD booting these files directly (QEMU -kernel/-initrd/-append,
OVMF/TDVF) must quote, with their events; MRTD and the TD-HOB witness when given the TDVF; and the SEV-SNP
launch measurement when given the SEV firmware (through sev-snp-measure). `--out` writes the image's
measurement file (measurement.tdx.cbor, teecloud.image.measurement), from which a verifier computes MRTD
and RTMR0-2 for any vm_config without the image; `--snp-out` its SEV-SNP one (measurement.snp.cbor,
teecloud.image.snp), from which the launch measurement for any vCPU count and type is computed. RTMR0
itself is not printed: its ACPI events are the tables QEMU builds for the VM's devices, which a verifier
takes from the quote's event log (docs/node.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Annotated

import typer

from teecloud._fs import atomic_write
from teecloud.image import ImageError, ImageFormatError
from teecloud.image.build import DEFAULT_CACHE, GUEST_KERNEL, Recipe, build_image
from teecloud.image.measurement import encode, measure_tdx_image
from teecloud.image.snp import (
    DSTACK_VCPU_TYPE,
    SnpShape,
    encode_snp,
    expected_snp_measurement,
    measure_snp_image,
    snp_launch_measurement,
)
from teecloud.image.tdx import mrtd, parse_tdvf, replay, rtmr1_events, rtmr2_events

__all__ = ["app"]

app = typer.Typer(
    name="image",
    help="Guest OS images for the qemu backend: build, reference measurements.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

MAX_FILE = 512 * 1024 * 1024


def _read(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE:
            raise ImageFormatError(f"{what} {path} is larger than {MAX_FILE >> 20} MiB")
        return path.read_bytes()
    except OSError as exc:
        raise ImageFormatError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _memory(text: str) -> int:
    m = re.fullmatch(r"(\d{1,7})([MG])", text.strip().upper())
    if not m:
        raise ImageFormatError(f"memory is a size like 2048M or 2G, got {text!r}")
    return int(m.group(1)) << (20 if m.group(2) == "M" else 30)


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data, mode=0o644)
    except OSError as exc:
        raise ImageFormatError(f"cannot write {path}: {exc.strerror or exc}") from None


@app.command("measure")
def measure(
    kernel: Annotated[Path, typer.Option(help="the bzImage (EFI stub)")],
    initrd: Annotated[Path, typer.Option(help="the initramfs")],
    cmdline: Annotated[str, typer.Option(help="the kernel command line, as passed to -append")],
    memory: Annotated[
        str, typer.Option(help="the VM's memory, e.g. 2G (the kernel patch depends on it)")
    ] = "2G",
    tdvf: Annotated[Path | None, typer.Option(help="the TDX firmware (TDVF): adds MRTD")] = None,
    two_pass: Annotated[bool, typer.Option(help="MRTD as QEMU 8 builds it (else QEMU >= 9)")] = False,
    out: Annotated[
        Path | None, typer.Option(help="write the measurement file (measurement.tdx.cbor; needs --tdvf)")
    ] = None,
    ovmf_sev: Annotated[Path | None, typer.Option(help="the SEV firmware: adds the SNP measurement")] = None,
    vcpus: Annotated[int, typer.Option(help="vCPUs (SEV-SNP: one VMSA each)")] = 1,
    vcpu_type: Annotated[str, typer.Option(help="SEV-SNP: the QEMU -cpu model")] = DSTACK_VCPU_TYPE,
    snp_out: Annotated[
        Path | None,
        typer.Option(help="write the SEV-SNP measurement file (measurement.snp.cbor; needs --ovmf-sev)"),
    ] = None,
) -> None:
    """Reference measurements of a guest image for a VM shape (JSON on stdout)."""
    if out is not None and tdvf is None:
        raise ImageFormatError("--out writes the TDX measurement file, which needs the firmware: pass --tdvf")
    if snp_out is not None and ovmf_sev is None:
        raise ImageFormatError("--snp-out writes the SEV-SNP measurement file: pass --ovmf-sev")
    kernel_bytes, initrd_bytes = _read(kernel, "kernel"), _read(initrd, "initrd")
    r1 = rtmr1_events(kernel_bytes, initrd_size=len(initrd_bytes), memory_bytes=_memory(memory))
    r2 = rtmr2_events(cmdline, initrd_bytes)
    result: dict[str, object] = {
        "rtmr1": replay(r1).hex(),
        "rtmr1_events": [d.hex() for d in r1],
        "rtmr2": replay(r2).hex(),
        "rtmr2_events": [d.hex() for d in r2],
        "rtmr0": None,
        "rtmr0_note": "depends on the ACPI tables QEMU builds for the VM: a verifier takes their digests "
        "from the quote's event log and the rest from the measurement file (--out)",
    }
    if tdvf is not None:
        firmware = _read(tdvf, "TDVF")
        result["mrtd"] = mrtd(firmware, two_pass=two_pass).hex()
        if out is not None:
            m = measure_tdx_image(kernel=kernel_bytes, initrd=initrd_bytes, cmdline=cmdline, tdvf=firmware)
            result["td_hob_witness"] = m.td_hob_witness.hex()
            _write(out, encode(m))
            result["measurement_file"] = str(out)
    if ovmf_sev is not None:
        result["snp_measurement"] = snp_launch_measurement(
            ovmf=ovmf_sev, kernel=kernel, initrd=initrd, cmdline=cmdline, vcpus=vcpus, vcpu_type=vcpu_type
        ).hex()
        if snp_out is not None:
            snp = measure_snp_image(ovmf=ovmf_sev, kernel=kernel_bytes, initrd=initrd_bytes, cmdline=cmdline)
            # the file must give what the firmware itself gives, or it is not written
            if expected_snp_measurement(snp, SnpShape(vcpus, vcpu_type)).hex() != result["snp_measurement"]:
                raise ImageFormatError("the SEV-SNP measurement file does not reproduce the firmware's value")
            _write(snp_out, encode_snp(snp))
            result["snp_measurement_file"] = str(snp_out)
    typer.echo(json.dumps(result, indent=2))


@app.command("acpi")
def acpi(
    vcpus: Annotated[int, typer.Option(help="the VM's vCPUs")] = 1,
    memory: Annotated[str, typer.Option(help="the VM's memory, e.g. 2G")] = "2G",
    bios: Annotated[Path, typer.Option(help="the VM's firmware")] = Path("/usr/share/ovmf/OVMF.fd"),
    measurement: Annotated[
        Path | None, typer.Option(help="an image's measurement.tdx.cbor: adds the whole RTMR0 for this shape")
    ] = None,
    kernel: Annotated[Path, typer.Option(help="the dumper's kernel")] = GUEST_KERNEL / "vmlinuz",
) -> None:
    """RTMR0's ACPI digests from the tables this host's QEMU builds for a plain q35 VM of this shape (a TCG
    boot of a dumper guest; teecloud.image.acpi). Not a TD's tables: QEMU 7.2 has no tdx-guest
    (docs/node.md)."""
    from teecloud import vmconfig
    from teecloud.image.acpi import acpi_digests, plain_q35_argv, qemu_acpi_files
    from teecloud.image.measurement import expected_tdx_registers, parse
    from teecloud.image.testguest import busybox_path

    mem = _memory(memory)
    m = parse(_read(measurement, "measurement file")) if measurement is not None else None
    shape = plain_q35_argv(vcpus=vcpus, memory_mb=mem >> 20, bios=bios)
    files = qemu_acpi_files(
        shape, kernel=kernel, modules_dir=GUEST_KERNEL / "modules", busybox=busybox_path()
    )
    d = acpi_digests(files)
    result: dict[str, object] = {
        "shape": {"vcpus": vcpus, "memory_size": mem, "machine": "plain q35 (this host's QEMU)"},
        "acpi_loader": d.loader.hex(),
        "acpi_rsdp": d.rsdp.hex(),
        "acpi_tables": d.tables.hex(),
        "sizes": {
            name: len(files[name]) for name in ("etc/table-loader", "etc/acpi/rsdp", "etc/acpi/tables")
        },
    }
    if m is not None:
        config = vmconfig.VmConfig(bytes(32), vcpus, mem)
        result["rtmr0"] = expected_tdx_registers(m, config, d).rtmr0.hex()
    typer.echo(json.dumps(result, indent=2))


MAX_LOCK = 1024 * 1024


@app.command("build")
def build(
    cache: Annotated[
        Path, typer.Option(help="the image cache (one directory per recipe hash)")
    ] = DEFAULT_CACHE,
    out: Annotated[Path | None, typer.Option(help="build into this directory instead of the cache")] = None,
    force: Annotated[
        bool, typer.Option(help="rebuild even on a cache hit (the rootfs tar is reused)")
    ] = False,
    lock: Annotated[
        Path | None, typer.Option(help="a packages.txt of an earlier build: refuse any other version")
    ] = None,
    tdvf: Annotated[
        Path | None,
        typer.Option(
            help="a TDX firmware (OVMF IntelTdx) as the image's firmware: adds measurement.tdx.cbor"
        ),
    ] = None,
) -> None:
    """Build the reproducible guest image (Debian bookworm, Docker, cryptsetup, the agent); JSON on stdout."""
    try:
        lines: tuple[str, ...] = ()
        if lock is not None:
            text = _read(lock, "lock file")[:MAX_LOCK].decode("utf-8", "replace")
            lines = tuple(ln.strip() for ln in text.splitlines() if ln.strip())
            if not lines or any(ln.count("=") != 1 or " " in ln for ln in lines):
                raise ImageFormatError(f"{lock}: expected package=version lines (packages.txt)")
        recipe = Recipe(lock=lines)
        if tdvf is not None:
            parse_tdvf(_read(tdvf, "TDVF"))  # a TDX firmware, or the reason it is not
            recipe = dataclasses.replace(recipe, ovmf=tdvf.resolve())
        built = build_image(recipe, cache=cache, force=force, out=out, log=typer.echo)
    except ImageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    doc = {
        "path": str(built.path),
        "os_image_hash": built.os_image_hash,
        "recipe_hash": built.recipe_hash,
        "cached": built.cached,
        "seconds": round(built.seconds, 1),
    }
    typer.echo(json.dumps(doc, indent=2))
