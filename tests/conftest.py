"""Shared fixtures: every test gets its own TEECLOUD_HOME; the real vectors are used in place.

Parallel runs (`pytest -n 2 --dist loadgroup`, scripts/test.sh): pytest-xdist gives each worker process
whole work units, one per `xdist_group`. `pytest_collection_modifyitems` below puts every test in one:
- "e2e" for the tests that share a machine-wide resource, so that they run one after another on one worker:
  every test marked `docker` (the one Docker engine: containers, `docker ps` filters, the crash test that
  restarts dockerd under TEECLOUD_E2E_RESTART_DOCKERD) and the modules or tests in E2E below (a LocalCloud,
  a QEMU/TCG VM boot, the guest-image cache /var/cache/teecloud/images that `image build --force` rewrites);
- otherwise its own module, so that a module's module- and session-scoped fixtures (an embedded chain, a
  threshold committee, the AI engine) are made once and the module's tests keep their order.
Everything else a test touches is its own: TEECLOUD_HOME (below), tmp_path, mkdtemp sockets, ports bound
to 0, per-process anvil/chain fixtures. A test that starts `docker` or `qemu-system-*` outside the "e2e"
group fails (`_serial_resources_stay_in_e2e`), naming this list.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT.parent / "shared" / "vectors"


@pytest.fixture(autouse=True)
def teecloud_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("teecloud-home")
    monkeypatch.setenv("TEECLOUD_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS} (expected ../shared/vectors beside the repo)")
    return VECTORS


@pytest.hookimpl(tryfirst=True)  # before pytest's tmpdir plugin reads the base temporary directory
def pytest_configure(config: pytest.Config) -> None:
    """On an xdist worker: the terminal size a serial run has, and temporary directories in
    <run's basetemp>/gw0 instead of .../popen-gw0 (HAProxy takes Unix socket paths of at most 97 bytes, and
    the gateway's sockets live under the data directory: <basetemp>/<test name, 30 chars>0/home/gateway/
    run/metrics.sock is 91 bytes in a serial run)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # A worker starts with COLUMNS=80 and LINES=24 in its environment (a serial run has neither): rich
        # fixes a Console's width from COLUMNS when the Console is made, at import of the CLI's modules,
        # so a test's own COLUMNS (tests/e2e/test_journey.py: 250) would no longer widen `teecloud ls`.
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)
    base = config.option.basetemp
    if worker and base and Path(base).name == f"popen-{worker}":
        config.option.basetemp = str(Path(base).with_name(worker))


# Node-id prefixes (a module, or one test) that share a machine-wide resource besides the Docker engine
# (tests marked `docker` are in "e2e" anyway). Why each: see the module's docstring.
E2E: tuple[str, ...] = (
    "tests/e2e/",  # Docker, LocalCloud, QEMU: the whole-system tests
    "tests/node/test_qemu_boot.py",  # QEMU/TCG VMs of a LocalCloud; reads the guest-image cache
    "tests/node/test_qemu_guest.py::test_a_tampered_rootfs_does_not_boot",  # a VM; the guest-image cache
    "tests/node/test_qemu_backend.py",  # QEMU/TCG VMs (two tests)
    "tests/image/test_build.py",  # rebuilds the cached guest image in /var/cache/teecloud/images (force)
    "tests/image/test_measure_acpi.py",  # QEMU/TCG guest boots
    "tests/cli/test_bad_input.py::test_every_command_answers_bad_input_with_a_message[image acpi]",  # TCG
    "tests/gateway/test_acme_local_cloud.py",  # a LocalCloud (BIND9 + pebble + Docker)
    "tests/gateway/test_certkeys_local.py",  # a LocalCloud
    "tests/gateway/test_threshold_gateway.py",  # a threshold LocalCloud
    "tests/kms/test_threshold_net_up.py",  # a five-node LocalCloud (and Docker)
    "tests/kms/test_threshold_rotate_cli.py",  # a threshold LocalCloud, restarted
    "tests/kms/test_threshold_up_getkey.py",  # a five-node LocalCloud
    "tests/node/test_up_kms_url.py",  # a threshold LocalCloud (and Docker)
)
E2E_GROUP = "e2e"
# The real programs only the "e2e" group may start (a test's stand-in named `docker` is not one of them).
SERIAL_PROGRAMS = ("docker", "dockerd", "qemu-system-x86_64", "qemu-system-i386")


def _real(path: str | None) -> str | None:
    return os.path.realpath(path) if path else None


_SERIAL_PATHS = {p for p in (_real(shutil.which(name)) for name in SERIAL_PROGRAMS) if p is not None}


def _group_of(item: pytest.Item) -> str:
    if item.get_closest_marker("docker") is not None or item.nodeid.startswith(E2E):
        return E2E_GROUP
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = {id(item): _group_of(item) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[id(item)]))
    if hasattr(config, "workerinput"):
        # On an xdist worker (every worker collects the same order): the "e2e" group first, then modules
        # with a `slow` test, then the rest, each in collection order, so the long serial unit starts at
        # once and the short modules fill the end (scripts/test.sh passes --no-loadscope-reorder).
        slow_groups = {groups[id(i)] for i in items if i.get_closest_marker("slow") is not None}

        def rank(item: pytest.Item) -> int:
            g = groups[id(item)]
            return 0 if g == E2E_GROUP else 1 if g in slow_groups else 2

        items.sort(key=rank)


_started: list[str] = []  # the real programs of SERIAL_PROGRAMS the running test started (audit hook)


def _serial_program(args: tuple[Any, ...]) -> str | None:
    """The program of SERIAL_PROGRAMS a subprocess.Popen audit event starts, if any."""
    executable, argv, _cwd, env = args
    if isinstance(argv, (str, bytes)):
        argv = os.fsdecode(argv).split()
    argv = [os.fsdecode(a) for a in argv or ()]
    if len(argv) >= 3 and os.path.basename(argv[0]) in ("sh", "bash") and argv[1] == "-c":
        executable, argv = None, argv[2].split()  # shell=True: the command's first word
    prog = os.fsdecode(executable) if executable else (argv[0] if argv else None)
    if prog is None:
        return None
    if os.sep not in prog:
        search = env.get("PATH") if isinstance(env, dict) else None  # a child's own env decides its PATH
        prog = shutil.which(prog, path=search or os.environ.get("PATH")) or prog
    return os.path.basename(prog) if _real(prog) in _SERIAL_PATHS else None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "subprocess.Popen":
        return
    try:
        name = _serial_program(args)
    except Exception:  # a check of the grouping must never break a test's Popen
        return
    if name is not None:
        _started.append(name)


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _serial_resources_stay_in_e2e(request: pytest.FixtureRequest) -> Iterator[None]:
    """Docker and QEMU are machine-wide: a test that starts them outside the "e2e" group could run beside
    another one on the other worker (pytest-xdist), so it fails here, by name, instead of racing."""
    _started.clear()
    yield
    started, _started[:] = sorted(set(_started)), []
    if started and _group_of(request.node) != E2E_GROUP:
        pytest.fail(
            f"{request.node.nodeid} started {', '.join(started)} outside the xdist group {E2E_GROUP!r}: "
            "mark it `docker` or add it to E2E in tests/conftest.py"
        )
