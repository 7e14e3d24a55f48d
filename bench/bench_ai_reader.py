"""The verifying proxy's upstream reading, alone: CPU per streamed event of `UpstreamClient` reading a paced
SSE answer as the proxy's stream reads it (this tree: `aiter_raw` directly; a tree that has
`teecloud.ai.proxy._coalesced`, i.e. before AI round 8: through it, as that proxy did), against a raw
asyncio server in its own process (no model, no front: the client side of one hop, nothing else).

    python3 bench/bench_ai_reader.py [--before SRC] [--events 256] [--gap-ms 2] [--answers 20] [--runs 4]

Each run is a process of its own (the trees alternate, this tree first); the figure is that process's CPU
time (time.process_time) over the timed answers, per event; medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _server(ready: object, stop: object, events: int, gap_s: float) -> None:
    import asyncio

    chunk = {
        "id": "x",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": " tok"}}],
    }
    line = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    framed = b"%x\r\n%s\r\n" % (len(line), line)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                req = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(x.split(b":", 1)[1])
                    for x in req.split(b"\r\n")
                    if x.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                writer.write(head)
                start = loop.time()
                for k in range(events):  # one write per event, paced by the clock
                    writer.write(framed)
                    await asyncio.sleep(max(0.0, start + (k + 1) * gap_s - loop.time()))
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.put(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        while not stop.is_set():  # type: ignore[attr-defined]
            await asyncio.sleep(0.1)

    asyncio.run(main())


def _client(src: str, port: int, events: int, answers: int) -> float:
    """CPU µs per event of this process reading `answers` answers (after 3 untimed)."""
    sys.path.insert(0, src)
    import time

    from teecloud.ai import proxy
    from teecloud.ai._upstream import UpstreamClient

    coalesced = getattr(proxy, "_coalesced", None)

    async def main() -> float:
        client = UpstreamClient(f"http://127.0.0.1:{port}")
        cpu = 0.0
        for i in range(answers + 3):
            t0 = time.process_time()
            resp = await client.post("/v1/chat/completions", b"{}", {"content-type": "application/json"})
            pieces = resp.aiter_raw() if coalesced is None else coalesced(resp.aiter_raw())
            size = 0
            async for piece in pieces:
                size += len(piece)
            if i >= 3:
                cpu += time.process_time() - t0
        await client.aclose()
        return cpu * 1e6 / (answers * events)

    import uvloop

    return uvloop.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="another tree's src/ (e.g. git archive main src | tar -x -C /tmp/base)")
    ap.add_argument("--events", type=int, default=256)
    ap.add_argument("--gap-ms", type=float, default=2.0)
    ap.add_argument("--answers", type=int, default=20)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--client", nargs=2, metavar=("SRC", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(_client(args.client[0], int(args.client[1]), args.events, args.answers))
        return
    import os

    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_server, args=(ready, stop, args.events, args.gap_ms / 1000), daemon=True)
    server.start()
    port = ready.get(timeout=30)
    trees = {"this tree": str(ROOT / "src")} | ({"before": args.before} if args.before else {})
    got: dict[str, list[float]] = {k: [] for k in trees}
    load = os.getloadavg()[0]
    try:
        for _ in range(args.runs):
            for name, src in trees.items():
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--events",
                        str(args.events),
                        "--answers",
                        str(args.answers),
                        "--client",
                        src,
                        str(port),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": ""},
                )
                got[name].append(float(out.stdout.strip().splitlines()[-1]))
    finally:
        stop.set()
        server.join(5)
    print(
        f"{args.answers} answers x {args.events} events {args.gap_ms} ms apart, {args.runs} runs per tree; "
        f"load avg {load:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    for name, xs in got.items():
        runs = ", ".join(f"{x:.1f}" for x in xs)
        print(f"- {name}: {statistics.median(xs):.1f} µs CPU per event (runs: {runs})")


if __name__ == "__main__":
    main()
