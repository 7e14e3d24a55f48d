#!/usr/bin/env bash
# Build the AI agent's image teecloud/ai-agent:0.1 locally (see build_image.py). Usage: examples/ai-agent/build.sh
set -euo pipefail
exec python3 "$(dirname "$0")/build_image.py" "$@"
