#!/usr/bin/env python3
"""HAProxy configuration variants of the gateway's data plane, each against the same baselines in the same
rounds (docs/benchmarks.md, "Gateway — variants"): is there a configuration that closes the gap to nginx?

    base        the configuration teecloud.gateway.haproxy renders (fe_sni reads the ClientHello, then an
                abstract unix socket hop with PROXY v2 to the TLS frontend), no access log
    unix-path   the hop over a unix socket path (unix@) instead of an abstract one (abns@)
    cpu-map     nbthread 2 with each thread pinned to a core (cpu-map auto:1/1-2 0-1)
    ssl-cache   tune.ssl.cachesize 100000 (default 20000 sessions)
    small-bufs  tune.bufsize 16384, tune.maxrewrite 1024, no-memory-trimming (memory per connection)
    reuse       http-reuse always in the app backends (server connections shared between clients)
    no-hop      what teecloud.gateway.haproxy renders with DataPlaneLimits(passthrough=False) and no custom
                domains: TLS terminated on the public port itself (no fe_sni, no hop)
    no-hop+cpu-map, no-hop+small-bufs, no-hop+reuse   those tunings on top of no-hop
    two-ports   what teecloud.gateway.haproxy renders with DataPlaneLimits(passthrough_port=N): passthrough
                on, `s` names and custom domains on a second port (fe_sni there), the public port
                terminating TLS itself (no hop); measured on the public port
    no-hop+no-cache   and no TLS session cache (tune.ssl.cachesize 0; with tickets off as well, as in the
                nginx baselines, which keep no session cache either: no resumption)

Levers for the hop itself (passthrough on, each judged against `base` with `--against base`):

    tcp-hop     the hop over a loopback TCP port instead of the abstract socket (kernel splicing needs TCP
                sockets on both sides of fe_sni)
    tcp-hop+splice-auto       option splice-auto in fe_sni and be_terminate (HAProxy decides per direction)
    tcp-hop+splice            option splice-request + splice-response there (always splice)
    tcp-hop+splice+pipesize   that with tune.pipesize 262144 (the kernel's default pipe is 64 KiB)
    tcp-hop+smart             option tcp-smart-accept (fe_sni) + tcp-smart-connect (be_terminate)
    tcp-hop+tfo               TCP fast open on the hop's server line
    nbthread1   nbthread 1 instead of HAProxy's default (one thread per core: 2 here, beside wrk's 2)
    inspect-delay-1s          tcp-request inspect-delay 1s instead of 5s in fe_sni
    no-proxy    the hop without PROXY v2 (the TLS frontend then loses the client's address: measured only)

Round 11, on the two-port layout's public port (each judged against `two-ports` with `--against two-ports`):

    two-ports+2proc         two HAProxy processes of one thread each on the same ports (HAProxy sets
                            SO_REUSEPORT: the kernel spreads new connections), each with its own runtime
                            socket: processes instead of threads, as nginx runs 2 workers here
                            (DataPlaneLimits(processes=2) renders the same, with its caps split
                            between the processes; 64 connections stay far below either)
    two-ports+nbthread1     one process of one thread
    two-ports+no-xff        no X-Forwarded-For / X-Forwarded-Proto (measured only)
    two-ports+no-host-check no Host-vs-SNI 421 rule (measured only)
    two-ports+balance-first `balance first` instead of leastconn (measured only)
    no-hop+2proc            two processes on the no-hop configuration (bench_gateway_memory.py)
    base+2proc              two processes on the one-port layout (ClientHello reader + hop), each its own hop

Baselines in every round: direct TLS (nginx serving the answer), nginx terminating TLS for the route name
(`same SNI routing`) and nginx built like the gateway (stream ssl_preread + unix socket with PROXY protocol
to a TLS server: `same split`). wrk: 2 threads, 64 keep-alive connections, TLS 1.3; memory per idle TLS
connection on fresh processes (bench_gateway.idle_memory: RSS growth from 300 to 800 connections).

    python3 bench/bench_gateway_variants.py [--seconds 5] [--rounds 3] [--variants base,no-hop,...]
        [--no-memory]

The goal's verdict (keep-alive req/s >= 1.0x nginx same SNI routing, p99 no worse), statistical, since the
spread between rounds is larger than the difference:

    python3 bench/bench_gateway_variants.py --verdict no-hop,no-hop+low-latency [--pairs 30]
        [--pair-seconds 2] [--budget-s 900]

runs many short pairs: in each, nginx and the candidate back to back (order alternating between pairs, so a
drift in the machine's load hits both sides alike), and takes the ratio within the pair (paired comparison).
Over the pairs: the geometric mean of the req/s ratios and of the p99 ratios with a 95 % confidence interval
(Student's t on the log ratios), and the verdict per goal: met (the whole interval on the good side of 1.0),
not met (the whole interval on the bad side) or undecidable on this machine (the interval contains 1.0).
Bounded: at most `--pairs` pairs and `--budget-s` seconds (what is done by then is reported).
`--against` names the baselines (default nginx; also nginx-split, direct or a variant such as base), every
candidate paired with every baseline; `--close` judges new TLS connections/s (wrk with Connection: close,
a full handshake per request) instead of keep-alive requests:

    python3 bench/bench_gateway_variants.py --verdict tcp-hop,tcp-hop+splice --against base --pairs 25
    python3 bench/bench_gateway_variants.py --verdict base,nginx-split --against nginx,nginx-split
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gateway as bg

from teecloud.gateway.driver import HaproxyDriver
from teecloud.gateway.routing import DataPlaneLimits, Route


def _global(extra: str) -> Callable[[str, str], str]:
    return lambda cfg, _port: cfg.replace("global\n", f"global\n{extra}\n", 1)


VARIANTS: dict[str, Callable[[str, str], str]] = {
    "base": lambda cfg, _port: cfg,
    "unix-path": lambda cfg, _port: cfg,  # the socket path is set per instance below
    "cpu-map": _global("    nbthread 2\n    cpu-map auto:1/1-2 0-1"),
    "ssl-cache": _global("    tune.ssl.cachesize 100000"),
    "small-bufs": lambda cfg, _port: _global("    tune.maxrewrite 1024\n    no-memory-trimming")(
        "\n".join(
            "    tune.bufsize 16384" if line.startswith("    tune.bufsize") else line
            for line in cfg.splitlines()
        )
        + "\n",
        _port,
    ),
    "reuse": lambda cfg, _port: cfg.replace(
        "    balance leastconn\n", "    balance leastconn\n    http-reuse always\n"
    ),
    "no-hop": lambda cfg, _port: cfg,  # rendered by the driver with passthrough=False (below)
    "two-ports": lambda cfg, _port: cfg,  # rendered by the driver with passthrough_port (below)
    "no-hop+cpu-map": _global("    nbthread 2\n    cpu-map auto:1/1-2 0-1"),
    "no-hop+small-bufs": lambda cfg, port: VARIANTS["small-bufs"](cfg, port),
    "no-hop+reuse": lambda cfg, port: VARIANTS["reuse"](cfg, port),
    "no-hop+no-cache": _global("    tune.ssl.cachesize 0"),
    # stateless TLS session tickets instead of the server-side cache (resumption kept, no per-session state)
    "no-hop+tickets": lambda cfg, port: _global("    tune.ssl.cachesize 0")(
        cfg.replace(" no-tls-tickets", ""), port
    ),
    "no-hop+arena1": lambda cfg, _port: cfg,  # MALLOC_ARENA_MAX=1 in HAProxy's environment (ENV below)
    "no-hop+tickets+arena1": lambda cfg, port: VARIANTS["no-hop+tickets"](cfg, port),
    "no-hop+nbthread1": _global("    nbthread 1"),
    "no-hop+no-cache+no-tag": _global("    tune.ssl.cachesize 0"),  # -dMno-tag (ARGS below)
    "no-hop+tickets+no-tag": lambda cfg, port: VARIANTS["no-hop+tickets"](cfg, port),
    # not tried before: the scheduler favouring latency over batching (HAProxy 2.4+), and edge-triggered
    # polling (2.6, experimental: fewer epoll_ctl calls per event)
    "no-hop+low-latency": _global("    tune.sched.low-latency on"),
    "no-hop+edge-triggered": _global("    expose-experimental-directives\n    tune.fd.edge-triggered on"),
    # levers for the hop itself (passthrough on), each against `base` (round 9): `tcp-hop*` put the hop on a
    # loopback TCP port instead of the abstract socket (HOP below), which kernel splicing needs on both sides
    "tcp-hop": lambda cfg, _port: cfg,
    "tcp-hop+splice-auto": lambda cfg, _port: _hop_option(cfg, "option splice-auto"),
    "tcp-hop+splice": lambda cfg, _port: _hop_option(cfg, "option splice-request", "option splice-response"),
    "tcp-hop+splice+pipesize": lambda cfg, port: _global("    tune.pipesize 262144")(
        VARIANTS["tcp-hop+splice"](cfg, port), port
    ),
    "tcp-hop+smart": lambda cfg, _port: _hop_option(
        cfg, "option tcp-smart-accept", "option tcp-smart-connect"
    ),
    "tcp-hop+tfo": lambda cfg, _port: _sub(
        cfg, _HOP_SERVER_END, " send-proxy-v2 tfo\n\nfrontend fe_terminate"
    ),
    "nbthread1": _global("    nbthread 1"),
    # round 11, on the two-port layout's public port (each judged against `two-ports` with --against):
    # processes instead of threads, as nginx runs workers: N HAProxy processes of 1 thread each on the same
    # ports (HAProxy sets SO_REUSEPORT on Linux, the kernel spreads new connections), each with its own
    # runtime socket (PROCS below)
    "two-ports+2proc": _global("    nbthread 1"),
    "two-ports+nbthread1": _global("    nbthread 1"),
    "no-hop+2proc": _global("    nbthread 1"),  # for bench_gateway_memory.py (the same public frontend)
    "base+2proc": _global("    nbthread 1"),  # the one-port layout, each process with its own hop
    # without the TLS session cache (wrk --close resumes its session on every new connection: with N
    # processes, each with its own cache, about 1 in N resumptions finds it)
    "two-ports+no-cache": _global("    tune.ssl.cachesize 0"),
    "two-ports+2proc+no-cache": _global("    nbthread 1\n    tune.ssl.cachesize 0"),
    # per-request work on the terminating frontend, measured only (each is a feature the gateway keeps):
    # no X-Forwarded-For / X-Forwarded-Proto; no Host-vs-SNI 421 check (the set-vars and the first 421 rule)
    "two-ports+no-xff": lambda cfg, _port: _sub(
        _sub(cfg, "    option forwardfor\n", ""), "    http-request set-header X-Forwarded-Proto https\n", ""
    ),
    "two-ports+no-host-check": lambda cfg, _port: _drop_host_check(cfg),
    # the app backends' balancing: leastconn repositions the server in a shared tree on every stream (a
    # lock between threads); `first` is cheaper per request (measured only: it does not spread instances)
    "two-ports+balance-first": lambda cfg, _port: cfg.replace(
        "    balance leastconn\n", "    balance first\n"
    ),
    "two-ports+2proc+no-xff": lambda cfg, port: VARIANTS["two-ports+no-xff"](
        VARIANTS["two-ports+2proc"](cfg, port), port
    ),
    "inspect-delay-1s": lambda cfg, _port: _sub(cfg, "inspect-delay 5s", "inspect-delay 1s"),
    # the hop without PROXY v2 (the TLS frontend then sees the hop's address, not the client's: measured only)
    "no-proxy": lambda cfg, _port: _sub(
        _sub(cfg, " accept-proxy ssl", " ssl"), _HOP_SERVER_END, "\n\nfrontend fe_terminate"
    ),
}
_HOP_SERVER_END = " send-proxy-v2\n\nfrontend fe_terminate"  # the end of be_terminate's server line


def _drop_host_check(cfg: str) -> str:
    """fe_terminate without the Host-vs-SNI 421 rule: the SNI still selects the route (measured only)."""
    lines = cfg.splitlines(keepends=True)
    host_rule = [i for i, line in enumerate(lines) if "does not name the TLS server name" in line]
    host_var = [i for i, line in enumerate(lines) if "set-var(txn.host)" in line]
    if len(host_rule) != 1 or len(host_var) != 1:
        raise SystemExit("no single Host-vs-SNI rule in the rendered configuration")
    # the rule spans its line and the next (`unless ...`) when wrapped; it is one line as rendered
    return "".join(line for i, line in enumerate(lines) if i not in (host_rule[0], host_var[0]))


def _sub(cfg: str, old: str, new: str) -> str:
    if old not in cfg:
        raise SystemExit(f"{old!r} is not in the rendered configuration")
    return cfg.replace(old, new, 1)


# the hop's address per variant (default: an abstract unix socket per instance, as the driver renders it)
HOP_TCP = ("tcp-hop",)


def _hop_option(cfg: str, *options: str) -> str:
    """`options` in the ClientHello reader (fe_sni) and the hop's backend (be_terminate), both TCP mode."""
    extra = "".join(f"    {o}\n" for o in options)
    for section in ("frontend fe_sni\n    mode tcp\n", "backend be_terminate\n    mode tcp\n"):
        if section not in cfg:
            raise SystemExit(f"no {section.splitlines()[0]!r} in the rendered configuration")
        cfg = cfg.replace(section, section + extra, 1)
    return cfg


