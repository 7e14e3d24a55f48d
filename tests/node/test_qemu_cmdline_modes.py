"""The qemu backend tells the guest its TEE mode through the host-shared `.sys-config.json` (`tee_mode`),
which the guest's TEE factory (teecloud.tee.guest) reads strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teecloud.agent.boot import normalize_app_compose
from teecloud.node.runtime.qemu import _write_shared
from teecloud.tee.guest import guest_mode
from teecloud.tee.sysconfig import read_sys_config
from tests.node.fakes import stored_instance


@pytest.mark.parametrize("mode", ["tdx", "sev-snp", "plain"])
def test_the_share_states_the_backends_mode_for_the_guest(
    teecloud_home: Path, tmp_path: Path, mode: str
) -> None:
    compose = normalize_app_compose(
        {"name": "web", "runner": "docker-compose", "docker_compose_file": "services: {}\n"}
    )
    inst = stored_instance(teecloud_home, compose, sys_config={"kms_urls": ["https://127.0.0.1:1"]})
    shared = tmp_path / "shared"
    _write_shared(inst, shared, tee_mode=mode)  # type: ignore[arg-type]
    doc = json.loads((shared / ".sys-config.json").read_text())
    assert doc == {"kms_urls": ["https://127.0.0.1:1"], "tee_mode": mode}
    assert guest_mode(read_sys_config(shared / ".sys-config.json")) == mode
