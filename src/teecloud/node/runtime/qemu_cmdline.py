"""The QEMU command line of one CVM, as dstack-vmm builds it (vmm/src/app/qemu.rs; facts in
shared/reference/dstack-vmm.md section 1), for three modes:

    tdx      `-machine q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off` and a `tdx-guest`
             object (optional mrconfigid; the quote-generation socket to the host's QGS over vsock CID 2)
    sev-snp  a `memory-backend-memfd` RAM, `sev-snp-guest,...,kernel-hashes=on,host-data=...`, CPU EPYC-v4,
             every virtio device with `disable-legacy=on,iommu_platform=true`
    plain    no TEE (q35 only): the same image and devices; what the tests here boot under TCG

GPUs (tdx, sev-snp; dstack-vmm's layout for NVIDIA confidential-computing GPUs): one `iommufd` object, then
per GPU (and per NVSwitch bridge) its own `pcie-root-port` on pcie.0 (chassis N) with a `vfio-pci` device
of the host's PCI address behind it, bound to the iommufd; optionally a larger 64-bit PCI hole
(`q35-pcihost.pci-hole64-size`, for BARs as large as an H100's) and ACPI PCI hot-plug off. A GPU in mode
plain is refused: its evidence would be bound to no TEE. The host checks of those devices (bound to
vfio-pci, alone in their IOMMU group) are teecloud.node.runtime.qemu's (they read sysfs).

Pure: `qemu_argv(config) -> list[str]` does no I/O. `QemuVmConfig` refuses, with a reason a user can act on
(`UnsafeVmConfig`), what would give the host the guest's secrets or an unmeasured boot: a debug TD or SNP
policy, SNP without kernel hashes (the kernel, initrd and command line would then be unmeasured), host
device passthrough other than GPUs, a GPU in mode plain, a TEE mode under TCG, a port forward off loopback
by default, a guest forward to anything but a host loopback port, and values out of bounds or carrying QEMU
option separators.

The guest's user network is `restrict=on` in every mode (dstack-vmm uses `restrict=no`): the guest reaches
the host only through its `guestfwd` rules (GuestForward), each relayed to one host loopback port.

Minimum host for each mode: tdx — a TDX-enabled host kernel (Linux >= 6.16 with kvm_intel tdx=1), QEMU >=
10.1 (upstream tdx-guest) or a TDX-patched QEMU >= 8, TDVF (OVMF built with IntelTdx); sev-snp — a host
kernel with SNP (Linux >= 6.11, kvm_amd sev_snp=1), QEMU >= 9.1, OVMF built from AmdSevX64. Debian 12 here
has QEMU 7.2: only `plain` runs; TDX and SNP command lines are checked as text.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from teecloud.node.errors import BadRequest

__all__ = [
    "APP_IMAGES_SERIAL",
    "GUESTFWD_RELAY",
    "GUEST_NET",
    "MODES",
    "SNP_POLICY_DEBUG",
    "SNP_POLICY_DEFAULT",
    "GuestForward",
    "GuestImage",
    "PortForward",
    "QemuVmConfig",
    "SevSnpParams",
    "UnsafeVmConfig",
    "VmShape",
    "mrconfigid_v1",
    "pci_address",
    "qemu_argv",
]

Mode = Literal["tdx", "sev-snp", "plain"]
MODES: tuple[Mode, ...] = ("tdx", "sev-snp", "plain")

# AMD SEV-SNP ABI (pub. 56860), guest policy: bit 16 reserved-must-be-one, bit 17 SMT allowed, bit 19 DEBUG.
SNP_POLICY_DEFAULT = 0x30000  # dstack-vmm's value: SMT allowed, debug off
SNP_POLICY_RESERVED_ONE = 1 << 16
SNP_POLICY_DEBUG = 1 << 19
# dstack-vmm's vsock CID pool (1000 CIDs from 1000); 0-2 are reserved by vsock itself
MIN_CID, MAX_CID = 3, 0xFFFF_FFFE
MAX_VCPUS = 512
MIN_MEMORY_MB, MAX_MEMORY_MB = 256, 4 * 1024 * 1024
MAX_DISK_GB = 64 * 1024
MAX_PORT_FORWARDS = 128
MAX_GUEST_FORWARDS = 32
# the guest's user-mode network; slirp's own addresses (.2 the host, .3 DNS) and its DHCP pool (16 from .10)
# are never a guestfwd address
GUEST_NET = ipaddress.IPv4Network("10.0.2.0/24")
_SLIRP_RESERVED = {ipaddress.IPv4Address(f"10.0.2.{n}") for n in (0, 2, 3, 255, *range(10, 26))}
# a guestfwd's host end: a relay process per guest connection (a chardev would be ONE connection, opened at
# QEMU's start), speaking stdio to QEMU and TCP to one host loopback port
GUESTFWD_RELAY = "socat STDIO TCP4:{host}:{port}"
MAX_CMDLINE = 4096  # bytes; x86 COMMAND_LINE_SIZE is 2048 on older kernels, 4096 on this project's
DEFAULT_QGS_PORT = 4050
APP_IMAGES_SERIAL = "tc-images"
# a value inside a QEMU option list: no separator (,), no `=` in paths we do not expect, no control bytes
_SAFE_OPTION_VALUE = re.compile(r"[A-Za-z0-9_./+\-:@]+")
MAX_GPUS = 16  # GPUs + NVSwitch bridges of one CVM (an HGX board: 8 GPUs, 4 NVSwitches)
# a PCI address: [domain:]bus:device.function, lower-case hex (sysfs's spelling)
_PCI_ADDRESS = re.compile(r"(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([01][0-9a-f])\.([0-7])")
MAX_PCI_HOLE64 = 1 << 46  # 64 TiB


class UnsafeVmConfig(BadRequest):
    """A VM configuration this node refuses: unsafe for the guest, or not a value QEMU can take safely."""


def _option_value(value: str, what: str) -> str:
    if not _SAFE_OPTION_VALUE.fullmatch(value) or len(value) > 4096:
        raise UnsafeVmConfig(
            f"{what} {value!r} cannot go into a QEMU option: use letters, digits and _ . / + - : @ only"
        )
    return value


def _path(value: Path, what: str) -> str:
    return _option_value(str(value), what)


def check_passthrough(mode: str, gpus: Sequence[str], bridges: Sequence[str]) -> None:
    """The PCI devices a CVM may be given (GPUs and NVSwitch bridges, host addresses): none in mode plain,
    at most MAX_GPUS, each in sysfs's form, none twice (QemuBackendConfig and VmShape both check)."""
    devices = (*gpus, *bridges)
    if devices and mode == "plain":
        raise UnsafeVmConfig(
            "a GPU in mode plain is refused: the VM has no TEE, so the GPU's evidence would be bound to "
            "nothing and its data readable by the host (use mode tdx or sev-snp)"
        )
    if len(devices) > MAX_GPUS:
        raise UnsafeVmConfig(f"at most {MAX_GPUS} GPUs and bridges per CVM")
    for d in devices:
        if pci_address(d) != d:
            raise UnsafeVmConfig(f"PCI address {d[:64]!r} is not in sysfs's form {pci_address(d)!r}")
    if len(set(devices)) != len(devices):
        raise UnsafeVmConfig("a PCI device is passed through twice")