# command-line flags per variant: Debian builds HAProxy with DEBUG_MEMORY_POOLS, which tags every pool object
# (8 bytes after it, to catch frees into the wrong pool); -dMno-tag turns that off
ARGS: dict[str, list[str]] = {"no-hop+no-cache+no-tag": ["-dMno-tag"], "no-hop+tickets+no-tag": ["-dMno-tag"]}
# processes per variant (default 1): the same configuration, each process with its own runtime and metrics
# sockets, all binding the same ports
PROCS: dict[str, int] = {
    "two-ports+2proc": 2,
    "two-ports+2proc+no-xff": 2,
    "no-hop+2proc": 2,
    "base+2proc": 2,
    "two-ports+2proc+no-cache": 2,
}
# environment per variant: glibc's malloc keeps one arena per thread (up to 8 x cores); one arena for all
ENV: dict[str, dict[str, str]] = {
    "no-hop+arena1": {"MALLOC_ARENA_MAX": "1"},
    "no-hop+tickets+arena1": {"MALLOC_ARENA_MAX": "1"},
}


def t_975(dof: int) -> float:
    """Student's t 0.975 quantile: exact for 1..4 degrees of freedom, else the Cornish-Fisher expansion
    (Abramowitz & Stegun 26.7.5; error < 0.001 from 5 on)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}
    if dof in table:
        return table[dof]
    z = 1.959964
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def paired_ratio(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of per-pair ratios and its 95 % confidence interval (t on the log ratios)."""
    logs = [math.log(r) for r in ratios if r > 0]
    n = len(logs)
    if n < 2:
        return (math.exp(logs[0]) if logs else float("nan"), float("nan"), float("nan"))
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = t_975(n - 1) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def judge(low: float, high: float, *, higher_is_better: bool) -> str:
    """met / not met / undecidable for a ratio's interval against 1.0."""
    if math.isnan(low):
        return "undecidable"
    good, bad = (low >= 1.0, high < 1.0) if higher_is_better else (high <= 1.0, low > 1.0)
    return "met" if good else "not met" if bad else "undecidable"


