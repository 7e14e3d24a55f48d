#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install what is missing, start a Docker engine, build the
# hello example's image locally, then run the local cloud (`teecloud up`; Ctrl-C stops it, state is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/dockerd.sh >/dev/null
examples/hello/build.sh
exec teecloud up "$@"
