"""`teecloud kms verify-app-key` on what a booted CVM actually hands its app (issue 19): five signing nodes
(3-of-5), a hello app booted through the ThresholdKeyProvider on the group KmsGroup records, its guest
agent's GetKey response checked by the CLI under the signing key on chain; the same response under
another group's record is rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teecloud.agent import api as agent_api
from teecloud.agent.service import AgentService
from teecloud.chain import ChainClient
from teecloud.chain.kmsgroup import CommitteeMember
from teecloud.cli import app
from teecloud.keys import threshold_ecdsa as te
from teecloud.kms.threshold_client import ThresholdKeyProvider, group_from_chain
from tests.kms.conftest import World
from tests.kms.test_threshold_getkey import cluster  # noqa: F401 (fixture: five signing nodes)
from tests.kms.test_threshold_nodes import Cluster, boot_hello

pytestmark = pytest.mark.slow


def _record(home: Path, nodes: Cluster, signing_key: bytes) -> None:
    """Epoch 1's committee and signing key in the embedded chain of `home` (what the CLI opens)."""
    members = [
        CommitteeMember(i, bytes([i]) * 32, bytes(32), url) for i, url in sorted(nodes.group.nodes.items())
    ]
    with ChainClient.embedded(home) as c:  # one process holds the embedded chain at a time
        c.deploy()
        g = c.kms_group
        g.activate(g.record_committee(1, nodes.group.t, nodes.group.commitments, members))
        g.record_signing_key(1, signing_key)


def test_a_booted_apps_getkey_response_verifies_under_the_signing_key_on_chain(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    _record(teecloud_home, cluster, cluster.group.signing_key)
    with ChainClient.embedded(teecloud_home) as c:
        trusted = group_from_chain(c.kms_group, 1)
    provider = ThresholdKeyProvider(trusted, cluster.provider()._clients, hedge_s=60.0)
    app_id, state = boot_hello(teecloud_home, world, provider)
    assert provider.signature_error == ""
    body = AgentService(state).get_key(agent_api.GetKeyRequest(path="wallet/0", purpose="signing"))
    (tmp_path / "getkey.json").write_text(json.dumps(json.loads(body)))  # the agent's JSON as an app gets it
    runner = CliRunner()
    args = ["kms", "verify-app-key", "--app-id", app_id.hex(), "--get-key", str(tmp_path / "getkey.json")]
    r = runner.invoke(app, [*args, "--purpose", "signing", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["is_valid"] and doc["signing_key"] == cluster.group.signing_key.hex()
    # the same response judged as another purpose's, or another app's: rejected
    r = runner.invoke(app, [*args, "--purpose", "other"])
    assert r.exit_code == 1 and "REJECTED" in r.output, r.output
    r = runner.invoke(app, [*args[:3], "00" * 20, *args[4:], "--purpose", "signing"])
    assert r.exit_code == 1 and "not issued by the expected KMS root" in r.output, r.output


def test_the_same_response_under_another_groups_record_is_rejected(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The app booted under the cluster's group; the chain the user reads records another signing key for
    the epoch (another group's): the CLI says the chain ends elsewhere, exit 1."""
    provider = cluster.provider()
    app_id, state = boot_hello(teecloud_home, world, provider)
    body = AgentService(state).get_key(agent_api.GetKeyRequest(path="p", purpose="x"))
    (tmp_path / "getkey.json").write_text(json.dumps(json.loads(body)))  # the agent's JSON as an app gets it
    other = te.dkg_local(2, 3)[0].group_public_key
    _record(teecloud_home, cluster, other)
    r = CliRunner().invoke(
        app,
        [
            "kms",
            "verify-app-key",
            "--app-id",
            app_id.hex(),
            "--get-key",
            str(tmp_path / "getkey.json"),
            "--purpose",
            "x",
        ],
    )
    assert r.exit_code == 1 and f"expected {other.hex()}" in r.output, r.output
    assert "Traceback" not in r.output
