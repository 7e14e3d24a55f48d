"""`teecloud image build`: the guest image is reproducible (the same recipe gives the same bytes and the same
os_image_hash), laid out as dstack's (metadata.json, sha256sum.txt, digest.txt), and its verity root hash on
the command line is the one veritysetup (independent of the builder) verifies.

Slow: the first build of a machine runs mmdebstrap (Debian packages from deb.debian.org, a few minutes); the
rootfs tar is cached under /var/cache/teecloud/images, so later builds only assemble (squashfs, verity,
initramfs).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teecloud.cli import app
from teecloud.image.build import (
    GUEST_KERNEL,
    ImageBuildError,
    Recipe,
    _resolve_in,
    build_image,
    kernel_release,
    os_image_hash,
)
from teecloud.image.initramfs import read_newc

KERNEL = GUEST_KERNEL / "vmlinuz"


def test_kernel_release_is_read_from_the_bzimage_setup_header() -> None:
    if not KERNEL.is_file():
        pytest.fail(f"{KERNEL} is missing: run scripts/setup.sh")
    release = kernel_release(KERNEL.read_bytes())
    # the modules tree setup.sh fetched belongs to this release (Debian's linux-image-<release>)
    assert release.endswith("-cloud-amd64") and release[0].isdigit()
    with pytest.raises(ImageBuildError, match="not a bzImage"):
        kernel_release(b"MZ" + bytes(0x300))
    bad = bytearray(KERNEL.read_bytes()[:0x400])
    bad[0x20E:0x210] = b"\x00\x00"
    with pytest.raises(ImageBuildError, match="no kernel version"):
        kernel_release(bytes(bad))


def test_os_image_hash_is_sha256_of_sha256sum_txt() -> None:
    sums = b"00" * 32 + b"  bzImage\n"
    assert os_image_hash(sums) == hashlib.sha256(sums).hexdigest()


def test_library_paths_resolve_inside_the_rootfs_never_on_the_host(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "libx.so.1").write_bytes(b"guest")
    (root / "lib").symlink_to("usr/lib")
    (root / "usr" / "lib" / "libabs.so").symlink_to("/usr/lib/libx.so.1")  # absolute: the rootfs's
    (root / "usr" / "lib" / "escape").symlink_to("../../../../../../etc/passwd")
    assert _resolve_in(root, "/lib/libx.so.1").read_bytes() == b"guest"
    assert _resolve_in(root, "/lib/libabs.so").read_bytes() == b"guest"
    assert _resolve_in(root, "/lib/escape") == root / "etc" / "passwd"  # `..` stops at the root
    (root / "loop").symlink_to("loop")
    with pytest.raises(ImageBuildError, match="too many"):
        _resolve_in(root, "/loop")


def test_the_recipe_hash_covers_packages_command_line_and_lock() -> None:
    if os.geteuid() != 0:
        pytest.fail("image builds run as root")
    base = Recipe()
    assert base.recipe_hash() == Recipe().recipe_hash()
    others = {
        Recipe(packages=(*base.packages, "curl")).recipe_hash(),
        Recipe(cmdline=base.cmdline + " debug").recipe_hash(),
        Recipe(lock=("python3=3.11.2-1+b1",)).recipe_hash(),
        Recipe(source_date_epoch=base.source_date_epoch + 1).recipe_hash(),
    }
    assert base.recipe_hash() not in others and len(others) == 4


def test_a_malformed_lock_file_is_one_error_line(tmp_path: Path) -> None:
    lock = tmp_path / "packages.txt"
    lock.write_text("python3 3.11\n")
    result = CliRunner().invoke(app, ["image", "build", "--lock", str(lock), "--cache", str(tmp_path)])
    assert result.exit_code == 1
    assert "expected package=version lines" in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The image built twice from the same recipe, both full assemblies (squashfs, verity, initramfs, wheels,
    measurement files; only the mmdebstrap rootfs tar is shared, through the cache). The first, into the
    cache, is the image every test here inspects and the one the VM tests of tests/node boot; the second,
    into a directory of its own, exists to be compared byte for byte with it (the assembly is
    reproducible)."""
    a = build_image(force=True)
    b = build_image(out=tmp_path_factory.mktemp("b") / "img", force=True)
    assert not a.cached and not b.cached
    return a.path, b.path


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_same_recipe_gives_the_same_bytes(built: tuple[Path, Path]) -> None:
    a, b = built
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert names == sorted(
        [
            "bzImage",
            "digest.txt",
            "initramfs.cpio.gz",
            "measurement.tdx.cbor",
            "metadata.json",
            "ovmf.fd",
            "packages.txt",
            "rootfs.img.verity",
            "sha256sum.txt",
        ]
    )
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_image_is_laid_out_as_dstacks(built: tuple[Path, Path]) -> None:
    img, _ = built
    sums = (img / "sha256sum.txt").read_bytes()
    listed = dict(reversed(line.split("  ")) for line in sums.decode().splitlines())
    assert sorted(listed) == sorted(
        [
            "bzImage",
            "initramfs.cpio.gz",
            "measurement.tdx.cbor",
            "metadata.json",
            "ovmf.fd",
            "packages.txt",
            "rootfs.img.verity",
        ]
    )
    for name, digest in listed.items():
        assert hashlib.sha256((img / name).read_bytes()).hexdigest() == digest
    assert (img / "digest.txt").read_text().strip() == hashlib.sha256(sums).hexdigest()
    meta = json.loads((img / "metadata.json").read_text())
    assert {meta[k] for k in ("bios", "kernel", "initrd", "rootfs")} <= set(listed)
    packages = (img / "packages.txt").read_text().splitlines()
    names = {p.split("=")[0] for p in packages}
    assert {"python3", "docker.io", "docker-compose", "cryptsetup-bin", "dmsetup"} <= names
    assert all(p.count("=") == 1 for p in packages)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_veritysetup_verifies_the_rootfs_with_the_command_lines_root_hash(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    img, _ = built
    cmdline = json.loads((img / "metadata.json").read_text())["cmdline"]
    (value,) = [a.split("=", 1)[1] for a in cmdline.split() if a.startswith("teecloud.verity=")]
    root, salt, blocks = value.split(":")
    raw = (img / "rootfs.img.verity").read_bytes()
    data, tree = tmp_path / "data", tmp_path / "tree"
    data.write_bytes(raw[: int(blocks) * 4096])
    tree.write_bytes(raw[int(blocks) * 4096 :])
    assert data.read_bytes()[:4] == b"hsqs"  # squashfs
    ok = subprocess.run(
        ["veritysetup", "verify", str(data), str(tree), root, "--no-superblock", f"--salt={salt}"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    # one flipped byte of the rootfs: veritysetup refuses it (so would the guest's dm-verity)
    with data.open("r+b") as f:
        f.seek(4096 * (int(blocks) // 2))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    bad = subprocess.run(
        ["veritysetup", "verify", str(data), str(tree), root, "--no-superblock", f"--salt={salt}"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_initramfs_holds_what_opens_the_rootfs(built: tuple[Path, Path]) -> None:
    img, _ = built
    files = read_newc((img / "initramfs.cpio.gz").read_bytes())
    assert "init" in files and "bin/busybox" in files and "bin/dmsetup" in files
    assert any(name.startswith("lib/dm/libdevmapper") for name in files)
    order = files["modules.order"][1].decode().split()
    assert {"dm-verity", "squashfs", "virtio_blk"} <= set(order)
    # every file's owner is root and its mtime the recipe's SOURCE_DATE_EPOCH (read_newc keeps modes only:
    # the bytes-equality test above covers the rest)
    assert all(mode & 0o170000 in (0o100000, 0o040000, 0o120000) for mode, _ in files.values())


def test_the_guest_wheels_cover_what_the_guest_agent_imports() -> None:
    """Every distribution the guest's boot path imports (vm_agent's boot: the guest half, the KMS client, the
    simulated TEE, LUKS) is among the wheels the image installs, at the version installed here."""
    import subprocess
    import sys

    from teecloud.image.build import GUEST_DISTRIBUTIONS, guest_wheel_pins

    # The probe imports as the guest would: a third-party module whose distribution the image does not
    # install cannot be imported (the guest has only the image's wheels), so an optional import (httpcore
    # tries trio and h2 when they happen to be installed here) fails as it does in the guest, and a needed
    # one fails the import and names itself.
    probe = (
        "import sys, json, importlib.metadata as md\n"
        f"guest = {sorted(d.lower().replace('_', '-') for d in GUEST_DISTRIBUTIONS)!r}\n"
        "pd = md.packages_distributions()\n"
        "class OnlyTheImagesWheels:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        top = name.split('.')[0]\n"
        "        dists = {d.lower().replace('_', '-') for d in pd.get(top, [])} - {'teecloud'}\n"
        "        if dists and not dists & set(guest):\n"
        "            raise ModuleNotFoundError(f'{name}: not in the image ({sorted(dists)})', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, OnlyTheImagesWheels())\n"
        "import teecloud.agent.vm_agent, teecloud.agent.guest, teecloud.agent.volume_luks\n"
        "import teecloud.agent.runner, teecloud.kms.client, teecloud.tee.simulated, teecloud.keys.envcrypt\n"
        # a threshold guest's KMS client (imported when .sys-config.json names a group)
        "import teecloud.kms.threshold_client, teecloud.gateway.client\n"
        "tops = {m.split('.')[0] for m in sys.modules}\n"
        "print(json.dumps(sorted({d for t in tops for d in pd.get(t, [])})))\n"
    )
    import teecloud

    src = str(Path(teecloud.__file__).resolve().parents[1])  # this tree's, not the installed one
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, (
        f"the guest's boot path needs a distribution the image does not install:\n{out.stderr}"
    )
    imported = set(json.loads(out.stdout)) - {"teecloud", "setuptools"}  # teecloud: its own wheel
    assert imported, "the probe found no distributions"
    norm = {d.lower().replace("_", "-") for d in GUEST_DISTRIBUTIONS}
    missing = sorted(d for d in imported if d.lower().replace("_", "-") not in norm)
    assert missing == [], f"the guest imports distributions the image does not install: {missing}"
    import importlib.metadata as md

    assert guest_wheel_pins() == [f"{d}=={md.version(d)}" for d in GUEST_DISTRIBUTIONS]
