"""GPU evidence in the attestation report, bound to the report's fresh nonce.

    GpuEvidenceSource   collect(nonce32) -> [{"evidence": hex, "certificate_chain": PEM, "simulated": bool}]
    SimulatedGpu        a development GPU (teecloud.tee.gpu, re-exported here): real-format SPDM evidence
                        under a development device root of this installation; always labelled simulated
    verify_gpu_evidence the client's check: each item through teecloud's NVIDIA verifier (chain to a trusted
                        device root, SPDM signature, requester nonce == the report_data the quote signs)

The nonce is the attestation route's report_data (32 bytes), so the GPU evidence is as fresh as the quote and
bound to the same key set. On a real GPU the source is teecloud.tee.gpu.NvmlGpuSource (NVML), the same
one-method protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from teecloud.ai.errors import UpstreamRejected
from teecloud.attestation.errors import AttestationError
from teecloud.attestation.models import VerifiedEvidence
from teecloud.attestation.nvidia import verify_nvidia_evidence

# the device simulation and the source protocol live beside TeePlatform, where the guest boot's GPU gate
# (teecloud.agent.boot) reads them too; re-exported here for the inference app
from teecloud.tee.gpu import MAX_GPUS, GpuEvidenceSource, SimulatedGpu

__all__ = ["GpuEvidenceSource", "SimulatedGpu", "verify_gpu_evidence"]


def verify_gpu_evidence(
    items: Any, *, trust_anchors: Sequence[bytes], expected_nonce: bytes, now: int
) -> list[VerifiedEvidence]:
    """Every GPU's evidence verifies under `trust_anchors` and answers `expected_nonce`;
    raises UpstreamRejected(step="gpu")."""
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_GPUS:
        raise UpstreamRejected(f"expected 1..{MAX_GPUS} GPU evidence items", step="gpu")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UpstreamRejected(f"GPU {i}: not an object", step="gpu")
        evidence, chain = item.get("evidence"), item.get("certificate_chain")
        if not isinstance(evidence, str) or not isinstance(chain, str) or len(evidence) > 131072:
            raise UpstreamRejected(f"GPU {i}: evidence and certificate_chain must be strings", step="gpu")
        try:
            out.append(
                verify_nvidia_evidence(
                    evidence.encode(),
                    cert_chain_pem=chain.encode()[:65536],
                    trust_anchors=trust_anchors,
                    now=now,
                    expected_nonce=expected_nonce,
                )
            )
        except AttestationError as exc:
            raise UpstreamRejected(f"GPU {i}: {exc}", step="gpu") from exc
    return out
