"""CVM boot as the guest agent sees it: measure the app into RTMR3 in dstack's order, fetch keys.

Event order (dstack v0.5.x `system_setup.rs`, reference/dstack.md §4, plus teecloud's boot-nonce):
    system-preparing, app-id, compose-hash, instance-id, [boot-nonce], boot-mr-done,
    [extra events: os-image-hash in KMS mode], key-provider, [storage-fs], system-ready
Keys are fetched after `boot-mr-done` and the KMS-mode events, so a KMS sees exactly the boot grammar's
RTMR3 (teecloud.attestation.boottime); the boot-nonce (the key provider's challenges) binds the request to
this boot.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from teecloud import appcompose
from teecloud.agent.keyprovider import KeyProvider
from teecloud.appcompose import compose_hash, normalize_app_compose
from teecloud.keys.appkeys import AppKeys
from teecloud.tee.base import TeePlatform

__all__ = ["AgentState", "BootError", "boot", "compose_hash", "normalize_app_compose"]


class BootError(ValueError):
    """The app-compose file or the boot parameters are unusable."""


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
) -> AgentState:
    """Measure the app (dstack order, see module docstring), get its keys, and return the AgentState.

    `app_id` None -> compose_hash[:20] (dstack's rule without a KMS); `instance_id` None -> empty when the
    compose sets no_instance_id, else sha256(b"teecloud-instance:" + app_id)[:20]."""
    compose = parse_app_compose(app_compose_text)
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
    tee.emit_event("boot-mr-done", b"")
    for name, payload in extra_events:
        tee.emit_event(name, payload)
    keys = key_provider.get_app_keys(tee, app_id, instance_id)
    kp_info = json.dumps(key_provider.info(), separators=(",", ":")).encode()
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
    )
