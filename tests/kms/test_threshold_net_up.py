"""`teecloud up --kms-nodes 5 --threshold 3` with NO development ceremony (issue 19), one local cloud for the
whole module (starting it runs the networked ceremonies: the longest part of each test when each started its
own). Its tests run in file order, those that only observe it first, then the one that stops nodes and
restarts it, then the one that tampers with its group.json:

- the five share-less dealer processes and five node processes run a dealerless DKG (sub-shares over mutual
  RA-TLS to the nodes' boot-time evidence), then make the group's signing key and a batch of presignatures
  among themselves as running nodes (kms.threshold_net over kms.peering); a CVM's GetKey chain ends in a
  signature made by three node processes that verifies under the group's signing key. No process ever held
  the signing key.
- the app CA ("Signatures as the KMS"): the nodes make the group's P-256 CA key among themselves, three of
  them self-sign the group root CA, and a booted app's RA-TLS certificate chain [leaf, app CA] verifies under
  that root (cryptography and `openssl verify`): the app CA was signed by t node processes, each after
  judging the app's boot-time evidence itself. No process ever held the CA key.
- `teecloud deploy --env` on the docker runtime (needs Docker): the app's env key is made by a ceremony among
  the running nodes on the deploy's first request, and the app decrypts its env from three proved partials.
- the local cloud's worker node gets its CVMs' keys from the five node processes through
  ThresholdKeyProvider; two nodes stopped, a new boot still gets the same keys; a restart reuses the sealed
  shares. (Start-up without the Docker prerequisites: the CVM boot here is the guest boot sequence on a
  simulated TEE, driven through the node's own key provider.)
- a group.json whose signing key is not the chain's stops the next start.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import coincurve
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from typer.testing import CliRunner

from teecloud.agent import api as agent_api
from teecloud.agent.boot import boot
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.cli import app as cli_app
from teecloud.devstack import PRESIGN_BATCH, LocalCloud
from teecloud.keys.certs import verify_cert_chain
from teecloud.keys.sigchain import verify_key_signature_chain
from teecloud.kms.launcher import load_admin_token
from teecloud.kms.threshold import node_home, read_group
from teecloud.kms.threshold_client import ThresholdKeyProvider, group_ca_record
from teecloud.node.errors import NodeError
from teecloud.tee.simulated import SimulatedTdx
from tests.e2e.conftest import _fail_or_skip, deploy_hello_with_secret, hello_image  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


def _app(name: str) -> dict[str, object]:
    return {
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": "services:\n  web:\n    image: hello\n",
    }


HELLO = _app("hello")
HELLO_CA = _app("hello-ca")
SECRET = "threshold-secret-" + hashlib.sha256(b"teecloud threshold env").hexdigest()[:16]


def _pool(home: Path, cloud: LocalCloud | None, i: int) -> dict[str, object]:
    ep = json.loads((node_home(i, home) / "kms" / "endpoint.json").read_text())
    token = load_admin_token(node_home(i, home))
    r = httpx.get(f"{ep['admin_url']}/tround/pool", headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert isinstance(doc, dict)
    return doc


def _pools(home: Path) -> list[dict[str, object]]:
    return [_pool(home, None, i) for i in range(1, 6)]


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    """The module's cloud, started once (the tests below that stop or restart it come last in the file)."""
    cloud = LocalCloud(tmp_path_factory.mktemp("five") / "home", kms_nodes=5, kms_threshold=3)
    try:
        cloud.start(check=False, resume=False)
        yield cloud
    finally:
        cloud.stop()  # a second stop after a test's own is a no-op


def test_up_makes_its_signing_key_and_presignatures_and_getkey_works(five: LocalCloud) -> None:
    # first in the file: the pools are as the start left them (no app booted yet)
    cloud, home = five, five.home
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


