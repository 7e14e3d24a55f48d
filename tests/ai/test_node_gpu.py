"""The GPU gate in deployed CVMs: the node's GPU setting (`teecloud up --gpu simulated[:N]`,
teecloud.node.gpus) gives every CVM's boot a GpuGate; through the node's boot path (docker backend's
boot_instance: gocryptfs volume, guest agent, a stand-in container runtime) and the real KMS server, an app
whose compose requires GPU attestation boots and gets keys on a node with GPUs, and is refused on one
without."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from teecloud.agent.boot import GpuGateFailed, boot
from teecloud.appcompose import compose_hash, normalize_app_compose
from teecloud.attestation.boottime import GPU_EVIDENCE_EVENT
from teecloud.chain import ChainClient
from teecloud.kms.server import KmsServer
from teecloud.node.errors import BadRequest, BootFailed
from teecloud.node.gpus import gpu_gate_for, parse_gpu_setting
from teecloud.node.instance import InstanceStore
from teecloud.node.runtime.docker import ContainerState, ResourceLimits
from teecloud.node.runtime.docker_cvm import boot_instance, shutdown_instance
from teecloud.tee.gpu import SimulatedGpu
from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for
from tests.kms.conftest import SIM_OS, Kms, World, make_kms
from tests.kms.test_gpu_gate import client

pytestmark = pytest.mark.skipif(
    shutil.which("gocryptfs") is None or not os.path.exists("/dev/fuse"),
    reason="gocryptfs/FUSE not available",
)

GPU_APP = {
    "name": "gpu-app",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  a:\n    image: x\n",
    "kms_enabled": True,
    "gpu_attestation": "required",
}


class _Runtime:
    """A container runtime whose app starts and stays up (no Docker needed for the guest half)."""

    def __init__(self) -> None:
        self.running = False

    def prepare(self, spec: object, compose_text: str, limits: object) -> list[str]:
        return []

    def up(self, spec: object) -> None:
        self.running = True

    def ps(self, project: str) -> list[ContainerState]:
        return [ContainerState("a", "tc-a-1", "running" if self.running else "created", None, None)]

    def stop(self, spec: object) -> None:
        self.running = False

    def down(self, spec: object) -> None:
        self.running = False


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The embedded chain with KmsAuth, the simulated OS image allowed (as tests/kms's)."""
    d = tmp_path_factory.mktemp("gpu-node-chain")
    chain = ChainClient.embedded(d)
    chain.deploy()
    chain.add_os_image(os_image_hash_for(SIM_OS))
    yield World(chain, d)
    chain.close()


@pytest.fixture
def kms(teecloud_home: Path, world: World) -> Kms:
    return make_kms(teecloud_home, world.chain)


@pytest.fixture
def server(kms: Kms) -> Iterator[KmsServer]:
    with KmsServer(kms.service) as s:
        yield s


