"""The GPU evidence sources beside TeePlatform (teecloud.tee.gpu): the simulated device is labelled and is
what teecloud.ai re-exports; the NVML source refuses clearly where there is no NVML, no GPU or no CC mode,
and reads NVML's attestation report and certificate chain as nvtrust does (checked against a stand-in module
with pynvml's call shapes that serves a simulated GPU's bytes — labelled: not a GPU)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from teecloud.agent.boot import GpuGate, GpuGateFailed, _run_gpu_gate
from teecloud.ai import gpu as ai_gpu
from teecloud.tee.errors import GpuUnavailable
from teecloud.tee.gpu import NvmlGpuSource, SimulatedGpu

NONCE = bytes(range(32))


def test_the_simulated_gpu_is_labelled_and_shared_with_teecloud_ai(tmp_path: Path) -> None:
    gpu = SimulatedGpu(tmp_path)
    assert ai_gpu.SimulatedGpu is SimulatedGpu
    items = gpu.collect(NONCE)
    assert len(items) == 1 and items[0]["simulated"] is True
    assert gpu.simulated is True and NvmlGpuSource.simulated is False
    with pytest.raises(ValueError, match="32 bytes"):
        gpu.collect(b"short")


def test_nvml_absent_is_a_clear_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as on a machine without nvidia-ml-py
    with pytest.raises(GpuUnavailable, match="NVML is not installed"):
        NvmlGpuSource().collect(NONCE)
    with pytest.raises(ValueError, match="32 bytes"):
        NvmlGpuSource().collect(b"\x00" * 31)


def fake_pynvml(gpus: list[SimulatedGpu], *, cc: int = 1, init_error: bool = False) -> types.ModuleType:
    """A stand-in with pynvml's call shapes (not a GPU): report and certificate structs as ctypes arrays."""
    mod = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    def report(handle: int, nonce: bytes) -> Any:
        raw = bytes.fromhex(gpus[handle].collect(nonce)[0]["evidence"]) + b"\0" * 64  # fixed-size buffer
        return types.SimpleNamespace(attestationReport=list(raw), attestationReportSize=len(raw) - 64)

    def cert(handle: int) -> Any:
        pem = gpus[handle].collect(NONCE)[0]["certificate_chain"].encode()
        return types.SimpleNamespace(
            attestationCertChain=list(pem) + [0] * 8, attestationCertChainSize=len(pem)
        )

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlSystemGetConfComputeState = lambda: types.SimpleNamespace(ccFeature=cc)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetConfComputeGpuAttestationReport = report  # type: ignore[attr-defined]
    mod.nvmlDeviceGetConfComputeGpuCertificate = cert  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    return mod


def test_nvml_source_reads_every_gpu_and_the_gate_verifies_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus = [SimulatedGpu(tmp_path / "a"), SimulatedGpu(tmp_path / "b")]
    mod = fake_pynvml(gpus)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    items = NvmlGpuSource().collect(NONCE)
    assert [i["simulated"] for i in items] == [False, False]  # the source's label; trust is the chain's
    assert mod.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    gate = GpuGate(NvmlGpuSource(), trust_anchors=tuple(g.root_der() for g in gpus))
    assert len(_run_gpu_gate(gate, NONCE)) == 32
    # one GPU's root not trusted: the whole gate fails, naming that GPU
    with pytest.raises(GpuGateFailed, match="GPU 1"):
        _run_gpu_gate(GpuGate(NvmlGpuSource(), trust_anchors=(gpus[0].root_der(),)), NONCE)


@pytest.mark.parametrize(
    ("kw", "gpus", "reason"),
    [
        ({"cc": 0}, 1, "not in confidential-computing mode"),
        ({"init_error": True}, 1, "NVML could not start"),
        ({}, 0, "expected 1..16 GPUs"),
    ],
)
def test_nvml_source_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], gpus: int, reason: str
) -> None:
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_pynvml([SimulatedGpu(tmp_path / str(i)) for i in range(gpus)], **kw)
    )
    with pytest.raises(GpuUnavailable, match=reason):
        NvmlGpuSource().collect(NONCE)
