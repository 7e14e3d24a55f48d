"""`teecloud kms threshold-init --dev` then `teecloud up --kms-nodes 5 --threshold 3` (issue 19): the
development ceremony also makes the group's secp256k1 signing key; the five node processes make their
presignatures at start (a networked round, kept in memory only) and serve them, and a CVM's GetKey chain
ends in a signature made by three node processes that verifies under the group's signing key (the one in
the group record). Two nodes stopped: still."""

from __future__ import annotations

import json
from pathlib import Path

import coincurve
import pytest

from teecloud.agent import api as agent_api
from teecloud.agent.boot import boot
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.devstack import LocalCloud
from teecloud.keys.sigchain import verify_key_signature_chain
from teecloud.kms.bootstrap import boot_kms_tee
from teecloud.kms.threshold import dev_ceremony, read_group
from teecloud.kms.threshold_client import ThresholdKeyProvider
from teecloud.tee.simulated import SimulatedTdx

pytestmark = pytest.mark.slow

HELLO = {
    "manifest_version": 2,
    "name": "hello",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  web:\n    image: hello\n",
}


def test_getkey_through_five_node_processes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    tee = SimulatedTdx(home)
    group, created = dev_ceremony(tee, boot_kms_tee(tee), 3, 5, home=home)
    assert created and len(group.signing_key) == 33
    assert read_group(home) == group
    cloud = LocalCloud(home, kms_nodes=5, kms_threshold=3)
    cloud.start(check=False, resume=False)
    try:
        provider = cloud.key_provider
        assert isinstance(provider, ThresholdKeyProvider)
        assert provider.group.signing_key == group.signing_key
        app_id = bytes.fromhex(cloud.chain.register_app(None, compose_hash(HELLO))[2:])

        def get_key() -> tuple[bytes, bytes]:
            t = SimulatedTdx(home)
            state = boot(
                t,
                json.dumps(HELLO),
                app_id,
                None,
                provider,
                extra_events=[("os-image-hash", t.os_image_hash)],
            )
            body = json.loads(AgentService(state).get_key(agent_api.GetKeyRequest(path="p", purpose="x")))
            key = bytes.fromhex(body["key"])
            app_pub = verify_key_signature_chain(
                app_id=app_id,
                public_key=coincurve.PrivateKey(key).public_key.format(compressed=True),
                purpose="x",
                signature_chain=[bytes.fromhex(s) for s in body["signature_chain"]],
                kms_root_public_key=group.signing_key,
            )
            return key, app_pub

        first = get_key()
        for i in (2, 5):  # two node processes stopped (children of this cloud, by their handles)
            cloud.kms_processes[i].terminate()
            cloud.kms_processes[i].wait(timeout=20)
        assert get_key() == first
        assert set(provider.faults) == {2, 5}
    finally:
        cloud.stop()