# short names of the baselines for --verdict / --against
BASELINES = {"nginx": "nginx same SNI routing", "nginx-split": "nginx same split", "direct": "direct"}


def verdict(
    targets: dict[str, tuple[int, int]],
    candidates: list[str],
    pairs: int,
    seconds: int,
    budget_s: float,
    bases: tuple[str, ...] = ("nginx same SNI routing",),
    wrk_extra: tuple[str, ...] = (),
) -> None:
    """The goal's statistical verdict (module docstring): paired base / candidate runs, interleaved, for
    every candidate against every base."""
    port_of = {n.removeprefix("haproxy "): port for n, (port, _pid) in targets.items()}
    combos = [(c, b) for b in bases for c in candidates if c != b]
    got: dict[tuple[str, str], list[tuple[dict[str, float], dict[str, float]]]] = {cb: [] for cb in combos}
    deadline = time.monotonic() + budget_s
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for i in range(pairs):
        if time.monotonic() + 2 * seconds * len(combos) > deadline:
            print(f"budget of {budget_s:.0f} s reached after {i} pairs", flush=True)
            break
        for k, (c, base) in enumerate(combos):
            order = [base, c] if (i + k) % 2 == 0 else [c, base]
            res = {n: bg.wrk(f"https://{bg.HOST}:{port_of[n]}/", seconds, *wrk_extra) for n in order}
            got[(c, base)].append((res[c], res[base]))
            print(
                f"pair {i + 1} {c}: {res[c]['rps']:.0f} vs {base} {res[base]['rps']:.0f} req/s "
                f"({res[c]['rps'] / max(res[base]['rps'], 1):.2f}x), p99 {res[c]['p99']:.2f} vs "
                f"{res[base]['p99']:.2f} ms",
                flush=True,
            )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        "\n| candidate | against | pairs | req/s ratio (geo. mean) | 95 % CI | req/s | p99 ratio | 95 % CI "
        "| p99 | pairs won | errors | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (c, base), rs in got.items():
        rps = paired_ratio([a["rps"] / b["rps"] for a, b in rs if b["rps"] > 0])
        p99 = paired_ratio([a["p99"] / b["p99"] for a, b in rs if b["p99"] > 0 and a["p99"] > 0])
        v_rps = judge(rps[1], rps[2], higher_is_better=True)
        v_p99 = judge(p99[1], p99[2], higher_is_better=False)
        overall = (
            "met"
            if v_rps == v_p99 == "met"
            else "not met"
            if "not met" in (v_rps, v_p99)
            else "undecidable on this machine"
        )
        won = sum(1 for a, b in rs if a["rps"] > b["rps"])
        errors = sum(a["errors"] + b["errors"] for a, b in rs)
        print(
            f"| {c} | {base} | {len(rs)} | {rps[0]:.3f} | {rps[1]:.3f}–{rps[2]:.3f} | {v_rps} | {p99[0]:.3f} "
            f"| {p99[1]:.3f}–{p99[2]:.3f} | {v_p99} | {won}/{len(rs)} | {errors:.0f} | {overall} |"
        )


