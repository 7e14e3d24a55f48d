#!/usr/bin/env python3
"""Where the gateway's memory per idle TLS connection goes, HAProxy vs nginx measured the same way in the same
run (docs/benchmarks.md, "Gateway — memory per idle TLS connection").

Every server is a fresh process per round: nginx terminating TLS for the route name (`nginx same SNI
routing`, 2 workers, as in bench_gateway) and HAProxy as `teecloud.gateway.haproxy` renders it with
passthrough off (`no-hop`), plus variants (bench_gateway_variants.VARIANTS / ENV). For each, the same client
opens `--warm` then `--n` more TLS 1.3 connections (handshake completed; `--request`: one keep-alive request
answered on each, then idle) and, after a settling pause, reads for the server's process tree:

    RSS        sum of VmRSS (what bench_gateway reports), and its RssShmem / RssFile parts
    PSS        sum of Pss from smaps_rollup (shared pages split between the processes that map them)
    anon       sum of Anonymous from smaps_rollup (private heap / mmap pages: the per-connection state)
    PSS anon   sum of Pss_Anon (Linux >= 5.13): anon, plus the pages a worker copies on its first write to a
               page it shared with its master since the fork (Anonymous counts such a page before and after
               the copy, in both processes, so it misses that growth; an allocator that reuses memory the
               master touched before the fork looks smaller by `anon` than it is)
and, for HAProxy, its own accounting through the runtime API: `show pools` (bytes allocated per pool:
connection, ssl_sock_ctx, session, h1c, stream, buffers, ...; pools of one size are merged and listed under
one name). What is not in HAProxy's pools (anonymous growth minus pool growth) is OpenSSL's SSL objects plus
malloc's overhead.
Figures are KiB per connection over the `--n` connections after the `--warm` ones (the per-connection slope,
not the fixed start-up cost); medians over rounds.

    python3 bench/bench_gateway_memory.py [--rounds 3] [--warm 300] [--n 500] [--request]
        [--variants no-hop,no-hop+no-cache,no-hop+jemalloc,...] [--nginx-allocators jemalloc,tcmalloc]
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway as bg
import bench_gateway_variants as bv

from teecloud.gateway.driver import HaproxyDriver
from teecloud.gateway.routing import DataPlaneLimits, Route

# malloc implementations tried under HAProxy and nginx, preloaded (LD_PRELOAD; Debian packages libjemalloc2,
# libtcmalloc-minimal4). nginx's workers are forked from the master, so they keep the master's allocator.
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
ALLOCATORS: dict[str, dict[str, str]] = {
    "jemalloc": {"LD_PRELOAD": JEMALLOC},
    # jemalloc tuned for a small footprint: one arena, no thread caches
    "jemalloc-small": {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "narenas:1,tcache:false"},
    # and freed pages returned at once (no decay delay)
    "jemalloc-small-nodecay": {
        "LD_PRELOAD": JEMALLOC,
        "MALLOC_CONF": "narenas:1,tcache:false,dirty_decay_ms:0,muzzy_decay_ms:0",
    },
    "tcmalloc": {"LD_PRELOAD": TCMALLOC},
    # glibc's malloc without its per-thread cache of freed chunks, and without fastbins
    "glibc-notcache": {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
    "glibc-notcache-nofast": {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"},
}
for _alloc, _env in ALLOCATORS.items():
    bv.VARIANTS[f"no-hop+{_alloc}"] = bv.VARIANTS["no-hop"]
    bv.ENV[f"no-hop+{_alloc}"] = _env

_POOL = re.compile(r"Pool (\S+) \((\d+) bytes\) : (\d+) allocated \((\d+) bytes\), (\d+) used")


def smaps(pids: list[int]) -> dict[str, int]:
    out = {"rss": bg.rss_kib(pids), "pss": 0, "anon": 0, "pss_anon": 0, "shmem": 0, "file": 0}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("RssShmem", "RssFile"):
                    out["shmem" if key == "RssShmem" else "file"] += int(rest.split()[0])
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key == "Pss":
                    out["pss"] += int(rest.split()[0])
                elif key == "Anonymous":
                    out["anon"] += int(rest.split()[0])
                elif key == "Pss_Anon":
                    out["pss_anon"] += int(rest.split()[0])
        except OSError:
            pass
    return out


def runtime(sock: str, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def pools(sock: str) -> dict[str, int]:
    """Bytes allocated per pool (`show pools`; merged pools are listed under their first name)."""
    return {m[1]: int(m[4]) for m in _POOL.finditer(runtime(sock, "show pools"))}


def pools_of(admins: list[str]) -> dict[str, int]:
    total: dict[str, int] = {}
    for sock in admins:
        for k, v in pools(sock).items():
            total[k] = total.get(k, 0) + v
    return total


def open_connections(port: int, ca_pem: str, k: int, conns: list[ssl.SSLSocket], request: bool) -> None:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for _ in range(k):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls = ctx.wrap_socket(raw, server_hostname=bg.HOST)
        if request:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {bg.HOST}\r\n\r\n".encode())
            data = b""
            while not data.endswith(b"hello world\n"):
                part = tls.recv(4096)
                if not part:
                    raise SystemExit(f"port {port}: the connection closed before the answer")
                data += part
        conns.append(tls)


def check_preload(pid: int, env: dict[str, str]) -> None:
    """Every process of the server's tree maps the preloaded allocator (else the variant measured glibc)."""
    lib = env.get("LD_PRELOAD")
    if lib is None:
        return
    for p in bg.tree_pids(pid):
        if lib not in Path(f"/proc/{p}/maps").read_text():
            raise SystemExit(f"process {p} does not map {lib}")


