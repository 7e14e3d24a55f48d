"""`teecloud kms pubkey` and `teecloud kms audit` against a running KMS."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from teecloud.chain import ChainRpcServer, ContractReverted
from teecloud.cli import app as cli
from teecloud.kms.server import KmsServer
from tests.kms.conftest import (
    COMPOSE_V1,
    COMPOSE_V2,
    World,
    client_cert,
    make_app,
    make_kms,
    post_with_cert,
    vm_config,
)


def test_pubkey_and_audit(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    with contextlib.suppress(ContractReverted):  # KMS builds measure the same everywhere: maybe already in
        world.chain.add_kms_mr(kms.service.identity.mr_aggregated)
    with contextlib.suppress(ContractReverted):
        world.chain.add_kms_device(kms.tee.device_id)
    app_id = world.register(COMPOSE_V1)
    bad = make_app(teecloud_home, app_id, COMPOSE_V2)
    runner = CliRunner()
    rpc = ChainRpcServer(world.chain.transport.chain).start()  # the CLI checks the KMS against KmsAuth
    # the CLI finds KmsAuth through this home's deployment record, as an operator's machine would
    (teecloud_home / "chain").mkdir(exist_ok=True)
    shutil.copy(world.chain_dir / "chain" / "deployment.json", teecloud_home / "chain" / "deployment.json")
    try:
        with KmsServer(kms.service) as server:
            args = ["kms", "pubkey", "0x" + app_id.hex(), "--url", server.url, "--dev", "--json"]
            r = runner.invoke(cli, [*args, "--rpc-url", rpc.url])
            assert r.exit_code == 0, r.output
            doc = json.loads(r.output)
            assert doc["kms_k256_pubkey"] == kms.service.keys.k256_public_key.hex()
            key, der = client_cert(kms, bad)
            post_with_cert(server.url, "/prpc/KMS.GetAppKey", key, der, {"vm_config": vm_config(bad)})
    finally:
        rpc.stop()
    r = runner.invoke(cli, ["kms", "audit", "--json"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.output.splitlines() if line.strip()]
    assert recs[-1]["decision"] == "denied" and "compose hash" in recs[-1]["reason"].lower()
    r = runner.invoke(cli, ["kms", "audit", "--denied"])
    assert r.exit_code == 0 and "denied" in r.output


def test_pubkey_rejects_bad_app_id() -> None:
    r = CliRunner().invoke(cli, ["kms", "pubkey", "0x1234", "--insecure", "--url", "https://127.0.0.1:1"])
    assert r.exit_code != 0 and "20 bytes" in r.output and "Traceback" not in r.output


def test_pubkey_unreachable_kms_is_a_clear_error() -> None:
    r = CliRunner().invoke(
        cli, ["kms", "pubkey", "0x" + "11" * 20, "--insecure", "--url", "https://127.0.0.1:1"]
    )
    assert r.exit_code != 0 and "cannot reach" in r.output and "Traceback" not in r.output
