"""KMS key-release benchmark: attested GetAppKey over mutual RA-TLS, embedded chain.

Each request is what a booting CVM does: a new TLS connection presenting its RA-TLS client certificate,
then GetAppKey (quote verification + event-log replay + boot_info + KmsAuth.isAppAllowed + derivation).

    cold   every request presents a certificate the KMS has never seen (full verification each time)
    warm   requests re-present certificates already verified (evidence cache hit; chain read per block)
    baseline: GetMeta over the same kind of TLS connection (handshake + HTTP, no attestation), same run

The KMS runs in a child process (its own GIL); clients are threads here. Usage:
    python bench/bench_kms.py [--requests 256] [--levels 1,16,64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import ssl
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

COMPOSE = hashlib.sha256(b"bench compose").digest()


def serve(home: str, conn) -> None:  # child process
    os.environ["TEECLOUD_HOME"] = home
    from teecloud.chain import ChainClient
    from teecloud.kms.audit import AuditLog
    from teecloud.kms.bootstrap import boot_kms_tee, kms_dir, start_kms_state
    from teecloud.kms.service import (
        KmsConfig,
        KmsServer,
        KmsService,
        StaticCollateral,
        simulated_os_image_mrtd,
    )
    from teecloud.tee.simulated import SimulatedTdx

    chain = ChainClient.embedded(Path(home))
    chain.deploy()
    tee = SimulatedTdx()
    chain.add_os_image(tee.os_image_hash)
    app_id = bytes.fromhex(chain.register_app(None, COMPOSE)[2:])
    identity = boot_kms_tee(tee)
    state, _ = start_kms_state(tee, identity, now=int(time.time()))
    service = KmsService(
        state=state,
        identity=identity,
        tee=tee,
        chain=chain,
        collateral=StaticCollateral(tee.collateral),
        audit=AuditLog(kms_dir() / "audit.jsonl"),
        config=KmsConfig(dev_mode=True),
        dev_root_der=tee.dev_root_der(),
        block_number=chain.block_number,
        os_image_mrtd=simulated_os_image_mrtd,
    )
    server = KmsServer(service).start()
    conn.send((server.url, app_id))
    conn.recv()  # wait for the parent to finish
    server.stop()


def make_certs(
    n: int, app_id: bytes, temp_ca_key: ec.EllipticCurvePrivateKey, temp_ca: x509.Certificate, tmp: Path
) -> list[ssl.SSLContext]:
    from teecloud.keys.ratls import make_ratls_cert
    from teecloud.tee.simulated import SimulatedTdx

    ctxs = []
    tee = SimulatedTdx()
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", COMPOSE),
        ("instance-id", hashlib.sha256(b"i").digest()[:20]),
        ("boot-mr-done", b""),
        ("os-image-hash", tee.os_image_hash),
        ("system-ready", b""),
    ]:
        tee.emit_event(name, payload)
    now = int(time.time())
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = make_ratls_cert(
            tee,
            key,
            issuer_key=temp_ca_key,
            issuer_cert=temp_ca,
            subject="bench",
            usage="app:kms-client",
            not_before=now - 30,
            not_after=now + 1800,
            app_id=app_id,
            server_auth=False,
            client_auth=True,
        )
        p = tmp / f"c{i}.pem"
        p.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(str(p))
        ctxs.append(ctx)
    return ctxs


def run_level(
    url: str, path: str, method: str, ctxs: list[ssl.SSLContext], concurrency: int, requests: int
) -> tuple[float, list[float], int]:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal errors
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                with httpx.Client(verify=ctxs[i % len(ctxs)], timeout=60) as c:
                    r = c.request(method, url + path, json={} if method == "POST" else None)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                errors += 0 if ok else 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for _ in range(concurrency):
            ex.submit(worker)
    return time.perf_counter() - t0, lat, errors


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--levels", default="1,16,64")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    home = tempfile.mkdtemp(prefix="bench-kms-")
    os.environ["TEECLOUD_HOME"] = home
    from teecloud.tee.simulated import SimulatedTdx

    SimulatedTdx()  # create the platform once, before the child uses it
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=serve, args=(home, child), daemon=True)
    proc.start()
    url, app_id = parent.recv()
    temp = httpx.get(url + "/prpc/KMS.GetTempCaCert", verify=False).json()
    temp_key = serialization.load_pem_private_key(temp["temp_ca_key"].encode(), password=None)
    assert isinstance(temp_key, ec.EllipticCurvePrivateKey)
    temp_cert = x509.load_pem_x509_certificate(temp["temp_ca_cert"].encode())
    tmp = Path(home) / "bench-certs"
    tmp.mkdir()
    total_cold = args.requests * len(levels)
    t0 = time.perf_counter()
    cold_ctxs = make_certs(total_cold, app_id, temp_key, temp_cert, tmp)
    warm_ctxs = cold_ctxs[: max(levels)]
    print(
        f"# generated {total_cold} client RA-TLS certificates in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    rows = []
    offset = 0
    for level in levels:
        # baseline: TLS + GetMeta, no attestation
        el, lat, err = run_level(url, "/prpc/KMS.GetMeta", "GET", warm_ctxs, level, args.requests)
        rows.append(("baseline GetMeta", level, args.requests / el, pct(lat, 50), pct(lat, 99), err))
        chunk = cold_ctxs[offset : offset + args.requests]
        offset += args.requests
        el, lat, err = run_level(url, "/prpc/KMS.GetAppKey", "POST", chunk, level, args.requests)
        rows.append(("GetAppKey cold", level, args.requests / el, pct(lat, 50), pct(lat, 99), err))
        el, lat, err = run_level(url, "/prpc/KMS.GetAppKey", "POST", warm_ctxs, level, args.requests)
        rows.append(("GetAppKey warm", level, args.requests / el, pct(lat, 50), pct(lat, 99), err))
    parent.send("stop")
    proc.join(15)
    print(f"{'case':<18} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, level, rps, p50, p99, err in rows:
        print(f"{name:<18} {level:>5} {rps:>8.1f} {p50:>8.1f} {p99:>8.1f} {err:>6}")
    print(json.dumps({"cpus": os.cpu_count(), "requests_per_level": args.requests}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
