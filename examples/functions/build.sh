#!/usr/bin/env bash
# Build the function runtime's image locally (see build_image.py). Usage: examples/functions/build.sh
set -euo pipefail
exec python3 "$(dirname "$0")/build_image.py" "$@"
