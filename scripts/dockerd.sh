#!/usr/bin/env bash
# Start a Docker engine if none answers (logs to $TEECLOUD_TOOLS/dockerd.log). Prints "started" or "running".
set -euo pipefail
TOOLS="${TEECLOUD_TOOLS:-$HOME/.cache/teecloud-tools}"
mkdir -p "$TOOLS"
if docker info >/dev/null 2>&1; then echo running; exit 0; fi
nohup dockerd >"$TOOLS/dockerd.log" 2>&1 &
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then echo started; exit 0; fi
  sleep 0.5
done
echo "dockerd did not start; see $TOOLS/dockerd.log" >&2
tail -20 "$TOOLS/dockerd.log" >&2
exit 1
