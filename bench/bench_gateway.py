#!/usr/bin/env python3
"""The gateway's data plane (HAProxy driven by teecloud.gateway) vs nginx doing the same SNI routing to the
same backend, vs TLS to the backend directly; all in one run on 127.0.0.1.

    backend        nginx, plain HTTP/1.1, one fixed 12-byte answer (1 worker)
    direct         nginx, TLS 1.3, the same answer served directly (the "direct" baseline; 2 workers)
    nginx gateway  nginx, TLS 1.3 terminated for <app_id>-8080.<base>, keep-alive upstream (2 workers);
                   any other name 421
    teecloud       teecloud.gateway.driver.HaproxyDriver: HAProxy 2.6 (2 threads), the same certificate
                   (dev CA wildcard), the route set through the runtime API; with the access log
                   (per-app latency histograms, as GatewayServer runs it) and without

Measured with wrk (keep-alive, TLS 1.3, 2 threads, 64 connections): req/s, p50, p99, errors; then new TLS
connections (wrk with `Connection: close`): proxy CPU ms per connection (utime+stime of its processes);
memory per idle TLS connection (the marginal RSS growth of the proxy's processes from 300 to 800 idle TLS
connections, on fresh processes before any load: the first 300 absorb start-up and allocator effects, which
made a from-zero figure swing between 0.2 and 36 KiB); several rounds, the order of the proxies rotated
each round, medians reported; route churn (10 route changes per second through the runtime API while wrk
runs): errors; and the time of one route change (`driver.apply`).

Needs: haproxy, nginx-light (+ libnginx-mod-stream for the "same split" nginx), wrk (Debian), and
`*.localhost` resolving to loopback for wrk's SNI
(libnss-myhostname, Debian). Not run in CI.

    python3 bench/bench_gateway.py [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from teecloud.gateway.devca import DevCa  # noqa: E402
from teecloud.gateway.driver import HaproxyDriver  # noqa: E402
from teecloud.gateway.routing import DataPlaneLimits, Route  # noqa: E402

BASE = "teecloud.localhost"
APP = "a1" * 20
INST = "b1" * 20
OTHER = "c1" * 20
HOST = f"{APP}-8080.{BASE}"


class _Stop:
    """A HaproxyDriver in the list of processes to stop."""

    def __init__(self, driver: HaproxyDriver) -> None:
        self.driver = driver

    def terminate(self) -> None:
        self.driver.stop()

    def wait(self, timeout: float) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def nginx_conf(tmp: Path, body: str, workers: int, stream: str = "") -> str:
    # the split's workers connect to the unix socket their master (root here) made
    load = f"load_module {STREAM_MODULE};\nuser {os.getlogin() if os.getuid() else 'root'};" if stream else ""
    return f"""
{load}
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    server_names_hash_bucket_size 128;
    ssl_protocols TLSv1.3;
    ssl_session_tickets off;
{body}
}}
{stream}
"""


def start_nginx(
    tmp: Path, body: str, workers: int, stream: str = "", env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """nginx in the foreground with `body` in its http block (and `stream`); `env`: extra environment (e.g.
    an allocator preloaded into the master, which its forked workers keep)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, body, workers, stream))
    # Its own session, as HaproxyDriver starts HAProxy: with the kernel's scheduler autogroups (on here) a
    # session is one scheduling group, so every server under test gets the same treatment.
    proc = subprocess.Popen(
        ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    time.sleep(0.5)
    if proc.poll() is not None:
        raise SystemExit("nginx did not start (its error is printed above)")
    return proc


class BenchTls:
    """A temporary directory with the dev CA's wildcard certificate for BASE, as nginx and HAProxy load it."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        now = int(time.time())
        self.ca = DevCa(now=now)
        self.cert = self.ca.issue_wildcard(BASE, now=now)
        (self.tmp / "cert.pem").write_text(self.cert.cert_pem + self.ca.cert_pem)
        (self.tmp / "key.pem").write_text(self.cert.key_pem)
        (self.tmp / "key.pem").chmod(0o600)
        # nginx's directives for it
        self.nginx = f"ssl_certificate {self.tmp}/cert.pem; ssl_certificate_key {self.tmp}/key.pem;"


def start_backend(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    """The backend every proxy routes to: nginx, plain HTTP/1.1, one fixed 12-byte answer, 1 worker."""
    return start_nginx(
        tmp, f'server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello world\\n"; }} }}', 1
    )


def nginx_routing(backend_port: int, port: int, tls: str) -> str:
    """nginx terminating TLS for the route name HOST (keep-alive upstream to the backend), 421 otherwise:
    the `nginx same SNI routing` baseline."""
    return (
        f"upstream app {{ server 127.0.0.1:{backend_port}; keepalive 64; }}\n"
        f"server {{ listen 127.0.0.1:{port} ssl default_server; {tls} return 421; }}\n"
        f"server {{ listen 127.0.0.1:{port} ssl; server_name {HOST}; {tls}\n"
        '  location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } }'
    )


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(p.name))
    return out


def cpu_s(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            f = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]).split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def wrk(url: str, seconds: int, *extra: str) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency", *extra, url], capture_output=True, text=True
    ).stdout

    def lat(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        return float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]

    m = re.search(r"([\d]+) requests in", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = (sum(int(x) for x in errs.groups()) if errs else 0) + (int(non2xx[1]) if non2xx else 0)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {
        "rps": float(rps[1]) if rps else 0.0,
        "p50": lat("50"),
        "p99": lat("99"),
        "errors": errors,
        "requests": int(m[1]) if m else 0,
    }


def idle_memory(port: int, host: str, ca_pem: str, pids: list[int], warm: int = 300, n: int = 500) -> float:
    """KiB per idle TLS connection: RSS growth from `warm` to `warm + n` open connections."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    conns = []

    def open_more(k: int) -> int:
        for _ in range(k):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            conns.append(ctx.wrap_socket(raw, server_hostname=host))
        time.sleep(0.5)
        return rss_kib(pids)

    try:
        before = open_more(warm)
        after = open_more(n)
    finally:
        for c in conns:
            c.close()
    return (after - before) / n


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    seconds = args.seconds
    for tool in ("haproxy", "nginx", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install haproxy nginx-light wrk)")
    bt = BenchTls("teecloud-bench-gw-")
    tmp, ca, cert, tls = bt.tmp, bt.ca, bt.cert, bt.nginx
    b_port, d_port, n_port, g_port, t_port, l_port, s_port = (free_port() for _ in range(7))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        run(
            tmp,
            ca,
            cert,
            procs,
            seconds,
            args.rounds,
            (b_port, d_port, n_port, g_port, t_port, l_port, s_port),
            tls,
        )
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp, ca, cert, procs, seconds, rounds, ports, tls) -> None:  # type: ignore[no-untyped-def]
    b_port, d_port, n_port, g_port, t_port, l_port, s_port = ports
    backend = start_backend(tmp / "backend", b_port)
    procs.append(backend)
    direct = start_nginx(
        tmp / "direct",
        f'server {{ listen 127.0.0.1:{d_port} ssl; {tls} location / {{ return 200 "hello world\\n"; }} }}',
        2,
    )
    procs.append(direct)
    nginx_gw = start_nginx(tmp / "nginx-gw", nginx_routing(b_port, n_port, tls), 2)
    procs.append(nginx_gw)
    # nginx built like the gateway: one public port that reads the ClientHello (stream, ssl_preread), sends
    # passthrough names on untouched and the rest over a unix socket (PROXY protocol) to a TLS server
    split = None
    if Path(STREAM_MODULE).exists():
        sock = tmp / "nginx-split" / "term.sock"
        split = start_nginx(
            tmp / "nginx-split",
            f"upstream app {{ server 127.0.0.1:{b_port}; keepalive 64; }}\n"
            f"server {{ listen unix:{sock} ssl proxy_protocol default_server; {tls} return 421; }}\n"
            f"server {{ listen unix:{sock} ssl proxy_protocol; server_name {HOST}; {tls}\n"
            "  location / { proxy_pass http://app; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; } }',
            2,
            stream=f"stream {{\n  map_hash_bucket_size 128;\n"
            f"  map $ssl_preread_server_name $to {{ {APP}-8443s.{BASE} 127.0.0.1:{d_port}; "
            f"default unix:{sock}; }}\n"
            f"  server {{ listen 127.0.0.1:{s_port}; ssl_preread on; proxy_pass $to; "
            "proxy_protocol on; }\n}",
        )
        procs.append(split)
    driver_tcp = HaproxyDriver(
        tmp / "gw-tcp",
        base_domain=BASE,
        port=t_port,
        cert=cert,
        chain_pem=ca.cert_pem,
        limits=DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2),
        terminate_mode="tcp",
    ).start()
    driver_tcp.apply([Route(APP, INST, 8080, f"127.0.0.1:{b_port}")])
    procs.append(_Stop(driver_tcp))  # type: ignore[arg-type]
    from teecloud.gateway.accesslog import AccessLog

    driver_log = HaproxyDriver(
        tmp / "gw-log",
        base_domain=BASE,
        port=l_port,
        cert=cert,
        chain_pem=ca.cert_pem,
        limits=DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2),
        access_log=True,
    )
    (tmp / "gw-log").mkdir(mode=0o700)
    access_log = AccessLog(Path(driver_log.paths.access_log)).start()  # read as GatewayServer does
    driver_log.start()
    driver_log.apply([Route(APP, INST, 8080, f"127.0.0.1:{b_port}")])
    access_log.set_backends({b: APP for (_m, _g), b in driver_log.plan.groups.items()})
    procs.append(_Stop(driver_log))  # type: ignore[arg-type]
    driver = HaproxyDriver(
        tmp / "gw",
        base_domain=BASE,
        port=g_port,
        cert=cert,
        chain_pem=ca.cert_pem,
        limits=DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2),
    ).start()
    route = Route(APP, INST, 8080, f"127.0.0.1:{b_port}")
    t0 = time.perf_counter()
    driver.apply([route])
    apply_ms = (time.perf_counter() - t0) * 1000
    try:
        targets = {
            "direct (TLS to the backend)": (f"https://{HOST}:{d_port}/", direct.pid),
            "nginx, same SNI routing": (f"https://{HOST}:{n_port}/", nginx_gw.pid),
            **(
                {
                    "nginx, same split as the gateway (preread + unix hop)": (
                        f"https://{HOST}:{s_port}/",
                        split.pid,
                    )
                }
                if split is not None
                else {}
            ),
            "teecloud gateway (HAProxy), access log on": (f"https://{HOST}:{l_port}/", driver_log.pid),
            "teecloud gateway (HAProxy), no access log": (f"https://{HOST}:{g_port}/", driver.pid),
            "teecloud gateway, terminate_mode=tcp": (f"https://{HOST}:{t_port}/", driver_tcp.pid),
        }
        results: dict[str, list[tuple[dict[str, float], dict[str, float], float, float]]] = {
            n: [] for n in targets
        }
        names = list(targets)
        # memory first, on fresh processes: an allocator that already held 800 connections' worth of pools
        # (a later round) shows ~0 growth, which measures the previous round, not a connection
        fresh_mem = {}
        for name, (url, pid) in targets.items():
            port = int(url.rsplit(":", 1)[1].rstrip("/"))
            fresh_mem[name] = idle_memory(port, HOST, ca.cert_pem, tree_pids(pid or 0))
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated: no fixed position
                url, pid = targets[name]
                pids = tree_pids(pid or 0)
                ka = wrk(url, seconds)
                c0 = cpu_s(pids)
                new = wrk(url, max(3, seconds // 2), "-H", "Connection: close")
                cpu = (cpu_s(pids) - c0) * 1000 / max(1, new["requests"])
                results[name].append((ka, new, cpu, fresh_mem[name]))
                print(f"round {r + 1} {name}: {ka['rps']:.0f} req/s p99 {ka['p99']:.1f} ms", flush=True)
        # route churn: 10 changes/s (another app's route and a second server of this app come and go)
        stop = threading.Event()
        changes = [0]

        def churn() -> None:
            extra = [
                Route(APP, "b2" * 20, 8080, f"127.0.0.1:{b_port}"),
                Route(OTHER, "c2" * 20, 9000, f"127.0.0.1:{b_port}"),
            ]
            while not stop.is_set():
                driver.apply([route, *extra])
                time.sleep(0.05)
                driver.apply([route])
                time.sleep(0.05)
                changes[0] += 2

        t = threading.Thread(target=churn)
        pid_before = driver.pid
        t.start()
        churned = wrk(f"https://{HOST}:{g_port}/", seconds)
        stop.set()
        t.join()
        assert driver.pid == pid_before
        print(
            "| proxy | keep-alive req/s | p50 ms | p99 ms | errors | new TLS conn/s | CPU ms / new conn "
            "| KiB / idle TLS conn |"
        )
        print("|---|---|---|---|---|---|---|---|")
        med: dict[str, dict[str, float]] = {}
        for name, rs in results.items():
            m = {
                "rps": median([x[0]["rps"] for x in rs]),
                "p50": median([x[0]["p50"] for x in rs]),
                "p99": median([x[0]["p99"] for x in rs]),
                "errors": sum(x[0]["errors"] + x[1]["errors"] for x in rs),
                "new": median([x[1]["rps"] for x in rs]),
                "cpu": median([x[2] for x in rs]),
                "mem": median([x[3] for x in rs]),
            }
            med[name] = m
            print(
                f"| {name} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['errors']:.0f} | "
                f"{m['new']:.0f} | {m['cpu']:.3f} | {m['mem']:.1f} |"
            )
        print(f"\nmedians of {rounds} rounds; per round (req/s): ")
        for name, rs in results.items():
            print(f"  {name}: " + ", ".join(f"{x[0]['rps']:.0f}" for x in rs))
        for name in names[2:]:
            if name.startswith("nginx"):
                continue
            # ratios per round (the baselines measured in the same round), then their median
            vs_nginx = [
                a[0]["rps"] / b[0]["rps"] for a, b in zip(results[name], results[names[1]], strict=True)
            ]
            vs_direct = [
                a[0]["rps"] / b[0]["rps"] for a, b in zip(results[name], results[names[0]], strict=True)
            ]
            p99 = [a[0]["p99"] / b[0]["p99"] for a, b in zip(results[name], results[names[1]], strict=True)]
            print(
                f"{name}: / nginx = {median(vs_nginx):.2f}x "
                f"(rounds {', '.join(f'{x:.2f}' for x in vs_nginx)}); "
                f"/ direct = {100 * median(vs_direct):.0f} %; p99 / nginx's = {median(p99):.2f}; "
                f"CPU per new conn / nginx's = {med[name]['cpu'] / med[names[1]]['cpu']:.2f}; "
                f"idle memory / nginx's = {med[name]['mem'] / med[names[1]]['mem']:.2f}"
            )
            if split is not None:
                same = names[2]
                vs_split = [
                    a[0]["rps"] / b[0]["rps"] for a, b in zip(results[name], results[same], strict=True)
                ]
                print(
                    f"  / nginx with the same split = {median(vs_split):.2f}x "
                    f"(rounds {', '.join(f'{x:.2f}' for x in vs_split)}); "
                    f"p99 / its = {med[name]['p99'] / med[same]['p99']:.2f}; "
                    f"CPU per new conn / its = {med[name]['cpu'] / med[same]['cpu']:.2f}; "
                    f"idle memory / its = {med[name]['mem'] / med[same]['mem']:.2f}"
                )
        snap = access_log.snapshot().get(APP)
        counted = snap.requests if snap else 0
        print(f"access log: {counted} requests counted for the app, {access_log.malformed} malformed")
        print(
            f"route churn: {changes[0]} route changes in {seconds} s under load: "
            f"{churned['requests']:.0f} requests, {churned['errors']:.0f} errors, "
            f"{churned['rps']:.0f} req/s, no reload"
        )
        print(f"one route change (driver.apply, runtime API + map files): {apply_ms:.1f} ms")
    finally:
        driver.stop()
        access_log.stop()


if __name__ == "__main__":
    main()
