"""`teecloud up --kms-nodes 5 --threshold 3` (issue 19): on first start five share-less dealer processes and
five node processes run a dealerless DKG (sub-shares over mutual RA-TLS to the nodes' boot-time evidence);
the local cloud's worker node then gets its CVMs' keys from the five node processes through
ThresholdKeyProvider; two nodes stopped, a new boot still gets the same keys; a restart reuses the sealed
shares. (Start-up without the Docker prerequisites: the CVM boot here is the guest boot sequence on a
simulated TEE, driven through the node's own key provider.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teecloud.agent.boot import boot
from teecloud.appcompose import compose_hash
from teecloud.devstack import LocalCloud
from teecloud.kms.threshold import read_group
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
        provider = cloud.key_provider
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

        assert (home / "kms-nodes" / "dkg-plan.json").exists()  # the networked ceremony ran, not the dev one
        group = read_group(home)
        assert group is not None and group.commitments == provider.group.commitments
        on_chain = cloud.chain.kms_group.active(1)  # on chain: the client takes its group from it
        assert on_chain is not None and on_chain.commitments == group.commitments and on_chain.t == 3
        assert on_chain.urls == dict(provider.group.nodes)
        assert len({m.mr_aggregated for m in on_chain.members}) == 1  # one KMS build, five nodes
        first = boot_once()
        assert set(cloud.kms_processes) == {1, 2, 3, 4, 5}
        for i in (2, 5):  # two node processes stopped (children of this cloud, by their handles)
            cloud.kms_processes[i].terminate()
            cloud.kms_processes[i].wait(timeout=20)
        assert boot_once() == first
        assert set(provider.faults) == {2, 5}
    finally:
        cloud.stop()
    # Restart: the nodes unseal their shares; no new ceremony, the same group and keys.
    again = LocalCloud(tmp_path / "home", kms_nodes=5, kms_threshold=3)
    again.start(check=False, resume=False)
    try:
        provider = again.key_provider
        assert provider.group.commitments == group.commitments
        served = again.chain.kms_group.active(1)
        assert served is not None and served.urls == dict(provider.group.nodes)
        assert served.group_public_key == group.commitments[0]
        assert boot_once() == first
    finally:
        again.stop()
