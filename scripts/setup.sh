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
# --- gateway: HAProxy is the gateway's data plane (teecloud.gateway.driver starts it; tests too)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
# --- end gateway
# --- gateway certificates: pebble (Let's Encrypt's ACME test server) for the ACME DNS-01 end-to-end tests
command -v pebble >/dev/null || need_apt+=(pebble)
# --- end gateway certificates
# --- gateway rfc2136: BIND9 `named` for the RFC 2136 (DNS UPDATE + TSIG) DnsProvider's end-to-end tests
command -v named >/dev/null || [ -x /usr/sbin/named ] || need_apt+=(bind9 bind9-utils)
# --- end gateway rfc2136
# --- threshold KMS (issue 19): libsodium's ristretto255, used through pysodium (pinned in pyproject.toml)
ldconfig -p | grep -q 'libsodium\.so\.23' || need_apt+=(libsodium23)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- qemu backend: QEMU + OVMF (mode plain boots under TCG here; tdx / sev-snp command lines are checked as
# text), and Debian's signed cloud kernel (an EFI-stub PE) with its modules, for the reference-measurement
# tests and the TCG boot test
need_qemu=()
command -v qemu-system-x86_64 >/dev/null || need_qemu+=(qemu-system-x86)
command -v qemu-img >/dev/null || need_qemu+=(qemu-utils)
[ -f /usr/share/OVMF/OVMF_CODE.fd ] || need_qemu+=(ovmf)
GUEST_KERNEL_DIR=/var/cache/teecloud/guest-kernel
if [ ${#need_qemu[@]} -gt 0 ] || [ ! -f "$GUEST_KERNEL_DIR/vmlinuz" ]; then
  apt-get update -qq
fi
if [ ${#need_qemu[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_qemu[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_qemu[@]}" >/dev/null
fi
if [ ! -f "$GUEST_KERNEL_DIR/vmlinuz" ] || [ ! -d "$GUEST_KERNEL_DIR/modules" ]; then
  kpkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')"
  echo "setup: $GUEST_KERNEL_DIR/vmlinuz from $kpkg"
  ktmp="$(mktemp -d)"
  (cd "$ktmp" && apt-get download -qq "$kpkg" 2>/dev/null) && dpkg-deb -x "$ktmp"/linux-image-*.deb "$ktmp/x"
  mkdir -p "$GUEST_KERNEL_DIR"
  rm -rf "$GUEST_KERNEL_DIR/modules" && cp -r "$ktmp"/x/lib/modules/*/kernel "$GUEST_KERNEL_DIR/modules"
  cp "$ktmp"/x/boot/vmlinuz-* "$GUEST_KERNEL_DIR/vmlinuz.tmp" && mv "$GUEST_KERNEL_DIR/vmlinuz.tmp" "$GUEST_KERNEL_DIR/vmlinuz"
  rm -rf "$ktmp"
fi
# --- qemu guest network: socat relays each guestfwd connection (the KMS nodes, the gateway) of a
# restricted guest to one host loopback port
if ! command -v socat >/dev/null; then
  echo "setup: apt-get install socat"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends socat >/dev/null
fi
# --- end qemu guest network
# --- qemu guest image: `teecloud image build` (mmdebstrap from deb.debian.org, squashfs, dm-verity)
need_img=()
command -v mmdebstrap >/dev/null || need_img+=(mmdebstrap)
command -v mksquashfs >/dev/null || need_img+=(squashfs-tools)
command -v veritysetup >/dev/null || need_img+=(cryptsetup-bin)
if [ ${#need_img[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_img[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_img[@]}" >/dev/null
fi
# --- end qemu guest image
# --- reference measurements: swtpm, a software TPM for the test that reads Debian OVMF's event log
# (tests/image/test_measure_acpi.py)
if ! command -v swtpm >/dev/null; then
  echo "setup: apt-get install swtpm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends swtpm >/dev/null
fi
# --- end reference measurements

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
# --- ai images: the engine's wheel for examples/llm's image (teecloud/llm:0.1), kept in
# ~/.cache/teecloud/wheels; pip's wheel cache holds it after the build above, so this takes a second (the
# images themselves are built, and cached by their inputs, by tests/e2e/test_ai_deploy.py's fixtures).
python3 examples/llm/build_image.py --wheel-only >/dev/null
# --- end ai images

# starlette's TestClient switches to httpx2 when it is installed (openai >= 3 pulls it in), and then no longer
# serves as an httpx transport (the node and KMS tests use it so): keep httpx2 out of this environment.
if python3 -c "import httpx2" 2>/dev/null; then
  echo "setup: pip uninstall httpx2 (breaks starlette's TestClient as an httpx transport)"
  python3 -m pip uninstall -y -q httpx2 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
