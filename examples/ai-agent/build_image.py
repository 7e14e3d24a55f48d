#!/usr/bin/env python3
"""Build the AI agent's image (teecloud/ai-agent:0.1) locally, with no image registry
(examples/_imagebuild.py).

1. The base: hello's (Debian bookworm minbase made by debootstrap, python3, ca-certificates), once per recipe.
2. site/: teecloud (a wheel of this checkout) and the agent's dependencies at the host's versions, from
   wheels only, with --no-index.

Usage: python3 examples/ai-agent/build_image.py. Needs a Docker engine, and for a first build root
(debootstrap), a Debian mirror and a Python package index.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _imagebuild as ib  # noqa: E402

IMAGE = "teecloud/ai-agent:0.1"
# What agent.py imports (the agent, its sqlite-vec memory in apsw's SQLite, the chain client and the
# contracts it compiles, the guest API client); pip adds their own requirements.
REQUIREMENTS = [
    "dstack-sdk",
    "rfc8785",
    "httpx",
    "fastapi",
    "uvicorn",
    "sqlite-vec",
    "apsw",
    "coincurve",
    "cryptography",
    "cbor2",
    "dcap-qvl",
    "eth-account",
    "eth-utils",
    "vyper",
    "typer",
    "rich",
    "PyYAML",
]


def build() -> str:
    """Build (or refresh) the image from this checkout; returns its reference."""
    t0 = time.monotonic()
    base = ib.base_image()
    reqs = ib.pinned(REQUIREMENTS)
    inputs = ib.inputs_digest(
        base, reqs, trees=[ib.ROOT / "src" / "teecloud", ib.ROOT / "pyproject.toml", HERE, Path(ib.__file__)]
    )
    if ib.up_to_date(IMAGE, inputs):
        return IMAGE
    with tempfile.TemporaryDirectory(prefix="ai-agent-image-") as tmp:
        ctx = Path(tmp)
        ib.python_site(ctx / "site", reqs)
        for name in ("Dockerfile", "agent.py"):
            shutil.copy2(HERE / name, ctx / name)
        image = ib.docker_build(ctx, IMAGE, base, inputs)
    print(f"build_image: {IMAGE} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return image


if __name__ == "__main__":
    print(build())
