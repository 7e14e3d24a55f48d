"""A root rotation through the CLI between processes (issue 19): a 2-of-3 group from
`teecloud up --kms-nodes 3`, three share-less dealer processes, `kms rotate`, each node restarted twice
with `--join-dkg` (keeping epoch 1's share; GJKR's rolling round: statements, then QUAL),
`kms rotate-finish`. First a round whose dealer is killed mid-DKG: the restarted node serves epoch 1
alone, nothing is sealed or recorded for epoch 2, and rotate-finish refuses. Then the real rotation: an
app that does not opt in keeps its keys, one that opts in gets new ones from the epoch the chain
records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import teecloud
from teecloud.agent.boot import boot
from teecloud.appcompose import compose_hash
from teecloud.chain import DEV_KEYS
from teecloud.cli import app as cli
from teecloud.devstack import LocalCloud
from teecloud.kms.client import connect_kms
from teecloud.kms.rotation import serving_groups
from teecloud.kms.threshold import node_home
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.test_quote_oracle import HELLO

pytestmark = pytest.mark.slow

OPTED_IN = {**HELLO, "kms_key_epoch": 2}


def _spawn(home: Path, node_dir: Path, index: int, rpc_url: str, *extra: str) -> subprocess.Popen[bytes]:
    src = str(Path(teecloud.__file__).resolve().parents[1])
    env = {**os.environ, "TEECLOUD_HOME": str(home), "PYTHONPATH": src}
    code = "import sys; from teecloud.cli import main; sys.argv[0] = 'teecloud'; main()"
    args = ["kms", "up", "--dev", "--threshold-node", str(index), "--node-dir", str(node_dir), *extra]
    args += ["--rpc-url", rpc_url, "--port", "0", "--admin-port", "0"]
    (node_dir / "kms").mkdir(parents=True, exist_ok=True)
    (node_dir / "kms" / "endpoint.json").unlink(missing_ok=True)
    log = (node_dir / "kms" / "node.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _wait(node_dir: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    f = node_dir / "kms" / "endpoint.json"
    while not f.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{node_dir} exited: {(node_dir / 'kms' / 'node.log').read_text()[-2000:]}")
        assert time.monotonic() < deadline, f"{node_dir} did not start"
        time.sleep(0.2)
    return dict(json.loads(f.read_text()))


def _stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rotation_between_processes_and_a_dealer_killed_mid_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    cloud = LocalCloud(home, kms_nodes=3, kms_threshold=2)
    cloud.start(check=False, resume=False)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        assert cloud.endpoints is not None
        rpc_url = cloud.endpoints.chain_rpc
        chain = cloud.chain
        app_id = bytes.fromhex(chain.register_app(None, compose_hash(HELLO))[2:])
        chain.add_compose_hash(app_id, compose_hash(OPTED_IN))
        tee_dev = SimulatedTdx(home)

        def provider() -> ThresholdKeyProvider:
            """A client that trusts what KmsGroup records: the committee of every serving epoch."""
            served = serving_groups(chain.kms_group)
            urls = served[1].urls
            clients = {
                j: connect_kms(
                    url,
                    collateral_for=lambda _q, _n: tee_dev.collateral(),
                    dev_root_der=tee_dev.dev_root_der(),
                    chain=chain,
                )
                for j, url in urls.items()
            }
            groups = {e: ThresholdGroup(c.epoch, c.t, c.commitments, c.urls) for e, c in served.items()}
            return ThresholdKeyProvider(groups.pop(1), clients, epochs=groups, hedge_s=60.0)

        def keys(p: Any, compose: dict[str, Any]) -> bytes:
            tee = SimulatedTdx(home)
            state = boot(
                tee, json.dumps(compose), app_id, None, p, extra_events=[("os-image-hash", tee.os_image_hash)]
            )
            return bytes(state.keys.disk_crypt_key + state.keys.env_crypt_key + state.keys.k256_key)

        before = keys(cloud.key_provider, HELLO)
        monkeypatch.setenv("TEECLOUD_HOME", str(home))
        monkeypatch.setenv(
            "TEECLOUD_CHAIN_KEY", DEV_KEYS[0]
        )  # the KmsGroup owner (the local cloud's deployer)
        runner = CliRunner()
        dealers_dir = tmp_path / "dealers"

        def start_dealer(i: int) -> None:
            d = dealers_dir / f"dealer-{i}"
            procs[f"dealer-{i}"] = _spawn(home, d, i, rpc_url, "--dealer")
            _wait(d, procs[f"dealer-{i}"])

        def restart_node(j: int, plan: Path) -> dict[str, Any]:
            _stop(procs.pop(f"node-{j}", None) or cloud.kms_processes[j])
            procs[f"node-{j}"] = _spawn(home, node_home(j, home), j, rpc_url, "--join-dkg", str(plan))
            return _wait(node_home(j, home), procs[f"node-{j}"])

        def where(plan: Path) -> list[str]:
            return ["--dealers-dir", str(dealers_dir), "--out", str(plan), "--rpc-url", rpc_url]

        def rotate(plan: Path) -> Any:
            return runner.invoke(
                cli,
                ["kms", "rotate", "--dealers", "1,2,3", "--threshold", "2", "--nodes", "3", *where(plan)],
            )

        def finish(plan: Path) -> Any:
            return runner.invoke(cli, ["kms", "rotate-finish", "--plan", str(plan), "--rpc-url", rpc_url])

        for i in (1, 2, 3):
            start_dealer(i)

        # --- a round interrupted: dealer 3 killed after the round opened, before node 1 joined
        plan1 = tmp_path / "rotate-1.json"
        r = rotate(plan1)
        assert r.exit_code == 0, r.output
        assert json.loads(plan1.read_text())["epoch"] == 2
        assert plan1.stat().st_mode & 0o077 == 0  # it holds the member tokens
        procs["dealer-3"].send_signal(signal.SIGKILL)
        procs["dealer-3"].wait()
        ep = restart_node(1, plan1)
        assert ep["join_error"] and list(ep["epochs"]) == ["1"]  # serving epoch 1, nothing new sealed
        sealed = sorted(p.name for p in (node_home(1, home) / "kms").glob("threshold-share*"))
        assert sealed == ["threshold-share.sealed"]
        r = finish(plan1)
        assert r.exit_code != 0 and "not complete" in r.output and "node 1" in r.output, r.output
        assert chain.kms_group.group_key(2) is None
        # epoch 1 still serves, every key unchanged (node 1 at its new address, nodes 2 and 3 as before)
        urls = {
            j: json.loads((node_home(j, home) / "kms" / "endpoint.json").read_text())["url"]
            for j in (1, 2, 3)
        }
        p = cloud.key_provider
        p1 = ThresholdKeyProvider(
            ThresholdGroup(1, p.group.t, p.group.commitments, urls),
            {
                j: connect_kms(
                    u,
                    collateral_for=lambda _q, _n: tee_dev.collateral(),
                    dev_root_der=tee_dev.dev_root_der(),
                    chain=chain,
                )
                for j, u in urls.items()
            },
        )
        assert keys(p1, HELLO) == before

        # --- the rotation: a new dealer 3, a new round, each node restarted into it (one at a time)
        start_dealer(3)
        plan2 = tmp_path / "rotate-2.json"
        r = rotate(plan2)
        assert r.exit_code == 0, r.output
        for j in (1, 2, 3):  # the rolling round's first pass: each posts its statement, serves epoch 1
            ep = restart_node(j, plan2)
            assert list(ep["epochs"]) == ["1"] and ep["join_error"].startswith("RoundPending: "), ep
            assert (node_home(j, home) / "kms" / "dkg-pending.sealed").exists()
        r = finish(plan2)
        assert r.exit_code != 0 and "not complete" in r.output and "statement posted" in r.output, r.output
        assert chain.kms_group.group_key(2) is None
        for j in (1, 2, 3):  # the second pass: QUAL decided, epoch 2 sealed beside epoch 1
            ep = restart_node(j, plan2)
            assert sorted(ep["epochs"]) == ["1", "2"] and not ep["join_error"], ep
            assert not (node_home(j, home) / "kms" / "dkg-pending.sealed").exists()
        r = finish(plan2)
        assert r.exit_code == 0, r.output
        doc = json.loads(plan2.read_text())
        served = serving_groups(chain.kms_group)
        assert sorted(served) == [1, 2]
        assert [c.hex() for c in served[2].commitments] == doc["commitments"]
        assert served[2].group_public_key != served[1].group_public_key
        for j in (1, 2, 3):
            assert len(list((node_home(j, home) / "kms").glob("threshold-share*"))) == 2
        # a second finish of the same plan is refused (the epoch is recorded)
        assert finish(plan2).exit_code != 0

        rotated = provider()
        assert keys(rotated, HELLO) == before  # not opted in: the same keys
        opted = keys(rotated, OPTED_IN)
        assert opted != before and keys(provider(), OPTED_IN) == opted
        # a rotation cannot go back: the chain has epoch 2, another epoch-2 round is refused
        x = tmp_path / "x.json"
        r = runner.invoke(
            cli,
            [
                "kms",
                "rotate",
                "--dealers",
                "1,2",
                "--threshold",
                "2",
                "--nodes",
                "3",
                "--epoch",
                "2",
                *where(x),
            ],
        )
        assert r.exit_code != 0 and "already records" in r.output

        # `teecloud up` again over the same data directory: the nodes (new ports) serve both epochs, the
        # chain records both committees at their new addresses, and the worker's provider has both
        for proc in procs.values():
            _stop(proc)
        cloud.stop()
        cloud = LocalCloud(home, kms_nodes=3, kms_threshold=2)
        cloud.start(check=False, resume=False)
        chain = cloud.chain
        assert sorted(cloud.key_provider.groups) == [1, 2]
        assert keys(cloud.key_provider, HELLO) == before
        assert keys(cloud.key_provider, OPTED_IN) == opted
    finally:
        for proc in procs.values():
            _stop(proc)
        cloud.stop()
