"""teecloud.tee.detect(): forced by TEECLOUD_TEE, else probed; clear error when nothing is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from teecloud.tee import SevSnpPlatform, SimulatedTdx, TdxPlatform, TeeUnavailable, TeeUsageError, detect

from .fake_configfs import FakeTsmKernel


@pytest.fixture
def no_hw(tmp_path: Path) -> dict[str, Path]:
    return {
        "tsm_root": tmp_path / "no-tsm",
        "tdx_device": tmp_path / "no-tdx",
        "sev_device": tmp_path / "no-sev",
    }


def test_env_forces_simulated(monkeypatch: pytest.MonkeyPatch, no_hw: dict[str, Path]) -> None:
    monkeypatch.setenv("TEECLOUD_TEE", "simulated")
    assert isinstance(detect(**no_hw), SimulatedTdx)


@pytest.mark.parametrize(
    ("value", "cls"), [("tdx", TdxPlatform), ("sev_snp", SevSnpPlatform), ("SEV-SNP", SevSnpPlatform)]
)
def test_env_forces_real_backends(
    monkeypatch: pytest.MonkeyPatch, no_hw: dict[str, Path], value: str, cls: type
) -> None:
    monkeypatch.setenv("TEECLOUD_TEE", value)
    assert isinstance(detect(**no_hw), cls)


def test_env_unknown_value(monkeypatch: pytest.MonkeyPatch, no_hw: dict[str, Path]) -> None:
    monkeypatch.setenv("TEECLOUD_TEE", "sgx")
    with pytest.raises(TeeUsageError, match="simulated, tdx, sev_snp"):
        detect(**no_hw)


def test_nothing_found_suggests_simulated(monkeypatch: pytest.MonkeyPatch, no_hw: dict[str, Path]) -> None:
    monkeypatch.delenv("TEECLOUD_TEE", raising=False)
    with pytest.raises(TeeUnavailable, match="TEECLOUD_TEE=simulated"):
        detect(**no_hw)


def test_probes_configfs_provider(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_hw: dict[str, Path]
) -> None:
    monkeypatch.delenv("TEECLOUD_TEE", raising=False)
    kernel = FakeTsmKernel(tmp_path / "tsm", "sev_guest", lambda b: b)
    found = detect(**{**no_hw, "tsm_root": kernel.root}, fs=kernel)
    assert isinstance(found, SevSnpPlatform)
    kernel.provider = "tdx_guest"
    assert isinstance(detect(**{**no_hw, "tsm_root": kernel.root}, fs=kernel), TdxPlatform)
    kernel.provider = "arm_cca_guest"
    with pytest.raises(TeeUnavailable, match="arm_cca_guest"):
        detect(**{**no_hw, "tsm_root": kernel.root}, fs=kernel)


def test_probes_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_hw: dict[str, Path]) -> None:
    monkeypatch.delenv("TEECLOUD_TEE", raising=False)
    dev = tmp_path / "tdx_guest"
    dev.write_bytes(b"")
    assert isinstance(detect(**{**no_hw, "tdx_device": dev}), TdxPlatform)
    sev = tmp_path / "sev-guest"
    sev.write_bytes(b"")
    with pytest.raises(TeeUnavailable, match="configfs-tsm"):
        detect(**{**no_hw, "sev_device": sev})