def node_boot(home: Path, kms: Kms, server: KmsServer, world: World, gpus: str) -> Any:
    """Create the GPU app's instance on a node with the GPU setting `gpus` and boot it as the node does."""
    app_id = world.register(compose_hash(GPU_APP))
    store = InstanceStore(home)
    inst = store.create(
        app_compose=normalize_app_compose(GPU_APP).encode(),
        app_id=app_id,
        name="gpu-app",
        encrypted_env=None,
        user_config=None,
        sys_config={},
        limits=ResourceLimits(),
    )
    store.prepare_runtime(inst)
    for d in (inst.runtime_dir, inst.agent_dir, inst.env_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    runtime = _Runtime()
    booted = boot_instance(
        inst,
        key_provider=client(kms, server, None),  # the measured compose is bound by boot() itself
        tee_factory=lambda: SimulatedTdx(home),
        runtime=runtime,  # type: ignore[arg-type]
        gpu=gpu_gate_for(parse_gpu_setting(gpus), home),
        healthy_timeout=10,
    )
    return inst, runtime, booted


def test_a_gpu_app_boots_with_the_nodes_simulated_gpus_and_gets_keys(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World
) -> None:
    kms.service.authz.require_app_compose = True  # as `teecloud up --kms-require-app-compose` sets it
    inst, runtime, booted = node_boot(teecloud_home, kms, server, world, "simulated:2")
    try:
        assert booted.state.keys.disk_crypt_key and runtime.running
        assert kms.audit.read()[-1].decision == "allowed"
        events = [(e.event, e.event_payload) for e in booted.state.tee.event_log() if e.imr == 3]
        names = [n for n, _ in events]
        assert names.count(GPU_EVIDENCE_EVENT) == 1
        assert names[names.index(GPU_EVIDENCE_EVENT) + 1] == "boot-mr-done"
    finally:
        shutdown_instance(inst, booted, runtime)  # type: ignore[arg-type]


def test_the_gpu_app_on_a_node_without_gpus_gets_no_keys(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World
) -> None:
    before = len(kms.audit.read())
    with pytest.raises(BootFailed) as failed:
        node_boot(teecloud_home, kms, server, world, "none")
    assert failed.value.phase == "measuring" and "gpu:" in failed.value.reason, failed.value
    assert len(kms.audit.read()) == before, "a key request reached the KMS"


def test_the_gate_refuses_a_gpu_under_a_root_the_node_does_not_trust(
    teecloud_home: Path, tmp_path: Path
) -> None:
    """The node's gate trusts its own simulated roots only: another installation's GPU fails the boot."""
    gate = gpu_gate_for(parse_gpu_setting("simulated:2"), teecloud_home)
    assert gate is not None
    foreign = SimulatedGpu(tmp_path / "elsewhere")
    from teecloud.agent.boot import GpuGate
    from teecloud.agent.keyprovider import LocalDevKeyProvider

    with pytest.raises(GpuGateFailed, match="gpu:"):
        boot(
            SimulatedTdx(teecloud_home),
            json.dumps(GPU_APP),
            None,
            None,
            LocalDevKeyProvider(teecloud_home),
            gpu=GpuGate(foreign, trust_anchors=gate.trust_anchors),
        )
    items = gate.source.collect(bytes(32))  # two GPUs, two device roots, every item labelled simulated
    assert len(items) == 2 and all(i["simulated"] is True for i in items)
    assert (
        items[0]["certificate_chain"] != items[1]["certificate_chain"] and len(set(gate.trust_anchors)) == 2
    )


@pytest.mark.parametrize("bad", ["simulated:0", "simulated:17", "simulated:x", "real", "nvml:2"])
def test_bad_gpu_settings_are_refused(bad: str) -> None:
    with pytest.raises(BadRequest):
        parse_gpu_setting(bad)


def test_nvml_needs_a_trusted_root(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="gpu-root"):
        gpu_gate_for(parse_gpu_setting("nvml"), tmp_path)
    (tmp_path / "root.pem").write_text("not a certificate")
    with pytest.raises(BadRequest, match="cannot read"):
        gpu_gate_for(parse_gpu_setting("nvml"), tmp_path, nvidia_roots=[tmp_path / "root.pem"])
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509 import load_der_x509_certificate

    der = SimulatedGpu(tmp_path).root_der()
    pem = load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "root.pem").write_bytes(pem)
    gate = gpu_gate_for(parse_gpu_setting("nvml"), tmp_path, nvidia_roots=[tmp_path / "root.pem"])
    assert gate is not None and gate.trust_anchors == (der,)


def test_teecloud_up_refuses_a_bad_gpu_setting_before_starting_anything(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TEECLOUD_HOME": str(tmp_path), "PYTHONPATH": str(root / "src")}
    code = "import sys; from teecloud.cli import main; sys.argv[0] = 'teecloud'; main()"
    out = subprocess.run(
        [sys.executable, "-c", code, "up", "--gpu", "simulated:99"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 1 and "GPU setting" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "chain").exists()


def test_the_nodes_gate_checks_rims_and_ocsp_from_offline_collateral(
    teecloud_home: Path, tmp_path: Path
) -> None:
    """simulated: the node caches its GPUs' RIMs and OCSP answers; a revoked device certificate, a RIM with
    other reference values, or no RIM at all stops the boot before any key request."""
    import time

    from teecloud.agent.keyprovider import LocalDevKeyProvider
    from teecloud.collateral.nvidia import NvidiaCollateralCache

    def boot_with(gate: Any) -> Any:
        return boot(
            SimulatedTdx(teecloud_home),
            json.dumps(GPU_APP),
            None,
            None,
            LocalDevKeyProvider(teecloud_home),
            gpu=gate,
        )

    gate = gpu_gate_for(parse_gpu_setting("simulated"), teecloud_home, collateral_dir=tmp_path / "c1")
    assert gate is not None and gate.require_rims
    assert len(list((tmp_path / "c1" / "rim").glob("*.xml"))) == 2
    assert boot_with(gate).keys.disk_crypt_key  # RIMs match, OCSP good
    gpu = SimulatedGpu(teecloud_home)
    # a revoked device certificate (a newer OCSP answer replaces the good one)
    time.sleep(1.1)
    NvidiaCollateralCache(tmp_path / "c1").add_ocsp(gpu.ocsp_response(revoked=True), now=int(time.time()))
    with pytest.raises(GpuGateFailed, match="revoked"):
        boot_with(gate)
    # a RIM whose reference value is not the GPU's
    gate = gpu_gate_for(parse_gpu_setting("simulated"), teecloud_home, collateral_dir=tmp_path / "c2")
    assert gate is not None
    for f in (tmp_path / "c2" / "rim").glob("*.xml"):
        f.unlink()
    with pytest.raises(GpuGateFailed, match="no RIM"):
        boot_with(gate)
    NvidiaCollateralCache(tmp_path / "c2").add_rim(
        gpu.rim("driver", golden={1: b"\x07" * 48}), trust_anchors=gate.trust_anchors, now=int(time.time())
    )
    with pytest.raises(GpuGateFailed, match="measurement 1"):
        boot_with(gate)
