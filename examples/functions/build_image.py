#!/usr/bin/env python3
"""Build the function runtime's image (teecloud/fn-runtime:0.1) locally, with no image registry
(examples/_imagebuild.py).

1. The base: hello's (Debian bookworm minbase made by debootstrap, python3, ca-certificates), once per recipe.
2. site/: teecloud as a wheel of this checkout plus only the runtime's dependencies (RUNTIME_REQUIREMENTS at
   the host's versions, and what they need), installed from local wheels with --no-index; copied by the
   Dockerfile to /opt/teecloud/site; `teecloud fn serve` is the command.

Usage: python3 examples/functions/build_image.py. Needs a Docker engine, and for a first build root
(debootstrap), a Debian mirror and a Python package index.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _imagebuild as ib  # noqa: E402

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


def build() -> str:
    """Build (or refresh) the runtime image from this checkout; returns its reference."""
    base = ib.base_image()
    with tempfile.TemporaryDirectory(prefix="fn-runtime-") as tmp:
        ctx = Path(tmp)
        ib.python_site(ctx / "site", ib.pinned(RUNTIME_REQUIREMENTS))
        for name in ("Dockerfile", "teecloud"):
            shutil.copy2(HERE / name, ctx / name)
        return ib.docker_build(ctx, IMAGE, base)


if __name__ == "__main__":
    print(build())
