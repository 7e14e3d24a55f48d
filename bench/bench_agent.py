"""Guest-agent throughput over its Unix socket: GetKey and GetQuote requests/s with concurrent clients.

    python3 bench/bench_agent.py [--seconds 5] [--procs 2] [--conns 8] [--httpx]

The agent (AgentRunner: one uvicorn server, one event loop) runs in its own process on the simulated TDX
platform with the dev key provider. Load comes from `--procs` client processes with `--conns` keep-alive
connections each; by default a minimal HTTP/1.1 client on raw sockets (so the load generator costs little
CPU on a 2-core machine), with --httpx the same through httpx's UDS transport (what dstack-sdk uses).
Baseline in the same run: `Version` (no crypto: the HTTP stack's ceiling). Goals: GetKey >= 3000/s,
GetQuote >= 1000/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

GOALS = {"GetKey": 3000, "GetQuote": 1000}


def _serve(sock_path: str, home: str, ready: mp.Event, stop: mp.Event) -> None:  # type: ignore[valid-type]
    os.environ["TEECLOUD_HOME"] = home
    import logging

    logging.disable(logging.WARNING)
    from teecloud.agent import AgentRunner, LocalDevKeyProvider, boot
    from teecloud.tee.simulated import SimulatedTdx

    compose = json.dumps({"runner": "docker-compose", "name": "bench", "docker_compose_file": "services: {}"})
    state = boot(SimulatedTdx(), compose, None, None, LocalDevKeyProvider())
    with AgentRunner(state, dstack_sock=Path(sock_path)):
        ready.set()
        stop.wait()


def _request(method: str, body: bytes) -> bytes:
    return (
        f"POST /{method} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _raw_worker(sock_path: str, payloads: list[bytes], deadline: float, out: list[int]) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    n, i, buf = 0, 0, b""
    while time.perf_counter() < deadline:
        s.sendall(payloads[i % len(payloads)])
        i += 1
        while True:  # read one response: headers, then Content-Length bytes
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                head = buf[:head_end].lower()
                cl_at = head.find(b"content-length:")
                length = int(head[cl_at + 15 :].split(b"\r\n", 1)[0])
                total = head_end + 4 + length
                if len(buf) >= total:
                    if not buf.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(buf[:200])
                    buf = buf[total:]
                    break
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            buf += chunk
        n += 1
    s.close()
    out.append(n)


def _httpx_worker(sock_path: str, method: str, bodies: list[dict], deadline: float, out: list[int]) -> None:
    import httpx

    n = 0
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock_path), base_url="http://localhost") as c:
        while time.perf_counter() < deadline:
            c.post(f"/{method}", json=bodies[n % len(bodies)]).raise_for_status()
            n += 1
    out.append(n)


def _client_proc(
    sock_path: str, method: str, conns: int, seconds: float, use_httpx: bool, q: mp.Queue
) -> None:  # type: ignore[type-arg]
    if method == "GetKey":
        bodies = [{"path": f"bench/{i % 8}", "purpose": "bench", "algorithm": "secp256k1"} for i in range(64)]
    elif method == "GetQuote":
        bodies = [{"report_data": os.urandom(32).hex()} for _ in range(64)]
    else:
        bodies = [{}]
    deadline = time.perf_counter() + seconds
    out: list[int] = []
    if use_httpx:
        threads = [
            threading.Thread(target=_httpx_worker, args=(sock_path, method, bodies, deadline, out))
            for _ in range(conns)
        ]
    else:
        payloads = [_request(method, json.dumps(b).encode()) for b in bodies]
        threads = [
            threading.Thread(target=_raw_worker, args=(sock_path, payloads, deadline, out))
            for _ in range(conns)
        ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(sum(out))


def run(method: str, sock_path: str, *, procs: int, conns: int, seconds: float, use_httpx: bool) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [
        ctx.Process(target=_client_proc, args=(sock_path, method, conns, seconds, use_httpx, q))
        for _ in range(procs)
    ]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    total = sum(q.get(timeout=seconds + 60) for _ in ps)
    for p in ps:
        p.join()
    elapsed = time.perf_counter() - t0
    # spawn start-up (~0.3 s) is inside `elapsed` but not inside the clients' measured window
    del elapsed
    return total / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument(
        "--httpx", action="store_true", help="load through httpx (like dstack-sdk) instead of raw sockets"
    )
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="tcb-", dir="/tmp"))
    sock = str(tmp / "dstack.sock")
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(target=_serve, args=(sock, str(tmp / "home"), ready, stop))
    server.start()
    if not ready.wait(60):
        sys.exit("agent did not start")
    try:
        import uvicorn

        loop = "uvloop" if _has("uvloop") else "asyncio"
        http = "httptools" if _has("httptools") else "h11"
        print(
            f"# guest agent over a Unix socket; uvicorn {uvicorn.__version__} ({loop}, {http}); "
            f"{os.cpu_count()} CPUs; {args.procs} client procs x {args.conns} conns; "
            f"{'httpx' if args.httpx else 'raw-socket'} clients; {args.seconds:.0f} s per method"
        )
        print(f"{'method':<10} {'req/s':>9} {'goal':>7}  verdict")
        for method in ("Version", "GetKey", "GetQuote"):
            rps = run(
                method, sock, procs=args.procs, conns=args.conns, seconds=args.seconds, use_httpx=args.httpx
            )
            goal = GOALS.get(method)
            verdict = "baseline" if goal is None else ("meets goal" if rps >= goal else "BELOW goal")
            print(f"{method:<10} {rps:9.0f} {goal or '':>7}  {verdict}")
    finally:
        stop.set()
        server.join(20)
        if server.is_alive():
            server.terminate()


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


if __name__ == "__main__":
    main()
