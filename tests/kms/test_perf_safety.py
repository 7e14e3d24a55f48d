"""The KMS's performance shortcuts keep its guarantees: an answered request's audit record is on disk
(group commit answers only after the fsync covering it, even if the KMS is killed), records are never
dropped or reordered, a failed write answers nothing, block numbers are never older than the request, and
cached app keys are exactly the derived ones, per instance, for a bounded time."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import teecloud.kms.audit as audit_mod
from teecloud.keys.appkeys import derive_app_keys
from teecloud.keys.ratls import make_ratls_cert
from teecloud.kms.api import PATH_GET_APP_KEY
from teecloud.kms.audit import AuditLog
from teecloud.kms.authz import FreshBlockNumber
from teecloud.kms.client import vm_config_json
from tests.kms.conftest import (
    COMPOSE_V1,
    World,
    boot_app,
    client_cert,
    make_app,
    make_kms,
    post_with_cert,
    vm_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _fields(i: int, decision: str = "allowed") -> dict[str, Any]:
    return {"ts": 1, "endpoint": "/x", "decision": decision, "reason": f"r{i}", "request_id": f"{i:016x}"}


# ------------------------------------------------------------------------------------------- group commit


class _Disk:
    """Stands in for the disk: what a power cut would leave is the file as of the last fsync."""

    def __init__(self) -> None:
        self.durable = b""
        self.fsyncs = 0
        self.lock = threading.Lock()
        self.real_fsync = os.fsync

    def fsync(self, fd: int) -> None:
        time.sleep(0.004)  # a slow disk: lets records queue up behind the running fsync
        size = os.fstat(fd).st_size
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            data = f.read(size)
        with self.lock:
            self.durable = data
            self.fsyncs += 1


def test_record_returns_only_after_its_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _Disk()
    monkeypatch.setattr(audit_mod.os, "fsync", disk.fsync)
    log = AuditLog(tmp_path / "audit.jsonl")
    not_durable: list[str] = []

    def worker(t: int) -> None:
        for k in range(25):
            rec = log.record(**_fields(t * 1000 + k))
            with disk.lock:
                if rec.request_id.encode() not in disk.durable:
                    not_durable.append(rec.request_id)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert not_durable == []  # every answered record was covered by a completed fsync
    assert log.records_written == 400 and log.allowed == 400
    assert disk.fsyncs == log.batches < 400  # grouped: fewer fsyncs than records
    # nothing dropped or reordered: every line parses, each writer's records in its own order
    ids = [r.request_id for r in log.read()]
    assert len(ids) == 400 == len(set(ids))
    for t in range(16):
        mine = [i for i in ids if int(i, 16) // 1000 == t]
        assert mine == sorted(mine) and len(mine) == 25


def test_failed_write_answers_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record(**_fields(1))

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit_mod.os, "fsync", broken)
    with pytest.raises(OSError):
        log.record(**_fields(2))
    monkeypatch.undo()
    log.record(**_fields(3))  # the writer survives a failed batch
    assert log.allowed == 2
    log.close()


def test_kms_answers_nothing_it_cannot_audit(
    teecloud_home: Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)
    _, der = client_cert(kms, app)
    assert kms.service.get_app_key(der, vm_config=vm_config(app)).disk_crypt_key  # works while the disk works

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit_mod.os, "fsync", broken)
    with pytest.raises(OSError):
        kms.service.get_app_key(der, vm_config=vm_config(app))


def test_killed_kms_has_a_record_for_every_answer(teecloud_home: Path) -> None:
    """SIGKILL the KMS process under load: every GetAppKey that got an answer has its audit record."""
    from teecloud.tee.simulated import SimulatedTdx

    SimulatedTdx(teecloud_home)  # create the simulated platform before the child uses it
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.kms._crash_child"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"},
    )
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        temp_key = serialization.load_pem_private_key(info["temp_ca_key"].encode(), password=None)
        assert isinstance(temp_key, ec.EllipticCurvePrivateKey)
        temp_cert = x509.load_pem_x509_certificate(info["temp_ca_cert"].encode())
        tee = SimulatedTdx(teecloud_home)
        app_id = bytes.fromhex(info["app_id"])
        boot_app(tee, app_id, bytes.fromhex(info["compose"]), hashlib.sha256(b"crash").digest()[:20])
        certs = []
        for _ in range(4):
            key = ec.generate_private_key(ec.SECP256R1())
            now = int(time.time())
            cert = make_ratls_cert(
                tee,
                key,
                issuer_key=temp_key,
                issuer_cert=temp_cert,
                subject="crash",
                usage="app:kms-client",
                not_before=now - 30,
                not_after=now + 600,
                app_id=app_id,
                server_auth=False,
                client_auth=True,
            )
            certs.append((key, cert.public_bytes(serialization.Encoding.DER)))
        answered: Counter[str] = Counter()
        lock = threading.Lock()
        stop = threading.Event()

        def load(i: int) -> None:
            key, der = certs[i % len(certs)]
            while not stop.is_set():
                try:
                    status, _ = post_with_cert(
                        info["url"], PATH_GET_APP_KEY, key, der, {"vm_config": vm_config_json(tee)}
                    )
                except Exception:  # the KMS died under us
                    return
                if status == 200:
                    with lock:
                        answered[hashlib.sha256(der).hexdigest()] += 1

        threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(answered.values()) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)  # mid-load: requests are in flight
        child.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert sum(answered.values()) >= 40
    lines = Path(info["audit"]).read_bytes().split(b"\n")
    assert lines[-1] == b"" or lines[-1].startswith(b"{")  # at most a cut last line, never a mixed one
    on_disk: Counter[str] = Counter()
    for raw in lines[:-1]:
        rec = json.loads(raw)  # every complete line parses
        if rec["decision"] == "allowed":
            on_disk[rec["cert_sha256"]] += 1
    for cert_hash, n in answered.items():
        assert on_disk[cert_hash] >= n, (cert_hash, n, on_disk[cert_hash])


# ----------------------------------------------------------------------------------- shared block reads


def test_block_number_is_never_older_than_the_request() -> None:
    height = 0
    reads = 0
    lock = threading.Lock()

    def read() -> int:
        nonlocal reads
        with lock:
            reads += 1
            value = height
        time.sleep(0.003)  # the RPC round trip; the chain may move meanwhile
        return value

    fresh = FreshBlockNumber(read)
    stale: list[tuple[int, int]] = []
    calls = 0

    def miner() -> None:
        nonlocal height
        for _ in range(60):
            time.sleep(0.002)
            with lock:
                height += 1

    def caller() -> None:
        nonlocal calls
        for _ in range(40):
            with lock:
                at_arrival = height
                calls += 1
            got = fresh()
            if got < at_arrival:
                stale.append((got, at_arrival))

    threads = [threading.Thread(target=miner)] + [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stale == []
    assert reads < calls  # concurrent callers shared reads


def test_block_number_failure_fails_its_callers() -> None:
    def broken() -> int:
        raise ConnectionError("rpc down")

    fresh = FreshBlockNumber(broken)
    with pytest.raises(ConnectionError):
        fresh()


# ------------------------------------------------------------------------------------- app key cache


def test_cached_app_keys_are_the_derived_keys_per_instance(teecloud_home: Path, world: World) -> None:
    clock = [time.time()]
    kms = make_kms(teecloud_home, world.chain, clock=lambda: clock[0])
    app_id = world.register(COMPOSE_V1)
    a = make_app(teecloud_home, app_id, COMPOSE_V1, instance_id=b"\x01" * 20)
    b = make_app(teecloud_home, app_id, COMPOSE_V1, instance_id=b"\x02" * 20)
    ka1 = kms.service.get_app_key(client_cert(kms, a)[1], vm_config=vm_config(a))
    kb = kms.service.get_app_key(client_cert(kms, b)[1], vm_config=vm_config(b))
    ka2 = kms.service.get_app_key(client_cert(kms, a)[1], vm_config=vm_config(a))
    assert ka2 is ka1  # served from the cache
    assert kb.disk_crypt_key != ka1.disk_crypt_key  # per instance
    fresh = derive_app_keys(
        kms.service.state.root, app_id, b"\x01" * 20, now=int(clock[0]), os_image_hash=a.tee.os_image_hash
    )
    assert ka1.disk_crypt_key == fresh.disk_crypt_key.hex()
    assert ka1.env_crypt_key == fresh.env_crypt_key.hex()
    assert ka1.k256_key == fresh.k256_key.hex() and ka1.ca_key == fresh.ca_key_pem
    clock[0] += kms.service.config.app_key_cache_s  # past the bound: derived again
    ka3 = kms.service.get_app_key(
        client_cert(kms, a, not_before=int(clock[0]) - 30)[1], vm_config=vm_config(a)
    )
    assert ka3 is not ka1 and ka3.disk_crypt_key == ka1.disk_crypt_key
    assert ka3.ca_cert != ka1.ca_cert  # a new app CA certificate, dated now
