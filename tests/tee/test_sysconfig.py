"""One reader of dstack's host-shared .sys-config.json (teecloud.tee.sysconfig) for both guest TEE backends:
the OS image hash and vm_config come from the file the node writes (teecloud.node.service), bounded and
typed; a malformed file is a clear error, an absent one means "not told"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from teecloud import vmconfig
from teecloud.tee.sev_snp import SevSnpPlatform
from teecloud.tee.sysconfig import MAX_SYS_CONFIG_BYTES, SysConfigError, parse_sys_config
from teecloud.tee.tdx import TdxPlatform

VM = {"os_image_hash": "ab" * 32, "cpu_count": 4, "memory_size": 4 << 30, "qemu_version": "9.2.1"}


def node_written(vm: dict[str, Any]) -> bytes:
    """.sys-config.json as the node writes it: vm_config as a JSON string (dstack's form)."""
    doc = {
        "kms_urls": ["https://127.0.0.1:8043"],
        "gateway_urls": [],
        "pccs_url": "",
        "docker_registry": "",
        "host_api_url": "",
        "vm_config": vmconfig.to_json(vm) or "{}",
    }
    return json.dumps(doc).encode()


@pytest.mark.parametrize("platform", [TdxPlatform, SevSnpPlatform])
def test_both_backends_read_the_host_shared_file(tmp_path: Path, platform: Any) -> None:
    path = tmp_path / ".sys-config.json"
    tee = platform(tsm_root=tmp_path / "tsm", sys_config=path)
    assert tee.os_image_hash == b"" and tee.vm_config() == {}  # absent: not told
    path.write_bytes(node_written(VM))
    assert tee.os_image_hash == bytes.fromhex("ab" * 32)
    assert tee.vm_config() == VM
    assert vmconfig.of(tee) == vmconfig.to_json(VM)  # what a KMS client sends
    path.write_bytes(node_written({}))
    assert tee.os_image_hash == b"" and tee.vm_config() == {}
    path.write_bytes(b"[]")
    with pytest.raises(SysConfigError, match="not a JSON object"):
        tee.vm_config()


def test_vm_config_may_be_an_object_and_unknown_fields_are_ignored() -> None:
    config = parse_sys_config(json.dumps({"vm_config": VM, "future_field": 1}).encode())
    assert config.vm_config == VM and config.kms_urls == ()


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"{", "not JSON"),
        (b" " * (MAX_SYS_CONFIG_BYTES + 1), "larger than"),
        (json.dumps({"kms_urls": "https://x"}).encode(), "kms_urls must be a list"),
        (json.dumps({"kms_urls": ["u"] * 33}).encode(), "kms_urls must be a list"),
        (json.dumps({"gateway_urls": [1]}).encode(), "gateway_urls"),
        (json.dumps({"pccs_url": 5}).encode(), "pccs_url must be a string"),
        (json.dumps({"vm_config": "{"}).encode(), "vm_config is not a JSON document"),
        (json.dumps({"vm_config": "[1]"}).encode(), "vm_config must be a JSON object"),
        (json.dumps({"vm_config": {"cpu_count": 1}}).encode(), "os_image_hash"),
        (json.dumps({"vm_config": {**VM, "memory_size": -1}}).encode(), "memory_size"),
    ],
)
def test_a_malformed_file_is_refused_with_the_field(doc: bytes, reason: str) -> None:
    with pytest.raises(SysConfigError, match=reason):
        parse_sys_config(doc)
