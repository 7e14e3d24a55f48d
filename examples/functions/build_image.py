#!/usr/bin/env python3
"""Build the function runtime's image (teecloud/fn-runtime:0.1) locally, with no image registry.

1. The base: examples/hello's (Debian bookworm minbase made by debootstrap, python3, ca-certificates),
   built by its build_image.py once per recipe.
2. Wheels on the host: teecloud itself with `pip wheel --no-deps` from this checkout, and the runtime's
   dependencies (RUNTIME_REQUIREMENTS and what they need, at the versions installed on the host, so the
   image runs what the tests ran) downloaded as CPython 3.11 manylinux x86_64 wheels.
3. site/: those wheels installed with `pip install --no-index --find-links <wheels>` (nothing else can get
   in), copied by the Dockerfile to /opt/teecloud/site; `teecloud fn serve` is the command.

Usage: python3 examples/functions/build_image.py. Needs a Docker engine, and for a first build root
(debootstrap), a Debian mirror and a Python package index.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IMAGE = "teecloud/fn-runtime:0.1"
# What `teecloud fn serve` imports (the CLI, the functions service and its HTTP server, the chain client and
# the contracts it compiles, the guest agent's client); pip adds their own requirements.
RUNTIME_REQUIREMENTS = [
    "wasmtime",
    "httpx",
    "fastapi",
    "uvicorn",
    "typer",
    "rich",
    "PyYAML",
    "eth-account",
    "eth-utils",
    "coincurve",
    "cryptography",
    "cbor2",
    "dcap-qvl",
    "vyper",
    "dstack-sdk",
]
WHEEL_PLATFORM = [
    "--only-binary=:all:",
    "--implementation",
    "cp",
    "--python-version",
    "3.11",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
]


def _pip(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        sys.exit(f"build_image: pip {args[0]} failed")


def _pinned() -> list[str]:
    """RUNTIME_REQUIREMENTS at the host's installed versions."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME_REQUIREMENTS]


def _constraints(path: Path) -> None:
    """Every installed distribution pinned (so transitive dependencies match the host's too)."""
    lines = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in importlib.metadata.distributions()
        if d.metadata["Name"] and d.metadata["Name"].lower() != "teecloud"
    )
    path.write_text("\n".join(lines) + "\n")


def base_image() -> str:
    spec = importlib.util.spec_from_file_location("hello_build_image", ROOT / "examples/hello/build_image.py")
    assert spec is not None and spec.loader is not None
    hello = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hello)
    base = f"{hello.BASE_REPO}:{hello.recipe_hash()}"
    if not hello.image_exists(base):
        hello.build_base(base)
    return base


def build() -> str:
    """Build (or refresh) the runtime image from this checkout; returns its reference."""
    base = base_image()
    with tempfile.TemporaryDirectory(prefix="fn-runtime-") as tmp:
        t = Path(tmp)
        wheels, ctx = t / "wheels", t / "context"
        wheels.mkdir()
        ctx.mkdir()
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT))
        _constraints(t / "constraints.txt")
        _pip("download", "-d", str(wheels), "-c", str(t / "constraints.txt"), *WHEEL_PLATFORM, *_pinned())
        (teecloud_wheel,) = wheels.glob("teecloud-*.whl")
        _pip(
            "install",
            "--no-index",
            "--find-links",
            str(wheels),
            "--no-deps",
            "--no-compile",
            "--target",
            str(ctx / "site"),
            *WHEEL_PLATFORM,
            str(teecloud_wheel),
        )
        _pip(
            "install",
            "--no-index",
            "--find-links",
            str(wheels),
            "--no-compile",
            "--target",
            str(ctx / "site"),
            *WHEEL_PLATFORM,
            *_pinned(),
        )
        # The PyPI "asyncio" package (a dstack-sdk requirement) is an obsolete backport: the standard
        # library's asyncio must be the one imported.
        for stale in (ctx / "site").glob("asyncio*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        shutil.rmtree(ctx / "site" / "bin", ignore_errors=True)
        for name in ("Dockerfile", "teecloud"):
            shutil.copy2(HERE / name, ctx / name)
        r = subprocess.run(
            ["docker", "build", "-q", "--build-arg", f"BASE={base}", "-t", IMAGE, str(ctx)],
            capture_output=True,
        )
        if r.returncode != 0:
            sys.stderr.write(r.stderr.decode(errors="replace"))
            sys.exit(f"build_image: docker build of {IMAGE} failed")
    return IMAGE


if __name__ == "__main__":
    print(build())
