"""Fakes for node tests without Docker, gocryptfs or a KMS: a runtime that records calls (and can fail like a
stopped engine), and a boot/shutdown pair patched into the docker backend (teecloud.node.runtime.docker_cvm)
in place of the real sequence."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from teecloud.agent.boot import normalize_app_compose
from teecloud.agent.storage import EncryptedVolume
from teecloud.node.errors import ComposeRejected, NodeError
from teecloud.node.instance import Instance, InstanceStore
from teecloud.node.runtime import docker_cvm
from teecloud.node.runtime.docker import ComposeSpec, ContainerState, DockerRuntime, LogStream, ResourceLimits
from teecloud.node.runtime.docker_cvm import BootedCvm, compose_spec
from teecloud.node.service import Node

# What a followed `docker logs` prints: one line, then nothing until it is killed.
FOLLOW_ARGV = ["sh", "-c", "echo hello; exec sleep 60"]


def app_compose(**extra: object) -> str:
    doc = {"name": "x", "runner": "docker-compose", "docker_compose_file": "services:\n  a:\n    image: x\n"}
    return normalize_app_compose({**doc, **extra})


class FakeRuntime(DockerRuntime):
    """Records lifecycle calls; `down_error` makes `down` raise (the engine is down). `logs` runs real, short
    local processes, so stream tests see real process lifetimes."""

    def __init__(self, *, down_error: NodeError | None = None, images: set[str] | None = None) -> None:
        super().__init__(docker="docker-not-used-in-tests", compose=["false"])
        self.down_error = down_error
        self.images = {"x", "y"} if images is None else images
        self.calls: list[tuple[str, str]] = []
        self.streams: list[LogStream] = []

    def check(self) -> None:
        pass

    def check_images(self, refs: Sequence[str]) -> None:
        self.calls.append(("check_images", ",".join(refs)))
        missing = [r for r in refs if r not in self.images]
        if missing:
            raise ComposeRejected(f"image {missing[0]!r} is not on this node (fake runtime)")

    def prepare(self, spec: ComposeSpec, compose_text: str, limits: ResourceLimits) -> list[str]:
        self.calls.append(("prepare", spec.project))
        return []

    def up(self, spec: ComposeSpec) -> None:
        self.calls.append(("up", spec.project))

    def stop(self, spec: ComposeSpec) -> None:
        self.calls.append(("stop", spec.project))

    def down(self, spec: ComposeSpec) -> None:
        self.calls.append(("down", spec.project))
        if self.down_error is not None:
            raise self.down_error

    def ps(self, project: str) -> list[ContainerState]:
        return []

    def logs(
        self, project: str, *, service: str | None = None, tail: int = 200, follow: bool = False
    ) -> LogStream:
        argv = FOLLOW_ARGV if follow else ["echo", "hello"]
        stream = LogStream([(service or "app", argv)])
        self.streams.append(stream)
        return stream

    def stats(self, project: str) -> list[dict[str, Any]]:
        return []


class FakeRunner:
    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


class FakeBoots:
    """Stands in for boot_instance/shutdown_instance: records the compose hash each boot read, and can make
    a shutdown slow (to open the window a racing request would use)."""

    def __init__(self) -> None:
        self.booted_hashes: list[str] = []
        self.shutdown_delay = 0.0
        self.in_shutdown = threading.Event()
        self.runners: list[FakeRunner] = []  # the agent of each boot, in order

    def boot(self, inst: Instance, *, runtime: DockerRuntime, **_: Any) -> BootedCvm:
        self.booted_hashes.append(inst.compose_hash().hex())
        spec = compose_spec(inst, with_env=False)
        runtime.prepare(spec, "", inst.limits())
        runtime.up(spec)
        self.runners.append(FakeRunner())
        return BootedCvm(
            state=SimpleNamespace(public_tcbinfo=True),  # type: ignore[arg-type]
            runner=self.runners[-1],  # type: ignore[arg-type]
            volume=EncryptedVolume(inst.cipher_dir, inst.mount_point),
        )

    def shutdown(self, inst: Instance, booted: BootedCvm | None, runtime: DockerRuntime) -> None:
        self.in_shutdown.set()
        time.sleep(self.shutdown_delay)
        runtime.stop(compose_spec(inst, with_env=False))


class NoKeys:
    name = "none"

    def boot_nonce(self) -> bytes:

        return b""

    def info(self) -> dict[str, str]:
        return {"name": "none", "id": ""}

    def get_app_keys(self, tee: Any, app_id: bytes, instance_id: bytes) -> Any:  # pragma: no cover
        raise AssertionError("the fake boot fetches no keys")


def make_node(home: Path, runtime: FakeRuntime, boots: FakeBoots, monkeypatch: pytest.MonkeyPatch) -> Node:
    from teecloud.tee.simulated import SimulatedTdx

    monkeypatch.setattr(docker_cvm, "boot_instance", boots.boot)
    monkeypatch.setattr(docker_cvm, "shutdown_instance", boots.shutdown)
    return Node(key_provider=NoKeys(), tee_factory=lambda: SimulatedTdx(home), runtime=runtime, home=home)


def stored_instance(
    home: Path,
    app_compose: str,
    *,
    sys_config: dict[str, Any] | None = None,
    encrypted_env: bytes | None = None,
) -> Instance:
    """App `web` (app id 11..11, 512 MB) as the node stores it, with the normalized `app_compose`."""
    return InstanceStore(home).create(
        app_compose=app_compose.encode(),
        app_id=b"\x11" * 20,
        name="web",
        encrypted_env=encrypted_env,
        user_config=None,
        sys_config=sys_config or {},
        limits=ResourceLimits(memory_mb=512),
    )
