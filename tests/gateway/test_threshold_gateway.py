"""`teecloud up --kms-nodes 3 --threshold 2`: every KMS node process is given KmsAuth's gateway_app_id (it
was recorded on chain but not passed), so every node returns it with an app's keys and the threshold client's
check that the nodes agree on it applies; the gateway's TEE boots as the gateway app through the three
nodes and its TLS keys are derived from the app keys they released (teecloud.gateway.kmskeys)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teecloud.agent.boot import boot
from teecloud.appcompose import compose_hash
from teecloud.devstack import LocalCloud
from teecloud.gateway.certkeys import check_cert_key_signature, fetch_document, presented_cert
from teecloud.gateway.kmskeys import PUBLIC, GatewayKeys
from teecloud.kms import api as kms_api
from teecloud.kms.threshold_client import ThresholdKeyProvider
from teecloud.tee.simulated import SimulatedTdx

pytestmark = pytest.mark.slow

HELLO = {
    "manifest_version": 2,
    "name": "hello",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  web:\n    image: hello\n",
}

SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_threshold_nodes_serve_the_gateway_app_id(tmp_path: Path) -> None:
    home = tmp_path / "home"
    cloud = LocalCloud(home, kms_nodes=3, kms_threshold=2)
    endpoints = cloud.start(check=False, resume=False)
    try:
        provider = cloud.key_provider
        assert isinstance(provider, ThresholdKeyProvider)
        gateway_app_id = cloud.gateway_app_id
        assert int(gateway_app_id, 16) != 0
        assert cloud.chain.kms.info().gateway_app_id == gateway_app_id
        # every node process serves it (its public meta; RA-TLS, the certificate is not the point here)
        for i, url in sorted(provider.group.nodes.items()):
            meta = httpx.get(url + kms_api.PATH_GET_META, verify=False, timeout=10).json()
            assert meta["gateway_app_id"].lower() == gateway_app_id.lower(), f"node {i}"
        # an app's keys from the nodes carry it
        app_id = bytes.fromhex(cloud.chain.register_app(None, compose_hash(HELLO))[2:])
        tee = SimulatedTdx(home)
        state = boot(
            tee,
            json.dumps(HELLO),
            app_id,
            None,
            provider,
            extra_events=[("os-image-hash", tee.os_image_hash)],
        )
        assert state.keys.gateway_app_id.lower() == gateway_app_id.lower()
        # the gateway booted as its app through the nodes; its public key is derived from those app keys
        assert cloud.gateway_boot is not None
        assert cloud.gateway_boot.keys.gateway_app_id.lower() == gateway_app_id.lower()
        gw = endpoints.gateway
        assert gw or shutil.which("haproxy") is None, "HAProxy is installed but no gateway started"
        if gw:  # HAProxy installed (setup.sh installs it)
            der = presented_cert("127.0.0.1", gw["public_port"], server_name=f"x.{gw['base_domain']}")
            served = x509.load_der_x509_certificate(der).public_key().public_bytes(*SPKI)
            derived = GatewayKeys.from_app_keys(cloud.gateway_boot.keys).p256(PUBLIC)
            assert served == derived.public_key().public_bytes(*SPKI)
            # the KMS signature chain over that key leads to the nodes' group k256 key, for the gateway app
            document = fetch_document(gw["cert_keys"])
            verdict = check_cert_key_signature(
                der,
                document,
                kms_root_public_key=cloud.gateway_boot.keys.kms_k256_pubkey,
                expected_app_id=bytes.fromhex(gateway_app_id.removeprefix("0x")),
                expected_domain=gw["base_domain"],
            )
            assert verdict.role == "public"
    finally:
        cloud.stop()