class Haproxy:
    """One HAProxy of a variant: the driver's rendered configuration (its maps and certificates), its own
    sockets and port, its own session (as the driver starts it)."""

    def __init__(self, tmp: Path, name: str, base_cfg: str, driver: HaproxyDriver, port: int) -> None:
        self.dir = tmp / f"variant-{name}"
        self.dir.mkdir(mode=0o700)
        paths = driver.paths
        cfg = base_cfg
        cfg = cfg.replace(paths.admin_socket, str(self.dir / "admin.sock"))
        cfg = cfg.replace(paths.metrics_socket, str(self.dir / "metrics.sock"))
        hop = (
            f"unix@{self.dir}/term.sock"
            if name == "unix-path"
            else f"127.0.0.1:{bg.free_port()}"
            if name.startswith(HOP_TCP)
            else f"abns@teecloud-bench-{name}-{port}"
        )
        cfg = cfg.replace(f"abns@{paths.terminate_socket}", hop)
        cfg = cfg.replace(f"bind 127.0.0.1:{driver.port}", f"bind 127.0.0.1:{port}")
        if driver.limits.passthrough_port:  # its own passthrough port too
            cfg = cfg.replace(
                f"bind 127.0.0.1:{driver.limits.passthrough_port}", f"bind 127.0.0.1:{bg.free_port()}"
            )
        cfg = VARIANTS[name](cfg, f"127.0.0.1:{port}")
        (self.dir / "haproxy.cfg").write_text(cfg)
        check = subprocess.run(["haproxy", "-c", "-f", str(self.dir / "haproxy.cfg")], capture_output=True)
        if check.returncode != 0:
            raise SystemExit(f"variant {name}: {check.stderr.decode()[-2000:]}")
        self.admin_socket = str(self.dir / "admin.sock")
        self.procs: list[subprocess.Popen[bytes]] = []
        for k in range(PROCS.get(name, 1)):
            # process k > 0: the same configuration with its own runtime and metrics sockets
            conf = self.dir / ("haproxy.cfg" if k == 0 else f"haproxy-{k}.cfg")
            if k:  # its own sockets, and its own hop (an abstract socket cannot be bound twice)
                conf.write_text(
                    cfg.replace(self.admin_socket, str(self.dir / f"admin-{k}.sock"))
                    .replace(str(self.dir / "metrics.sock"), str(self.dir / f"metrics-{k}.sock"))
                    .replace(f"{hop} ", f"{hop}-{k} ")
                )
            self.procs.append(
                subprocess.Popen(
                    ["haproxy", "-W", "-db", *ARGS.get(name, []), "-f", str(conf)],
                    env={**os.environ, **ENV.get(name, {})},
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.proc = self.procs[0]
        self.port = port
        time.sleep(0.5)
        for proc in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"variant {name}: a HAProxy process exited at start ({proc.returncode})")

    def pids(self) -> list[int]:
        """Every process of every HAProxy of the variant (masters and workers)."""
        return [pid for proc in self.procs for pid in bg.tree_pids(proc.pid)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-memory", action="store_true", help="req/s only (bench_gateway_memory.py: memory)")
    ap.add_argument("--verdict", default="", help="candidates for the statistical verdict (module docstring)")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--pair-seconds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=900.0)
    ap.add_argument(
        "--close", action="store_true", help="verdict on new TLS connections/s (Connection: close) instead"
    )
    ap.add_argument(
        "--against",
        default="nginx",
        help="the verdict's baselines, comma-separated: nginx, nginx-split, direct or variants",
    )
    args = ap.parse_args()
    candidates = [BASELINES.get(c, c) for c in args.verdict.split(",") if c]
    against = tuple(BASELINES.get(b, b) for b in args.against.split(",") if b)
    names = [n for n in [*candidates, *against] if n not in BASELINES.values()] if candidates else []
    names = list(dict.fromkeys(names or args.variants.split(",")))
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}: one of {', '.join(VARIANTS)}")
    if not 1 <= args.pairs <= 200 or not 1 <= args.pair_seconds <= 30:
        raise SystemExit("--pairs is 1..200 and --pair-seconds 1..30")
    bt = bg.BenchTls("teecloud-bench-gwv-")
    tmp, ca, cert, tls = bt.tmp, bt.ca, bt.cert, bt.nginx
    b_port, d_port, n_port, s_port, g_port = (bg.free_port() for _ in range(5))
    procs: list[subprocess.Popen[bytes]] = []
    haproxies: dict[str, Haproxy] = {}
    drivers: list[HaproxyDriver] = []
    driver = None
    try:
        procs.append(bg.start_backend(tmp / "backend", b_port))
        direct = bg.start_nginx(
            tmp / "direct",
            f"server {{ listen 127.0.0.1:{d_port} ssl; {tls} "
            'location / { return 200 "hello world\\n"; } }',
            2,
        )
        procs.append(direct)
        nginx_gw = bg.start_nginx(tmp / "nginx-gw", bg.nginx_routing(b_port, n_port, tls), 2)
        procs.append(nginx_gw)
        sock = tmp / "nginx-split" / "term.sock"
        split = bg.start_nginx(
            tmp / "nginx-split",
            f"upstream app {{ server 127.0.0.1:{b_port}; keepalive 64; }}\n"
            f"server {{ listen unix:{sock} ssl proxy_protocol default_server; {tls} return 421; }}\n"
            f"server {{ listen unix:{sock} ssl proxy_protocol; server_name {bg.HOST}; {tls}\n"
            "  location / { proxy_pass http://app; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; } }',
            2,
            stream=f"stream {{\n  map_hash_bucket_size 128;\n"
            f"  map $ssl_preread_server_name $to {{ {bg.APP}-8443s.{bg.BASE} 127.0.0.1:{d_port}; "
            f"default unix:{sock}; }}\n"
            f"  server {{ listen 127.0.0.1:{s_port}; ssl_preread on; proxy_pass $to; "
            "proxy_protocol on; }\n}",
        )
        procs.append(split)
        # the driver renders the configuration (maps, certificates) of one route; variants start from it
        driver = HaproxyDriver(
            tmp / "gw",
            base_domain=bg.BASE,
            port=g_port,
            cert=cert,
            chain_pem=ca.cert_pem,
            limits=DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2),
        ).start()
        driver.apply([Route(bg.APP, bg.INST, 8080, f"127.0.0.1:{b_port}")])
        base_cfg = Path(driver.paths.config).read_text()
        # the same route, rendered without passthrough names: no ClientHello reader, no hop
        direct_driver = HaproxyDriver(
            tmp / "gw-direct",
            base_domain=bg.BASE,
            port=bg.free_port(),
            cert=cert,
            chain_pem=ca.cert_pem,
            limits=DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2, passthrough=False),
        ).start()
        drivers.append(direct_driver)
        direct_driver.apply([Route(bg.APP, bg.INST, 8080, f"127.0.0.1:{b_port}")])
        no_hop_cfg = Path(direct_driver.paths.config).read_text()
        # the same route with passthrough on a second port: the public port terminates, no hop
        two_driver = HaproxyDriver(
            tmp / "gw-two-ports",
            base_domain=bg.BASE,
            port=bg.free_port(),
            cert=cert,
            chain_pem=ca.cert_pem,
            limits=DataPlaneLimits(
                http_backends=8, tcp_backends=8, servers_per_backend=2, passthrough_port=bg.free_port()
            ),
        ).start()
        drivers.append(two_driver)
        two_driver.apply([Route(bg.APP, bg.INST, 8080, f"127.0.0.1:{b_port}")])
        two_cfg = Path(two_driver.paths.config).read_text()
        for name in names:
            src, drv = (
                (no_hop_cfg, direct_driver)
                if name.startswith("no-hop")
                else (two_cfg, two_driver)
                if name.startswith("two-ports")
                else (base_cfg, driver)
            )
            haproxies[name] = Haproxy(tmp, name, src, drv, bg.free_port())
        targets: dict[str, tuple[int, int]] = {
            "direct": (d_port, direct.pid),
            "nginx same SNI routing": (n_port, nginx_gw.pid),
            "nginx same split": (s_port, split.pid),
            **{f"haproxy {n}": (h.port, h.proc.pid) for n, h in haproxies.items()},
        }
        tree_of = {f"haproxy {n}": h.pids() for n, h in haproxies.items()}
        if candidates:
            verdict(
                targets,
                candidates,
                args.pairs,
                args.pair_seconds,
                args.budget_s,
                against,
                ("-H", "Connection: close") if args.close else (),
            )
            return
        # memory first, on fresh processes (bench_gateway explains why)
        mem = {
            n: float("nan")
            if args.no_memory
            else bg.idle_memory(port, bg.HOST, ca.cert_pem, tree_of.get(n) or bg.tree_pids(pid))
            for n, (port, pid) in targets.items()
        }
        order = list(targets)
        rounds: dict[str, list[dict[str, float]]] = {n: [] for n in order}
        for r in range(args.rounds):
            for n in order[r % len(order) :] + order[: r % len(order)]:
                port, _pid = targets[n]
                res = bg.wrk(f"https://{bg.HOST}:{port}/", args.seconds)
                rounds[n].append(res)
                print(f"round {r + 1} {n}: {res['rps']:.0f} req/s p99 {res['p99']:.1f} ms", flush=True)
        print(
            "\n| variant | req/s (median) | p99 ms | errors | / nginx same routing | / nginx same split "
            "| / direct | p99 / nginx's | KiB / idle TLS conn |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for n in order:
            rs = rounds[n]

            def ratio(base: str, key: str = "rps", rs: list[dict[str, float]] = rs) -> float:
                return bg.median([a[key] / b[key] for a, b in zip(rs, rounds[base], strict=True)])

            print(
                f"| {n} | {bg.median([x['rps'] for x in rs]):.0f} | {bg.median([x['p99'] for x in rs]):.1f} "
                f"| {sum(x['errors'] for x in rs):.0f} | {ratio('nginx same SNI routing'):.2f} "
                f"| {ratio('nginx same split'):.2f} | {100 * ratio('direct'):.0f} % "
                f"| {ratio('nginx same SNI routing', 'p99'):.2f} | {mem[n]:.1f} |"
            )
        print("\nper round req/s:")
        for n in order:
            print(f"  {n}: " + ", ".join(f"{x['rps']:.0f}" for x in rounds[n]))
    finally:
        for h in haproxies.values():
            h.stop()
        for d in [driver, *drivers]:
            if d is not None:
                d.stop()
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
