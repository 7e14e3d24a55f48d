"""`teecloud up --backend qemu --qemu-mode plain|tdx|sev-snp --qemu-gpu BDF` (issues 20, 21): each refusal is
a message and an exit code before anything starts (no chain, KMS or VM: LocalCloud is replaced by a recorder
that fails the test if a refused command reaches it), the options of a valid command reach LocalCloud, and
LocalCloud's qemu_mode / qemu_gpus reach QemuBackendConfig (make_backend replaced: no QEMU runs). The host
check for tdx / sev-snp reads a fake /sys and /dev."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import teecloud.devstack as devstack
import teecloud.node.runtime.qemu as qemu_mod
from teecloud.node.runtime.qemu import QemuBackendConfig, tee_host_missing
from teecloud.node.runtime.qemu_cmdline import GuestImage, UnsafeVmConfig
from tests.cli._up_recorder import _Recorder, up_fixture  # noqa: F401  (the `up` fixture)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--qemu-mode", "tdx"], "--qemu-mode needs --backend qemu"),
        (["--backend", "docker", "--qemu-gpu", "0000:18:00.0"], "--qemu-gpu needs --backend qemu"),
        (["--qemu-accel", "kvm"], "--qemu-accel needs --backend qemu"),
        (["--qemu-mode", "plain", "--qemu-gpu", "18:00.0"], "--qemu-mode, --qemu-gpu need --backend qemu"),
        (["--backend", "qemu", "--qemu-mode", "sgx"], "--qemu-mode is one of plain, sev-snp, tdx, not 'sgx'"),
        (["--backend", "qemu", "--qemu-mode", "[red]x"], "not '[red]x'"),
        (["--backend", "qemu", "--qemu-mode", "sev-snp", "--qemu-accel", "hvf"], "runs under KVM only"),
        (["--backend", "qemu", "--qemu-mode", "tdx", "--qemu-accel", "tcg"], "runs under KVM only"),
        (["--backend", "qemu", "--qemu-gpu", "0000:18:00.0"], "--qemu-gpu needs --qemu-mode tdx or sev-snp"),
        (
            ["--backend", "qemu", "--qemu-mode", "plain", "--qemu-gpu", "18:00.0"],
            "--qemu-gpu needs --qemu-mode tdx or sev-snp",
        ),
        (
            [
                "--backend",
                "qemu",
                "--qemu-mode",
                "tdx",
                "--qemu-gpu",
                "18:00.0",
                "--qemu-gpu",
                "0000:18:00.0",
            ],
            "a PCI device is given twice",
        ),
        (
            ["--backend", "qemu", "--qemu-mode", "tdx", *["--qemu-gpu", "0000:18:00.0"] * 17],
            "at most 16 --qemu-gpu",
        ),
    ],
)
def test_usage_errors_exit_2_before_anything_starts(up: Any, argv: list[str], needle: str) -> None:
    code, text = up(*argv)
    assert code == 2, text
    assert needle in text, text
    assert _Recorder.calls == []


# PCI addresses that are not [domain:]bus:device.function in hex (device <= 0x1f, function <= 7), or that
# carry something QEMU's option parser would read as another option
BAD_ADDRESSES = [
    "",
    "18:0.0",
    "18:00",
    "0000:18:00.8",
    "0000:18:20.0",
    "00000:18:00.0",
    "000:18:00.0",
    "0000:g8:00.0",
    "0000:18:00.0,x-vga=on",
    "0000:18:00.0 ",
    " 0000:18:00.0x",
    "host=0000:18:00.0",
    "../0000:18:00.0",
    "0000:18:00.0\n",
    "0000:18:00.00",
    "x" * 300,
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_malformed_gpu_addresses_are_refused(up: Any, address: str) -> None:
    code, text = up("--backend", "qemu", "--qemu-mode", "sev-snp", "--qemu-gpu", address)
    if address.strip() != address and address.strip() == "0000:18:00.0":
        # surrounding blanks are what a shell leaves in a quoted word: the address itself is sound, and
        # the command goes on to the host check (this host has no SEV-SNP)
        assert code in (1, 2) and "PCI address" not in text, text
    else:
        assert code == 2, text
        assert "--qemu-gpu: PCI address" in text, text
        assert "expected [domain:]bus:device.function" in text, text
    assert _Recorder.calls == []


@pytest.mark.parametrize("mode", ["tdx", "sev-snp"])
def test_a_confidential_mode_on_a_host_without_the_tee_names_what_is_missing(
    up: Any, mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_sys, fake_dev = tmp_path / "sys", tmp_path / "dev"
    fake_dev.mkdir()
    (fake_dev / "kvm").write_text("")
    seen: list[str] = []

    def fake_missing(m: str) -> list[str]:
        seen.append(m)
        return tee_host_missing(m, sysfs=fake_sys, dev=fake_dev)

    monkeypatch.setattr(qemu_mod, "tee_host_missing", fake_missing)
    code, text = up("--backend", "qemu", "--qemu-mode", mode, "--qemu-gpu", "18:00.0")
    assert code == 1, text
    assert seen == [mode]
    param = "kvm_intel/parameters/tdx" if mode == "tdx" else "kvm_amd/parameters/sev_snp"
    assert f"--qemu-mode {mode} needs a {mode} host" in text and param in text, text
    assert "/kvm " not in text  # the KVM device is there
    assert ("/sev (the AMD PSP" in text) == (mode == "sev-snp"), text
    assert _Recorder.calls == []


@pytest.mark.parametrize("mode", ["tdx", "sev-snp"])
def test_a_confidential_mode_is_refused_with_the_simulated_kms(
    up: Any, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_mod, "tee_host_missing", lambda m: [])  # a host with the TEE
    code, text = up("--backend", "qemu", "--qemu-mode", mode, "--qemu-gpu", "0000:18:00.0")
    assert code == 2, text
    assert f"--qemu-mode {mode} needs a real KMS" in text and "the local cloud's KMS is simulated" in text
    assert ("Intel's root" if mode == "tdx" else "AMD's root") in text
    assert _Recorder.calls == []


def test_valid_qemu_options_reach_local_cloud(up: Any) -> None:
    code, text = up("--backend", "qemu", "--qemu-mode", "plain", "--qemu-accel", "kvm")
    assert code == 1 and "recorder: not starting" in text, text
    (kw,) = _Recorder.calls
    assert (kw["backend"], kw["qemu_mode"], kw["qemu_accel"], kw["qemu_gpus"]) == ("qemu", "plain", "kvm", ())
    _Recorder.calls = []
    code, text = up("--backend", "qemu")  # the defaults: mode plain under TCG
    (kw,) = _Recorder.calls
    assert (kw["qemu_mode"], kw["qemu_accel"], kw["qemu_gpus"]) == ("plain", "tcg", ())
    _Recorder.calls = []
    code, text = up()  # docker: the qemu options keep their neutral values
    (kw,) = _Recorder.calls
    assert (kw["backend"], kw["qemu_mode"], kw["qemu_gpus"]) == ("docker", "plain", ())


def test_local_cloud_passes_mode_and_gpus_to_the_backend_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import teecloud.image.build as build
    import teecloud.node.runtime as runtime

    fields = {"bios": tmp_path / "ovmf.fd", "kernel": tmp_path / "bzImage", "initrd": tmp_path / "initrd"}
    monkeypatch.setattr(build, "guest_image_fields", lambda path: {**fields, "cmdline": "console=ttyS0"})
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(runtime, "make_backend", lambda kind, **kw: made.append({"kind": kind, **kw}))
    cloud = devstack.LocalCloud(
        tmp_path / "home",
        backend="qemu",
        qemu_image=tmp_path / "image",
        qemu_accel="kvm",
        qemu_mode="tdx",
        qemu_gpus=("0000:18:00.0", "0000:3b:00.0"),
    )
    cloud._qemu_backend(object())
    (call,) = made
    config = call["config"]
    assert call["kind"] == "qemu" and isinstance(config, QemuBackendConfig)
    assert (config.mode, config.accel, config.gpus) == ("tdx", "kvm", ("0000:18:00.0", "0000:3b:00.0"))


def _image(tmp_path: Path) -> GuestImage:
    return GuestImage(bios=tmp_path / "b", kernel=tmp_path / "k", initrd=tmp_path / "i", cmdline="x")


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"mode": "sgx"}, "unknown mode"),
        ({"mode": "tdx", "accel": "tcg"}, "TCG runs mode plain only"),
        ({"mode": "plain", "gpus": ("0000:18:00.0",)}, "a GPU in mode plain is refused"),
        ({"mode": "tdx", "gpus": ("18:00.0",)}, "not in sysfs's form"),
        ({"mode": "tdx", "gpus": ("0000:18:00.0,x-vga=on",)}, "PCI address"),
        ({"mode": "sev-snp", "gpus": ("0000:18:00.0", "0000:18:00.0")}, "passed through twice"),
        ({"mode": "tdx", "gpus": ("0000:18:00.0",), "gpu_bridges": ("0000:18:00.0",)}, "twice"),
        ({"mode": "tdx", "gpus": tuple(f"0000:{i:02x}:00.0" for i in range(17))}, "at most 16"),
    ],
)
def test_backend_config_refuses_what_no_launch_could_use(
    tmp_path: Path, kw: dict[str, Any], needle: str
) -> None:
    with pytest.raises(UnsafeVmConfig, match=needle):
        QemuBackendConfig(image=_image(tmp_path), **kw)


def test_backend_config_accepts_gpus_in_a_confidential_mode(tmp_path: Path) -> None:
    cfg = QemuBackendConfig(image=_image(tmp_path), mode="sev-snp", gpus=("0000:18:00.0", "0000:3b:00.0"))
    assert cfg.gpus == ("0000:18:00.0", "0000:3b:00.0")


def _host(
    tmp_path: Path, *, kvm: bool = True, param: tuple[str, str, str] | None = None, sev: bool = False
) -> Any:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir(parents=True, exist_ok=True)
    if kvm:
        (dev / "kvm").write_text("")
    if sev:
        (dev / "sev").write_text("")
    if param is not None:
        module, name, value = param
        p = sysfs / "module" / module / "parameters"
        p.mkdir(parents=True, exist_ok=True)
        (p / name).write_text(value + "\n")
    return {"sysfs": sysfs, "dev": dev}


def test_tee_host_check_reads_the_kernel_parameters(tmp_path: Path) -> None:
    assert tee_host_missing("plain", sysfs=tmp_path / "none", dev=tmp_path / "none") == []
    tdx = _host(tmp_path / "a", param=("kvm_intel", "tdx", "Y"))
    assert tee_host_missing("tdx", **tdx) == []
    # the same host has no SEV-SNP: the parameter and the PSP device are named
    snp_missing = tee_host_missing("sev-snp", **tdx)
    assert len(snp_missing) == 2 and "kvm_amd/parameters/sev_snp is absent" in snp_missing[0]
    assert "/sev (the AMD PSP" in snp_missing[1]
    off = _host(tmp_path / "b", kvm=False, param=("kvm_intel", "tdx", "N"))
    missing = tee_host_missing("tdx", **off)
    assert len(missing) == 2 and "/kvm (KVM" in missing[0] and "tdx is 'N'" in missing[1]
    snp = _host(tmp_path / "c", param=("kvm_amd", "sev_snp", "1"), sev=True)
    assert tee_host_missing("sev-snp", **snp) == []
    assert "kvm_intel" in tee_host_missing("tdx", **snp)[0]


def test_backend_check_refuses_a_host_without_the_tee(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teecloud.node.errors import RuntimeUnavailable

    monkeypatch.setattr(qemu_mod.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(qemu_mod.os, "access", lambda path, mode: True)  # /dev/kvm as on a KVM host
    host = _host(tmp_path, param=("kvm_intel", "tdx", "N"))
    backend = qemu_mod.QemuBackend(
        QemuBackendConfig(image=_image(tmp_path), mode="tdx", **host), home=tmp_path
    )
    with pytest.raises(RuntimeUnavailable, match=r"mode tdx needs a tdx host; missing: .*tdx is 'N'"):
        backend.check()
    host["sysfs"].joinpath("module/kvm_intel/parameters/tdx").write_text("Y\n")
    backend.check()  # nothing missing (no GPUs to check)
