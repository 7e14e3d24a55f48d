#!/usr/bin/env python3
"""Build the hello example's images locally, with no image registry.

1. teecloud/hello-base:<recipe-hash>: a Debian bookworm minbase rootfs made by debootstrap (python3 from
   Debian packages) plus dstack-sdk installed by pip, imported with `docker import`. Built once per recipe:
   the tag is a hash of the recipe, so an unchanged recipe reuses the image already in the engine.
2. teecloud/hello:0.1: `docker build` of the Dockerfile here (app.py on top of the base); seconds.

Usage: python3 examples/hello/build_image.py [--force-base]. Needs root (debootstrap), a Docker engine,
and network access to a Debian mirror and a Python package index (only for step 1).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIRROR = os.environ.get("TEECLOUD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
DEB_PACKAGES = ["python3-minimal", "libpython3.11-stdlib", "ca-certificates"]
PIP_REQUIREMENTS = ["dstack-sdk==0.5.4"]
BASE_REPO = "teecloud/hello-base"
APP_IMAGE = "teecloud/hello:0.1"
# Trimmed from the rootfs: documentation and package caches are of no use in a container.
TRIM = [
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
]


RECIPE_VERSION = 1  # bump when build_base() changes what goes into the image


def recipe_hash() -> str:
    recipe = repr((RECIPE_VERSION, SUITE, DEB_PACKAGES, PIP_REQUIREMENTS, TRIM)).encode()
    return hashlib.sha256(recipe).hexdigest()[:16]


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0


def build_base(tag: str) -> None:
    if shutil.which("debootstrap") is None:
        sys.exit("build_image: debootstrap is missing; install it with: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="hello-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        t0 = time.monotonic()
        print(f"build_image: debootstrap {SUITE} ({', '.join(DEB_PACKAGES)}) ...", flush=True)
        log = Path(tmp) / "debootstrap.log"
        with log.open("wb") as out:
            r = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(DEB_PACKAGES)}",
                    SUITE,
                    str(rootfs),
                    MIRROR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if r.returncode != 0:
            sys.stderr.write(log.read_text(errors="replace")[-3000:])
            sys.exit(f"build_image: debootstrap failed (exit {r.returncode}); is {MIRROR} reachable?")
        print(
            f"build_image: rootfs in {time.monotonic() - t0:.0f} s; pip install {' '.join(PIP_REQUIREMENTS)}"
        )
        site = rootfs / "usr/local/lib/python3.11/dist-packages"
        # Wheels for CPython 3.11 on glibc x86_64 match bookworm's python3.11.
        pip = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-compile",
                "--target",
                str(site),
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
                *PIP_REQUIREMENTS,
            ],
            capture_output=True,
        )
        if pip.returncode != 0:
            sys.stderr.write(pip.stderr.decode(errors="replace")[-3000:])
            sys.exit("build_image: pip install into the rootfs failed; is a Python package index reachable?")
        # The PyPI "asyncio" package (a dstack-sdk requirement) is an obsolete backport: drop it so the
        # standard library's asyncio is the one imported.
        for stale in site.glob("asyncio*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        for rel in TRIM:
            target = rootfs / rel
            if target.exists():
                shutil.rmtree(target)
                target.mkdir(parents=True)
        print("build_image: docker import ...", flush=True)
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        _run(
            [
                "docker",
                "import",
                "-c",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "-c",
                "ENV LANG=C.UTF-8",
                "-",
                tag,
            ],
            stdin=tar.stdout,
            stdout=subprocess.DEVNULL,
        )
        if tar.wait() != 0:
            sys.exit("build_image: tar of the rootfs failed")
        print(f"build_image: {tag} built in {time.monotonic() - t0:.0f} s", flush=True)


def build(force_base: bool = False) -> str:
    """Make sure both images exist; returns the app image reference."""
    base = f"{BASE_REPO}:{recipe_hash()}"
    if force_base or not image_exists(base):
        build_base(base)
    _run(["docker", "tag", base, f"{BASE_REPO}:latest"])
    r = subprocess.run(
        ["docker", "build", "-q", "--build-arg", f"BASE={base}", "-t", APP_IMAGE, str(HERE)],
        capture_output=True,
    )
    if r.returncode != 0:
        sys.stderr.write(r.stderr.decode(errors="replace"))
        sys.exit(f"build_image: docker build of {APP_IMAGE} failed")
    return APP_IMAGE


if __name__ == "__main__":
    print(build(force_base="--force-base" in sys.argv[1:]))
