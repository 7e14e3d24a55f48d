#!/usr/bin/env bash
# Build the inference app's image teecloud/llm:0.1 locally (see build_image.py). Usage: examples/llm/build.sh
set -euo pipefail
exec python3 "$(dirname "$0")/build_image.py" "$@"
