"""`teecloud kms verify-app-key --app-ca` on what a booted CVM actually serves (issue 19): five nodes with a
group CA (3-of-5, P-256), a hello app booted under the group root, its guest agent's RA-TLS chain (leaf, app
CA signed by t nodes) checked by the CLI under the root KmsGroup records; under a chain that records another
root, or for another app, rejected."""

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
from teecloud.kms.threshold_client import group_ca_record
from tests.kms.conftest import World
from tests.kms.test_threshold_app_ca import cluster  # noqa: F401 (fixture: five nodes with a group CA)
from tests.kms.test_threshold_ca_chain import _self_signed_root
from tests.kms.test_threshold_nodes import Cluster, boot_hello

pytestmark = pytest.mark.slow


def _record(home: Path, nodes: Cluster, root_pem: str) -> None:
    by_index = sorted(nodes.group.nodes.items())
    members = [CommitteeMember(i, bytes([i]) * 32, bytes(32), url) for i, url in by_index]
    with ChainClient.embedded(home) as c:  # one process holds the embedded chain at a time
        c.deploy()
        g = c.kms_group
        g.activate(g.record_committee(1, nodes.group.t, nodes.group.commitments, members))
        g.record_ca(1, *group_ca_record(root_pem))


def test_a_booted_apps_ra_tls_chain_verifies_under_the_recorded_root(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    import time

    from cryptography.hazmat.primitives.asymmetric import ec

    from teecloud.keys.certs import cert_to_pem

    provider = cluster.provider()
    app_id, state = boot_hello(teecloud_home, world, provider)
    assert provider.ca_error == ""
    body = AgentService(state).get_tls_key(
        agent_api.GetTlsKeyRequest(subject="app", usage_ra_tls=True, usage_client_auth=True)
    )
    (tmp_path / "chain.pem").write_text("".join(body["certificate_chain"]))
    (tmp_path / "root.pem").write_text(cluster.group.ca_root_cert)
    args = ["kms", "verify-app-key", "--app-ca", str(tmp_path / "chain.pem")]
    args += ["--root-cert", str(tmp_path / "root.pem")]
    runner = CliRunner()
    # the chain records another root first: the group's root is not the recorded one
    attacker = _self_signed_root(ec.generate_private_key(ec.SECP256R1()), int(time.time()) - 60)
    _record(teecloud_home, cluster, cert_to_pem(attacker))
    r = runner.invoke(app, [*args, "--app-id", app_id.hex()])
    assert r.exit_code == 1 and "is not the recorded one" in r.output, r.output
    # a fresh home whose chain records the group's root: valid; for another app id: rejected
    home2 = teecloud_home / "second-chain-home"
    _record(home2, cluster, cluster.group.ca_root_cert)
    env = {"TEECLOUD_HOME": str(home2)}
    r = runner.invoke(app, [*args, "--app-id", app_id.hex(), "--json"], env=env)
    assert r.exit_code == 0 and json.loads(r.output)["is_valid"] is True, r.output
    r = runner.invoke(app, [*args, "--app-id", "00" * 20], env=env)
    assert r.exit_code == 1 and "the app CA is not the group's" in r.output, r.output
    assert "Traceback" not in r.output
