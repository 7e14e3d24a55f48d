"""dstack's host-shared system config (`.sys-config.json`, reference/dstack.md section 7): what the host
tells a guest about itself — KMS and gateway URLs, PCCS, registry, host API, and the VM's `vm_config`
(OS image hash, CPU count, memory size, QEMU settings), and teecloud's `tee_mode` (the qemu backend's
mode: tdx, sev-snp or plain; teecloud.tee.guest picks the guest's TEE from it). The one reader for the guest
TEE backends (`teecloud.tee.tdx`, `teecloud.tee.sev_snp`), which take the OS image hash and vm_config from
it.

    read_sys_config(path) -> SysConfig | None     None when the file is absent (not a dstack guest)
    parse_sys_config(bytes) -> SysConfig          bounded, typed; unknown fields ignored

The file is written by the host, so nothing here is trusted: a KMS believes the OS image only through the
quoted registers (teecloud.kms.authz, `os_image` step) and RTMR0's shape only through its reference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teecloud import vmconfig
from teecloud.tee.errors import TeeUsageError

__all__ = [
    "DEFAULT_SYS_CONFIG",
    "MAX_SYS_CONFIG_BYTES",
    "SysConfig",
    "SysConfigError",
    "parse_sys_config",
    "read_sys_config",
]

# where a dstack guest keeps the host-shared files it copied at boot (dstack-util system_setup)
DEFAULT_SYS_CONFIG = Path("/dstack/.host-shared/.sys-config.json")
MAX_SYS_CONFIG_BYTES = 64 * 1024
MAX_URLS = 32


class SysConfigError(TeeUsageError):
    """The host-shared .sys-config.json is oversized or malformed; the message names the field."""


@dataclass(frozen=True)
class SysConfig:
    kms_urls: tuple[str, ...] = ()
    gateway_urls: tuple[str, ...] = ()
    pccs_url: str = ""
    docker_registry: str = ""
    host_api_url: str = ""
    vm_config: Mapping[str, Any] = field(default_factory=dict)
    # teecloud's qemu backend: the guest's TEE mode (teecloud.tee.guest), "" when the host states none
    tee_mode: str = ""

    @property
    def os_image_hash(self) -> bytes:
        """vm_config's os_image_hash (32 bytes), or b"" when the host stated none."""
        if not self.vm_config:
            return b""
        try:
            return vmconfig.parse(dict(self.vm_config)).os_image_hash
        except vmconfig.VmConfigError:
            return b""


def _text(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name, "")
    if not isinstance(value, str) or len(value) > 2048:
        raise SysConfigError(f".sys-config.json: {name} must be a string of at most 2048 characters")
    return value


def _urls(doc: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = doc.get(name, [])
    if (
        not isinstance(value, list)
        or len(value) > MAX_URLS
        or not all(isinstance(u, str) and len(u) <= 2048 for u in value)
    ):
        raise SysConfigError(f".sys-config.json: {name} must be a list of at most {MAX_URLS} URL strings")
    return tuple(value)


TEE_MODES = ("tdx", "sev-snp", "plain")


def _tee_mode(doc: Mapping[str, Any]) -> str:
    value = doc.get("tee_mode", "")
    if value != "" and value not in TEE_MODES:
        raise SysConfigError(f".sys-config.json: tee_mode must be one of {', '.join(TEE_MODES)}")
    return str(value)


def parse_sys_config(data: bytes) -> SysConfig:
    if len(data) > MAX_SYS_CONFIG_BYTES:
        raise SysConfigError(f".sys-config.json is larger than {MAX_SYS_CONFIG_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SysConfigError(f".sys-config.json is not JSON: {str(exc)[:100]}") from None
    if not isinstance(doc, dict):
        raise SysConfigError(".sys-config.json is not a JSON object")
    raw = doc.get("vm_config", "")
    vm: object
    if isinstance(raw, str):  # dstack writes vm_config as a JSON string
        try:
            vm = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise SysConfigError(".sys-config.json: vm_config is not a JSON document") from None
    else:
        vm = raw
    if not isinstance(vm, dict):
        raise SysConfigError(".sys-config.json: vm_config must be a JSON object")
    if vm:
        try:
            vmconfig.parse(vm)
        except vmconfig.VmConfigError as exc:
            raise SysConfigError(f".sys-config.json: {exc}") from None
    return SysConfig(
        kms_urls=_urls(doc, "kms_urls"),
        gateway_urls=_urls(doc, "gateway_urls"),
        pccs_url=_text(doc, "pccs_url"),
        docker_registry=_text(doc, "docker_registry"),
        host_api_url=_text(doc, "host_api_url"),
        vm_config=vm,
        tee_mode=_tee_mode(doc),
    )


def read_sys_config(path: Path) -> SysConfig | None:
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_SYS_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SysConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_sys_config(data)


class HostToldIdentity:
    """What a guest TEE platform reports about its own image and VM shape: the host's word, read from dstack's
    host-shared `.sys-config.json` at `sys_config_path` (the verifier recomputes and checks both against the
    quote; nothing here is trusted). One reader for `tee/tdx.py` and `tee/sev_snp.py`."""

    sys_config_path: Path

    @property
    def os_image_hash(self) -> bytes:
        config = read_sys_config(self.sys_config_path)
        return config.os_image_hash if config is not None else b""

    @property
    def device_id(self) -> bytes:
        return b""

    def vm_config(self) -> dict[str, Any]:
        config = read_sys_config(self.sys_config_path)
        return dict(config.vm_config) if config is not None else {}
