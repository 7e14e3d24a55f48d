"""The attestation route's quote is taken after boot, so it can never release KMS keys (the boot-time rule).

A genuine app booted through the KMS serves teecloud.ai's front over the guest API (dstack-sdk on the agent's
socket); anyone may call GET /v1/attestation/report with a nonce of their choice. That quote and its event
log, put into a certificate for the caller's key under the KMS's public temporary CA, get nothing from
GetAppKey or SignCert; and the shared peer verifier's boot-time rule refuses the evidence itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from dstack_sdk import DstackClient
from fastapi.testclient import TestClient

from teecloud.agent import AgentRunner
from teecloud.ai import ATTESTATION_PURPOSE, KeySet, report_data_for
from teecloud.ai.server import InferenceConfig, keys_from_guest_api, make_inference_app
from teecloud.kms.api import PATH_GET_APP_KEY, PATH_SIGN_CERT
from teecloud.kms.client import vm_config_json
from teecloud.kms.server import KmsServer
from teecloud.peer import PeerPolicy, PeerRejected, PeerVerifier, StaticCollateral, require_boot_time
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import Kms, World, assert_nothing_released, make_kms, post_with_cert, world  # noqa: F401
from tests.kms.test_boot_rule import booted_app, cert_with_log
from tests.kms.test_quote_oracle import csr_pem


@pytest.fixture
def kms(teecloud_home: Path, world: World) -> Kms:  # noqa: F811
    return make_kms(teecloud_home, world.chain)


@pytest.fixture
def server(kms: Kms) -> Iterator[KmsServer]:
    with KmsServer(kms.service) as s:
        yield s


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tcai-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_attestation_routes_quote_never_releases_kms_keys(
    teecloud_home: Path,
    world: World,  # noqa: F811
    kms: Kms,
    server: KmsServer,
    sockdir: Path,
    tmp_path: Path,
) -> None:
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    runner = AgentRunner(agent.state, dstack_sock=sockdir / "dstack.sock")
    runner.start()
    try:
        guest = DstackClient(str(sockdir / "dstack.sock"), timeout=30)
        keys = keys_from_guest_api(guest)
        config = InferenceConfig("tiny", bytes(32), "http://127.0.0.1:9", tmp_path / "receipts")

        def quote(report_data: bytes) -> dict[str, str]:
            q = guest.get_quote(report_data)
            return {"quote": q.quote, "event_log": q.event_log, "vm_config": q.vm_config}

        front = TestClient(make_inference_app(config, keys, quote))
        nonce = os.urandom(32)
        report = front.get("/v1/attestation/report", params={"nonce": nonce.hex()}).json()
    finally:
        runner.stop()
    # The route did its job: a genuine quote binding this app's key set and the caller's nonce.
    keyset = KeySet.from_json(report["keyset"])
    assert keyset.app_id == app_id
    assert report["report_data"] == report_data_for(keyset.digest(), nonce, ATTESTATION_PURPOSE).hex()
    quote_bytes, event_log = bytes.fromhex(report["quote"]), report["event_log"]

    # (a) The shared verifier accepts the evidence as genuine, and the boot-time rule refuses it.
    peers = PeerVerifier(PeerPolicy.dev(kms.tee.dev_root_der()), StaticCollateral(kms.tee.collateral))
    peer = peers.verify_quote(quote_bytes, event_log)
    assert peer.app_id == app_id and peer.evidence.report_data[:32] == bytes.fromhex(report["report_data"])
    with pytest.raises(PeerRejected) as err:
        require_boot_time(peer)
    assert err.value.step == "boot_time"

    # (b) Through the KMS: the route's quote and log in a certificate for the caller's key K.
    key = ec.generate_private_key(ec.SECP256R1())
    der = cert_with_log(kms, key, quote_bytes, event_log, app_id)
    vm = vm_config_json(SimulatedTdx(teecloud_home))
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm})
    assert status == 403, body
    assert_nothing_released(body)
    # report_data is sha256(JCS(...)), never the RA-TLS binding of a key the caller chose ...
    assert body["step"] == "ratls_cert_verified", body
    status, body = post_with_cert(
        server.url, PATH_SIGN_CERT, key, der, {"csr": csr_pem(key), "vm_config": vm}
    )
    assert status == 403 and "certificate_chain" not in body, body
    assert kms.audit.read()[-1].decision == "denied"
    # The app's own keys came from the KMS at boot: the key set's chain leads to this KMS's root.
    keyset.verify_chain(kms.service.state.root.k256_public_key)
    assert json.dumps(report).find(keys.signing_secret.hex()) == -1