def pci_address(value: str) -> str:
    """A host PCI address as sysfs names it (`0000:bb:dd.f`), from `bb:dd.f` or `dddd:bb:dd.f`."""
    m = _PCI_ADDRESS.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if m is None:
        raise UnsafeVmConfig(
            f"PCI address {str(value)[:64]!r}: expected [domain:]bus:device.function, e.g. 0000:3b:00.0"
        )
    return f"{m.group(1) or '0000'}:{m.group(2)}:{m.group(3)}.{m.group(4)}"


@dataclass(frozen=True)
class GuestImage:
    """The files of a guest OS image, as dstack's metadata.json names them (bios, kernel, initrd, cmdline,
    rootfs; `bios_sev` the firmware for SEV-SNP when it differs)."""

    bios: Path
    kernel: Path
    initrd: Path
    cmdline: str
    rootfs: Path | None = None  # `.verity`: read-only raw disk hd0
    bios_sev: Path | None = None
    shared_ro: bool = True

    def __post_init__(self) -> None:
        raw = self.cmdline.encode()
        if len(raw) > MAX_CMDLINE or any(b < 0x20 or b == 0x7F for b in raw):
            raise UnsafeVmConfig(f"the kernel command line is at most {MAX_CMDLINE} printable bytes")
        if self.rootfs is not None and self.rootfs.suffix != ".verity":
            raise UnsafeVmConfig(
                f"rootfs {self.rootfs.name!r}: only a dm-verity image (.verity) is accepted; an unverified "
                "root filesystem would not be covered by the measured command line"
            )


