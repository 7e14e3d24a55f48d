"""Review 11: up-reattach — `cloud/ports.json` (the KMS and gateway ports kept across `teecloud up`
restarts) and `QemuBackend.attach` adopting a running VM at the next `up` (`Node.reattach`).

Held: the record is parsed strictly (300 generated mutations of a valid record — wrong types incl. bool,
float and string ports, out-of-range, missing, extra or renamed names, nesting, another version, truncated
and oversized text — each a NodeError naming the file, or exactly the record; `recorded_ports` falls back
to {} with a warning, never a traceback), and replaced atomically (a failed replace leaves the old record,
no temporary file). By the way (info): `{"version": true}` or `1.0` is read as version 1 (Python's
`True == 1`); same meaning, no effect.

FINDING R11-3 (low, fixed in r11-fix): `attach` adopted whatever process the VM's `qemu.pid` named as long
as its command line CONTAINS the work directory, an agent `hostfwd` and the gateway `guestfwd` strings (any
process's argv, world-readable and chosen by whoever starts it) and the agent port it names answers `/info`
`running` with the app's compose hash (public). A process of ANOTHER local user (here uid 65534, not QEMU)
that a stale pid file names — a VM that died while `up` was down and whose pid was reused, or a pid file
rewritten by a writer of the data directory — is adopted: the node reports the CVM running and does not
boot it (the app stays down), and signs its node statement for the endpoints that process reports and
posts it there (not usable at the gateway without the CVM's attested certificate).
By reading: `teecloud down`'s `power_off` (as root: SIGKILL after the grace periods) trusts the same pid
file and a command line naming the work directory alone. Minimal fix: at launch record QEMU's start time
(/proc/PID/stat field 22) and executable beside the pid; adopt (and power off) only a process with the
same start time, executable and the node's uid."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from teecloud import devstack
from teecloud.agent.vm_agent import GuestStatus
from teecloud.chain.embedded import DEV_KEYS
from teecloud.node.errors import NodeError
from teecloud.node.runtime import qemu
from tests.gateway.test_vouch import APP, Node
from tests.gateway.test_vouch_qemu import _containers, agent  # noqa: F401  (a fixture)
from tests.node.test_qemu_reattach_ports import COMPOSE, COMPOSE_HASH, _backend

VALID = {"kms": 41000, "gateway_public": 41001, "gateway_registration": 41002, "gateway_admin": 0}


def _mutations(rng: random.Random) -> list[tuple[str, Any]]:
    """(label, document or raw bytes) of records that are not one write_ports writes."""
    odd: list[Any] = [True, False, None, 1.0, -1, 65536, 2**70, "41000", [41000], {"p": 1}, 1e3, ""]
    out: list[tuple[str, Any]] = []
    for _ in range(300):
        doc: dict[str, Any] = {"version": 1, **VALID}
        kind = rng.randrange(8)
        name = rng.choice(list(VALID))
        if kind == 0:
            doc[name] = rng.choice(odd)
        elif kind == 1:
            del doc[name]
        elif kind == 2:
            doc[rng.choice(["kms2", "KMS", "gateway", "version2", " kms"])] = 1
        elif kind == 3:
            doc[name + rng.choice(["_", "s", " "])] = doc.pop(name)
        elif kind == 4:
            doc["version"] = rng.choice([0, 2, "1", None, [1], -1])
        elif kind == 5:
            out.append(("not an object", rng.choice([[doc], "x", 1, None])))
            continue
        elif kind == 6:
            raw = json.dumps(doc).encode()
            out.append(("truncated", raw[: rng.randrange(len(raw))]))
            continue
        else:
            raw = json.dumps({**doc, "pad": "x" * rng.randint(4096, 9000)}).encode()
            out.append(("oversized", raw))
            continue
        out.append((f"mutation {kind}", doc))
    return out


def test_generated_port_records_are_refused_or_read_exactly(teecloud_home: Path) -> None:
    path = devstack.ports_path(teecloud_home)
    devstack.write_ports(dict(VALID), teecloud_home)
    assert devstack.read_ports(teecloud_home) == VALID
    rng = random.Random(1111)
    refused = 0
    for label, doc in _mutations(rng):
        path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        try:
            got = devstack.read_ports(teecloud_home)
        except NodeError as exc:
            assert str(path) in str(exc), (label, doc)
            assert devstack.recorded_ports(teecloud_home) == {}
            refused += 1
            continue
        # only a record equal to one write_ports writes is read (bool/float version aside: info)
        assert got == VALID and all(type(v) is int for v in got.values()), (label, doc, got)
    assert refused > 250


def test_a_failed_replace_leaves_the_old_record(teecloud_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devstack.write_ports(dict(VALID), teecloud_home)
    before = devstack.ports_path(teecloud_home).read_bytes()

    def fail(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        devstack.write_ports({**VALID, "kms": 42000}, teecloud_home)
    monkeypatch.undo()
    path = devstack.ports_path(teecloud_home)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    with pytest.raises(ValueError):
        devstack.write_ports({**VALID, "kms": True}, teecloud_home)
    assert path.read_bytes() == before


def test_a_process_of_another_user_named_by_a_stale_pid_file_is_not_adopted(
    agent: tuple[GuestStatus, int],  # noqa: F811
    teecloud_home: Path,
) -> None:
    """The attacker's steps: the VM died while `up` was down (its `qemu.pid` stays); a process of another
    local user (uid 65534), not QEMU, holds that pid with a command line naming the work directory and
    `hostfwd=tcp:127.0.0.1:P-:8090`; its listener on P answers `/info` running with the app's compose hash
    (public). The next `up` calls attach."""
    if os.geteuid() != 0:
        pytest.fail("this test starts a process as another user: run as root (CI does)")
    status, port = agent
    node = Node(0, DEV_KEYS[1], clock=time.time)
    iid = node.launch()
    inst = SimpleNamespace(
        instance_id=iid.hex(), compose_hash=lambda: COMPOSE_HASH, app_compose=lambda: COMPOSE
    )
    backend = _backend(teecloud_home, node.voucher.vouch, None)
    status.identity = (APP.hex(), iid.hex())
    status.set(phase="running", compose_hash=COMPOSE_HASH.hex())
    status.containers = lambda: _containers({8080: 18080})
    workdir = backend.workdir(inst)  # type: ignore[arg-type]
    workdir.mkdir(parents=True, exist_ok=True)
    netdev = f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:{qemu.AGENT_GUEST_PORT}"
    stranger = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 60; :", "sh", str(workdir / "qmp.sock"), netdev],
        user=65534,
        group=65534,
        cwd="/",
    )
    try:
        (workdir / "qemu.pid").write_text(str(stranger.pid))  # what the dead VM's pid file says
        deadline = time.monotonic() + 10
        while str(workdir).encode() not in Path(f"/proc/{stranger.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert Path(f"/proc/{stranger.pid}").stat().st_uid == 65534
        handle = backend.attach(inst)  # type: ignore[arg-type]
        vouched = status.node_vouch()
        backend._end_renewal(iid.hex())
        assert not handle.booted, "another user's non-QEMU process was adopted as the CVM's VM"
        assert vouched is None, "the node signed its statement for that process's endpoints"
    finally:
        stranger.kill()
        stranger.wait()
