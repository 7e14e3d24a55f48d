"""`teecloud image build`: a reproducible guest OS image for the qemu backend, from Debian packages.

Layout (dstack's OS image directory):
    metadata.json        bios, kernel, cmdline, initrd, rootfs (+ teecloud's recipe hash and package list)
    bzImage              Debian's cloud kernel (/var/cache/teecloud/guest-kernel, fetched by setup.sh)
    initramfs.cpio.gz    busybox, dmsetup and the modules that open the verity rootfs (image.initramfs)
    rootfs.img.verity    squashfs of the Debian rootfs, then its dm-verity hash tree (no superblock); the root
                         hash, salt and sizes are on the (measured) kernel command line
    ovmf.fd              the firmware (the host's Debian OVMF, or the TDVF given with --tdvf)
    measurement.tdx.cbor the TDX reference measurements, when ovmf.fd is a TDVF (image.reference)
    packages.txt         every installed package=version (what the image is made of)
    sha256sum.txt        `sha256  name` of each file above (sorted by name)
    digest.txt           os_image_hash = sha256(sha256sum.txt), as dstack computes it

Steps (each reproducible: the same inputs give the same bytes):
(1) rootfs    mmdebstrap --variant=minbase of the recipe's packages from deb.debian.org, SOURCE_DATE_EPOCH
              set (mmdebstrap then clamps mtimes and empties /etc/machine-id); fixed /etc/hostname and
              /etc/resolv.conf; cached as a tar by the hash of its inputs (suite, mirror, packages, epoch)
(2) assemble  the kernel's modules (+ depmod), the init and the guest agent into the rootfs: teecloud (a
              wheel built from this source tree, SOURCE_DATE_EPOCH set) and its runtime dependencies on the
              guest's path (GUEST_DISTRIBUTIONS at the versions installed here, as wheels fetched with pip
              into <cache>/wheels/) installed `--no-index --no-deps` under /opt/teecloud/lib, compiled by
              the guest's own python3 (unchecked-hash .pyc: no mtimes); mksquashfs with every timestamp
              SOURCE_DATE_EPOCH; veritysetup with a salt derived from the recipe
(3) initramfs busybox, dmsetup and its libraries from the rootfs, the modules that open the rootfs
(4) digests   sha256sum.txt, digest.txt; the directory is cached by the recipe hash under
              /var/cache/teecloud/images/<recipe hash>/ (a later build of the same recipe is a cache hit)

Package versions are whatever the mirror serves at step (1) (recorded in packages.txt); `--lock FILE` makes
a build refuse any other version than the file's. Debian's mirror keeps only current versions: a lock of
superseded versions fails with the difference, it is never silently ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from teecloud.image.errors import ImageError
from teecloud.image.initramfs import Entry, build_initramfs
from teecloud.image.reference import write_reference_files
from teecloud.image.testguest import module_load_order

__all__ = [
    "DEFAULT_CACHE",
    "BuiltImage",
    "ImageBuildError",
    "Recipe",
    "build_image",
    "kernel_release",
    "os_image_hash",
]

DEFAULT_CACHE = Path("/var/cache/teecloud/images")
GUEST_KERNEL = Path("/var/cache/teecloud/guest-kernel")
OVMF = Path("/usr/share/ovmf/OVMF.fd")
BUILDER_VERSION = "1"
# the kernel modules the initramfs loads to open the rootfs (dependencies resolved from each .modinfo)
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "dm_verity", "squashfs", "overlay")
VERITY_BLOCK = 4096
AGENT_SOURCE = Path(__file__).resolve().parent.parent / "agent" / "vm_agent.py"
TEECLOUD_PACKAGE = Path(__file__).resolve().parent.parent
GUEST_LIB = "opt/teecloud/lib"
# what the guest agent imports (teecloud.agent.vm_agent: the guest half of boot, the KMS client, the simulated
# TEE of mode plain) and what those import, by distribution name; the versions are the ones installed here
# (pinned by pyproject.toml), recorded in the image's wheels.txt
GUEST_DISTRIBUTIONS = (
    "Pygments",
    "annotated-doc",
    "annotated-types",
    "anyio",
    "bitarray",
    "cbor2",
    "certifi",
    "cffi",
    "ckzg",
    "click",
    "coincurve",
    "cryptography",
    "cytoolz",
    "dcap-qvl",
    "eth-account",
    "eth-hash",
    "eth-keyfile",
    "eth-keys",
    "eth-rlp",
    "eth-typing",
    "eth-utils",
    "eth_abi",
    "ecdsa",
    "fastapi",
    "h11",
    "hexbytes",
    "httpx",
    "httpcore",
    "idna",
    "markdown-it-py",
    "mdurl",
    "opentelemetry-api",
    "orjson",
    "parsimonious",
    "py-ecc",
    "pycparser",
    "pycryptodome",
    "pydantic",
    "pydantic_core",
    "pysodium",
    "PyYAML",
    "regex",
    "rich",
    "rlp",
    "six",
    "sniffio",
    "starlette",
    "toolz",
    "typing-inspection",
    "typing_extensions",
    "uvicorn",
)

# --- qemu guest network: a threshold guest's KMS client (teecloud.keys.threshold) needs pysodium, which
# PyPI ships as an sdist only: its wheel is built here (pure Python, SOURCE_DATE_EPOCH), over the rootfs's
# libsodium23
SDIST_ONLY_DISTRIBUTIONS = ("pysodium",)
# --- end qemu guest network
# the guest's packages: what the agent, the boot sequence and the app need (docker.io brings containerd,
# runc and iptables); minbase brings dpkg, apt and the Essential set
PACKAGES = (
    "busybox-static",
    "ca-certificates",
    "cryptsetup-bin",
    "dmsetup",
    "docker-compose",
    "docker.io",
    "e2fsprogs",
    "iproute2",
    "kmod",
    "libsodium23",
    "python3",
)
# left out of the rootfs (smaller; nothing at runtime reads them)
DPKG_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)


class ImageBuildError(ImageError):
    """A build step failed (the tool's output attached) or an input is missing."""


@dataclass(frozen=True)
class Recipe:
    """What an image is made of; its hash (with the hashes of the kernel, firmware and teecloud's files) names
    the cache entry."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = PACKAGES
    source_date_epoch: int = 1735689600  # 2025-01-01T00:00:00Z
    cmdline: str = "console=ttyS0 panic=1 quiet"
    kernel_dir: Path = GUEST_KERNEL
    ovmf: Path = OVMF
    lock: tuple[str, ...] = ()  # package=version lines the build must reproduce exactly

    def rootfs_inputs(self) -> dict[str, object]:
        return {
            "builder": BUILDER_VERSION,
            "suite": self.suite,
            "mirror": self.mirror,
            "packages": sorted(self.packages),
            "excludes": list(DPKG_EXCLUDES),
            "source_date_epoch": self.source_date_epoch,
            "lock": sorted(self.lock),
        }

    def rootfs_hash(self) -> str:
        return _sha256_json(self.rootfs_inputs())

    def recipe_hash(self) -> str:
        """sha256 over the rootfs inputs, the kernel and its modules, the firmware, the command line and the
        teecloud files that go into the image."""
        self.check_inputs()
        return _sha256_json(
            {
                "rootfs": self.rootfs_hash(),
                "cmdline": self.cmdline,
                "kernel": _sha256_file(self.kernel_dir / "vmlinuz"),
                "modules": _tree_hash(self.kernel_dir / "modules"),
                "ovmf": _sha256_file(self.ovmf),
                "agent": _sha256_file(AGENT_SOURCE),
                "teecloud": _tree_hash(TEECLOUD_PACKAGE),
                "project": _sha256_file(TEECLOUD_PACKAGE.parent.parent / "pyproject.toml"),
                "wheels": guest_wheel_pins(),
                "init": hashlib.sha256((_INITRAMFS_INIT + _ROOTFS_INIT).encode()).hexdigest(),
                "initramfs_modules": list(INITRAMFS_MODULES),
            }
        )

    def check_inputs(self) -> None:
        for path in (self.kernel_dir / "vmlinuz", self.kernel_dir / "modules", self.ovmf):
            if not path.exists():
                raise ImageBuildError(f"{path} is missing: run scripts/setup.sh (guest kernel, ovmf)")
        if os.geteuid() != 0:
            raise ImageBuildError("teecloud image build runs as root (mmdebstrap --mode=root, chroot)")
        for tool in ("mmdebstrap", "mksquashfs", "veritysetup"):
            if shutil.which(tool) is None:
                raise ImageBuildError(
                    f"{tool} not found (Debian: apt-get install mmdebstrap squashfs-tools cryptsetup-bin)"
                )


@dataclass(frozen=True)
class BuiltImage:
    path: Path
    os_image_hash: str
    recipe_hash: str
    cached: bool
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def metadata(self) -> dict[str, object]:
        return dict(json.loads((self.path / "metadata.json").read_text()))


def _sha256_json(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            h.update(f"{p.relative_to(root)}\0{_sha256_file(p)}\n".encode())
    return h.hexdigest()


def os_image_hash(sha256sum_txt: bytes) -> str:
    """dstack's os_image_hash: sha256 of the image's sha256sum.txt."""
    return hashlib.sha256(sha256sum_txt).hexdigest()


def kernel_release(bzimage: bytes) -> str:
    """The kernel release (`uname -r`) from a bzImage: the setup header's kernel_version pointer (offset
    0x20E, relative to 0x200) names a NUL-terminated string that starts with it (Linux boot protocol)."""
    if len(bzimage) < 0x210 or bzimage[0x202:0x206] != b"HdrS":
        raise ImageBuildError("the kernel is not a bzImage (no HdrS setup header)")
    (ptr,) = struct.unpack_from("<H", bzimage, 0x20E)
    start = ptr + 0x200
    end = bzimage.find(b"\0", start, start + 256)
    if ptr == 0 or end < 0:
        raise ImageBuildError("the bzImage carries no kernel version string")
    release = bzimage[start:end].split(b" ")[0].decode("ascii", "replace")
    if not release or "/" in release or release.startswith("."):
        raise ImageBuildError(f"bad kernel release {release!r}")
    return release


def _run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800, what: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{what}: {exc}") from None
    if out.returncode != 0:
        raise ImageBuildError(f"{what} failed ({out.returncode}): {(out.stderr or out.stdout)[-2000:]}")
    return out.stdout


# -- (1) the Debian rootfs
def _rootfs_tar(recipe: Recipe, cache: Path, log: Callable[[str], None]) -> Path:
    tar = cache / f"rootfs-{recipe.rootfs_hash()[:32]}.tar"
    if tar.is_file():
        return tar
    cache.mkdir(parents=True, exist_ok=True)
    tmp = tar.with_name(tar.name + f".tmp{os.getpid()}")
    include = ",".join(recipe.lock or recipe.packages)
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        f"--include={include}",
        "--aptopt=APT::Install-Recommends false",
        *[f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES],
        # mmdebstrap leaves these host-dependent: make them constant
        "--customize-hook=echo teecloud-guest > $1/etc/hostname",
        "--customize-hook=echo 'nameserver 10.0.2.3' > $1/etc/resolv.conf",
        "--customize-hook=rm -f $1/etc/apt/sources.list.d/*.list",
        recipe.suite,
        str(tmp),
        recipe.mirror,
    ]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(recipe.source_date_epoch), "LC_ALL": "C.UTF-8"}
    log(f"mmdebstrap {recipe.suite}: {include}")
    try:
        _run(argv, env=env, what="mmdebstrap")
        os.replace(tmp, tar)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return tar


def _packages(root: Path) -> list[str]:
    out = _run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f=${Package}=${Version}\\n"],
        what="dpkg-query",
    )
    return sorted(line for line in out.splitlines() if line)


# -- (2) the guest's own files
_ROOTFS_INIT = """#!/bin/sh
# teecloud guest init (PID 1 after the initramfs switched to the verity rootfs + a tmpfs overlay)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp; mount -t devpts devpts /dev/pts; mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp; mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "teecloud-guest: init on $(uname -r)"
for m in virtio_net vfat nls_cp437 nls_ascii dm_crypt overlay bridge veth br_netfilter ip_tables \\
         iptable_nat iptable_filter nf_nat xt_MASQUERADE xt_addrtype xt_conntrack; do
  modprobe $m || echo "teecloud-guest: no module $m"
