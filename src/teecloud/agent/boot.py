"""CVM boot as the guest agent sees it: measure the app into RTMR3 in dstack's order, fetch keys.

Event order (dstack v0.5.x `system_setup.rs`, reference/dstack.md §4, plus teecloud's boot-nonce, GPU gate):
    system-preparing, app-id, compose-hash, instance-id, [boot-nonce], [gpu-evidence], boot-mr-done,
    [extra events: os-image-hash in KMS mode], key-provider, [storage-fs], system-ready
Keys are fetched after `boot-mr-done` and the KMS-mode events, so a KMS sees exactly the boot grammar's
RTMR3 (teecloud.attestation.boottime); the boot-nonce (the key provider's challenges) binds the request to
this boot.

The GPU gate (dstack's, when the compose sets `"gpu_attestation": "required"`), before `boot-mr-done` and so
before any key request: (1) nonce = sha256("teecloud-gpu-nonce:" ‖ boot-nonce ‖ app-id), so the evidence is
of this boot; (2) evidence for every GPU from the GPU evidence source (teecloud.tee.gpu); (3) each item
verified by teecloud.attestation.nvidia (chain to a trusted device root, SPDM signature, that nonce); (4)
`gpu-evidence` = sha256 of the canonical JSON of the evidence set is measured. Any failure raises
GpuGateFailed: the boot stops, no key is requested.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from teecloud import appcompose
from teecloud.agent.keyprovider import KeyProvider
from teecloud.appcompose import compose_hash, gpu_attestation_required, normalize_app_compose
from teecloud.attestation.boottime import GPU_EVIDENCE_EVENT
from teecloud.attestation.errors import AttestationError
from teecloud.attestation.nvidia import Revocation, parse_nvidia_evidence, verify_nvidia_evidence
from teecloud.keys.appkeys import AppKeys
from teecloud.tee.base import TeePlatform
from teecloud.tee.errors import TeeError
from teecloud.tee.gpu import MAX_GPUS, GpuEvidenceSource

__all__ = [
    "AgentState",
    "BootError",
    "GpuGate",
    "GpuGateFailed",
    "boot",
    "compose_hash",
    "gpu_evidence_digest",
    "gpu_nonce",
    "normalize_app_compose",
]

MAX_GPU_EVIDENCE_HEX = 131072
MAX_GPU_CHAIN_PEM = 65536


class BootError(ValueError):
    """The app-compose file or the boot parameters are unusable."""


class GpuGateFailed(BootError):
    """The GPU gate refused: no source, no GPU, or evidence that does not verify. No key was requested."""


class GpuCollateral(Protocol):
    """Offline NVIDIA collateral (teecloud.collateral.nvidia.NvidiaCollateralCache): current OCSP answers
    and the RIMs of given driver/VBIOS versions."""

    def revocation(self, *, now: int) -> Revocation: ...

    def rims(
        self, versions: Sequence[str], *, trust_anchors: Sequence[bytes], now: int
    ) -> tuple[bytes, ...]: ...


@dataclass(frozen=True)
class GpuGate:
    """What the GPU gate needs: the CVM's GPUs and the device roots this installation trusts (NVIDIA's
    device identity root in production; a SimulatedGpu's root only where development is trusted).
    `collateral`: OCSP answers (a revoked device certificate fails the gate) and RIMs (the measurements must
    be the reference ones); with `require_rims`, a GPU whose driver/VBIOS has no RIM fails the gate."""

    source: GpuEvidenceSource
    trust_anchors: tuple[bytes, ...]
    clock: Callable[[], float] = time.time
    collateral: GpuCollateral | None = None
    require_rims: bool = False


def gpu_nonce(boot_nonce: bytes, app_id: bytes) -> bytes:
    """The SPDM requester nonce of this boot's GPU evidence."""
    return hashlib.sha256(b"teecloud-gpu-nonce:" + boot_nonce + app_id).digest()


