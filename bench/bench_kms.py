"""KMS key-release benchmark: attested GetAppKey over mutual RA-TLS, embedded chain.

Two connection modes, each with its baseline in the same run:

    new        every request opens a new mutual-TLS connection (what a booting CVM does: one key request)
    keepalive  each simulated CVM opens one mutual-TLS connection and sends all its requests on it

Cases:

    baseline GetMeta      TLS + HTTP, no attestation (the HTTP/TLS stack's ceiling in that mode)
    GetAppKey cold        every request presents a certificate the KMS has never seen (full verification)
    GetAppKey warm        certificates already verified (evidence cache hit; chain read per request)
    GetAppKey (keepalive) each connection's certificate is verified on its first request, cached after

Every GetAppKey still reads the chain's block number (answers at most one block old), passes the
KmsAuth check, and waits for its audit record to be fsync'ed before the answer is sent.

The KMS runs in a child process; the load comes from `--client-procs` processes (threads inside), using a
minimal HTTP/1.1 client on raw TLS sockets so the load generator takes as little as possible of the two
cores the KMS shares with it (httpx costs ~1 ms of client CPU per new connection). Server and client CPU
are reported per request (from /proc and os.times()). Usage:

    python bench/bench_kms.py [--requests 256] [--ka-requests 2048] [--levels 1,16,64] [--client-procs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

COMPOSE = hashlib.sha256(b"bench compose").digest()
GOAL_P50_MS, GOAL_P99_MS = 10.0, 50.0
VM_CONFIG_FILE = "get-app-key-body.json"


def serve(home: str, conn: Any, workers_note: str = "") -> None:  # child process
    os.environ["TEECLOUD_HOME"] = home
    from teecloud.chain import ChainClient
    from teecloud.kms.audit import AuditLog
    from teecloud.kms.bootstrap import boot_kms_tee, kms_dir, start_kms_state
    from teecloud.kms.server import KmsServer
    from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
    from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference

    chain = ChainClient.embedded(Path(home))
    chain.deploy()
    tee = SimulatedTdx()
    chain.add_os_image(tee.os_image_hash)
    app_id = bytes.fromhex(chain.register_app(None, COMPOSE)[2:])
    identity = boot_kms_tee(tee)
    state, _ = start_kms_state(tee, identity, now=int(time.time()))
    audit = AuditLog(kms_dir() / "audit.jsonl")
    service = KmsService(
        state=state,
        identity=identity,
        tee=tee,
        chain=chain,
        collateral=StaticCollateral(tee.collateral),
        audit=audit,
        config=KmsConfig(dev_mode=True),
        dev_root_der=tee.dev_root_der(),
        block_number=chain.block_number,
        os_image_reference=simulated_os_image_reference,
    )
    server = KmsServer(service).start()
    conn.send((server.url, app_id))
    while True:
        msg = conn.recv()
        if msg == "stats":
            conn.send(
                {
                    "fsyncs": getattr(audit, "batches", None),
                    "records": getattr(audit, "records_written", None),
                }
            )
        else:
            break
    server.stop()


def make_certs(n: int, app_id: bytes, temp_ca_key: Any, temp_ca: Any, tmp: Path) -> list[str]:
    """n client RA-TLS certificates (PEM files with their keys) for one booted app CVM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from teecloud.keys.ratls import make_ratls_cert
    from teecloud.kms.client import vm_config_json
    from teecloud.tee.simulated import SimulatedTdx

    tee = SimulatedTdx()
    # GetAppKey carries the CVM's vm_config (the KMS checks RTMR0 for that VM shape); the clients read it here
    (tmp / VM_CONFIG_FILE).write_text(json.dumps({"vm_config": vm_config_json(tee)}))
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", COMPOSE),
        ("instance-id", hashlib.sha256(b"i").digest()[:20]),
        ("boot-mr-done", b""),
        ("os-image-hash", tee.os_image_hash),  # keys are released only at this point of the boot
    ]:
        tee.emit_event(name, payload)
    now = int(time.time())
    paths = []
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
        paths.append(str(p))
    return paths