def test_a_booted_apps_ra_tls_chain_verifies_under_the_group_root_ca(
    five: LocalCloud, tmp_path: Path
) -> None:
    cloud, home = five, five.home
    group = read_group(home)
    assert group is not None and group.ca_root_cert
    root = x509.load_pem_x509_certificate(group.ca_root_cert.encode())
    root.verify_directly_issued_by(root)
    root_key = root.public_key()
    assert isinstance(root_key, ec.EllipticCurvePublicKey) and isinstance(root_key.curve, ec.SECP256R1)
    provider = cloud.key_provider
    assert isinstance(provider, ThresholdKeyProvider) and provider.group.ca_root_cert == group.ca_root_cert
    # KmsGroup records the CA key and the root's hash; the provider's root is the one the chain names
    recorded = cloud.chain.kms_group.group_ca(group.epoch)
    assert recorded is not None
    assert (recorded.ca_key, recorded.root_cert_hash) == group_ca_record(group.ca_root_cert)
    app_id = bytes.fromhex(cloud.chain.register_app(None, compose_hash(HELLO_CA))[2:])
    t = SimulatedTdx(home)
    state = boot(
        t, json.dumps(HELLO_CA), app_id, None, provider, extra_events=[("os-image-hash", t.os_image_hash)]
    )
    assert provider.ca_error == ""
    body = AgentService(state).get_tls_key(
        agent_api.GetTlsKeyRequest(subject="hello-ca", usage_ra_tls=True, usage_client_auth=True)
    )
    leaf_pem, app_ca_pem = body["certificate_chain"]
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    app_ca = x509.load_pem_x509_certificate(app_ca_pem.encode())
    assert app_ca.issuer == root.subject and app_ca_pem != leaf_pem
    assert app_id.hex() in app_ca.subject.rfc4514_string()  # the node took the app id from the evidence
    verify_cert_chain([leaf, app_ca, root], trusted_public_key=root_key, now=int(time.time()))
    (tmp_path / "root.pem").write_text(group.ca_root_cert)
    (tmp_path / "app-ca.pem").write_text(app_ca_pem)
    (tmp_path / "leaf.pem").write_text(leaf_pem)
    ok = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "app-ca.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "leaf.pem: OK" in ok.stdout, ok.stdout + ok.stderr
    # the root's key is the group's P-256 CA key that every node reports (C_0 of its commitments)
    ca_key = root_key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint).hex()
    assert all(p.get("ca_key") == ca_key for p in _pools(home))
    # the operator's refill of the CA pools: `teecloud kms presign --ca`
    before = [int(str(p["ca_unused"])) for p in _pools(home)]
    result = CliRunner().invoke(
        cli_app, ["kms", "presign", "--ca", "--count", "2"], env={"TEECLOUD_HOME": str(home)}
    )
    assert result.exit_code == 0, result.output
    assert "2 CA presignatures made by nodes [1, 2, 3, 4, 5]" in result.output
    assert [int(str(p["ca_unused"])) for p in _pools(home)] == [b + 2 for b in before]


@pytest.mark.docker
@pytest.mark.usefixtures("hello_image")
def test_deploy_with_env_against_five_threshold_nodes(five: LocalCloud) -> None:
    """`teecloud deploy --env` on the docker runtime: the app's env key is made by a ceremony among the five
    running node processes on the deploy's first request, the deploy encrypts to the key three nodes agree on
    (signatures recovered to the group's signing key), and the app's CVM decrypts its env at boot from three
    proved partials: the app sees its secret."""
    from teecloud.cloud.deploy import Session
    from teecloud.devstack import check_prerequisites

    # the module's cloud starts without this check (the other tests boot no app container)
    missing = check_prerequisites()
    if missing:
        _fail_or_skip("; ".join(missing))
    home = Path(five.home)
    session = Session(home)
    try:
        r = deploy_hello_with_secret(session, "hello-tenv", SECRET)
        # every node holds its own sealed share of the app's env key; none holds the key or the secret (the
        # apps the tests above booted have shares of their own keys beside it: this app's are counted)
        app_hex = str(getattr(r, "app_id", "")).lower().removeprefix("0x")
        assert len(app_hex) == 40, r
        sealed = sorted((home / "kms-nodes").glob(f"*/kms/threshold-env/*-{app_hex}.sealed"))
        assert len(sealed) == 5
        for p in (home / "kms-nodes").rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes()
    finally:
        session.close()
        for inst in five.node.store.all():
            five.node.remove(inst.instance_id)


def test_up_with_five_kms_nodes_threshold_three(five: LocalCloud) -> None:
    # stops two of the module cloud's nodes, then the cloud, and restarts it: after the tests that observe it
    cloud, home = five, five.home
    try:
        provider = cloud.key_provider
        assert isinstance(provider, ThresholdKeyProvider)
        assert (provider.group.t, len(provider.group.nodes)) == (3, 5)
        app_id = bytes.fromhex(cloud.chain.register_app(None, compose_hash(HELLO))[2:])

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
    again = LocalCloud(home, kms_nodes=5, kms_threshold=3)
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


def test_a_group_json_the_chain_disagrees_with_stops_the_next_start(five: LocalCloud) -> None:
    # last in the file: tampers with the module cloud's group.json (stopping the cloud first, if still up)
    home = five.home
    five.stop()
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