def gpu_evidence_digest(items: Sequence[dict[str, Any]]) -> bytes:
    """The `gpu-evidence` payload: sha256 of the evidence set as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(list(items), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).digest()


def _run_gpu_gate(gate: GpuGate | None, nonce: bytes) -> bytes:
    """Steps (2)-(4) of the module docstring's GPU gate; returns the gpu-evidence payload."""
    if gate is None:
        raise GpuGateFailed(
            "gpu: the compose requires GPU attestation but this CVM has no GPU evidence source"
        )
    if not gate.trust_anchors:
        raise GpuGateFailed("gpu: no GPU device root is trusted, so no GPU evidence can verify")
    # (2)
    try:
        items = gate.source.collect(nonce)
    except (TeeError, ValueError, OSError) as exc:  # no GPU / NVML, a bad nonce, unreadable device state
        raise GpuGateFailed(f"gpu: {exc}") from exc
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_GPUS:
        raise GpuGateFailed(f"gpu: expected evidence for 1..{MAX_GPUS} GPUs")
    # (3)
    now = int(gate.clock())
    for i, item in enumerate(items):
        evidence = item.get("evidence") if isinstance(item, dict) else None
        chain = item.get("certificate_chain") if isinstance(item, dict) else None
        if not isinstance(evidence, str) or not isinstance(chain, str):
            raise GpuGateFailed(f"gpu: GPU {i}: evidence and certificate_chain must be strings")
        if len(evidence) > MAX_GPU_EVIDENCE_HEX or len(chain) > MAX_GPU_CHAIN_PEM:
            raise GpuGateFailed(f"gpu: GPU {i}: evidence or certificate chain too large")
        try:
            revocation: Revocation | None = None
            rims: tuple[bytes, ...] = ()
            if gate.collateral is not None:
                m = parse_nvidia_evidence(evidence.encode())
                versions = [v for v in (m.driver_version, m.vbios_version) if v]
                revocation = gate.collateral.revocation(now=now)
                rims = gate.collateral.rims(versions, trust_anchors=gate.trust_anchors, now=now)
            if gate.require_rims and not rims:
                raise GpuGateFailed(f"gpu: GPU {i}: no RIM for its driver/VBIOS (offline NVIDIA collateral)")
            verify_nvidia_evidence(
                evidence.encode(),
                cert_chain_pem=chain.encode(),
                trust_anchors=gate.trust_anchors,
                now=now,
                expected_nonce=nonce,
                revocation=revocation,
                rims=rims,
            )
        except AttestationError as exc:
            raise GpuGateFailed(f"gpu: GPU {i}: {exc}") from exc
    # (4)
    return gpu_evidence_digest(items)


@dataclass
class AgentState:
    """Everything the agent serves. `app_compose_text` is the normalized JSON, so
    sha256(app_compose_text) == compose_hash and verifiers can check tcb_info.app_compose directly."""

    tee: TeePlatform
    app_compose: dict[str, Any]
    keys: AppKeys
    app_id: bytes
    instance_id: bytes
    vm_config: dict[str, Any]
    app_compose_text: str = ""
    compose_hash: bytes = b""
    os_image_hash: bytes = b""
    device_id: bytes = b""
    cloud_vendor: str = "teecloud"
    cloud_product: str = ""
    booted: bool = True
    reserved_events: frozenset[str] = field(default_factory=frozenset)
    # an app migrating to a new root epoch: its keys under the previous one, for the volume's re-wrap
    # (teecloud.agent.guest drops them once the volume is mounted)
    previous_keys: AppKeys | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.app_compose_text:
            self.app_compose_text = normalize_app_compose(self.app_compose)
        if not self.compose_hash:
            self.compose_hash = hashlib.sha256(self.app_compose_text.encode()).digest()
        if not self.reserved_events:
            from teecloud.agent.api import RESERVED_EVENTS

            self.reserved_events = RESERVED_EVENTS

    @property
    def app_name(self) -> str:
        name = self.app_compose.get("name", "")
        return name if isinstance(name, str) else ""

    @property
    def public_tcbinfo(self) -> bool:
        return self.app_compose.get("public_tcbinfo", True) is not False