# --------------------------------------------------------------------------------------- the load generator
# A minimal HTTP/1.1 client (Content-Length bodies only, which is all uvicorn sends here): written by hand
# because the load generator shares the 2 cores with the KMS, and httpx's per-connection cost would be
# measured as KMS latency.


class Conn:
    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection((host, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw)
        self.buf = b""

    def request(self, method: str, path: str, body: bytes) -> int:
        head = f"{method} {path} HTTP/1.1\r\nHost: kms\r\nContent-Length: {len(body)}\r\n"
        if method == "POST":
            head += "Content-Type: application/json\r\n"
        self.sock.sendall((head + "\r\n").encode() + body)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        header, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(self.buf) < length:
            self._fill()
        self.buf = self.buf[length:]
        return status

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the KMS")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def _ctx(pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the bench measures the KMS; KmsClient checks the server's RA-TLS cert
    ctx.load_cert_chain(pem)
    return ctx


def client_proc(
    url: str, method: str, path: str, keepalive: bool, jobs: list[list[str]], start: Any, out: Any
) -> None:
    """One client process: a thread per job; a job is the list of certificate files its requests use, in
    order (keepalive: one connection with the first certificate for all of them)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    body = (Path(jobs[0][0]).parent / VM_CONFIG_FILE).read_bytes() if method == "POST" and jobs else b""
    ctxs = [[_ctx(p) for p in (job[:1] if keepalive else job)] for job in jobs]
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()

    def run(job: list[str], cs: list[ssl.SSLContext]) -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        conn: Conn | None = None
        for i in range(len(job)):
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = Conn(host, int(port), cs[0 if keepalive else i])
                ok = conn.request(method, path, body) == 200
                if not keepalive:
                    conn.close()
                    conn = None
            except (OSError, ValueError):
                ok = False
                conn = None
            mine.append(time.perf_counter() - t0)
            bad += 0 if ok else 1
        if conn is not None:
            conn.close()
        with lock:
            lat.extend(mine)
            errors += bad

    threads = [threading.Thread(target=run, args=(job, cs)) for job, cs in zip(jobs, ctxs, strict=True)]
    start.wait()
    c0 = os.times()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    c1 = os.times()
    out.put((lat, errors, (c1.user - c0.user) + (c1.system - c0.system), t0, t1))


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(
    url: str,
    server_pid: int,
    method: str,
    path: str,
    certs: list[str],
    *,
    concurrency: int,
    requests: int,
    keepalive: bool,
    client_procs: int,
) -> dict[str, Any]:
    """`requests` requests from `concurrency` simulated CVMs; request k of CVM j uses certs[(j*per + k) %
    len(certs)] (keepalive: CVM j's connection uses certs[j % len(certs)])."""
    per = max(1, requests // concurrency)
    jobs = [
        [certs[(j * per + k) % len(certs)] for k in range(per)]
        if not keepalive
        else [certs[j % len(certs)]] * per
        for j in range(concurrency)
    ]
    nproc = max(1, min(client_procs, concurrency))
    fork = mp.get_context("fork")
    start = fork.Event()
    out = fork.Queue()
    procs = [
        fork.Process(target=client_proc, args=(url, method, path, keepalive, jobs[i::nproc], start, out))
        for i in range(nproc)
    ]
    for p in procs:
        p.start()
    time.sleep(0.3 + 0.002 * len(certs[:requests]))  # let the clients load their certificates
    s0 = proc_cpu(server_pid)
    start.set()
    results = [out.get() for _ in procs]
    s1 = proc_cpu(server_pid)
    for p in procs:
        p.join()
    lat = [x for r in results for x in r[0]]
    n = len(lat)
    elapsed = max(r[4] for r in results) - min(r[3] for r in results)
    client_cpu = sum(r[2] for r in results)
    return {
        "n": n,
        "rps": n / elapsed,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "errors": sum(r[1] for r in results),
        "server_ms": 1000 * (s1 - s0) / n,
        "client_ms": 1000 * client_cpu / n,
        "server_cores": (s1 - s0) / elapsed,
        "client_cores": client_cpu / elapsed,
    }


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256, help="requests per row, new-connection mode")
    ap.add_argument("--ka-requests", type=int, default=2048, help="requests per row, keep-alive mode")
    ap.add_argument("--levels", default="1,16,64")
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--modes", default="new,keepalive")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    modes = args.modes.split(",")
    home = tempfile.mkdtemp(prefix="bench-kms-")
    os.environ["TEECLOUD_HOME"] = home
    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from teecloud.tee.simulated import SimulatedTdx

    SimulatedTdx()  # create the platform once, before the child uses it
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=serve, args=(home, child), daemon=True)
    proc.start()
    url, app_id = parent.recv()
    assert proc.pid is not None
    temp = httpx.get(url + "/prpc/KMS.GetTempCaCert", verify=False).json()
    temp_key = serialization.load_pem_private_key(temp["temp_ca_key"].encode(), password=None)
    temp_cert = x509.load_pem_x509_certificate(temp["temp_ca_cert"].encode())
    tmp = Path(home) / "bench-certs"
    tmp.mkdir()
    n_cold = args.requests * len(levels) if "new" in modes else 0
    n_warm = max(levels)
    t0 = time.perf_counter()
    certs = make_certs(n_cold + n_warm, app_id, temp_key, temp_cert, tmp)
    warm, cold = certs[:n_warm], certs[n_warm:]
    print(
        f"# generated {len(certs)} client RA-TLS certificates in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )

    rows: list[tuple[str, str, int, dict[str, Any]]] = []

    def case(mode: str, name: str, method: str, path: str, cs: list[str], level: int, n: int) -> None:
        r = run_case(
            url,
            proc.pid,
            method,
            path,
            cs,
            concurrency=level,
            requests=n,
            keepalive=mode == "keepalive",
            client_procs=args.client_procs,
        )
        rows.append((mode, name, level, r))
        print(f"# {mode} {name} c={level}: {r['rps']:.0f}/s p50 {r['p50']:.1f} ms", file=sys.stderr)

    meta, key = "/prpc/KMS.GetMeta", "/prpc/KMS.GetAppKey"
    # warm the evidence cache for the "warm" certificates (one request each)
    run_case(
        url, proc.pid, "POST", key, warm, concurrency=4, requests=len(warm), keepalive=False, client_procs=1
    )
    offset = 0
    for level in levels:
        if "new" in modes:
            case("new", "baseline GetMeta", "GET", meta, warm, level, args.requests)
            case(
                "new",
                "GetAppKey cold",
                "POST",
                key,
                cold[offset : offset + args.requests],
                level,
                args.requests,
            )
            offset += args.requests
            case("new", "GetAppKey warm", "POST", key, warm, level, args.requests)
        if "keepalive" in modes:
            case("keepalive", "baseline GetMeta", "GET", meta, warm, level, args.ka_requests)
            case("keepalive", "GetAppKey", "POST", key, warm, level, args.ka_requests)
    parent.send("stats")
    stats = parent.recv()
    parent.send("stop")
    proc.join(15)
    print(
        f"{'mode':<10} {'case':<17} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} "
        f"{'srv ms/req':>10} {'cli ms/req':>10} {'srv cores':>9} {'cli cores':>9}"
    )
    for mode, name, level, r in rows:
        print(
            f"{mode:<10} {name:<17} {level:>4} {r['rps']:>7.0f} {r['p50']:>7.1f} {r['p99']:>7.1f} "
            f"{r['errors']:>4} {r['server_ms']:>10.2f} {r['client_ms']:>10.2f} {r['server_cores']:>9.2f} "
            f"{r['client_cores']:>9.2f}"
        )
    for mode, name, level, r in rows:
        if name.startswith("GetAppKey") and level == 64:
            met = r["p50"] <= GOAL_P50_MS and r["p99"] <= GOAL_P99_MS
            print(
                f"# goal p50<={GOAL_P50_MS:g} ms, p99<={GOAL_P99_MS:g} ms at 64 ({mode}, {name}): "
                f"{'met' if met else 'NOT met'}"
            )
    print(
        json.dumps(
            {
                "cpus": os.cpu_count(),
                "client_procs": args.client_procs,
                "audit_records": stats["records"],
                "audit_fsyncs": stats["fsyncs"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