done
export DM_DISABLE_UDEV=1  # no udev: libdevmapper (cryptsetup) creates its /dev/mapper nodes itself
i=0; dev=""
while [ -z "$dev" ] && [ $i -lt 100 ]; do
  dev=$(busybox findfs LABEL=DSTACKSHR 2>/dev/null); i=$((i+1)); sleep 0.1
done
[ -n "$dev" ] || { echo "teecloud-guest: no host-shared disk (label DSTACKSHR)"; sleep 1; poweroff -f; }
mkdir -p /dstack/.host-shared && mount -t vfat -o ro "$dev" /dstack/.host-shared
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.10/24 dev eth0; ip route add default via 10.0.2.2
echo "teecloud-guest: starting the agent"
PYTHONPATH=/opt/teecloud/lib python3 -m teecloud.agent.vm_agent /dstack/.host-shared &
echo "teecloud-guest: ready"
while true; do sleep 3600; done
"""

_INITRAMFS_INIT = """#!/bin/busybox sh
# teecloud initramfs: open the dm-verity rootfs named on the (measured) command line, overlay a tmpfs on it
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"; done
for a in $(cat /proc/cmdline); do
  case "$a" in teecloud.verity=*) v="${a#teecloud.verity=}" ;; esac
done
[ -n "$v" ] || { echo "initramfs: no teecloud.verity= on the command line"; poweroff -f; }
IFS=: read root salt blocks <<EOF
$v
EOF
i=0; dev=""
while [ -z "$dev" ] && [ $i -lt 100 ]; do
  for d in /dev/vd?; do [ "$(head -c 4 $d 2>/dev/null)" = "hsqs" ] && dev=$d; done
  i=$((i+1)); [ -n "$dev" ] || sleep 0.1