def parse_app_compose(text: str | bytes) -> dict[str, Any]:
    """teecloud.appcompose.parse_app_compose, its refusal raised as a BootError."""
    try:
        return appcompose.parse_app_compose(text)
    except appcompose.AppComposeError as exc:
        raise BootError(str(exc)) from None


def boot(
    tee: TeePlatform,
    app_compose_text: str | bytes,
    app_id: bytes | None,
    instance_id: bytes | None,
    key_provider: KeyProvider,
    *,
    extra_events: Sequence[tuple[str, bytes]] = (),
    storage_fs: str | None = None,
    cloud_product: str | None = None,
    gpu: GpuGate | None = None,
) -> AgentState:
    """Measure the app (dstack order, see module docstring), get its keys, and return the AgentState.

    `app_id` None -> compose_hash[:20] (dstack's rule without a KMS); `instance_id` None -> empty when the
    compose sets no_instance_id, else sha256(b"teecloud-instance:" + app_id)[:20]."""
    compose = parse_app_compose(app_compose_text)
    try:
        gpu_required = gpu_attestation_required(compose)
    except appcompose.AppComposeError as exc:
        raise BootError(str(exc)) from None
    text = normalize_app_compose(compose)
    chash = hashlib.sha256(text.encode()).digest()
    app_id = bytes(app_id) if app_id is not None else chash[:20]
    if not 1 <= len(app_id) <= 64:
        raise BootError("app_id must be 1..64 bytes")
    if instance_id is None:
        no_id = compose.get("no_instance_id") is True
        instance_id = b"" if no_id else hashlib.sha256(b"teecloud-instance:" + app_id).digest()[:20]
    instance_id = bytes(instance_id)

    tee.emit_event("system-preparing", b"")
    tee.emit_event("app-id", app_id)
    tee.emit_event("compose-hash", chash)
    tee.emit_event("instance-id", instance_id)
    nonce = key_provider.boot_nonce()
    if nonce:
        tee.emit_event("boot-nonce", nonce)
    if gpu_required:
        # the GPU gate (module docstring): before boot-mr-done, so a failure stops the boot before any key
        tee.emit_event(GPU_EVIDENCE_EVENT, _run_gpu_gate(gpu, gpu_nonce(nonce, app_id)))
    tee.emit_event("boot-mr-done", b"")
    for name, payload in extra_events:
        tee.emit_event(name, payload)
    # a KMS client sends the measured compose with GetAppKey, where the KMS reads its GPU requirement
    bind = getattr(key_provider, "bind_app_compose", None)
    if callable(bind):
        bind(text)
    keys = key_provider.get_app_keys(tee, app_id, instance_id)
    # a key provider of a rotated root (teecloud.kms.rotation): while the measured compose migrates, the
    # previous epoch's keys too, now, while the evidence is still boot-time evidence
    previous = getattr(key_provider, "get_previous_app_keys", None)
    previous_keys = previous(tee, app_id, instance_id) if callable(previous) else None
    # what the provider states for these keys (a rotated threshold group: the app's epoch and its group key;
    # the same as info() for every other provider), so the measured event matches the Info route's
    kp_info = json.dumps(keys.key_provider_info or key_provider.info(), separators=(",", ":")).encode()
    tee.emit_event("key-provider", kp_info)
    if storage_fs:
        tee.emit_event("storage-fs", storage_fs.encode())
    tee.emit_event("system-ready", b"")

    vm_config = tee.vm_config()
    os_image_hash = tee.os_image_hash or keys.os_image_hash
    device_id = tee.device_id
    return AgentState(
        tee=tee,
        app_compose=compose,
        keys=keys,
        app_id=app_id,
        instance_id=instance_id,
        vm_config=dict(vm_config) if isinstance(vm_config, dict) else {},
        app_compose_text=text,
        compose_hash=chash,
        os_image_hash=os_image_hash if isinstance(os_image_hash, bytes) else b"",
        device_id=device_id if isinstance(device_id, bytes) else b"",
        cloud_product=cloud_product or tee.kind,
        previous_keys=previous_keys,
    )
