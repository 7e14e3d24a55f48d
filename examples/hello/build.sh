#!/usr/bin/env bash
# Build the hello example's images locally (see build_image.py). Usage: examples/hello/build.sh [--force-base]
set -euo pipefail
exec python3 "$(dirname "$0")/build_image.py" "$@"