@dataclass(frozen=True)
class VmShape:
    """vCPUs, memory and the data disk of a CVM (from the deployment)."""

    vcpus: int = 1
    memory_mb: int = 2048
    disk_gb: int = 20

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise UnsafeVmConfig(f"vcpus must be in 1..{MAX_VCPUS}, got {self.vcpus}")
        if not MIN_MEMORY_MB <= self.memory_mb <= MAX_MEMORY_MB:
            raise UnsafeVmConfig(
                f"memory must be in {MIN_MEMORY_MB}..{MAX_MEMORY_MB} MB, got {self.memory_mb}"
            )
        if not 1 <= self.disk_gb <= MAX_DISK_GB:
            raise UnsafeVmConfig(f"disk size must be in 1..{MAX_DISK_GB} GB, got {self.disk_gb}")


@dataclass(frozen=True)
class PortForward:
    """`hostfwd=<protocol>:<host_address>:<host_port>-:<guest_port>` on the first user-mode NIC."""

    host_port: int
    guest_port: int
    protocol: Literal["tcp", "udp"] = "tcp"
    host_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "udp"):
            raise UnsafeVmConfig(f"port protocol must be tcp or udp, got {self.protocol!r}")
        for name, port in (("host_port", self.host_port), ("guest_port", self.guest_port)):
            if not 1 <= port <= 65535:
                raise UnsafeVmConfig(f"{name} must be in 1..65535, got {port}")
        try:
            ipaddress.IPv4Address(self.host_address)
        except ValueError:
            raise UnsafeVmConfig(f"host_address must be an IPv4 address, got {self.host_address!r}") from None


@dataclass(frozen=True)
class GuestForward:
    """`guestfwd=tcp:<guest_address>:<guest_port>-cmd:<relay to host_address:host_port>`: the ONE way a
    guest reaches a host service under `restrict=on` (the KMS nodes, the gateway's registration listener).
    Host end on loopback only: a forward elsewhere would route the guest off the host."""

    guest_address: str
    guest_port: int
    host_port: int
    host_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name, port in (("guest_port", self.guest_port), ("host_port", self.host_port)):
            if not 1 <= port <= 65535:
                raise UnsafeVmConfig(f"guest forward {name} must be in 1..65535, got {port}")
        try:
            guest = ipaddress.IPv4Address(self.guest_address)
            host = ipaddress.IPv4Address(self.host_address)
        except ValueError:
            raise UnsafeVmConfig(
                f"guest forward addresses are IPv4 ({self.guest_address!r} -> {self.host_address!r})"
            ) from None
        if guest not in GUEST_NET or guest in _SLIRP_RESERVED:
            raise UnsafeVmConfig(
                f"guest forward address {guest} must be in {GUEST_NET}, off slirp's own addresses and the "
                "DHCP pool"
            )
        if not host.is_loopback:
            raise UnsafeVmConfig(f"guest forward to {host}: only host loopback services are forwarded")


@dataclass(frozen=True)
class SevSnpParams:
    """What `sev-snp-guest` needs beyond the image: the C-bit position and reduced physical bits come from
    QMP `query-sev-capabilities` of the same QEMU on the same host (AMD EPYC: 51 and 1)."""

    cbitpos: int = 51
    reduced_phys_bits: int = 1
    policy: int = SNP_POLICY_DEFAULT
    kernel_hashes: bool = True
    host_data: bytes = b""  # 32 bytes, or empty (dstack: SHA-256 of the mr_config document)