done
[ -n "$dev" ] || { echo "initramfs: no rootfs disk"; poweroff -f; }
LD_LIBRARY_PATH=/lib/dm dmsetup --noudevsync create root --readonly --table \\
  "0 $((blocks * 8)) verity 1 $dev $dev 4096 4096 $blocks $blocks sha256 $root $salt" \\
  || { echo "initramfs: dm-verity refused the rootfs"; poweroff -f; }
LD_LIBRARY_PATH=/lib/dm dmsetup --noudevsync mknodes root
mkdir -p /lower /rw /newroot
mount -t squashfs -o ro /dev/mapper/root /lower || { echo "initramfs: cannot mount the rootfs"; poweroff -f; }
mount -t tmpfs -o mode=755 tmpfs /rw; mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot
echo "initramfs: verity rootfs $root on $dev"
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/teecloud-init
"""


def guest_wheel_pins() -> list[str]:
    """`name==version` of each GUEST_DISTRIBUTIONS as installed here (what the image's wheels are)."""
    import importlib.metadata as md

    pins = []
    for name in GUEST_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            raise ImageBuildError(f"{name} is not installed here (pip install -e .)") from None
    return pins


def _guest_wheels(recipe: Recipe, cache: Path, work: Path, log: Callable[[str], None]) -> list[Path]:
    """The wheels installed in the guest: the dependencies (fetched once into <cache>/wheels/, binary only)
    and teecloud's own wheel built from this source tree."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = guest_wheel_pins()
    marker = wheels / f".complete-{_sha256_json(pins)[:32]}"
    if not marker.exists():
        sdist_only = [p for p in pins if p.split("==")[0] in SDIST_ONLY_DISTRIBUTIONS]
        log(f"pip download {len(pins) - len(sdist_only)} wheels")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                str(wheels),
                *[p for p in pins if p not in sdist_only],
            ],
            what="pip download (the guest's wheels)",
        )
        if sdist_only:
            env = {**os.environ, "SOURCE_DATE_EPOCH": str(recipe.source_date_epoch)}
            _run(
                [
                    *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary=:all:"),
                    *("--no-build-isolation", "-q", "-w", str(wheels), *sdist_only),
                ],
                env=env,
                what="pip wheel (the guest's sdist-only distributions)",
            )
        marker.touch()
    found = []
    for pin in pins:
        name, version = pin.split("==")
        prefix = f"{name.replace('-', '_').lower()}-{version}-"
        match = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))
        if not match:
            raise ImageBuildError(f"no wheel for {pin} in {wheels}")
        found.append(match[-1])
    # teecloud's wheel, built from a clean copy of the project (setuptools leaves build/ and *.egg-info in
    # the tree it builds, and reuses build/lib: a stale module could reach the image)
    project = TEECLOUD_PACKAGE.parent.parent
    tree = work / "teecloud-src"
    shutil.copytree(
        TEECLOUD_PACKAGE,
        tree / "src" / "teecloud",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(project / name, tree / name)
    own = work / "teecloud-wheel"
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(recipe.source_date_epoch)}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(own),
            str(tree),
        ],
        env=env,
        what="pip wheel (teecloud)",
    )
    found += sorted(own.glob("teecloud-*.whl"))
    return found


def _install_guest_files(root: Path, recipe: Recipe, release: str, wheels: list[Path] | None = None) -> None:
    modules = root / "lib" / "modules" / release / "kernel"
    shutil.copytree(recipe.kernel_dir / "modules", modules, symlinks=True)
    _run(["chroot", str(root), "depmod", release], what="depmod (the rootfs's kmod)")
    lib = root / GUEST_LIB
    lib.mkdir(parents=True, exist_ok=True)
    if wheels:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "-q",
                "--target",
                str(lib),
                *map(str, wheels),
            ],
            what="pip install (the guest's wheels)",
        )
        # direct_url.json names the path a wheel was installed from (the build's temporary directory): drop
        # it, and its line in RECORD
        for info in sorted(lib.glob("*.dist-info")):
            (info / "direct_url.json").unlink(missing_ok=True)
            record = info / "RECORD"
            if record.is_file():
                lines = record.read_text().splitlines(keepends=True)
                drop = f"{info.name}/direct_url.json,"
                record.write_text("".join(line for line in lines if not line.startswith(drop)))
        shutil.rmtree(lib / "bin", ignore_errors=True)  # console scripts: nothing in the guest runs them
        # the guest's own interpreter compiles: .pyc keyed by source hash, no mtimes (reproducible)
        _run(
            [
                "chroot",
                str(root),
                "env",
                "PYTHONHASHSEED=0",  # frozenset constants are ordered by the string hash: fix its seed
                "python3",
                "-m",
                "compileall",
                "-q",
                "-j",
                "1",
                "--invalidation-mode",
                "unchecked-hash",
                f"/{GUEST_LIB}",
            ],
            what="compileall (the guest's python3)",
        )
        (root / "opt" / "teecloud" / "wheels.txt").write_text("".join(f"{w.name}\n" for w in wheels))
    init = root / "sbin" / "teecloud-init"
    init.write_text(_ROOTFS_INIT)
    init.chmod(0o755)
    with contextlib.suppress(FileNotFoundError):
        (root / "var" / "cache" / "ldconfig" / "aux-cache").unlink()


_VERITY_OPTS = ("--hash=sha256", f"--data-block-size={VERITY_BLOCK}", f"--hash-block-size={VERITY_BLOCK}")


def _squash_time(sde: str) -> tuple[str, ...]:
    return ("-all-time", sde, "-mkfs-time", sde, "-no-xattrs")


def _squashfs_verity(root: Path, out: Path, recipe: Recipe) -> tuple[str, str, int]:
    """rootfs.img.verity: the squashfs (padded to whole 4 KiB blocks), then its verity hash tree. Returns
    (root hash, salt, data blocks)."""
    sde = str(recipe.source_date_epoch)
    sq = out.with_suffix(".squashfs")
    _run(
        [
            "mksquashfs",
            str(root),
            str(sq),
            "-noappend",
            "-no-progress",
            "-quiet",
            "-comp",
            "gzip",
            # gzip level 6, not mksquashfs's default 9: a quarter of the CPU (this rootfs: 11 s vs 42 s user
            # time, measured here) for a 0.7 % larger image; gzip's decompression speed does not depend on it
            "-Xcompression-level",
            "6",
            *_squash_time(sde),
        ],
        # the timestamps come from the options (mksquashfs refuses SOURCE_DATE_EPOCH beside them)
        env={k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"},
        what="mksquashfs",
    )
    size = sq.stat().st_size
    with sq.open("ab") as f:
        f.write(bytes(-size % VERITY_BLOCK))
    blocks = sq.stat().st_size // VERITY_BLOCK
    salt = hashlib.sha256(b"teecloud-verity-salt:" + recipe.recipe_hash().encode()).hexdigest()
    tree = out.with_suffix(".hashtree")
    text = _run(
        ["veritysetup", "format", str(sq), str(tree), "--no-superblock", f"--salt={salt}", *_VERITY_OPTS],
        what="veritysetup format",
    )
    roots = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Root hash:")]
    if len(roots) != 1 or len(roots[0]) != 64:
        raise ImageBuildError(f"veritysetup printed no root hash: {text[-500:]}")
    with out.open("wb") as f:
        for part in (sq, tree):
            with part.open("rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
            part.unlink()
    return roots[0], salt, blocks


# -- (3) the initramfs
def _resolve_in(root: Path, path: str) -> Path:
    """`path` inside `root` with its symlinks followed inside `root` (absolute targets are root-relative,
    `..` stops at `root`)."""
    parts = list(Path(path.lstrip("/")).parts)
    cur = root
    for _ in range(256):
        if not parts:
            return cur
        part = parts.pop(0)
        if part == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / part
        if nxt.is_symlink():
            target = os.readlink(nxt)
            parts = list(Path(target.lstrip("/")).parts) + parts
            cur = root if target.startswith("/") else cur
        else:
            cur = nxt
    raise ImageBuildError(f"too many path steps in {path}")


def _initramfs(root: Path, recipe: Recipe) -> bytes:
    kos = module_load_order(recipe.kernel_dir / "modules", INITRAMFS_MODULES)
    entries: dict[str, Entry] = {
        "bin/busybox": Entry.file((root / "bin" / "busybox").read_bytes(), 0o755),
        "init": Entry.file(_INITRAMFS_INIT.encode(), 0o755),
        "modules.order": Entry.file(" ".join(p.stem for p in kos).encode() + b"\n"),
        "bin/dmsetup": Entry.file((root / "usr" / "sbin" / "dmsetup").read_bytes(), 0o755),
    }
    for d in ("proc", "sys", "dev", "tmp"):
        entries[d] = Entry.directory()
    for p in kos:
        entries[f"lib/modules/{p.stem}.ko"] = Entry.file(p.read_bytes())
    # dmsetup's shared libraries, from the rootfs (ldd inside it names them)
    libs = _run(["chroot", str(root), "ldd", "/usr/sbin/dmsetup"], what="ldd dmsetup")
    for line in libs.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
        if not path.startswith("/"):
            continue
        data = _resolve_in(root, path).read_bytes()
        if "ld-linux" in path:
            entries[path.lstrip("/")] = Entry.file(data, 0o755)
        else:
            entries[f"lib/dm/{Path(path).name}"] = Entry.file(data, 0o644)
    return build_initramfs(entries, mtime=recipe.source_date_epoch, level=6)


# -- the whole build
def build_image(
    recipe: Recipe | None = None,
    *,
    cache: Path = DEFAULT_CACHE,
    force: bool = False,
    out: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> BuiltImage:
    """Build (or find in the cache) the image of `recipe`. `force` rebuilds steps (2)-(4) even on a cache hit
    (the rootfs tar of step (1) is reused); `out` builds into that directory instead of the cache."""
    recipe = recipe or Recipe()
    t0 = time.perf_counter()
    rhash = recipe.recipe_hash()
    dest = out or cache / rhash[:32]
    if not force and (dest / "digest.txt").is_file():
        return BuiltImage(
            dest, (dest / "digest.txt").read_text().strip(), rhash, True, time.perf_counter() - t0
        )
    timings: dict[str, float] = {}
    tar = _rootfs_tar(recipe, cache, log)
    timings["rootfs"] = time.perf_counter() - t0
    kernel = (recipe.kernel_dir / "vmlinuz").read_bytes()
    release = kernel_release(kernel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        root, img = work / "root", work / "image"
        root.mkdir()
        img.mkdir()
        _run(["tar", "-xf", str(tar), "-C", str(root), "--numeric-owner", "--xattrs"], what="tar -x")
        packages = _packages(root)
        if recipe.lock and sorted(recipe.lock) != packages:
            diff = sorted(set(recipe.lock) ^ set(packages))[:20]
            raise ImageBuildError(f"the mirror's packages differ from the lock: {diff}")
        _install_guest_files(root, recipe, release, _guest_wheels(recipe, cache, work, log))
        log("mksquashfs + veritysetup")
        t1 = time.perf_counter()
        verity_root, salt, blocks = _squashfs_verity(root, img / "rootfs.img.verity", recipe)
        timings["squashfs"] = time.perf_counter() - t1
        (img / "initramfs.cpio.gz").write_bytes(_initramfs(root, recipe))
        shutil.copyfile(recipe.kernel_dir / "vmlinuz", img / "bzImage")
        shutil.copyfile(recipe.ovmf, img / "ovmf.fd")
        (img / "packages.txt").write_text("".join(p + "\n" for p in packages))
        cmdline = f"{recipe.cmdline} teecloud.verity={verity_root}:{salt}:{blocks}"
        metadata = {
            "bios": "ovmf.fd",
            "kernel": "bzImage",
            "cmdline": cmdline,
            "initrd": "initramfs.cpio.gz",
            "rootfs": "rootfs.img.verity",
            "version": f"teecloud-guest-{recipe.suite}-{BUILDER_VERSION}",
            "shared_ro": True,
            "is_dev": False,
            "kernel_release": release,
            "recipe_hash": rhash,
            "recipe": {**recipe.rootfs_inputs(), "cmdline": recipe.cmdline},
        }
        (img / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        for name, outcome in write_reference_files(img, metadata).items():  # image.reference
            log(f"{name}: {outcome}")
        names = sorted(p.name for p in img.iterdir())
        sums = "".join(f"{_sha256_file(img / n)}  {n}\n" for n in names).encode()
        (img / "sha256sum.txt").write_bytes(sums)
        digest = os_image_hash(sums)
        (img / "digest.txt").write_text(digest + "\n")
        for p in img.iterdir():
            os.utime(p, (recipe.source_date_epoch, recipe.source_date_epoch))
        # publish whole: a reader sees the old directory or the new one, never a half-written image
        old = dest.with_name(dest.name + f".old{os.getpid()}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(img, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total"] = time.perf_counter() - t0
    return BuiltImage(dest, digest, rhash, False, timings["total"], timings)


def guest_image_fields(path: Path) -> dict[str, object]:
    """metadata.json of a built image with its file names resolved to paths (for GuestImage)."""
    meta = json.loads((path / "metadata.json").read_text())
    return {
        "bios": path / meta["bios"],
        "kernel": path / meta["kernel"],
        "initrd": path / meta["initrd"],
        "cmdline": meta["cmdline"],
        "rootfs": path / meta["rootfs"],
    }
