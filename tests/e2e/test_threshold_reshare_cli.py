"""A reshare through the CLI between processes (issue 19): a 2-of-3 group from `teecloud up --kms-nodes 3`
is reshared to a 3-of-4 committee of new `kms up --join-reshare` processes (`kms reshare-open`, then
`kms reshare-finish --retire`): the app keys do not change, the chain records and serves the new
committee, and the old nodes' shares are erased (they answer no more)."""

from __future__ import annotations

import json
import os
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
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider
from teecloud.tee.simulated import SimulatedTdx

pytestmark = pytest.mark.slow

HELLO = {
    "manifest_version": 2,
    "name": "hello",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  web:\n    image: hello\n",
}


def _spawn(home: Path, node_dir: Path, index: int, plan: Path, rpc_url: str) -> subprocess.Popen[bytes]:
    src = str(Path(teecloud.__file__).resolve().parents[1])
    env = {**os.environ, "TEECLOUD_HOME": str(home), "PYTHONPATH": src}
    code = "import sys; from teecloud.cli import main; sys.argv[0] = 'teecloud'; main()"
    args = ["kms", "up", "--dev", "--threshold-node", str(index), "--node-dir", str(node_dir)]
    args += ["--join-reshare", str(plan), "--rpc-url", rpc_url, "--port", "0", "--admin-port", "0"]
    (node_dir / "kms").mkdir(parents=True, exist_ok=True)
    log = (node_dir / "kms" / "node.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _wait(node_dirs: dict[int, Path], procs: dict[int, subprocess.Popen[bytes]]) -> dict[int, dict[str, Any]]:
    deadline = time.monotonic() + 120
    eps: dict[int, dict[str, Any]] = {}
    while len(eps) < len(node_dirs):
        for j, d in node_dirs.items():
            f = d / "kms" / "endpoint.json"
            if j not in eps and f.exists():
                eps[j] = json.loads(f.read_text())
            elif j not in eps and procs[j].poll() is not None:
                raise AssertionError(f"new node {j} exited: {(d / 'kms' / 'node.log').read_text()[-2000:]}")
        assert time.monotonic() < deadline, "new nodes did not start"
        time.sleep(0.2)
    return eps


def test_reshare_2_of_3_to_3_of_4_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    cloud = LocalCloud(home, kms_nodes=3, kms_threshold=2)
    cloud.start(check=False, resume=False)
    new_procs: dict[int, subprocess.Popen[bytes]] = {}
    try:
        assert cloud.endpoints is not None
        rpc_url = cloud.endpoints.chain_rpc
        app_id = bytes.fromhex(cloud.chain.register_app(None, compose_hash(HELLO))[2:])

        def boot_once(provider: Any) -> bytes:
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

        first = boot_once(cloud.key_provider)
        old_group = cloud.key_provider.group
        monkeypatch.setenv("TEECLOUD_HOME", str(home))
        monkeypatch.setenv(
            "TEECLOUD_CHAIN_KEY", DEV_KEYS[0]
        )  # the KmsGroup owner (the local cloud's deployer)
        runner = CliRunner()
        plan = tmp_path / "plan.json"
        r = runner.invoke(
            cli,
            [
                "kms",
                "reshare-open",
                "--dealers",
                "1,3",
                "--threshold",
                "3",
                "--nodes",
                "4",
                "--out",
                str(plan),
            ],
        )
        assert r.exit_code == 0, r.output
        doc = json.loads(plan.read_text())
        assert (
            doc["new_commitments"][0] == old_group.commitments[0].hex() and len(doc["new_commitments"]) == 3
        )

        new_dirs = {j: tmp_path / "committee-2" / str(j) for j in range(1, 5)}
        new_procs.update({j: _spawn(home, d, j, plan, rpc_url) for j, d in new_dirs.items()})
        _wait(new_dirs, new_procs)

        r = runner.invoke(
            cli,
            [
                "kms",
                "reshare-finish",
                "--plan",
                str(plan),
                "--new-nodes-dir",
                str(tmp_path / "committee-2"),
                "--rpc-url",
                rpc_url,
                "--retire",
            ],
        )
        assert r.exit_code == 0, r.output
        assert "3-of-4" in r.output and r.output.count("share erased") == 3

        served = cloud.chain.kms_group.active(1)
        assert served is not None and (served.t, served.n) == (3, 4)
        assert served.group_public_key == old_group.group_public_key
        tee = SimulatedTdx(home)
        clients = {
            j: connect_kms(
                url,
                collateral_for=lambda _q, _n: tee.collateral(),
                dev_root_der=tee.dev_root_der(),
                chain=cloud.chain,
            )
            for j, url in served.urls.items()
        }
        provider = ThresholdKeyProvider(
            ThresholdGroup(served.epoch, served.t, served.commitments, served.urls), clients
        )
        assert boot_once(provider) == first  # same group key, same app keys, from the new committee only
        # the reshare carried the group's signing key (made by `teecloud up`) too: each new member sealed its
        # share of it at boot (kms.threshold_carry), and the old members' copies were erased with their root
        assert all((d / "kms" / "threshold-signing-share.sealed").exists() for d in new_dirs.values())
        old_homes = [home / "kms-nodes" / str(i) for i in (1, 2, 3)]
        assert not any((h / "kms" / "threshold-signing-share.sealed").exists() for h in old_homes)

        with pytest.raises(Exception, match=r"(?i)threshold|retired|share|fail"):
            boot_once(cloud.key_provider)  # the old committee erased its shares: it answers nothing
    finally:
        for p in new_procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=20)
        cloud.stop()
