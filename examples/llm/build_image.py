#!/usr/bin/env python3
"""Build the inference app's image (teecloud/llm:0.1) locally, with no image registry
(examples/_imagebuild.py).

1. The base: Debian bookworm minbase (python3, and libgomp1: llama.cpp's CPU backend uses OpenMP) made by
   debootstrap, once per recipe.
2. The engine: llama-cpp-python[server] 0.3.36 from a wheel built on this host from its source (no index has
   a wheel of it; scripts/setup.sh built it already, so pip's wheel cache usually answers at once, and ours,
   ~/.cache/teecloud/wheels, keeps it). llama.cpp builds for the host's CPU: run the image on this kind of
   machine.
3. site/: teecloud (a wheel of this checkout), the engine and the app's dependencies at the host's
   versions, from wheels only, with --no-index.
4. models/tiny-llama.gguf: the tiny random-weight model of tinymodel.py (seed 0; deterministic), whose
   sha256 docker-compose.yml pins (MODEL_SHA256): the build checks that they agree.

Usage: python3 examples/llm/build_image.py [--force-base | --wheel-only]. Needs a Docker engine, and for a
first build root (debootstrap), a Debian mirror and a Python package index.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _imagebuild as ib  # noqa: E402

IMAGE = "teecloud/llm:0.1"
EXTRA_DEBS = ["libgomp1"]
LLAMA = "llama-cpp-python==0.3.36"
LLAMA_SERVER = "llama-cpp-python[server]==0.3.36"
# What app.py imports (teecloud.ai's front, the engine's supervisor, the guest API client, the receipt-root
# publisher's chain client) is the library's common set; the engine comes as a local wheel.
REQUIREMENTS = ib.TEECLOUD_APP_REQUIREMENTS
MODEL_NAME = "tiny-llama.gguf"


def compose_model_sha256() -> str:
    doc = yaml.safe_load((HERE / "docker-compose.yml").read_text())
    return str(doc["services"]["llm"]["environment"]["MODEL_SHA256"])


def write_model(out: Path) -> str:
    spec = importlib.util.spec_from_file_location("llm_tinymodel", HERE / "tinymodel.py")
    assert spec is not None and spec.loader is not None
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tiny.write_tiny_llama(out, seed=0)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    pinned = compose_model_sha256()
    if digest != pinned:
        ib.fail(f"the tiny model's sha256 is {digest}; docker-compose.yml pins MODEL_SHA256={pinned}")
    return digest


def llama_wheel() -> Path:
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
    return ib.local_wheel(LLAMA, "llama_cpp_python-0.3.36-*.whl", env=env)


def build(force_base: bool = False) -> str:
    """Build (or refresh) the image from this checkout; returns its reference."""

    def add_model(ctx: Path) -> None:
        (ctx / "models").mkdir()
        write_model(ctx / "models" / MODEL_NAME)

    return ib.app_image(
        IMAGE,
        here=HERE,
        base=ib.base_image(EXTRA_DEBS, repo="teecloud/ai-base", force=force_base),
        requirements=[*ib.pinned(REQUIREMENTS), LLAMA_SERVER],
        files=["Dockerfile", "app.py"],
        local_wheels=lambda: [llama_wheel()],
        prepare=add_model,
    )


if __name__ == "__main__":
    if "--wheel-only" in sys.argv[1:]:  # scripts/setup.sh: the engine's wheel, built once and kept
        print(llama_wheel())
    else:
        print(build(force_base="--force-base" in sys.argv[1:]))
