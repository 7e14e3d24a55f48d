"""Whole-system fixtures: the hello image (built locally once per recipe) and a local cloud (chain + KMS +
node) in this process, under its own data directory."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"


def _docker_ok() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )


def _fail_or_skip(why: str) -> None:
    # In CI (.ci/run starts dockerd) a missing engine is a failure; elsewhere these tests skip.
    import os

    if os.environ.get("CI") or os.environ.get("TEECLOUD_E2E_REQUIRED"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def hello_image() -> str:
    if not _docker_ok():
        _fail_or_skip("no Docker engine reachable (start one with `bash scripts/dockerd.sh`)")
    spec = importlib.util.spec_from_file_location("hello_build_image", HELLO / "build_image.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.build())


@pytest.fixture(scope="module")
def cloud(hello_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from teecloud.devstack import LocalCloud, check_prerequisites

    missing = check_prerequisites()
    if missing:
        _fail_or_skip("; ".join(missing))
    home = tmp_path_factory.mktemp("e2e-home")
    c = LocalCloud(home, dev_time_travel=True)  # test_hello skips a timelock delay
    c.start()
    yield c
    try:
        node = c.node
        for inst in node.store.all():
            node.remove(inst.instance_id)
    finally:
        c.stop()


@pytest.fixture(scope="module")
def session(cloud: object) -> Iterator[object]:
    from teecloud.cloud.deploy import Session

    s = Session(cloud.home)  # type: ignore[attr-defined]
    yield s
    s.close()


def wait_serving(url: str, timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return r
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{url} not serving after {timeout} s: {last}")


def deploy_hello_with_secret(session: object, name: str, secret: str) -> object:
    """Deploy examples/hello with the env SECRET=secret (allowed_envs) and check that the running app sees
    it (its /secret route answers the value's SHA-256); the deploy result, for the test's own checks."""
    import hashlib

    from teecloud.cloud.deploy import deploy

    r = deploy(
        session,  # type: ignore[arg-type]
        HELLO / "docker-compose.yml",
        name=name,
        env={"SECRET": secret},
        allowed_envs=["SECRET"],
    )
    assert r.status == "running", r.error
    wait_serving(r.urls[0] + "/")
    got = httpx.get(r.urls[0] + "/secret", timeout=10).json()
    assert got == {"present": True, "sha256": hashlib.sha256(secret.encode()).hexdigest()}
    return r
