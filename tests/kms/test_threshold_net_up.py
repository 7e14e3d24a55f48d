"""`teecloud up --kms-nodes 5 --threshold 3` with NO development ceremony (issue 19): the five node processes
run the DKG, then make the group's signing key and a batch of presignatures among themselves as running
nodes (kms.threshold_net over kms.peering); a CVM's GetKey chain then ends in a signature made by three
node processes that verifies under the group's signing key. No process ever held the signing key."""

from __future__ import annotations

import json
from pathlib import Path

import coincurve
import httpx
import pytest
from typer.testing import CliRunner

from teecloud.agent import api as agent_api
from teecloud.agent.boot import boot
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.cli import app as cli_app
from teecloud.devstack import PRESIGN_BATCH, LocalCloud
from teecloud.keys.sigchain import verify_key_signature_chain
from teecloud.kms.launcher import load_admin_token
from teecloud.kms.threshold import node_home, read_group
from teecloud.kms.threshold_client import ThresholdKeyProvider
from teecloud.node.errors import NodeError
from teecloud.tee.simulated import SimulatedTdx

pytestmark = pytest.mark.slow

HELLO = {
    "manifest_version": 2,
    "name": "hello",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  web:\n    image: hello\n",
}


def _pool(home: Path, cloud: LocalCloud, i: int) -> dict[str, object]:
    ep = json.loads((node_home(i, home) / "kms" / "endpoint.json").read_text())
    token = load_admin_token(node_home(i, home))
    r = httpx.get(f"{ep['admin_url']}/tround/pool", headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert isinstance(doc, dict)
    return doc


def test_up_makes_its_signing_key_and_presignatures_and_getkey_works(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cloud = LocalCloud(home, kms_nodes=5, kms_threshold=3)
    cloud.start(check=False, resume=False)
    try:
        group = read_group(home)
        assert group is not None and len(group.signing_key) == 33
        pools = [_pool(home, cloud, i) for i in range(1, 6)]
        assert all(p["signing_key"] == group.signing_key.hex() for p in pools)
        # made among the running nodes (the local cloud's own start may already have used one per signer)
        assert all(PRESIGN_BATCH - 3 <= int(str(p["unused"])) <= PRESIGN_BATCH for p in pools), pools
        provider = cloud.key_provider
        assert isinstance(provider, ThresholdKeyProvider)
        assert provider.group.signing_key == group.signing_key
        # the provider's group is the chain's record: KmsGroup holds the signing key the nodes made
        assert cloud.chain.kms_group.signing_key(1) == group.signing_key
        app_id = bytes.fromhex(cloud.chain.register_app(None, compose_hash(HELLO))[2:])
        t = SimulatedTdx(home)
        state = boot(
            t, json.dumps(HELLO), app_id, None, provider, extra_events=[("os-image-hash", t.os_image_hash)]
        )
        body = json.loads(AgentService(state).get_key(agent_api.GetKeyRequest(path="p", purpose="x")))
        key = bytes.fromhex(body["key"])
        verify_key_signature_chain(
            app_id=app_id,
            public_key=coincurve.PrivateKey(key).public_key.format(compressed=True),
            purpose="x",
            signature_chain=[bytes.fromhex(s) for s in body["signature_chain"]],
            kms_root_public_key=group.signing_key,
        )
        used = sum(
            int(str(p["unused"])) - int(str(_pool(home, cloud, i)["unused"])) for i, p in enumerate(pools, 1)
        )
        assert used == 3  # one presignature on each of the t signing nodes
        # the operator's refill: `teecloud kms presign` among the running node processes
        before = [int(str(_pool(home, cloud, i)["unused"])) for i in range(1, 6)]
        env = {"TEECLOUD_HOME": str(home)}
        result = CliRunner().invoke(cli_app, ["kms", "presign", "--count", "2"], env=env)
        assert result.exit_code == 0, result.output
        assert "2 presignatures made by nodes [1, 2, 3, 4, 5]" in result.output
        assert [int(str(_pool(home, cloud, i)["unused"])) for i in range(1, 6)] == [b + 2 for b in before]
    finally:
        cloud.stop()
    # a group.json whose signing key is not the chain's: the next start refuses, naming the file
    doc = json.loads((home / "kms-nodes" / "group.json").read_text())
    doc["signing_key"] = coincurve.PrivateKey().public_key.format(compressed=True).hex()
    (home / "kms-nodes" / "group.json").write_text(json.dumps(doc))
    again = LocalCloud(home, kms_nodes=5, kms_threshold=3)
    try:
        with pytest.raises(NodeError, match=r"group\.json disagrees with the chain: its signing key"):
            again.start(check=False, resume=False)
    finally:
        again.stop()
