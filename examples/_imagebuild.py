"""The examples' image builder, shared by examples/{hello,functions,llm,ai-agent}/build_image.py: container
images built locally, with no image registry.

1. A base, `<repo>:<recipe-hash>`: a Debian bookworm minbase rootfs made by debootstrap (python3 and the
   given Debian packages) plus a few pip requirements, imported with `docker import`. Built once per recipe:
   the tag is a hash of the recipe, so an unchanged recipe reuses the image already in the engine.
2. Optionally a site/ directory of Python packages for the app (`python_site`): teecloud itself as a wheel
   built from this checkout, and the app's requirements at the versions installed on the host (so the image
   runs what the tests ran), downloaded as CPython 3.11 manylinux x86_64 wheels, plus any wheels built
   locally (`local_wheels`, e.g. llama-cpp-python, which no index has as a wheel); installed with
   `pip install --no-index --find-links <wheels>`, so nothing else can get in.
3. `docker build` of the app's Dockerfile on top of the base (`docker_build`); seconds.

Needs a Docker engine, and for a first base build root (debootstrap), a Debian mirror and a Python package
index.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIRROR = os.environ.get("TEECLOUD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
DEB_PACKAGES = ["python3-minimal", "libpython3.11-stdlib", "ca-certificates"]
PIP_REQUIREMENTS = ["dstack-sdk==0.5.4"]
BASE_REPO = "teecloud/hello-base"
# Trimmed from the rootfs: documentation and package caches are of no use in a container.
TRIM = [
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
]
RECIPE_VERSION = 1  # bump when build_base() changes what goes into the image
# Wheels for CPython 3.11 on glibc x86_64 match bookworm's python3.11; `linux_x86_64` admits wheels built
# on this (bookworm) host.
WHEEL_PLATFORM = [
    "--only-binary=:all:",
    "--implementation",
    "cp",
    "--python-version",
    "3.11",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
]
LOCAL_PLATFORM = ["--platform", "linux_x86_64"]
WHEEL_CACHE = Path(os.environ.get("TEECLOUD_WHEEL_CACHE", Path.home() / ".cache/teecloud/wheels"))


def fail(msg: str) -> None:
    sys.exit(f"build_image: {msg}")


def recipe_hash(extra_debs: Sequence[str] = ()) -> str:
    """The base's tag. Without extra packages it is the hash hello's builder always used (images already
    built keep being reused)."""
    debs = DEB_PACKAGES + sorted(extra_debs)
    recipe = repr((RECIPE_VERSION, SUITE, debs, PIP_REQUIREMENTS, TRIM)).encode()
    return hashlib.sha256(recipe).hexdigest()[:16]


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        fail(f"pip {args[0]} failed; is a Python package index reachable?")


def _drop_asyncio_backport(site: Path) -> None:
    # The PyPI "asyncio" package (a dstack-sdk requirement) is an obsolete backport: the standard library's
    # asyncio must be the one imported.
    for stale in site.glob("asyncio*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def build_base(tag: str, extra_debs: Sequence[str] = ()) -> None:
    if shutil.which("debootstrap") is None:
        fail("debootstrap is missing; install it with: apt-get install debootstrap")
    debs = DEB_PACKAGES + sorted(extra_debs)
    with tempfile.TemporaryDirectory(prefix="teecloud-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        t0 = time.monotonic()
        print(f"build_image: debootstrap {SUITE} ({', '.join(debs)}) ...", flush=True)
        log = Path(tmp) / "debootstrap.log"
        with log.open("wb") as out:
            r = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(debs)}",
                    SUITE,
                    str(rootfs),
                    MIRROR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if r.returncode != 0:
            sys.stderr.write(log.read_text(errors="replace")[-3000:])
            fail(f"debootstrap failed (exit {r.returncode}); is {MIRROR} reachable?")
        print(
            f"build_image: rootfs in {time.monotonic() - t0:.0f} s; pip install {' '.join(PIP_REQUIREMENTS)}"
        )
        site = rootfs / "usr/local/lib/python3.11/dist-packages"
        _pip("install", "--no-compile", "--target", str(site), *WHEEL_PLATFORM, *PIP_REQUIREMENTS)
        _drop_asyncio_backport(site)
        for rel in TRIM:
            target = rootfs / rel
            if target.exists():
                shutil.rmtree(target)
                target.mkdir(parents=True)
        print("build_image: docker import ...", flush=True)
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        r = subprocess.run(
            [
                "docker",
                "import",
                "-c",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "-c",
                "ENV LANG=C.UTF-8",
                "-",
                tag,
            ],
            stdin=tar.stdout,
            stdout=subprocess.DEVNULL,
        )
        if tar.wait() != 0 or r.returncode != 0:
            fail("docker import of the rootfs failed")
        print(f"build_image: {tag} built in {time.monotonic() - t0:.0f} s", flush=True)


def base_image(extra_debs: Sequence[str] = (), repo: str = BASE_REPO, force: bool = False) -> str:
    """The base for this recipe (built if the engine lacks it); returns its reference."""
    tag = f"{repo}:{recipe_hash(extra_debs)}"
    if force or not image_exists(tag):
        build_base(tag, extra_debs)
    return tag


def pinned(names: Iterable[str]) -> list[str]:
    """Requirements at the host's installed versions."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def _constraints(path: Path, exclude: Iterable[str]) -> None:
    """Every installed distribution pinned (so transitive dependencies match the host's too)."""
    skip = {"teecloud", *(e.lower() for e in exclude)}
    lines = sorted(
        f"{d.metadata['Name']}=={d.version}"
        for d in importlib.metadata.distributions()
        if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-") not in skip
    )
    path.write_text("\n".join(lines) + "\n")


