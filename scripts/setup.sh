#!/usr/bin/env bash
# Install everything teecloud and its tests need on a fresh Debian 12 machine (idempotent; run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${TEECLOUD_TOOLS:-$HOME/.cache/teecloud-tools}"
need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
command -v gocryptfs >/dev/null || need_apt+=(gocryptfs)
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# anvil (a second, independent EVM implementation for the chain tests) ships inside this npm package.
if [ ! -x "$TOOLS/node_modules/.bin/anvil" ]; then
  echo "setup: npm install @foundry-rs/anvil"
  mkdir -p "$TOOLS"
  (cd "$TOOLS" && npm install --no-audit --no-fund --silent @foundry-rs/anvil@1.7.1 >/dev/null)
fi

echo "setup: pip install -e .[test,fuzz]"
python3 -m pip install -q -e '.[test,fuzz]' 2>&1 | grep -v -e "Running pip as the 'root' user" -e '^$' || true

# --- confidential AI: the [ai] extra (gguf, openai) and llama-cpp-python built from source (CPU; no
# prebuilt wheel is reachable here). The build takes several minutes on 2 cores (docs/ai.md has the figure);
# it is skipped when the pinned version is already installed.
python3 -m pip install -q -e '.[ai]' 2>&1 | grep -v -e "Running pip as the 'root' user" -e '^$' || true
if ! python3 -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '0.3.36')" 2>/dev/null; then
  echo "setup: building llama-cpp-python 0.3.36 from source (several minutes)"
  CMAKE_BUILD_PARALLEL_LEVEL=2 python3 -m pip install -q --no-binary llama-cpp-python \
    'llama-cpp-python[server]==0.3.36' 2>&1 | grep -v -e "Running pip as the 'root' user" -e '^$' || true
fi

# starlette's TestClient switches to httpx2 when it is installed (openai >= 3 pulls it in), and then no longer
# serves as an httpx transport (the node and KMS tests use it so): keep httpx2 out of this environment.
if python3 -c "import httpx2" 2>/dev/null; then
  echo "setup: pip uninstall httpx2 (breaks starlette's TestClient as an httpx transport)"
  python3 -m pip uninstall -y -q httpx2 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
