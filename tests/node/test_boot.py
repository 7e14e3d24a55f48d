"""Boot failures after the keys: nothing decrypted is left behind (env file, agent, mounted volume)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from teecloud.agent.boot import normalize_app_compose
from teecloud.agent.keyprovider import LocalDevKeyProvider
from teecloud.agent.storage import EncryptedVolume
from teecloud.keys.envcrypt import encrypt_env
from teecloud.node.errors import BootFailed, RuntimeFailed
from teecloud.node.instance import InstanceStore
from teecloud.node.runtime.docker import ENV_FILE_NAME, ContainerState, ResourceLimits
from teecloud.node.runtime.docker_cvm import boot_instance
from teecloud.tee.simulated import SimulatedTdx


class _FailingRuntime:
    """`prepare` fails (fail_at="starting"), or the app starts but exits at once (fail_at="healthy")."""

    def __init__(self, fail_at: str) -> None:
        self.fail_at = fail_at
        self.running = False

    def prepare(self, spec: object, compose_text: str, limits: object) -> list[str]:
        if self.fail_at == "starting":
            raise RuntimeFailed("compose failed (simulated)")
        return []

    def up(self, spec: object) -> None:
        self.running = True

    def ps(self, project: str) -> list[ContainerState]:
        return [ContainerState("a", "tc-a-1", "exited" if self.running else "created", None, 1)]

    def logs(self, project: str, **kw: object) -> Iterator[bytes]:
        return iter([b"a | boom\n"])

    def stop(self, spec: object) -> None:
        self.running = False


@pytest.mark.parametrize("fail_at", ["storage", "starting", "healthy"])
def test_a_failed_boot_leaves_no_plaintext_env_nor_mount(teecloud_home: Path, fail_at: str) -> None:
    if fail_at != "storage" and (shutil.which("gocryptfs") is None or not os.path.exists("/dev/fuse")):
        pytest.skip("gocryptfs/FUSE not available")
    provider = LocalDevKeyProvider(teecloud_home)
    app_id = bytes.fromhex("11" * 20)
    compose = normalize_app_compose(
        {
            "name": "x",
            "runner": "docker-compose",
            "docker_compose_file": "services:\n  a:\n    image: x\n",
            "allowed_envs": ["SECRET"],
            "kms_enabled": True,
        }
    ).encode()
    store = InstanceStore(teecloud_home)
    # the env must be encrypted to the app's key, which depends on the instance: create, then write it
    inst = store.create(
        app_compose=compose,
        app_id=app_id,
        name="x",
        encrypted_env=None,
        user_config=None,
        sys_config={},
        limits=ResourceLimits(),
    )
    keys = provider.get_app_keys(SimulatedTdx(teecloud_home), app_id, bytes.fromhex(inst.instance_id))
    pub = X25519PrivateKey.from_private_bytes(keys.env_crypt_key).public_key().public_bytes_raw()
    inst.write_manifest(compose, encrypt_env(pub, {"SECRET": "s3cr3t-value"}), None)
    store.prepare_runtime(inst)
    if fail_at == "storage":  # a cipher directory gocryptfs refuses to reuse
        inst.cipher_dir.mkdir(parents=True)
        (inst.cipher_dir / "junk").write_bytes(b"x")

    runtime = _FailingRuntime(fail_at)
    phases: list[str] = []
    with pytest.raises(BootFailed) as failed:
        boot_instance(
            inst,
            key_provider=provider,
            tee_factory=lambda: SimulatedTdx(teecloud_home),
            runtime=runtime,  # type: ignore[arg-type]
            progress=phases.append,
        )
    # the boot stopped where the fault was, after the keys, and says so
    assert failed.value.phase == fail_at, failed.value
    assert phases[-1] == fail_at and "keys" in phases
    expected = {"storage": "gocryptfs", "starting": "compose failed", "healthy": "exited with code 1"}[
        fail_at
    ]
    assert expected in failed.value.reason, failed.value.reason
    assert not runtime.running, "the failed CVM's containers were left running"
    assert not (inst.env_dir / ENV_FILE_NAME).exists(), "decrypted env left in the runtime dir"
    assert not EncryptedVolume(inst.cipher_dir, inst.mount_point).is_mounted()