def local_wheel(requirement: str, pattern: str, env: dict[str, str] | None = None) -> Path:
    """A wheel built on this host from the package's source (pip's own wheel cache answers a repeat at once;
    ours keeps it across pip cache purges): for packages no index has as a wheel."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(WHEEL_CACHE.glob(pattern))
    if found:
        return found[-1]
    name = requirement.split("[", 1)[0].split("=", 1)[0]
    print(f"build_image: building a wheel of {requirement} from source (minutes, once) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="wheel-", dir=WHEEL_CACHE) as tmp:
        _pip("wheel", "--no-deps", "--no-binary", name, "-w", tmp, requirement, env=env)
        (built,) = Path(tmp).glob(pattern)
        final = WHEEL_CACHE / built.name
        os.replace(built, final)
    return final


def python_site(
    site: Path, requirements: Sequence[str], local_wheels: Sequence[Path] = (), with_teecloud: bool = True
) -> None:
    """site/: teecloud (a wheel of this checkout) + `requirements` (pinned to the host's versions by the
    caller) + what they need, from wheels only, installed with --no-index."""
    with tempfile.TemporaryDirectory(prefix="teecloud-wheels-") as tmp:
        t = Path(tmp)
        wheels = t / "wheels"
        wheels.mkdir()
        for w in local_wheels:
            shutil.copy2(w, wheels / w.name)
        platform = [*WHEEL_PLATFORM, *(LOCAL_PLATFORM if local_wheels else [])]
        locals_ = [w.name.split("-", 1)[0].replace("_", "-") for w in local_wheels]
        _constraints(t / "constraints.txt", exclude=locals_)
        _pip(
            "download",
            "-d",
            str(wheels),
            "--find-links",
            str(wheels),
            "-c",
            str(t / "constraints.txt"),
            *platform,
            *requirements,
        )
        targets = list(requirements)
        if with_teecloud:
            _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT))
            (teecloud_wheel,) = wheels.glob("teecloud-*.whl")
            _pip(
                "install",
                "--no-index",
                "--find-links",
                str(wheels),
                "--no-deps",
                "--no-compile",
                "--target",
                str(site),
                *platform,
                str(teecloud_wheel),
            )
        _pip(
            "install",
            "--no-index",
            "--find-links",
            str(wheels),
            "--no-compile",
            "--target",
            str(site),
            "--upgrade",
            *platform,
            *targets,
        )
    _drop_asyncio_backport(site)
    shutil.rmtree(site / "bin", ignore_errors=True)


INPUTS_LABEL = "org.teecloud.build-inputs"

# What an app built on teecloud's library imports at least (the guest API client, teecloud.ai's JCS, HTTP
# client and server, the chain client and the contracts it compiles, the CLI's own imports); an app's
# build_image.py adds its own. pip adds their requirements.
TEECLOUD_APP_REQUIREMENTS = [
    "dstack-sdk",
    "rfc8785",
    "httpx",
    "fastapi",
    "uvicorn",
    "coincurve",
    "cryptography",
    "cbor2",
    "dcap-qvl",
    "eth-account",
    "eth-utils",
    "vyper",
    "typer",
    "rich",
    "PyYAML",
]


def inputs_digest(*parts: object, trees: Sequence[Path] = ()) -> str:
    """A digest of what goes into an image: `parts` (the base's tag, pinned requirements, ...) and every file
    under `trees` (path and content; caches skipped)."""
    h = hashlib.sha256(repr(parts).encode())
    for tree in trees:
        files = [tree] if tree.is_file() else sorted(p for p in tree.rglob("*") if p.is_file())
        for p in files:
            if "__pycache__" in p.parts or p.suffix == ".pyc":
                continue
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:32]


def up_to_date(image: str, digest: str) -> bool:
    """The engine holds `image` built from exactly these inputs (its label says so)."""
    r = subprocess.run(
        ["docker", "image", "inspect", image, "--format", '{{index .Config.Labels "' + INPUTS_LABEL + '"}}'],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0 and r.stdout.strip() == digest


def docker_build(context: Path, image: str, base: str, inputs: str = "") -> str:
    label = ["--label", f"{INPUTS_LABEL}={inputs}"] if inputs else []
    r = subprocess.run(
        ["docker", "build", "-q", "--build-arg", f"BASE={base}", *label, "-t", image, str(context)],
        capture_output=True,
    )
    if r.returncode != 0:
        sys.stderr.write(r.stderr.decode(errors="replace"))
        fail(f"docker build of {image} failed")
    return image


def app_image(
    image: str,
    *,
    here: Path,
    base: str,
    requirements: Sequence[str],
    files: Sequence[str],
    local_wheels: Callable[[], Sequence[Path]] = lambda: (),
    prepare: Callable[[Path], None] = lambda ctx: None,
) -> str:
    """An app's image on `base`: site/ (teecloud + `requirements`, pinned by the caller, + `local_wheels()`),
    `files` copied from `here`, and what `prepare(context)` adds; rebuilt only when its inputs (the base, the
    requirements, teecloud's source, the app's folder, this builder) changed. Returns its reference."""
    t0 = time.monotonic()
    trees = [ROOT / "src" / "teecloud", ROOT / "pyproject.toml", here, Path(__file__)]
    inputs = inputs_digest(base, list(requirements), trees=trees)
    if up_to_date(image, inputs):
        return image
    with tempfile.TemporaryDirectory(prefix=image.split("/")[-1].replace(":", "-") + "-image-") as tmp:
        ctx = Path(tmp)
        prepare(ctx)
        wheels = local_wheels()
        python_site(ctx / "site", requirements, wheels)
        if wheels:  # a wheel for a prefix install (llama-cpp-python's) also ships its libraries under lib/
            shutil.rmtree(ctx / "site" / "lib", ignore_errors=True)
        for name in files:
            shutil.copy2(here / name, ctx / name)
        docker_build(ctx, image, base, inputs)
    print(f"build_image: {image} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return image
