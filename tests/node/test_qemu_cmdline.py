"""The QEMU command line of a CVM: golden files per mode and VM shape (tests/node/data/qemu/*.argv, one
argument a line, reviewed against dstack-vmm's qemu.rs), the properties each mode must have whatever the
golden says, and the refusal of unsafe settings with a reason.

Regenerate the golden files after a deliberate change (then review the diff: it is the change in what the
host runs): TEECLOUD_REGEN_GOLDEN=1 python3 -m pytest tests/node/test_qemu_cmdline.py"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from teecloud.node.runtime.qemu_cmdline import (
    SNP_POLICY_DEBUG,
    GuestForward,
    GuestImage,
    PortForward,
    QemuVmConfig,
    SevSnpParams,
    UnsafeVmConfig,
    VmShape,
    mrconfigid_v1,
    qemu_argv,
)

GOLDEN = Path(__file__).parent / "data" / "qemu"
IMG = Path("/var/lib/teecloud/images/teecloud-0.1.0")
CMDLINE = "console=ttyS0 init=/init panic=1 net.ifnames=0 biosdevname=0 mce=off oops=panic tsc=reliable"
IMAGE = GuestImage(
    bios=IMG / "ovmf.fd",
    kernel=IMG / "bzImage",
    initrd=IMG / "initramfs.cpio.gz",
    cmdline=CMDLINE,
    rootfs=IMG / "rootfs.img.verity",
    bios_sev=IMG / "ovmf-sev.fd",
)
WORK = Path("/var/lib/teecloud/node/vms/0123456789abcdef")
COMPOSE_HASH = bytes(range(32))


def _config(mode: str, shape: VmShape, **kw: Any) -> QemuVmConfig:
    base: dict[str, Any] = {
        "mode": mode,
        "image": IMAGE,
        "shape": shape,
        "workdir": WORK,
        "cid": 1000,
        "ports": (PortForward(host_port=18080, guest_port=80), PortForward(host_port=18443, guest_port=443)),
        "guest_forwards": (
            GuestForward(guest_address="10.0.2.100", guest_port=443, host_port=18000),
            GuestForward(guest_address="10.0.2.120", guest_port=443, host_port=18100),
        ),
    }
    if mode == "tdx":
        base["mrconfigid"] = mrconfigid_v1(COMPOSE_HASH)
    if mode == "sev-snp":
        base["snp"] = SevSnpParams(host_data=bytes(range(32, 64)))
    if mode == "plain":
        base["accel"] = "tcg"
    return QemuVmConfig(**{**base, **kw})


SHAPES = {
    "small": VmShape(vcpus=1, memory_mb=2048, disk_gb=20),
    "large": VmShape(vcpus=16, memory_mb=65536, disk_gb=500),
}
CASES = [(mode, shape) for mode in ("tdx", "sev-snp", "plain") for shape in SHAPES]


@pytest.mark.parametrize(("mode", "shape"), CASES)
def test_golden_command_line(mode: str, shape: str) -> None:
    argv = qemu_argv(_config(mode, SHAPES[shape]))
    path = GOLDEN / f"{mode}-{shape}.argv"
    text = "\n".join(argv) + "\n"
    if os.environ.get("TEECLOUD_REGEN_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"the {mode}/{shape} command line changed (see the module docstring)"


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_mode_boots_the_images_files_unchanged_at_the_deployments_size(shape: str) -> None:
    s = SHAPES[shape]
    for mode in ("tdx", "sev-snp", "plain"):
        argv = qemu_argv(_config(mode, s))
        assert _opt(argv, "-append") == [CMDLINE]  # the measured cmdline: app identity never goes here
        assert _opt(argv, "-kernel") == [str(IMAGE.kernel)] and _opt(argv, "-initrd") == [str(IMAGE.initrd)]
        assert _opt(argv, "-smp") == [str(s.vcpus)] and _opt(argv, "-m") == [f"{s.memory_mb}M"]
        drives = _opt(argv, "-drive")
        assert f"file={IMAGE.rootfs},if=none,id=hd0,format=raw,readonly=on" in drives
        assert f"file={WORK / 'hda.img'},if=none,id=hd1,format=qcow2" in drives
        (netdev,) = _opt(argv, "-netdev")
        assert "hostfwd=tcp:127.0.0.1:18080-:80" in netdev and "hostfwd=tcp:127.0.0.1:18443-:443" in netdev
        opts = netdev.split(",")
        # restricted: the guest reaches the host only through its guest forwards, each to one loopback port
        assert "restrict=on" in opts and "restrict=no" not in opts
        assert [o for o in opts if o.startswith("guestfwd=")] == [
            "guestfwd=tcp:10.0.2.100:443-cmd:socat STDIO TCP4:127.0.0.1:18000",
            "guestfwd=tcp:10.0.2.120:443-cmd:socat STDIO TCP4:127.0.0.1:18100",
        ]
        (virtfs,) = _opt(argv, "-virtfs")
        assert "mount_tag=host-shared" in virtfs and "readonly=on" in virtfs
        assert f"logfile={WORK / 'serial.log'}" in _opt(argv, "-chardev")[0]


def test_tdx_object_and_machine() -> None:
    argv = qemu_argv(_config("tdx", SHAPES["small"]))
    assert _opt(argv, "-machine") == ["q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off"]
    (obj,) = _opt(argv, "-object")
    tdx = json.loads(obj)
    assert tdx["qom-type"] == "tdx-guest" and tdx["id"] == "tdx"
    assert base64.b64decode(tdx["mrconfigid"]) == b"\x01" + COMPOSE_HASH + bytes(15)
    assert tdx["quote-generation-socket"] == {"type": "vsock", "cid": "2", "port": "4050"}
    assert "debug" not in tdx
    assert _opt(argv, "-bios") == [str(IMAGE.bios)] and _opt(argv, "-cpu") == ["host"]
    assert "vhost-vsock-pci,guest-cid=1000" in _opt(argv, "-device")


def test_sev_snp_object_memory_and_virtio() -> None:
    argv = qemu_argv(_config("sev-snp", SHAPES["large"]))
    objs = _opt(argv, "-object")
    assert objs[0] == "memory-backend-memfd,id=ram1,size=65536M,share=true,prealloc=false"
    sev = dict(kv.split("=", 1) for kv in objs[1].split(",")[1:])
    assert objs[1].startswith("sev-snp-guest,")
    assert sev["kernel-hashes"] == "on" and int(sev["policy"], 16) == 0x30000
    assert base64.b64decode(sev["host-data"]) == bytes(range(32, 64))
    assert (sev["cbitpos"], sev["reduced-phys-bits"]) == ("51", "1")
    assert "confidential-guest-support=sev0,memory-backend=ram1" in _opt(argv, "-machine")[0]
    assert _opt(argv, "-cpu") == ["EPYC-v4"] and _opt(argv, "-bios") == [str(IMAGE.bios_sev)]
    devices = _opt(argv, "-device")
    assert devices and all(d.endswith(",disable-legacy=on,iommu_platform=true") for d in devices)


def test_plain_has_no_confidential_guest_support() -> None:
    argv = qemu_argv(_config("plain", SHAPES["small"]))
    assert not any("confidential-guest-support" in a or "tdx-guest" in a or "sev-snp" in a for a in argv)
    assert _opt(argv, "-accel") == ["tcg"]


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("tdx", {"debug": True}, "debug CVM is refused"),
    ("sev-snp", {"debug": True}, "debug CVM is refused"),
    ("sev-snp", {"snp": SevSnpParams(policy=0x30000 | SNP_POLICY_DEBUG)}, "DEBUG bit"),
    ("sev-snp", {"snp": SevSnpParams(kernel_hashes=False)}, "without kernel-hashes=on is refused"),
    ("sev-snp", {"snp": SevSnpParams(policy=0x20000)}, "not a valid guest policy"),
    ("sev-snp", {"snp": SevSnpParams(host_data=b"short")}, "host_data is 32 bytes"),
    ("tdx", {"host_devices": ("0000:17:00.0",)}, "passthrough is not supported"),
    ("plain", {"host_devices": ("0000:17:00.0",)}, "passthrough is not supported"),
    ("tdx", {"accel": "tcg"}, "needs KVM"),
    ("sev-snp", {"accel": "tcg"}, "needs KVM"),
    ("tdx", {"mrconfigid": b"\x01" * 47}, "mrconfigid is 48 bytes"),
    ("plain", {"mrconfigid": b"\x01" * 48}, "for mode tdx only"),
    ("tdx", {"ports": (PortForward(host_port=80, guest_port=80, host_address="0.0.0.0"),)}, "loopback only"),
    ("tdx", {"ports": (PortForward(host_port=80, guest_port=80),) * 2}, "forwarded twice"),
    ("tdx", {"cid": 2}, "vsock CID"),
    (
        "plain",
        {"guest_forwards": (GuestForward("10.0.2.100", 443, 1), GuestForward("10.0.2.100", 443, 2))},
        "twice",
    ),
    (
        "plain",
        {"guest_forwards": tuple(GuestForward(f"10.0.2.{100 + i}", 443, 1) for i in range(33))},
        "at most",
    ),
    ("sgx", {}, "unknown mode"),
    ("tdx", {"workdir": Path("/tmp/a,b")}, "cannot go into a QEMU option"),
]


@pytest.mark.parametrize(("mode", "change", "reason"), REFUSALS)
def test_unsafe_settings_are_refused_with_a_reason(mode: str, change: dict[str, Any], reason: str) -> None:
    with pytest.raises(UnsafeVmConfig, match=reason):
        qemu_argv(_config(mode, SHAPES["small"], **change))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: VmShape(vcpus=0), "vcpus"),
        (lambda: VmShape(memory_mb=64), "memory"),
        (lambda: VmShape(disk_gb=0), "disk size"),
        (lambda: PortForward(host_port=0, guest_port=80), "host_port"),
        (lambda: PortForward(host_port=1, guest_port=80, protocol="sctp"), "tcp or udp"),  # type: ignore[arg-type]
        (lambda: PortForward(host_port=1, guest_port=80, host_address="localhost"), "IPv4 address"),
        (lambda: GuestForward("10.0.2.100", 443, 8000, host_address="10.1.2.3"), "loopback"),
        (lambda: GuestForward("10.0.2.100", 443, 8000, host_address="0.0.0.0"), "loopback"),
        (lambda: GuestForward("10.0.2.2", 443, 8000), "slirp's own addresses"),  # the host itself
        (lambda: GuestForward("10.0.2.3", 53, 8000), "slirp's own addresses"),  # slirp's DNS
        (lambda: GuestForward("10.0.2.15", 443, 8000), "DHCP pool"),
        (lambda: GuestForward("192.168.1.1", 443, 8000), "must be in 10.0.2.0/24"),
        (lambda: GuestForward("10.0.2.100,x", 443, 8000), "IPv4"),
        (lambda: GuestForward("10.0.2.100", 0, 8000), "guest_port"),
        (lambda: GuestForward("10.0.2.100", 443, 70000), "host_port"),
        (lambda: dataclasses.replace(IMAGE, cmdline="a\nb"), "printable"),
        (lambda: dataclasses.replace(IMAGE, cmdline="x" * 5000), "printable"),
        (lambda: dataclasses.replace(IMAGE, rootfs=Path("/r.img")), "dm-verity"),
    ],
)
def test_bad_values_are_refused_with_a_reason(make: Any, reason: str) -> None:
    with pytest.raises(UnsafeVmConfig, match=reason):
        make()


def test_public_ports_only_when_allowed() -> None:
    p = (PortForward(host_port=8080, guest_port=80, host_address="0.0.0.0"),)
    argv = qemu_argv(_config("plain", SHAPES["small"], ports=p, allow_public_ports=True))
    assert "hostfwd=tcp:0.0.0.0:8080-:80" in _opt(argv, "-netdev")[0]


def test_vvfat_host_share_is_a_read_only_disk_labelled_dstackshr() -> None:
    argv = qemu_argv(_config("plain", SHAPES["small"], host_share="vvfat"))
    assert not _opt(argv, "-virtfs")
    assert f"if=none,id=hd2,driver=vvfat,dir={WORK / 'shared'},label=DSTACKSHR,readonly=on" in _opt(
        argv, "-drive"
    )
    assert "virtio-blk-pci,drive=hd2" in _opt(argv, "-device")
    with pytest.raises(UnsafeVmConfig, match="host_share"):
        _config("plain", SHAPES["small"], host_share="nfs")


@pytest.mark.parametrize("mode", ["plain", "sev-snp"])
def test_the_app_images_are_a_read_only_raw_disk_the_guest_knows_by_its_serial(mode: str) -> None:
    images = WORK / "app-images.tar"
    argv = qemu_argv(_config(mode, SHAPES["small"], app_images=images))
    assert f"file={images},if=none,id=hd3,format=raw,readonly=on" in _opt(argv, "-drive")
    virtio = ",disable-legacy=on,iommu_platform=true" if mode == "sev-snp" else ""
    assert f"virtio-blk-pci,drive=hd3,serial=tc-images{virtio}" in _opt(argv, "-device")
    assert not any("hd3" in a for a in qemu_argv(_config(mode, SHAPES["small"])))  # none: no disk
    with pytest.raises(UnsafeVmConfig, match="app images"):
        qemu_argv(_config(mode, SHAPES["small"], app_images=Path("/x,file=/etc/shadow")))