def measure(
    port: int,
    tree: Callable[[], list[int]],
    ca_pem: str,
    warm: int,
    n: int,
    request: bool,
    admins: list[str],
) -> dict[str, float]:
    """`tree`: the server's processes now; `admins`: HAProxy runtime sockets (one per process of a
    multi-process variant; their pools are summed)."""
    conns: list[ssl.SSLSocket] = []
    try:
        open_connections(port, ca_pem, warm, conns, request)
        time.sleep(1.0)
        before, pool_before = smaps(tree()), pools_of(admins)
        open_connections(port, ca_pem, n, conns, request)
        time.sleep(1.0)
        after, pool_after = smaps(tree()), pools_of(admins)
    finally:
        for c in conns:
            c.close()
    out = {k: (after[k] - before[k]) / n for k in after}
    if admins:
        grown = {k: (v - pool_before.get(k, 0)) / 1024 / n for k, v in pool_after.items()}
        out["pools"] = sum(grown.values())
        out.update({f"pool:{k}": v for k, v in grown.items() if abs(v) >= 0.01})
        out["not pools"] = out["anon"] - out["pools"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", type=int, default=300)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--request", action="store_true", help="one request per connection before it idles")
    ap.add_argument("--variants", default="no-hop,no-hop+no-cache,no-hop+tickets")
    ap.add_argument(
        "--nginx-allocators",
        default="",
        help=f"comma-separated, of {','.join(ALLOCATORS)}: nginx with that allocator as well",
    )
    args = ap.parse_args()
    names = args.variants.split(",")
    args.nginx_allocators = [a for a in args.nginx_allocators.split(",") if a]
    for a in args.nginx_allocators:
        if a not in ALLOCATORS:
            raise SystemExit(f"unknown allocator {a!r}: one of {', '.join(ALLOCATORS)}")
    for path in {e["LD_PRELOAD"] for e in ALLOCATORS.values() if "LD_PRELOAD" in e}:
        if any(ALLOCATORS[a].get("LD_PRELOAD") == path for a in args.nginx_allocators) or any(
            bv.ENV.get(v, {}).get("LD_PRELOAD") == path for v in names
        ):
            if not Path(path).exists():
                raise SystemExit(f"{path} is missing (apt-get install libjemalloc2 libtcmalloc-minimal4)")
    bt = bg.BenchTls("teecloud-bench-gwm-")
    tmp, ca, cert, tls = bt.tmp, bt.ca, bt.cert, bt.nginx
    b_port = bg.free_port()
    backend = bg.start_backend(tmp / "backend", b_port)
    driver = HaproxyDriver(
        tmp / "gw",
        base_domain=bg.BASE,
        port=bg.free_port(),
        cert=cert,
        chain_pem=ca.cert_pem,
        limits=DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2, passthrough=False),
    ).start()
    results: dict[str, list[dict[str, float]]] = {}
    try:
        driver.apply([Route(bg.APP, bg.INST, 8080, f"127.0.0.1:{b_port}")])
        cfg = Path(driver.paths.config).read_text()
        for r in range(args.rounds):
            order = ["nginx same SNI routing", *(f"nginx+{a}" for a in args.nginx_allocators), *names]
            order = order[r % len(order) :] + order[: r % len(order)]
            for name in order:
                if name.startswith("nginx"):
                    n_port = bg.free_port()
                    proc = bg.start_nginx(
                        tmp / f"{name.replace(' ', '-')}-{r}",
                        bg.nginx_routing(b_port, n_port, tls),
                        2,
                        env=ALLOCATORS.get(name.partition("+")[2], {}),
                    )
                    try:
                        check_preload(proc.pid, ALLOCATORS.get(name.partition("+")[2], {}))
                        res = measure(
                            n_port,
                            lambda pid=proc.pid: bg.tree_pids(pid),
                            ca.cert_pem,
                            args.warm,
                            args.n,
                            args.request,
                            [],
                        )
                    finally:
                        proc.terminate()
                        proc.wait(timeout=10)
                else:
                    (tmp / f"r{r}").mkdir(exist_ok=True)
                    h = bv.Haproxy(tmp / f"r{r}", name, cfg, driver, bg.free_port())
                    try:
                        check_preload(h.proc.pid, bv.ENV.get(name, {}))
                        admins = [h.admin_socket] + [
                            str(h.dir / f"admin-{k}.sock") for k in range(1, len(h.procs))
                        ]
                        res = measure(h.port, h.pids, ca.cert_pem, args.warm, args.n, args.request, admins)
                    finally:
                        h.stop()
                results.setdefault(name, []).append(res)
                print(
                    f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True
                )
        mode = "after one request" if args.request else "after the handshake"
        print(
            f"\nKiB per idle TLS connection ({mode}; {args.n} connections after {args.warm}; medians of "
            f"{args.rounds} rounds)\n"
        )
        print(
            "| server | RSS | of it shmem | of it file | PSS | anon | PSS anon | HAProxy pools "
            "| anon not in pools | largest pools |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, rs in results.items():

            def med(key: str, rs: list[dict[str, float]] = rs) -> float:
                return bg.median([x.get(key, 0.0) for x in rs])

            top = sorted({k for x in rs for k in x if k.startswith("pool:")}, key=lambda k: -med(k))[:5]
            pooled = "—" if name.startswith("nginx") else f"{med('pools'):.2f}"
            rest = "—" if name.startswith("nginx") else f"{med('not pools'):.2f}"
            print(
                f"| {name} | {med('rss'):.2f} | {med('shmem'):.2f} | {med('file'):.2f} | {med('pss'):.2f} "
                f"| {med('anon'):.2f} | {med('pss_anon'):.2f} "
                f"| {pooled} | {rest} | " + ", ".join(f"{k[5:]} {med(k):.2f}" for k in top) + " |"
            )
    finally:
        driver.stop()
        backend.terminate()
        backend.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
