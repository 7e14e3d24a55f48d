"""The qemu guest's GPU evidence source (teecloud.tee.gpu.guest_gpu_source) and GPU gate
(teecloud.agent.vm_agent.guest_gpu_gate): NVML when the VM has an NVIDIA GPU (a fake sysfs PCI tree here),
the labelled simulated GPU in mode plain otherwise, nothing in tdx / sev-snp without a GPU. No GPU here: the
NVML path is checked up to its refusal without NVML."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from teecloud.agent.vm_agent import guest_gpu_gate, image_gpu_roots
from teecloud.tee.errors import GpuUnavailable
from teecloud.tee.gpu import NvmlGpuSource, SimulatedGpu, guest_gpu_source, nvidia_gpus


def _pci(root: Path, devices: dict[str, tuple[str, str]]) -> Path:
    for address, (vendor, klass) in devices.items():
        d = root / address
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "class").write_text(klass + "\n")
    return root


VIRTIO = {"0000:00:02.0": ("0x1af4", "0x010000"), "0000:00:03.0": ("0x1af4", "0x020000")}
H100 = {"0000:01:00.0": ("0x10de", "0x030200")}
NVIDIA_AUDIO = {"0000:02:00.1": ("0x10de", "0x040300")}  # an NVIDIA function that is not a GPU


def test_nvidia_display_devices_are_the_vms_gpus(tmp_path: Path) -> None:
    pci = _pci(tmp_path / "pci", {**VIRTIO, **H100, **NVIDIA_AUDIO})
    assert nvidia_gpus(pci) == ["0000:01:00.0"]
    assert nvidia_gpus(tmp_path / "absent") == []


@pytest.mark.parametrize("mode", ["tdx", "sev-snp", "plain"])
def test_a_passed_through_gpu_is_read_through_nvml(tmp_path: Path, mode: str) -> None:
    pci = _pci(tmp_path / "pci", {**VIRTIO, **H100})
    source = guest_gpu_source(mode, pci_devices=pci, home=tmp_path / "home")
    assert isinstance(source, NvmlGpuSource) and source.simulated is False
    with pytest.raises(GpuUnavailable, match="NVML"):  # no NVML / driver in this test machine
        source.collect(bytes(32))


def test_without_a_gpu_plain_gets_the_labelled_simulated_gpu_and_tees_get_none(tmp_path: Path) -> None:
    pci = _pci(tmp_path / "pci", {**VIRTIO, **NVIDIA_AUDIO})
    assert guest_gpu_source("tdx", pci_devices=pci) is None
    assert guest_gpu_source("sev-snp", pci_devices=pci) is None
    source = guest_gpu_source("plain", pci_devices=pci, home=tmp_path / "home")
    assert isinstance(source, SimulatedGpu)
    items = source.collect(hashlib.sha256(b"boot").digest())
    assert items and all(item["simulated"] is True for item in items)


def test_the_guest_gpu_gate_trusts_the_simulated_root_only_for_the_simulated_gpu(tmp_path: Path) -> None:
    plain = guest_gpu_gate("plain", home=tmp_path / "home", pci_devices=_pci(tmp_path / "a", VIRTIO))
    assert isinstance(plain.source, SimulatedGpu)
    assert plain.trust_anchors == (plain.source.root_der(),)
    assert guest_gpu_gate("tdx", home=tmp_path / "home", pci_devices=_pci(tmp_path / "b", VIRTIO)) is None
    gpu = guest_gpu_gate("tdx", home=tmp_path / "home", pci_devices=_pci(tmp_path / "c", H100))
    assert isinstance(gpu.source, NvmlGpuSource)
    assert gpu.trust_anchors == image_gpu_roots()  # the image's roots, never a simulated one


def test_the_images_gpu_roots_are_read_from_its_pem_files(tmp_path: Path) -> None:
    root = SimulatedGpu(tmp_path / "dev").root_der()
    from cryptography import x509

    pem = x509.load_der_x509_certificate(root).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "roots").mkdir()
    (tmp_path / "roots" / "nvidia.pem").write_bytes(pem)
    (tmp_path / "roots" / "notes.txt").write_text("not a root")
    assert image_gpu_roots(tmp_path / "roots") == (root,)
    assert image_gpu_roots(tmp_path / "none") == ()
