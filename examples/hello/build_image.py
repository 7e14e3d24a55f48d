#!/usr/bin/env python3
"""Build the hello example's images locally, with no image registry (examples/_imagebuild.py).

1. teecloud/hello-base:<recipe-hash>: Debian bookworm minbase (python3) + dstack-sdk; once per recipe.
2. teecloud/hello:0.1: `docker build` of the Dockerfile here (app.py on top of the base); seconds.

Usage: python3 examples/hello/build_image.py [--force-base]. Needs root (debootstrap), a Docker engine,
and network access to a Debian mirror and a Python package index (only for step 1).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _imagebuild as ib  # noqa: E402

APP_IMAGE = "teecloud/hello:0.1"
BASE_REPO = ib.BASE_REPO


def build(force_base: bool = False) -> str:
    """Make sure both images exist; returns the app image reference."""
    base = ib.base_image(force=force_base)
    subprocess.run(["docker", "tag", base, f"{BASE_REPO}:latest"], check=True)
    return ib.docker_build(HERE, APP_IMAGE, base)


if __name__ == "__main__":
    print(build(force_base="--force-base" in sys.argv[1:]))
