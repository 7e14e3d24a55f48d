"""A KMS in its own process for the crash test: embedded chain, one registered app. Prints one JSON line
(url, app_id, temporary CA) and serves until killed. Usage: python -m tests.kms._crash_child (with
TEECLOUD_HOME set)."""

from __future__ import annotations

import hashlib
import json
import sys
import time

from teecloud._fs import data_home
from teecloud.chain import ChainClient
from teecloud.kms.audit import AuditLog
from teecloud.kms.bootstrap import boot_kms_tee, kms_dir, start_kms_state
from teecloud.kms.server import KmsServer
from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference
from tests.kms.conftest import harness_challenges

COMPOSE = hashlib.sha256(b"crash test compose").digest()


def main() -> None:
    home = data_home()
    chain = ChainClient.embedded(home / "chain")
    chain.deploy()
    tee = SimulatedTdx()
    chain.add_os_image(tee.os_image_hash)
    app_id = bytes.fromhex(chain.register_app(None, COMPOSE)[2:])
    identity = boot_kms_tee(tee)
    state, _ = start_kms_state(tee, identity, now=int(time.time()))
    service = KmsService(
        state=state,
        identity=identity,
        tee=tee,
        chain=chain,
        collateral=StaticCollateral(tee.collateral),
        audit=AuditLog(kms_dir() / "audit.jsonl"),
        config=KmsConfig(dev_mode=True),
        dev_root_der=tee.dev_root_der(),
        block_number=chain.block_number,
        os_image_reference=simulated_os_image_reference,
        # the test's one boot makes every request of the run
        challenges=harness_challenges(max_uses=1_000_000),
    )
    server = KmsServer(service).start()
    line = {
        "url": server.url,
        "app_id": app_id.hex(),
        "compose": COMPOSE.hex(),
        "temp_ca_key": state.temp_ca_key_pem,
        "temp_ca_cert": state.temp_ca_cert_pem,
        "audit": str(kms_dir() / "audit.jsonl"),
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    server.wait()


if __name__ == "__main__":
    main()
