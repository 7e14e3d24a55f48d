"""The node's GPU setting: which GPUs its CVMs get, and which GPU device roots the guest's GPU gate trusts
(teecloud.agent.boot.GpuGate; docs/ai.md "The GPU gate at boot").

    none            no GPUs: an app whose compose requires GPU attestation does not boot here (the gate
                    stops the boot before any key request; a guest that skipped it would be refused by the
                    KMS at step `gpu_evidence`)
    simulated[:N]   N (default 1, at most MAX_GPUS) SIMULATED GPUs of this installation
                    (teecloud.tee.gpu.SimulatedGpu, `<home>/simulated-gpu/`, further ones under
                    `<home>/simulated-gpus/<i>/`), their development device roots trusted: development only,
                    every evidence item is labelled simulated
    nvml            the host's GPUs through NVML (NvmlGpuSource), trusting only the device roots given as PEM
                    files (NVIDIA's device identity root); untested here (no GPU)

Offline NVIDIA collateral (teecloud.collateral.nvidia): with `simulated`, the node writes its simulated GPUs'
RIMs and fresh OCSP answers into `<home>/nvidia-collateral/` and the gate requires a RIM for every GPU; with
`nvml`, a collateral directory (`--gpu-collateral DIR`, filled with NVIDIA's OCSP answers and RIMs) makes the
gate check revocation and require RIMs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teecloud.agent.boot import GpuGate
from teecloud.node.errors import BadRequest
from teecloud.tee.gpu import MAX_GPUS, NvmlGpuSource, SimulatedGpu

__all__ = ["GpuSetting", "gpu_gate_for", "parse_gpu_setting"]

log = logging.getLogger("teecloud.node.gpus")


@dataclass(frozen=True)
class GpuSetting:
    kind: str  # "none" | "simulated" | "nvml"
    count: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind != "simulated" else f"simulated:{self.count}"


def parse_gpu_setting(text: str | None) -> GpuSetting:
    value = (text or "none").strip().lower()
    if value in ("", "none"):
        return GpuSetting("none")
    if value == "nvml":
        return GpuSetting("nvml")
    kind, _, count = value.partition(":")
    if kind == "simulated":
        if not count:
            return GpuSetting("simulated", 1)
        if count.isdigit() and 1 <= int(count) <= MAX_GPUS:
            return GpuSetting("simulated", int(count))
    raise BadRequest(f"GPU setting {text!r}: expected none, simulated[:N] (N = 1..{MAX_GPUS}) or nvml")


class _EveryGpu:
    """One evidence source over several GPUs: their items in order."""

    def __init__(self, gpus: Sequence[Any]) -> None:
        self.gpus = list(gpus)

    def collect(self, nonce: bytes) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for gpu in self.gpus:
            items.extend(gpu.collect(nonce))
        return items


def gpu_gate_for(
    setting: GpuSetting,
    home: Path,
    *,
    nvidia_roots: Sequence[Path] = (),
    collateral_dir: Path | None = None,
) -> GpuGate | None:
    """The GpuGate every CVM of this node boots with (None: no GPUs)."""
    from teecloud.collateral.nvidia import NvidiaCollateralCache

    if setting.kind == "none":
        return None
    if setting.kind == "simulated":
        more = [SimulatedGpu(home / "simulated-gpus" / str(i)) for i in range(1, setting.count)]
        gpus = [SimulatedGpu(home), *more]
        log.warning("this node gives its CVMs %d SIMULATED GPU(s): development only", setting.count)
        anchors = tuple(g.root_der() for g in gpus)
        cache = NvidiaCollateralCache(collateral_dir or home / "nvidia-collateral")
        for g in gpus:  # the simulated GPUs' reference measurements and current OCSP answers
            for kind in ("driver", "vbios"):
                rim = g.rim(kind)
                cache.add_rim(rim, trust_anchors=anchors, now=int(time.time()))
            # `now` read after the answer is made: its thisUpdate (the second it was signed) is never after
            # it (a `now` read before signing was one second early when signing crossed a second)
            answer = g.ocsp_response()
            cache.add_ocsp(answer, now=int(time.time()))
        return GpuGate(_EveryGpu(gpus), trust_anchors=anchors, collateral=cache, require_rims=True)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not nvidia_roots:
        raise BadRequest("GPU setting nvml needs the trusted NVIDIA device root (--gpu-root FILE)")
    roots = []
    for p in nvidia_roots:
        try:
            for cert in x509.load_pem_x509_certificates(Path(p).read_bytes()):
                roots.append(cert.public_bytes(serialization.Encoding.DER))
        except (OSError, ValueError) as exc:
            raise BadRequest(f"cannot read a GPU device root from {p}: {exc}") from None
    if collateral_dir is None:
        return GpuGate(NvmlGpuSource(), trust_anchors=tuple(roots))
    cache = NvidiaCollateralCache(collateral_dir)
    return GpuGate(NvmlGpuSource(), trust_anchors=tuple(roots), collateral=cache, require_rims=True)
