"""`teecloud up --kms-nodes 5 --threshold 3` (issue 19): the local cloud's worker node gets its CVMs' keys
from five KMS node processes through ThresholdKeyProvider; two nodes stopped, a new boot still gets the same
keys. (Start-up without the Docker prerequisites: the CVM boot here is the guest boot sequence on a
simulated TEE, driven through the node's own key provider.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teecloud.agent.boot import boot
from teecloud.appcompose import compose_hash
from teecloud.devstack import LocalCloud
from teecloud.kms.threshold_client import ThresholdKeyProvider
from teecloud.tee.simulated import SimulatedTdx

pytestmark = pytest.mark.slow

HELLO = {
    "manifest_version": 2,
    "name": "hello",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  web:\n    image: hello\n",
}


def test_up_with_five_kms_nodes_threshold_three(tmp_path: Path) -> None:
    cloud = LocalCloud(tmp_path / "home", kms_nodes=5, kms_threshold=3)
    cloud.start(check=False, resume=False)
    try:
        provider = cloud.node.key_provider
        assert isinstance(provider, ThresholdKeyProvider)
        assert (provider.group.t, len(provider.group.nodes)) == (3, 5)
        app_id = bytes.fromhex(cloud.chain.register_app(None, compose_hash(HELLO))[2:])
        home = tmp_path / "home"

        def boot_once() -> bytes:
            tee = SimulatedTdx(home)
            state = boot(
                tee,
                json.dumps(HELLO),
                app_id,
                None,
                provider,
                extra_events=[("os-image-hash", tee.os_image_hash)],
            )
            return bytes(state.keys.disk_crypt_key + state.keys.env_crypt_key)

        first = boot_once()
        assert set(cloud.kms_processes) == {1, 2, 3, 4, 5}
        for i in (2, 5):  # two node processes stopped (children of this cloud, by their handles)
            cloud.kms_processes[i].terminate()
            cloud.kms_processes[i].wait(timeout=20)
        assert boot_once() == first
        assert set(provider.faults) == {2, 5}
    finally:
        cloud.stop()
