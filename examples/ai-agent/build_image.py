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

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _imagebuild as ib  # noqa: E402

IMAGE = "teecloud/ai-agent:0.1"
# What agent.py imports beyond the library's common set: its sqlite-vec memory in apsw's SQLite.
REQUIREMENTS = [*ib.TEECLOUD_APP_REQUIREMENTS, "sqlite-vec", "apsw"]


def build() -> str:
    """Build (or refresh) the image from this checkout; returns its reference."""
    return ib.app_image(
        IMAGE,
        here=HERE,
        base=ib.base_image(),
        requirements=ib.pinned(REQUIREMENTS),
        files=["Dockerfile", "agent.py"],
    )


if __name__ == "__main__":
    print(build())