@dataclass(frozen=True)
class QemuVmConfig:
    """One CVM's VM: mode, image, shape and wiring. Refuses unsafe settings at construction."""

    mode: Mode
    image: GuestImage
    shape: VmShape
    workdir: Path  # hda.img, shared/, serial.log, qmp.sock
    accel: Literal["kvm", "tcg"] = "kvm"
    cid: int | None = None  # vsock guest CID (None: no vsock device; the agent is reached over a port)
    ports: tuple[PortForward, ...] = ()
    # what the guest may reach on the host (restrict=on: nothing else, not the outside either)
    guest_forwards: tuple[GuestForward, ...] = ()
    mrconfigid: bytes = b""  # tdx: 48 bytes, or empty
    qgs_port: int | None = DEFAULT_QGS_PORT  # tdx: the host QGS's vsock port (None: no quote socket)
    snp: SevSnpParams = field(default_factory=SevSnpParams)
    debug: bool = False  # a debuggable TD / SNP guest: the host can read its memory; always refused
    host_devices: tuple[str, ...] = ()  # PCI passthrough of other devices (vfio-pci): refused
    # GPUs and NVSwitch bridges passed through (vfio-pci over iommufd; tdx and sev-snp only): host PCI
    # addresses, normalized by pci_address
    gpus: tuple[str, ...] = ()
    gpu_bridges: tuple[str, ...] = ()
    pci_hole64_size: int = 0  # bytes; 0: QEMU's default (dstack-vmm's qemu_pci_hole64_size)
    hotplug_off: bool = False  # ACPI PCI hot-plug with bridge support off (dstack-vmm's qemu_hotplug_off)
    allow_public_ports: bool = False
    # how the host-shared files reach the guest (dstack-vmm's host_share_mode): a read-only 9p share, or a
    # read-only FAT disk QEMU builds from the directory (vvfat), labelled DSTACKSHR, for kernels without 9p
    host_share: Literal["9p", "vvfat"] = "9p"
    # the app's images (`docker save` on the host) as a read-only raw disk the guest `docker load`s; its
    # serial (APP_IMAGES_SERIAL) is how the guest tells it from the data disk
    app_images: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UnsafeVmConfig(f"unknown mode {self.mode!r} (one of: {', '.join(MODES)})")
        if self.host_share not in ("9p", "vvfat"):
            raise UnsafeVmConfig(f"host_share must be 9p or vvfat, got {self.host_share!r}")
        if self.accel not in ("kvm", "tcg"):
            raise UnsafeVmConfig(f"accel must be kvm or tcg, got {self.accel!r}")
        if self.mode != "plain" and self.accel != "kvm":
            raise UnsafeVmConfig(
                f"mode {self.mode} needs KVM on a {self.mode} host; TCG runs mode plain only"
            )
        if self.debug:
            raise UnsafeVmConfig(
                "a debug CVM is refused: its memory and registers are readable by the host, so no key may "
                "ever be released to it"
            )
        if self.host_devices:
            raise UnsafeVmConfig(
                "host device passthrough is not supported by this node: a passed-through device is outside "
                f"the CVM's measurement and can DMA into shared memory ({', '.join(self.host_devices)[:200]})"
            )
        self._check_gpus()
        if self.mode == "sev-snp":
            if not self.snp.kernel_hashes:
                raise UnsafeVmConfig(
                    "sev-snp without kernel-hashes=on is refused: the kernel, initrd and command line would "
                    "not be part of the launch measurement"
                )
            if self.snp.policy & SNP_POLICY_DEBUG:
                raise UnsafeVmConfig(f"SNP policy {self.snp.policy:#x} has the DEBUG bit (19) set: refused")
            if not self.snp.policy & SNP_POLICY_RESERVED_ONE or self.snp.policy >> 25:
                raise UnsafeVmConfig(f"SNP policy {self.snp.policy:#x} is not a valid guest policy")
            if self.snp.host_data and len(self.snp.host_data) != 32:
                raise UnsafeVmConfig("SNP host_data is 32 bytes")
            if not (0 < self.snp.cbitpos < 64 and 0 <= self.snp.reduced_phys_bits < 64):
                raise UnsafeVmConfig("SNP cbitpos / reduced-phys-bits out of range")
        if self.mrconfigid and (self.mode != "tdx" or len(self.mrconfigid) != 48):
            raise UnsafeVmConfig("mrconfigid is 48 bytes, for mode tdx only")
        if self.cid is not None and not MIN_CID <= self.cid <= MAX_CID:
            raise UnsafeVmConfig(f"vsock CID must be in {MIN_CID}..{MAX_CID}, got {self.cid}")
        if self.qgs_port is not None and not 1 <= self.qgs_port <= 0xFFFF_FFFF:
            raise UnsafeVmConfig("qgs_port out of range")
        if len(self.ports) > MAX_PORT_FORWARDS:
            raise UnsafeVmConfig(f"at most {MAX_PORT_FORWARDS} port forwards")
        seen: set[tuple[str, str, int]] = set()
        for p in self.ports:
            if not self.allow_public_ports and not ipaddress.IPv4Address(p.host_address).is_loopback:
                raise UnsafeVmConfig(
                    f"port forward on {p.host_address}: this node publishes ports on loopback only (the "
                    "gateway reaches them there); set allow_public_ports to publish elsewhere"
                )
            key = (p.protocol, p.host_address, p.host_port)
            if key in seen:
                raise UnsafeVmConfig(
                    f"host port {p.protocol}/{p.host_address}:{p.host_port} is forwarded twice"
                )
            seen.add(key)
        if len(self.guest_forwards) > MAX_GUEST_FORWARDS:
            raise UnsafeVmConfig(f"at most {MAX_GUEST_FORWARDS} guest forwards")
        targets = [(g.guest_address, g.guest_port) for g in self.guest_forwards]
        if len(set(targets)) != len(targets):
            raise UnsafeVmConfig("a guest address and port is forwarded twice")

    def _check_gpus(self) -> None:
        devices = (*self.gpus, *self.gpu_bridges)
        if not devices:
            if self.pci_hole64_size and not 0 < self.pci_hole64_size <= MAX_PCI_HOLE64:
                raise UnsafeVmConfig(f"pci_hole64_size must be in 1..{MAX_PCI_HOLE64} bytes")
            return
        check_passthrough(self.mode, self.gpus, self.gpu_bridges)
        if not self.gpus:
            raise UnsafeVmConfig("NVSwitch bridges are passed through only with the GPUs they connect")
        if not 0 <= self.pci_hole64_size <= MAX_PCI_HOLE64:
            raise UnsafeVmConfig(f"pci_hole64_size must be in 0..{MAX_PCI_HOLE64} bytes")

    # -- the files in the work directory (dstack-vmm's VmWorkDir names)
    @property
    def hda(self) -> Path:
        return self.workdir / "hda.img"

    @property
    def shared_dir(self) -> Path:
        return self.workdir / "shared"

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"


