"""Threshold KMS as separate processes (issue 19): `teecloud kms threshold-init` (development ceremony),
five `teecloud kms up --threshold-node I` processes, each with its own data directory, sealed share,
listener and boot-challenge secret, checked by the CVM against KmsAuth; a guest boot through them, then two
of them killed and another boot with the same keys."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teecloud.agent.boot import boot
from teecloud.appcompose import compose_hash
from teecloud.chain import ChainRpcServer, ContractReverted
from teecloud.cli import app as cli
from teecloud.kms.bootstrap import boot_kms_tee
from teecloud.kms.client import connect_kms
from teecloud.kms.threshold import node_home, read_group
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_quote_oracle import HELLO

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def rpc_url(teecloud_home: Path, world: World) -> Iterator[str]:
    rpc = ChainRpcServer(world.chain.transport.chain).start()
    (teecloud_home / "chain").mkdir(exist_ok=True)
    shutil.copy(world.chain_dir / "chain" / "deployment.json", teecloud_home / "chain" / "deployment.json")
    try:
        yield rpc.url
    finally:
        rpc.stop()


def _spawn(index: int, rpc: str, home: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TEECLOUD_HOME": str(home), "PYTHONPATH": str(SRC)}
    code = "import sys; from teecloud.cli import main; sys.argv[0] = 'teecloud'; main()"
    args = ["kms", "up", "--dev", "--threshold-node", str(index), "--rpc-url", rpc, "--port", "0"]
    log = (home / f"kms-node-{index}.log").open("wb")  # a file, not a pipe: a chatty node never blocks
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, *args, "--admin-port", "0"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


def _endpoint(index: int, home: Path, proc: subprocess.Popen[bytes], deadline: float) -> dict[str, str]:
    path = node_home(index, home) / "kms" / "endpoint.json"
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if proc.poll() is not None:
            raise AssertionError(f"node {index} exited: {(home / f'kms-node-{index}.log').read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"node {index} did not start in time")


def test_five_node_processes_two_killed(teecloud_home: Path, world: World, rpc_url: str) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["kms", "threshold-init", "--nodes", "5", "--threshold", "3", "--dev"])
    assert res.exit_code == 0, res.output
    again = runner.invoke(cli, ["kms", "threshold-init", "--nodes", "5", "--threshold", "3", "--dev"])
    assert again.exit_code == 0 and "already exists" in again.output  # idempotent
    changed = runner.invoke(cli, ["kms", "threshold-init", "--nodes", "7", "--threshold", "4", "--dev"])
    assert changed.exit_code != 0 and "reshare" in changed.output
    group = read_group(teecloud_home)
    assert group is not None and (group.t, group.n) == (3, 5)

    # KmsAuth must allow the KMS build the CVM talks to (connect_kms checks isKmsAllowed per node).
    tee = SimulatedTdx(teecloud_home)
    with contextlib.suppress(ContractReverted):
        world.chain.add_kms_mr(boot_kms_tee(tee).mr_aggregated)
    with contextlib.suppress(ContractReverted):
        world.chain.add_kms_device(tee.device_id)
    app_id = world.register(compose_hash(HELLO))

    procs = {i: _spawn(i, rpc_url, teecloud_home) for i in range(1, 6)}
    try:
        deadline = time.monotonic() + 60
        eps = {i: _endpoint(i, teecloud_home, p, deadline) for i, p in procs.items()}
        assert len({e["server_ca_pubkey"] for e in eps.values()}) == 5  # five separate node identities

        def provider() -> ThresholdKeyProvider:
            g = ThresholdGroup(group.epoch, group.t, group.commitments, {i: e["url"] for i, e in eps.items()})
            return ThresholdKeyProvider(
                g,
                {
                    i: connect_kms(
                        e["url"],
                        collateral_for=lambda _q, _n: tee.collateral(),
                        dev_root_der=tee.dev_root_der(),
                        chain=world.chain,
                    )
                    for i, e in eps.items()
                },
            )

        def boot_once() -> bytes:
            cvm = SimulatedTdx(teecloud_home)
            state = boot(
                cvm,
                json.dumps(HELLO),
                app_id,
                None,
                provider(),
                extra_events=[("os-image-hash", cvm.os_image_hash)],
            )
            return bytes(state.keys.disk_crypt_key + state.keys.env_crypt_key + state.keys.k256_key)

        first = boot_once()
        for i in (1, 4):  # two of five nodes die (processes this test started, by their own handle)
            procs[i].terminate()
            procs[i].wait(timeout=20)
        assert boot_once() == first
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=20)
            if p.poll() is None:
                p.kill()
