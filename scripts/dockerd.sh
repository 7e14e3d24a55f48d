#!/usr/bin/env bash
# Start a Docker engine if none answers (logs to $TEECLOUD_TOOLS/dockerd.log). Prints "started" or "running".
# The PID of a dockerd started here goes to $TEECLOUD_TOOLS/dockerd.pid; `dockerd.sh stop` stops that
# process only (never an engine this script did not start, never by name).
set -euo pipefail
TOOLS="${TEECLOUD_TOOLS:-$HOME/.cache/teecloud-tools}"
PIDFILE="$TOOLS/dockerd.pid"
mkdir -p "$TOOLS"

ours() {  # prints the recorded PID if that process is still the dockerd we started
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
  echo "$pid"
}

if [ "${1:-}" = stop ]; then
  if pid=$(ours); then
    kill -TERM "$pid"
    for _ in $(seq 1 40); do
      # gone, or a zombie waiting for its parent to reap it
      grep -qs '^State:[[:space:]]*[A-Y]' "/proc/$pid/status" || break
      sleep 0.5
    done
    echo "stopped $pid"
  else
    echo "no dockerd started by this script is running"
  fi
  rm -f "$PIDFILE"
  exit 0
fi

if docker info >/dev/null 2>&1; then echo running; exit 0; fi
nohup dockerd >"$TOOLS/dockerd.log" 2>&1 &
echo $! >"$PIDFILE"
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then echo started; exit 0; fi
  sleep 0.5
done
echo "dockerd did not start; see $TOOLS/dockerd.log" >&2
tail -20 "$TOOLS/dockerd.log" >&2
exit 1
