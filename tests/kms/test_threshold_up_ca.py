"""`teecloud up --kms-nodes 5 --threshold 3` and the app CA (issue 19, "Signatures as the KMS"): the five node
processes make the group's P-256 CA key among themselves, three of them self-sign the group root CA, and a
booted app's RA-TLS certificate chain [leaf, app CA] verifies under that root (cryptography and
`openssl verify`): the app CA was signed by t node processes, each after judging the app's boot-time
evidence itself. No process ever held the CA key."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

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
from teecloud.devstack import LocalCloud
from teecloud.keys.certs import verify_cert_chain
from teecloud.kms.threshold import read_group
from teecloud.kms.threshold_client import ThresholdKeyProvider, group_ca_record
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.test_threshold_net_up import _pool

pytestmark = [pytest.mark.slow]

HELLO = {
    "manifest_version": 2,
    "name": "hello-ca",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  web:\n    image: hello\n",
}


def _pools(home: Path) -> list[dict[str, object]]:
    return [_pool(home, None, i) for i in range(1, 6)]  # type: ignore[arg-type]


def test_a_booted_apps_ra_tls_chain_verifies_under_the_group_root_ca(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cloud = LocalCloud(home, kms_nodes=5, kms_threshold=3)
    cloud.start(check=False, resume=False)
    try:
        group = read_group(home)
        assert group is not None and group.ca_root_cert
        root = x509.load_pem_x509_certificate(group.ca_root_cert.encode())
        root.verify_directly_issued_by(root)
        root_key = root.public_key()
        assert isinstance(root_key, ec.EllipticCurvePublicKey) and isinstance(root_key.curve, ec.SECP256R1)
        provider = cloud.key_provider
        assert (
            isinstance(provider, ThresholdKeyProvider) and provider.group.ca_root_cert == group.ca_root_cert
        )
        # KmsGroup records the CA key and the root's hash; the provider's root is the one the chain names
        recorded = cloud.chain.kms_group.group_ca(group.epoch)
        assert recorded is not None
        assert (recorded.ca_key, recorded.root_cert_hash) == group_ca_record(group.ca_root_cert)
        app_id = bytes.fromhex(cloud.chain.register_app(None, compose_hash(HELLO))[2:])
        t = SimulatedTdx(home)
        state = boot(
            t, json.dumps(HELLO), app_id, None, provider, extra_events=[("os-image-hash", t.os_image_hash)]
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
    finally:
        cloud.stop()