def mrconfigid_v1(compose_hash: bytes) -> bytes:
    """dstack's MrConfig V1 as a TDX MRCONFIGID: 0x01 ‖ compose_hash, zero-padded to 48 bytes."""
    if len(compose_hash) != 32:
        raise ValueError("compose_hash is 32 bytes")
    return (b"\x01" + compose_hash).ljust(48, b"\x00")


def qemu_argv(cfg: QemuVmConfig, *, qemu: str = "qemu-system-x86_64") -> list[str]:
    """The QEMU command line of `cfg` (dstack-vmm's order; golden tests pin it per mode and shape)."""
    snp = cfg.mode == "sev-snp"
    virtio = ",disable-legacy=on,iommu_platform=true" if snp else ""
    cpu = "EPYC-v4" if snp else ("host" if cfg.accel == "kvm" else "max")
    argv = [qemu, "-accel", cfg.accel, "-cpu", cpu, "-nographic", "-nodefaults"]
    # (1) the serial console is the boot log (dstack: a pty chardev logging to serial.log)
    argv += ["-chardev", f"null,id=com0,logfile={_path(cfg.serial_log, 'serial log')},logappend=off"]
    argv += ["-serial", "chardev:com0"]
    argv += ["-qmp", f"unix:{_path(cfg.qmp_socket, 'QMP socket')},server=on,wait=off"]
    # (2) firmware, kernel, initrd and command line, passed unchanged (they are what is measured)
    bios = cfg.image.bios_sev if snp and cfg.image.bios_sev is not None else cfg.image.bios
    argv += ["-bios", str(bios), "-kernel", str(cfg.image.kernel), "-initrd", str(cfg.image.initrd)]
    # PCI layout for large device BARs (GPUs), as dstack-vmm places them
    if cfg.hotplug_off:
        argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    if cfg.pci_hole64_size:
        argv += ["-global", f"q35-pcihost.pci-hole64-size={cfg.pci_hole64_size:#x}"]
    # (3) disks: the verity rootfs read-only, the data disk (LUKS2 inside the guest: the host sees ciphertext)
    if cfg.image.rootfs is not None:
        argv += ["-drive", f"file={_path(cfg.image.rootfs, 'rootfs')},if=none,id=hd0,format=raw,readonly=on"]
        argv += ["-device", f"virtio-blk-pci,drive=hd0{virtio}"]
    argv += ["-drive", f"file={_path(cfg.hda, 'data disk')},if=none,id=hd1,format=qcow2"]
    argv += ["-device", f"virtio-blk-pci,drive=hd1{virtio}"]
    # (4) user-mode network, restricted: the guest reaches neither the host nor the outside, only the host
    # services of its guest forwards; the published ports come in by hostfwd (loopback unless allowed)
    netdev = "user,id=net0,net=10.0.2.0/24,dhcpstart=10.0.2.10,restrict=on"
    for p in cfg.ports:
        netdev += f",hostfwd={p.protocol}:{p.host_address}:{p.host_port}-:{p.guest_port}"
    for g in cfg.guest_forwards:
        relay = GUESTFWD_RELAY.format(host=g.host_address, port=g.host_port)
        netdev += f",guestfwd=tcp:{g.guest_address}:{g.guest_port}-cmd:{relay}"
    argv += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=net0{virtio}"]
    # (5) the mode
    if cfg.mode == "tdx":
        argv += ["-machine", "q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off"]
        tdx: dict[str, object] = {"qom-type": "tdx-guest", "id": "tdx"}
        if cfg.mrconfigid:
            tdx["mrconfigid"] = base64.b64encode(cfg.mrconfigid).decode()
        if cfg.qgs_port is not None:
            tdx["quote-generation-socket"] = {"type": "vsock", "cid": "2", "port": str(cfg.qgs_port)}
        argv += ["-object", json.dumps(tdx, separators=(",", ":"))]
    elif snp:
        mem = f"memory-backend-memfd,id=ram1,size={cfg.shape.memory_mb}M,share=true,prealloc=false"
        argv += ["-object", mem]
        sev = (
            f"sev-snp-guest,id=sev0,policy={cfg.snp.policy:#x},sev-device=/dev/sev,kernel-hashes=on,"
            f"cbitpos={cfg.snp.cbitpos},reduced-phys-bits={cfg.snp.reduced_phys_bits}"
        )
        if cfg.snp.host_data:
            sev += f",host-data={base64.b64encode(cfg.snp.host_data).decode()}"
        argv += ["-object", sev]
        argv += [
            "-machine",
            "q35,kernel-irqchip=split,confidential-guest-support=sev0,memory-backend=ram1,hpet=off",
        ]
    else:
        argv += ["-machine", "q35,kernel-irqchip=split,hpet=off" if cfg.accel == "kvm" else "q35,hpet=off"]
    # (6) vsock to the host (tdx: also the QGS path), the host-shared config files (read-only 9p)
    if cfg.cid is not None:
        argv += ["-device", f"vhost-vsock-pci,guest-cid={cfg.cid}{virtio}"]
    shared = _path(cfg.shared_dir, "shared dir")
    if cfg.host_share == "vvfat":
        argv += ["-drive", f"if=none,id=hd2,driver=vvfat,dir={shared},label=DSTACKSHR,readonly=on"]
        argv += ["-device", f"virtio-blk-pci,drive=hd2{virtio}"]
    else:
        ro = "on" if cfg.image.shared_ro else "off"
        argv += [
            "-virtfs",
            f"local,path={shared},mount_tag=host-shared,readonly={ro},security_model=mapped,id=virtfs0",
        ]
    if cfg.app_images is not None:
        images = _path(cfg.app_images, "app images")
        argv += ["-drive", f"file={images},if=none,id=hd3,format=raw,readonly=on"]
        argv += ["-device", f"virtio-blk-pci,drive=hd3,serial={APP_IMAGES_SERIAL}{virtio}"]
    # (7) GPUs, then NVSwitch bridges: each behind its own PCIe root port, vfio-pci over one iommufd
    if cfg.gpus:
        argv += ["-object", "iommufd,id=iommufd0"]
        for n, address in enumerate((*cfg.gpus, *cfg.gpu_bridges), start=1):
            argv += ["-device", f"pcie-root-port,id=pci.{n},bus=pcie.0,chassis={n}"]
            argv += ["-device", f"vfio-pci,host={address},bus=pci.{n},iommufd=iommufd0"]
    argv += ["-smp", str(cfg.shape.vcpus), "-m", f"{cfg.shape.memory_mb}M"]
    argv += ["-append", cfg.image.cmdline]
    return argv
