#!/usr/bin/env bash
# The test command: set up, start the Docker engine, lint, type-check, run the suite, fuzz briefly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TOOLS="${TEECLOUD_TOOLS:-$HOME/.cache/teecloud-tools}"
export PATH="$TOOLS/node_modules/.bin:$PATH"

state=$(bash scripts/dockerd.sh)
# Stop only the engine this run started, by the PID dockerd.sh recorded (never by name).
cleanup() { if [ "$state" = started ]; then bash scripts/dockerd.sh stop || true; fi; }
trap cleanup EXIT
# The crash test may restart the engine only when this script started it (it stops every container).
if [ "$state" = started ]; then export TEECLOUD_E2E_RESTART_DOCKERD=1; fi

echo "== ruff"; ruff check src tests bench fuzz; ruff format --check src tests bench fuzz
# mypy's incremental cache outlives the clone (a fresh clone checks every file again otherwise: ~30 s); mypy
# revalidates each cached module by its source hash, so a changed file is always checked again
export MYPY_CACHE_DIR="${MYPY_CACHE_DIR:-$HOME/.cache/teecloud-mypy}"
echo "== mypy"; mypy src fuzz
echo "== import layers"; lint-imports --no-cache
echo "== fuzz (brief)"; python3 fuzz/run.py --seconds "${FUZZ_SECONDS:-20}" > "${TMPDIR:-/tmp}/teecloud-fuzz.log" 2>&1 \
  || { tail -40 "${TMPDIR:-/tmp}/teecloud-fuzz.log"; exit 1; }
tail -1 "${TMPDIR:-/tmp}/teecloud-fuzz.log"
# --durations=40: every CI log names its slowest test phases (where the next minutes are).
# Two worker processes (pytest-xdist, TEECLOUD_TEST_WORKERS to change): many tests wait (the Docker engine,
# QEMU/TCG, KMS node processes, HTTP round trips), so one process left a core idle. --dist loadgroup sends
# each xdist_group to one worker as a whole: "e2e" (Docker, LocalCloud, QEMU, the guest-image cache) runs
# serially, every other module is its own unit (tests/conftest.py); tests/conftest.py already orders the
# units, so xdist keeps that order (--no-loadscope-reorder).
echo "== pytest"
TEECLOUD_E2E_REQUIRED=1 python3 -m pytest -q --durations=40 -n "${TEECLOUD_TEST_WORKERS:-2}" \
  --dist loadgroup --no-loadscope-reorder "$@"
