"""GPU passthrough on the qemu backend: the arguments GPUs add to a CVM's command line, per mode, against
golden files (tests/node/data/qemu/gpu-*.argv; dstack-vmm's layout: one iommufd, each GPU / NVSwitch behind
its own pcie-root-port as vfio-pci), the refusals (mode plain, malformed or repeated addresses), and the host
checks on a fake sysfs tree (bound to vfio-pci, alone in its IOMMU group, iommufd and the VFIO device node
present). No GPU or IOMMU here: nothing is passed through for real.

Regenerate the golden files after a deliberate change: TEECLOUD_REGEN_GOLDEN=1 python3 -m pytest <this file>
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from teecloud.agent.boot import normalize_app_compose
from teecloud.node.errors import InstanceStateError, RuntimeUnavailable
from teecloud.node.instance import InstanceStore
from teecloud.node.runtime.base import ResourceLimits
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig, check_passthrough_devices, record_vm
from teecloud.node.runtime.qemu_cmdline import (
    MAX_GPUS,
    UnsafeVmConfig,
    VmShape,
    pci_address,
    qemu_argv,
)
from tests.node.test_qemu_cmdline import IMAGE, _config

GOLDEN = Path(__file__).parent / "data" / "qemu"
GPUS = ("0000:18:00.0", "0000:2a:00.0")
BRIDGE = ("0000:05:00.0",)
SHAPE = VmShape(vcpus=16, memory_mb=65536, disk_gb=500)
GPU_OPTIONS: dict[str, Any] = {
    "gpus": GPUS,
    "gpu_bridges": BRIDGE,
    "pci_hole64_size": 1 << 40,
    "hotplug_off": True,
}


def _added(without: list[str], with_gpus: list[str]) -> list[str]:
    """The arguments `with_gpus` inserts into `without`, checking nothing else changed."""
    ops = difflib.SequenceMatcher(a=without, b=with_gpus, autojunk=False).get_opcodes()
    assert {op for op, *_ in ops} <= {"equal", "insert"}, "GPUs changed arguments other than their own"
    return [a for op, _i1, _i2, j1, j2 in ops if op == "insert" for a in with_gpus[j1:j2]]


@pytest.mark.parametrize("mode", ["tdx", "sev-snp"])
def test_golden_gpu_arguments(mode: str) -> None:
    plain_argv = qemu_argv(_config(mode, SHAPE))
    argv = qemu_argv(_config(mode, SHAPE, **GPU_OPTIONS))
    added = _added(plain_argv, argv)
    path = GOLDEN / f"gpu-{mode}.argv"
    text = "\n".join(added) + "\n"
    if os.environ.get("TEECLOUD_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"the {mode} GPU arguments changed (see the module docstring)"
    # where dstack-vmm puts them: the PCI globals right after the boot files, the devices before -smp
    at = argv.index("-initrd") + 2
    assert argv[at : at + 4] == [
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        "-global",
        "q35-pcihost.pci-hole64-size=0x10000000000",
    ]
    devices = argv[argv.index("iommufd,id=iommufd0") - 1 : argv.index("-smp")]
    assert devices[:2] == ["-object", "iommufd,id=iommufd0"]
    for n, address in enumerate((*GPUS, *BRIDGE), start=1):
        port = f"pcie-root-port,id=pci.{n},bus=pcie.0,chassis={n}"
        vfio = f"vfio-pci,host={address},bus=pci.{n},iommufd=iommufd0"
        assert devices[2 + 4 * (n - 1) : 2 + 4 * n] == ["-device", port, "-device", vfio]


def test_without_gpus_nothing_is_added() -> None:
    argv = qemu_argv(_config("tdx", SHAPE))
    assert not [a for a in argv if "vfio" in a or "iommufd" in a or "pcie-root-port" in a or a == "-global"]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"gpus": ("0000:18:00.0",), "mode": "plain", "accel": "tcg"}, "mode plain is refused"),
        ({"gpus": ("0000:18:00.0",), "mode": "plain", "accel": "kvm"}, "mode plain is refused"),
        ({"gpu_bridges": BRIDGE}, "only with the GPUs"),
        ({"gpus": ("18:00.0",)}, "not in sysfs's form '0000:18:00.0'"),
        ({"gpus": ("0000:18:00.0,x-foo=on",)}, "expected \\[domain:\\]bus:device.function"),
        ({"gpus": ("0000:18:20.0",)}, "expected"),  # device number is 5 bits
        ({"gpus": ("0000:18:00.8",)}, "expected"),  # function number is 3 bits
        ({"gpus": ("0000:18:00.0",), "gpu_bridges": ("0000:18:00.0",)}, "twice"),
        ({"gpus": tuple(f"0000:{i:02x}:00.0" for i in range(MAX_GPUS + 1))}, f"at most {MAX_GPUS}"),
        ({"gpus": GPUS, "pci_hole64_size": -1}, "pci_hole64_size"),
        ({"pci_hole64_size": 1 << 50}, "pci_hole64_size"),
        ({"host_devices": ("0000:18:00.0",)}, "passthrough is not supported"),  # other devices: still refused
    ],
)
def test_unsafe_gpu_settings_are_refused(changes: dict[str, Any], reason: str) -> None:
    mode = changes.pop("mode", "tdx")
    with pytest.raises(UnsafeVmConfig, match=reason):
        _config(mode, SHAPE, **changes)


def test_pci_addresses_take_sysfs_spelling() -> None:
    assert pci_address("18:00.0") == "0000:18:00.0"
    assert pci_address(" 0001:AB:1F.7 ") == "0001:ab:1f.7"
    for bad in ("", "18:00", "0000:18:00.0.1", "g0:00.0", "00000:18:00.0"):
        with pytest.raises(UnsafeVmConfig):
            pci_address(bad)


# -- the host checks ---------------------------------------------------------------------------------


def _host(
    tmp_path: Path,
    address: str = "0000:18:00.0",
    *,
    driver: str | None = "vfio-pci",
    group_members: tuple[str, ...] | None = None,
    vfio_dev: bool = True,
    iommu: bool = True,
    group: bool = True,
) -> tuple[Path, Path]:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    if iommu:
        (dev / "iommu").write_bytes(b"")
    device = sysfs / "bus" / "pci" / "devices" / address
    device.mkdir(parents=True)
    if driver is not None:
        drv = sysfs / "bus" / "pci" / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        (device / "driver").symlink_to(drv)
    if group:
        g = sysfs / "kernel" / "iommu_groups" / "42"
        (g / "devices").mkdir(parents=True)
        for member in group_members or (address,):
            (g / "devices" / member).mkdir()
        (device / "iommu_group").symlink_to(g)
    if vfio_dev:
        (device / "vfio-dev" / "vfio3").mkdir(parents=True)
    return sysfs, dev


def test_a_device_bound_to_vfio_alone_in_its_group_passes(tmp_path: Path) -> None:
    sysfs, dev = _host(tmp_path)
    check_passthrough_devices(["0000:18:00.0"], sysfs=sysfs, dev=dev)
    check_passthrough_devices([], sysfs=tmp_path / "nothing", dev=tmp_path / "nothing")


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ({"driver": "nvidia"}, "bound to nvidia, not vfio-pci"),
        ({"driver": None}, "bound to no driver"),
        (
            {"group_members": ("0000:18:00.0", "0000:18:00.1")},
            "not alone in IOMMU group 42 \\(also: 0000:18:00.1",
        ),
        ({"group": False}, "no IOMMU group"),
        ({"vfio_dev": False}, "no VFIO device node"),
        ({"iommu": False}, "iommufd"),
    ],
)
def test_host_devices_that_cannot_be_isolated_are_refused(
    tmp_path: Path, host: dict[str, Any], reason: str
) -> None:
    sysfs, dev = _host(tmp_path, **host)
    with pytest.raises(RuntimeUnavailable, match=reason):
        check_passthrough_devices(["0000:18:00.0"], sysfs=sysfs, dev=dev)


def test_a_device_the_host_does_not_have_is_refused(tmp_path: Path) -> None:
    sysfs, dev = _host(tmp_path)
    with pytest.raises(RuntimeUnavailable, match=r"no PCI device 0000:19:00\.0"):
        check_passthrough_devices(["0000:18:00.0", "0000:19:00.0"], sysfs=sysfs, dev=dev)


def _instance(home: Path, name: str, *, gpu: bool) -> Any:
    doc: dict[str, Any] = {"name": name, "runner": "docker-compose", "docker_compose_file": "services: {}\n"}
    if gpu:
        doc["gpu_attestation"] = "required"
    return InstanceStore(home).create(
        app_compose=normalize_app_compose(doc).encode(),
        app_id=bytes([len(name)]) * 20,
        name=name,
        encrypted_env=None,
        user_config=None,
        sys_config={},
        limits=ResourceLimits(memory_mb=2048),
    )


def _backend(home: Path, sysfs: Path, dev: Path, mode: str = "tdx") -> QemuBackend:
    config = QemuBackendConfig(
        image=IMAGE,
        mode=mode,  # type: ignore[arg-type]
        accel="tcg" if mode == "plain" else "kvm",
        gpus=("0000:18:00.0",),
        pci_hole64_size=1 << 40,
        sysfs=sysfs,
        dev=dev,
        qemu="/nonexistent/qemu",
        docker=None,
    )
    return QemuBackend(config, home=home)


def test_a_cvm_whose_compose_requires_gpu_attestation_gets_the_nodes_gpus(
    teecloud_home: Path, tmp_path: Path
) -> None:
    sysfs, dev = _host(tmp_path)
    backend = _backend(teecloud_home, sysfs, dev)
    gpu_app, plain_app = _instance(teecloud_home, "ai", gpu=True), _instance(teecloud_home, "web", gpu=False)
    cfg = backend._vm_config(gpu_app, ResourceLimits(memory_mb=2048), 18090)
    assert cfg.gpus == ("0000:18:00.0",)
    assert "vfio-pci,host=0000:18:00.0,bus=pci.1,iommufd=iommufd0" in qemu_argv(cfg)
    cfg = backend._vm_config(plain_app, ResourceLimits(memory_mb=2048), 18091)
    assert cfg.gpus == () and cfg.pci_hole64_size == 0
    assert not [a for a in qemu_argv(cfg) if "vfio" in a or a == "-global"]
    assert "1 GPU" in backend.describe()
    with pytest.raises(UnsafeVmConfig, match="mode plain"):
        _backend(teecloud_home, sysfs, dev, mode="plain")._vm_config(
            gpu_app, ResourceLimits(memory_mb=2048), 18090
        )


def test_the_host_is_checked_before_qemu_starts(teecloud_home: Path, tmp_path: Path) -> None:
    sysfs, dev = _host(tmp_path, driver="nvidia")
    backend = _backend(teecloud_home, sysfs, dev)
    app = _instance(teecloud_home, "ai", gpu=True)
    with pytest.raises(RuntimeUnavailable, match="not vfio-pci"):
        backend.launch(app, ResourceLimits(memory_mb=2048))
    assert not backend.workdir(app).exists()  # refused before anything was written or started


def test_gpus_held_by_another_running_vm_are_refused(teecloud_home: Path, tmp_path: Path) -> None:
    sysfs, dev = _host(tmp_path)
    backend = _backend(teecloud_home, sysfs, dev)
    first, second = _instance(teecloud_home, "ai", gpu=True), _instance(teecloud_home, "ai2", gpu=True)
    work = backend.workdir(first)
    work.mkdir(parents=True)
    # a process standing in for the first CVM's QEMU: its command line names its work directory and GPU
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            str(work),
            "-device",
            "vfio-pci,host=0000:18:00.0,bus=pci.1,iommufd=iommufd0",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while str(work).encode() not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():  # exec'd yet?
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert record_vm(work, holder.pid)
        with pytest.raises(InstanceStateError, match=f"held by the running VM {work.name}"):
            backend.launch(second, ResourceLimits(memory_mb=2048))
        assert not backend.workdir(second).exists()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # once it is gone, the GPU is free (the launch then fails only at the absent QEMU binary, named)
    with pytest.raises(RuntimeUnavailable, match="cannot start /nonexistent/qemu"):
        backend.launch(second, ResourceLimits(memory_mb=2048))
