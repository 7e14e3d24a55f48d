"""The node's CVM backends, behind `CvmBackend` (base.py): `docker` (Docker Engine + Compose on the host) and
`qemu` (one confidential VM per app). `make_backend` is how the rest of the node gets one: nothing in
teecloud.node outside this package imports a backend module (an import-linter contract)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from teecloud.agent.keyprovider import KeyProvider
from teecloud.node.errors import BadRequest
from teecloud.node.runtime.base import (
    BOOT_PHASES,
    ComposeSpec,
    ContainerState,
    Cvm,
    CvmAttestation,
    CvmBackend,
    LogSource,
    Progress,
    ResourceLimits,
    Runtime,
    Volume,
)
from teecloud.tee.base import TeePlatform

__all__ = [
    "BACKENDS",
    "BOOT_PHASES",
    "ComposeSpec",
    "ContainerState",
    "Cvm",
    "CvmAttestation",
    "CvmBackend",
    "LogSource",
    "Progress",
    "ResourceLimits",
    "Runtime",
    "Volume",
    "make_backend",
]

BACKENDS = ("docker", "qemu")


def make_backend(
    kind: str,
    *,
    key_provider: KeyProvider,
    guest_tee_factory: Callable[[], TeePlatform],
    **options: Any,
) -> CvmBackend:
    """The backend named `kind`, given how its guests get keys and evidence (`options`: the backend's own)."""
    if kind == "docker":
        from teecloud.node.runtime.docker_cvm import DockerBackend

        return DockerBackend(key_provider=key_provider, guest_tee_factory=guest_tee_factory, **options)
    if kind == "qemu":
        # the guest fetches its keys itself (KMS URLs in .sys-config.json) and produces its own evidence: the
        # node's key provider and TEE factory are not the guest's here
        from teecloud.node.runtime.qemu import QemuBackend

        return QemuBackend(**options)
    raise BadRequest(f"unknown CVM backend {kind!r} (one of: {', '.join(BACKENDS)})")
