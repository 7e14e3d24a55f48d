"""Confidential inference overhead: tokens/s and time to first token (TTFT) through the attested app's front
and through the verifying proxy, against the engine called directly, on the same model in the same run; and
receipts signed per second.

    python3 bench/bench_ai.py [--models small,medium] [--configs today,gpu-like] [--requests 12]
                              [--tokens 64] [--threads 2] [--relays thread|process] [--pin]
                              [--mode stream|plain|both] [--before SRC] [--proxy-loops uvloop,asyncio]

The stack is the tests' (tests/ai/conftest.py): a simulated CVM and guest agent, llama-cpp-python's server
(the real engine) on a random-weight llama GGUF written here (`small`: ~25 M parameters, 100 MB f32), the
teecloud.ai front, the verifying proxy (attested once, then each streamed answer's receipt is fetched and
checked at its end; once without E2EE, once with it). One client, streamed chat completions, EOS
suppressed so each answer has --tokens tokens, each prompt new; the paths are interleaved request by
request in a shuffled order so machine load (shared, 2 cores) hits them alike.
`--relays thread` runs the front and the proxies as threads of this (the client's) process, sharing its GIL;
`--relays process` runs each in its own process, as deployed (the front in the CVM, the proxy beside the
client). `--pin` (with --threads 1) pins the engine to CPU 0 and this process and the relays to CPU 1, so the
engine and the relays do not take turns on the same core (the machine's other work still runs on both).
`--mode plain` times non-streamed completions too (tokens from the answer's usage). `--before SRC` adds the
front and proxies of another tree (e.g. `git archive <base> src | tar -x -C /tmp/base`), so a change is
measured before/after in the same run. "decode rate" is tokens/s from the first token to the last (the
relays' cost per token, without the fixed per-answer costs at either end). With `--relays process`, each
verifying proxy's own CPU per answer and per token is printed too (its threads' time on a CPU over the timed
answers, less its idle rate measured just before).
`--configs` runs several engine setups one after the other in this run, each labelled: `today` (llama.cpp
on 2 threads: both cores) and `gpu-like` (1 thread: a core left to the host, as a GPU engine leaves the CPU;
the same engine for the direct and the proxied paths); `--models` does the same per model size (`medium`:
tens of tokens/s). `--proxy-loops` runs one plain proxy per event loop side by side.
Goals (issue 21): >= 98 % of direct throughput, <= 5 ms added to the first token.

The goals' statistical verdict (like bench_gateway_variants.py --verdict):

    python3 bench/bench_ai.py --verdict [--requests 40] [--budget-s 900] [--models small] [--configs today]

runs --requests interleaved rounds (relays as processes), paired within the round. Since AI round 8 a round
(`--pairing palindrome`, one_round) gives every path the same prompt, put in the engine's prompt cache
first by an untimed 1-token request, so every path gets the same answer from the same cache state, and runs
the paths in a shuffled order and then mirrored (A B C D D C B A); rounds 5-7 (`--pairing shuffled`) ran
every path once with a prompt of its own, whose answers differ in their number of content chunks: most of
that method's spread. `--configs synthetic` puts a paced synthetic engine (NOT a model: --tokens chunks
--synthetic-gap-ms apart by the clock, as a GPU paces them) in place of llama.cpp: no engine variance.
Paths: the engine direct, the attested app, the verifying proxy
(inline receipts: the default), with E2EE, and a proxy that fetches each receipt (`receipts="fetch"`, the
protocol before inline receipts). Over the rounds, per path: the geometric mean of the throughput ratios
(tokens/s end to end, path / direct) with a 95 % interval (Student's t on the log ratios), and the mean added
time to the first token with a 95 % t interval; per goal: met (the whole interval on the good side of the
goal), not met (the whole interval on the bad side) or undecidable on this machine (it straddles the goal).
Bounded: at most --requests rounds and --budget-s seconds of them (what is done by then is reported).
The TTFT goal is judged on rounds of its own first (--ttft-rounds of --ttft-tokens-token answers, at most a
quarter of the budget): short answers give many more pairs in the same time, so its interval narrows. The
throughput rows also give the decode rate's ratio (first to last token: the per-token cost without the fixed
per-answer costs, which the TTFT goal covers). `--with-fetch` adds the fetch-mode proxy as a path.
A quick verdict for a quiet machine (≤ 12 minutes; docs/benchmarks.md):

    python3 bench/bench_ai.py --verdict --configs gpu-like --requests 250 --ttft-rounds 800 --tokens 64 \
        --budget-s 560 --no-extras

The proxies' CPU is printed per answer and per token over all timed answers, and split (from the short
rounds' CPU per answer against the long rounds') into a cost per answer and one per token.

Where the first token's time goes, stage by stage (perf_counter marks on the path, the relays as threads of
this process in front of a synthetic engine whose first event comes at once):

    python3 bench/bench_ai.py --spans --requests 60

and what each path adds to the first event on that synthetic engine with the relays as processes (paired
interleaved rounds; `--before SRC` adds another tree's front and proxies to the same run):

    python3 bench/bench_ai.py --hops --requests 200 [--before SRC]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]


def one(http: object, url: str, tokens: int, i: int) -> tuple[float, float, int, float]:
    """(ttft_s, total_s, content chunks, last_s: time of the last content chunk) of one streamed chat
    completion; total_s ends with the stream (after [DONE], which the proxy releases once the receipt
    verifies)."""
    import httpx

    assert isinstance(http, httpx.Client)
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": f"request {i:04d}: hello world, tell me about the model"}],
        "max_tokens": tokens,
        "stream": True,
        "temperature": 0,
        "logit_bias": {"2": -100},
    }
    t0 = time.perf_counter()
    first, last, n = 0.0, 0.0, 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            assert "error" not in doc, doc
            if doc["choices"] and doc["choices"][0]["delta"].get("content"):
                n += 1
                last = time.perf_counter() - t0
                if not first:
                    first = last
    return first, time.perf_counter() - t0, n, last


def one_plain(http: object, url: str, tokens: int, i: int) -> tuple[float, float, int, float]:
    """The same for a non-streamed chat completion: (total_s, total_s, completion tokens, total_s); the
    proxy answers once the receipt verifies."""
    import httpx

    assert isinstance(http, httpx.Client)
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": f"request {i:04d}: hello world, tell me about the model"}],
        "max_tokens": tokens,
        "temperature": 0,
        "logit_bias": {"2": -100},
    }
    t0 = time.perf_counter()
    r = http.post(url + "/v1/chat/completions", json=body)
    total = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return total, total, int(r.json()["usage"]["completion_tokens"]), total


def _relay_main(kind: str, args: dict[str, object], ready: object, stop: object) -> None:
    """A relay in its own process (spawned): the front, keys and quotes through the guest API socket as the
    example app does; or the verifying proxy. Puts its URL on `ready`, serves until `stop` is set."""
    import logging

    logging.disable(logging.WARNING)
    if args.get("src"):  # another tree's teecloud (nothing of teecloud is imported yet in this process)
        sys.path.insert(0, str(args["src"]))
    from teecloud.ai._http import Listener

    if kind == "front":
        from dstack_sdk import DstackClient

        from teecloud.ai.server import keys_from_guest_api, make_inference_app

        guest = DstackClient(str(args["sock"]), timeout=30)

        def quote(report_data: bytes) -> dict[str, str]:
            q = guest.get_quote(report_data)
            return {"quote": q.quote, "event_log": q.event_log, "vm_config": q.vm_config}

        from teecloud.ai.server import InferenceConfig

        config = InferenceConfig(**args["config"])  # type: ignore[arg-type]
        app = make_inference_app(config, keys_from_guest_api(guest), quote)
    else:
        from teecloud.ai.proxy import ProxyPolicy, make_proxy_app
        from teecloud.peer import PeerPolicy, PeerVerifier, StaticCollateral
        from teecloud.tee.simulated import SimulatedTdx

        tee = SimulatedTdx(Path(str(args["home"])))
        verifier = PeerVerifier(PeerPolicy.dev(tee.dev_root_der()), StaticCollateral(tee.collateral))
        import dataclasses

        known = {f.name for f in dataclasses.fields(ProxyPolicy)}  # another tree's policy may have fewer
        policy = {k: v for k, v in args["policy"].items() if k in known}  # type: ignore[attr-defined]
        app = make_proxy_app(str(args["upstream"]), verifier, ProxyPolicy(**policy))
    loop = str(args.get("loop") or "default")
    if loop == "default" and kind == "proxy":  # as `teecloud ai proxy` serves it (older trees: their default)
        from teecloud.ai import proxy as proxy_module

        chosen = getattr(proxy_module, "proxy_event_loop", None)
        loop = chosen() if chosen is not None else "default"
    elif loop == "default":  # the front as examples/llm/app.py serves it (older trees: asyncio)
        from teecloud.ai import _http

        chosen = getattr(_http, "fast_event_loop", None)
        loop = chosen() if chosen is not None else "default"
    extra = {} if loop == "default" else {"loop": loop}
    with Listener(app, name=f"bench-{kind}", **extra) as listener:
        ready.put(listener.url)  # type: ignore[attr-defined]
        stop.wait()  # type: ignore[attr-defined]


class RelayProcess:
    """Context manager: `_relay_main` in a spawned process; `.url` once it serves."""

    def __init__(self, kind: str, **args: object) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.ready, self.stop = ctx.Queue(), ctx.Event()
        self.proc = ctx.Process(target=_relay_main, args=(kind, args, self.ready, self.stop), daemon=True)
        self.url = ""

    def __enter__(self) -> RelayProcess:
        self.proc.start()
        self.url = self.ready.get(timeout=120)
        return self

    def cpu_s(self) -> float:
        """The relay process's CPU time so far: every thread's time on a CPU (/proc/<pid>/task/*/schedstat,
        nanoseconds; threads that ended are not counted: the relays' threads live as long as they do)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def pin_engine(pid: int, cpu: int) -> None:
    """Pin every thread of the engine process to `cpu` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass


def receipts_per_second(home: Path, seconds: float = 2.0) -> tuple[float, float]:
    from tests.ai._keys import app_keys

    from teecloud.ai import ReceiptBody, ReceiptLog, sign_receipt

    keys = app_keys()

    def body(i: int) -> ReceiptBody:
        h = hashlib.sha256(str(i).encode()).digest()
        return ReceiptBody(
            f"r{i}", keys.keyset.app_id, keys.keyset.digest(), "m", h, h, h, False, False, 1, 2
        )

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sign_receipt(body(n), keys.signing_secret, keys.keyset)
        n += 1
    signed = n / (time.perf_counter() - t0)
    log = ReceiptLog(home / "bench-log")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        log.append(sign_receipt(body(n), keys.signing_secret, keys.keyset))
        n += 1
    return signed, n / (time.perf_counter() - t0)


def attestation_costs(front_url: str, home: Path, n: int = 10) -> tuple[float, float]:
    """(median ms of GET /v1/attestation/report: GetQuote through the guest API; median ms of a simulated
    GPU's SPDM evidence, collected and verified with attestation/nvidia.py)."""
    import httpx

    from teecloud.ai.gpu import SimulatedGpu, verify_gpu_evidence

    report = []
    for i in range(n):
        t0 = time.perf_counter()
        httpx.get(front_url + "/v1/attestation/report", params={"nonce": f"{i:064x}"}).raise_for_status()
        report.append(time.perf_counter() - t0)
    gpu, gpu_times = SimulatedGpu(home / "gpu"), []
    for _ in range(n):
        nonce = os.urandom(32)
        t0 = time.perf_counter()
        verify_gpu_evidence(
            gpu.collect(nonce), trust_anchors=[gpu.root_der()], expected_nonce=nonce, now=int(time.time())
        )
        gpu_times.append(time.perf_counter() - t0)
    return statistics.median(report) * 1000, statistics.median(gpu_times) * 1000


def relay_cost(s: object, events: int = 400, rounds: int = 5) -> dict[str, float]:
    """Microseconds each hop adds per streamed event, measured on a synthetic engine (labelled: NOT a model)
    that streams `events` OpenAI-shaped SSE chunks at once, so only the relays' own cost is timed."""
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from teecloud.ai._http import Listener
    from teecloud.ai.server import InferenceConfig, make_inference_app

    chunk = {
        "id": "x",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "tok"}}],
    }
    line = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    synthetic = FastAPI()

    @synthetic.post("/v1/chat/completions")
    async def stream() -> StreamingResponse:
        async def gen():  # type: ignore[no-untyped-def]
            for _ in range(events):
                yield line
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @synthetic.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"data": []}

    home = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    with contextlib.ExitStack() as cleanup, Listener(synthetic, name="synthetic-engine") as eng:
        cleanup.callback(shutil.rmtree, home, ignore_errors=True)
        config = InferenceConfig("tiny-llama", bytes(32), eng.url, home / "receipts")
        front = make_inference_app(config, s.keys, s.quote)  # type: ignore[attr-defined]
        with (
            Listener(front, name="relay-front") as f,
            s.proxy(f.url, e2ee=False) as p,  # type: ignore[attr-defined]
            s.proxy(f.url, e2ee=True) as pe,  # type: ignore[attr-defined]
        ):
            paths = {
                "synthetic engine": eng.url,
                "front": f.url,
                "front + proxy": p.url,
                "front + proxy, E2EE": pe.url,
            }
            times: dict[str, list[float]] = {k: [] for k in paths}
            firsts: dict[str, list[float]] = {k: [] for k in paths}
            with httpx.Client(timeout=120) as http:
                for _ in range(rounds + 1):
                    for name, url in paths.items():
                        t0 = time.perf_counter()
                        n = one(http, url, 16, 0)
                        times[name].append(time.perf_counter() - t0)
                        firsts[name].append(n[0])
                        assert n[2] == events, (name, n)
    base = statistics.median(times["synthetic engine"][1:])
    first = statistics.median(firsts["synthetic engine"][1:])
    out = {k: (statistics.median(v[1:]) - base) / events * 1e6 for k, v in times.items()}
    # Time to the first event over the synthetic engine's (its first event comes at once: the relays' own
    # per-request cost, the added TTFT without a model's compute competing for the CPU).
    out |= {f"{k} TTFT": (statistics.median(v[1:]) - first) * 1e6 for k, v in firsts.items()}
    return out


def _synthetic_main(ready: object, stop: object, events: int, gap_s: float) -> None:
    """A synthetic engine in its own process (labelled: NOT a model): `events` OpenAI-shaped chunks (fewer
    when the request's max_tokens says so), the first at once and then one per `gap_s`, then [DONE]; only
    the relays' own time shows in front of it."""
    import asyncio
    import logging

    logging.disable(logging.WARNING)
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    from teecloud.ai._http import Listener

    chunk = {
        "id": "chatcmpl-synthetic",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "tiny-llama",
        "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}],
    }
    line = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    app = FastAPI()

    async def stream(request: Request) -> StreamingResponse:  # a plain route: the request as it came
        asked = (await request.json()).get("max_tokens")
        n = min(events, asked) if isinstance(asked, int) and asked > 0 else events

        async def gen():  # type: ignore[no-untyped-def]
            # Paced by the clock from the first event (token k at k * gap_s): a late wake-up does not
            # slow the rest, as a GPU's pace does not depend on the host.
            loop = asyncio.get_running_loop()
            start = loop.time()
            for k in range(n):
                yield line
                await asyncio.sleep(max(0.0, start + (k + 1) * gap_s - loop.time()))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    app.add_route("/v1/chat/completions", stream, methods=["POST"])
    with Listener(app, name="synthetic-engine") as listener:
        ready.put(listener.url)  # type: ignore[attr-defined]
        stop.wait()  # type: ignore[attr-defined]


class SyntheticEngine:
    """Context manager: _synthetic_main in a spawned process (NOT a model); its URL."""

    def __init__(self, events: int, gap_s: float) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.ready, self.stop = ctx.Queue(), ctx.Event()
        self.proc = ctx.Process(
            target=_synthetic_main, args=(self.ready, self.stop, events, gap_s), daemon=True
        )

    def __enter__(self) -> str:
        self.proc.start()
        return str(self.ready.get(timeout=120))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


_MARKS: list[tuple[str, float]] = []  # (mark, perf_counter) of the request in flight (--spans)


def _instrument(engine_url: str, front_url: str) -> None:
    """--spans: wrap the first token's path with perf_counter marks (this process only: the relays run as
    its threads here). Names: who.what, who = client, proxy, front."""
    import functools

    from teecloud.ai import _http, _upstream, e2ee, proxy, server

    def mark(name: str) -> None:
        _MARKS.append((name, time.perf_counter()))

    def who_of(handler: object) -> str:
        return "proxy" if getattr(handler, "__module__", "") == "teecloud.ai.proxy" else "front"

    original_call = _http.CompletionRoutes.__call__

    async def call(self, scope, receive, send):  # type: ignore[no-untyped-def]
        who = who_of(self.handler)
        mark(f"{who}.request in")
        first = True

        async def timed_send(message):  # type: ignore[no-untyped-def]
            nonlocal first
            if message["type"] == "http.response.start":
                mark(f"{who}.headers out")
            if message["type"] == "http.response.body" and message.get("body") and first:
                first = False
                await send(message)
                mark(f"{who}.first event out")
                return
            await send(message)

        await original_call(self, scope, receive, timed_send)

    _http.CompletionRoutes.__call__ = call  # type: ignore[method-assign]

    def after(owner: object, attr: str, name: str, *, is_async: bool = False, once: bool = False) -> None:
        fn = getattr(owner, attr)
        if is_async:

            @functools.wraps(fn)
            async def wrapped_async(*a, **kw):  # type: ignore[no-untyped-def]
                out = await fn(*a, **kw)
                mark(name)
                return out

            setattr(owner, attr, wrapped_async)
            return

        @functools.wraps(fn)
        def wrapped(*a, **kw):  # type: ignore[no-untyped-def]
            out = fn(*a, **kw)
            if not once or not any(m == name for m, _ in _MARKS):
                mark(name)
            return out

        setattr(owner, attr, wrapped)

    after(proxy, "read_body", "proxy.body read", is_async=True)
    after(server, "read_body", "front.body read", is_async=True)
    after(e2ee.EphemeralSpare, "take", "proxy.ephemeral key taken")
    after(e2ee.ClientSession, "seal_request", "proxy.prompt sealed")
    after(e2ee.ServerKey, "open_request", "front.prompt opened")
    after(server._Front, "check_request", "front.request checked")
    after(e2ee.ServerKey, "seal_stream_event", "front.first event sealed", once=True)
    after(e2ee.ClientSession, "open_stream_event", "proxy.first event opened", once=True)
    who_by_url = {engine_url: "front", front_url: "proxy"}
    # The answer paths' client (teecloud.ai._upstream, round 7); httpx stays for what is off those paths.
    original_post = _upstream.UpstreamClient.post

    def who_of_client(client: _upstream.UpstreamClient) -> str:
        scheme = "https" if client.ssl_context is not None else "http"
        return who_by_url.get(f"{scheme}://{client.host}:{client.port}", "other")

    async def post(self, *a, **kw):  # type: ignore[no-untyped-def]
        who = who_of_client(self)
        mark(f"{who}.upstream request sent")  # just before: a kept connection or a new one
        resp = await original_post(self, *a, **kw)
        mark(f"{who}.upstream headers in")
        resp._who = who
        return resp

    _upstream.UpstreamClient.post = post  # type: ignore[method-assign]
    original_raw = _upstream.UpstreamResponse.aiter_raw

    async def aiter_raw(self, *a, **kw):  # type: ignore[no-untyped-def]
        who = getattr(self, "_who", "other")
        first = True
        async for piece in original_raw(self, *a, **kw):
            if first:
                mark(f"{who}.upstream first piece in")
            first = False
            yield piece

    _upstream.UpstreamResponse.aiter_raw = aiter_raw  # type: ignore[method-assign]


def spans(args: argparse.Namespace, home: Path, model: Path) -> None:
    """--spans: the first token's path, stage by stage (module docstring)."""
    import multiprocessing

    import httpx
    from tests.ai.conftest import running_stack

    from teecloud.ai._http import Listener, fast_event_loop
    from teecloud.ai.e2ee import ALG_K256, ALG_X25519
    from teecloud.ai.proxy import make_proxy_app, proxy_event_loop
    from teecloud.ai.server import make_inference_app

    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    engine = ctx.Process(target=_synthetic_main, args=(ready, stop, 16, 0.002), daemon=True)
    engine.start()
    load_before = os.getloadavg()[0]
    try:
        engine_url = ready.get(timeout=120)
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(running_stack(home, model=model, threads=1))
            config = dataclasses.replace(
                s.config, engine_url=engine_url, receipts_dir=home / "spans-receipts"
            )
            front = stack.enter_context(
                Listener(
                    make_inference_app(config, s.keys, s.quote), name="spans-front", loop=fast_event_loop()
                )
            )
            _instrument(engine_url, front.url)
            paths = {"attested app": front.url}
            for label, kw in [
                ("app + proxy", {"e2ee": False}),
                ("app + proxy, E2EE X25519", {"e2ee": True, "e2ee_alg": ALG_X25519}),
                ("app + proxy, E2EE secp256k1", {"e2ee": True, "e2ee_alg": ALG_K256}),
            ]:
                app = make_proxy_app(front.url, s.verifier(), s.policy(**kw))
                paths[label] = stack.enter_context(
                    Listener(app, name="spans-proxy", loop=proxy_event_loop())
                ).url
            timelines: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
            with httpx.Client(timeout=60) as http:
                for url in paths.values():
                    for w in range(3):
                        one(http, url, 4, 9000 + w)  # warm up, attest
                rng = random.Random(0)
                for i in range(args.requests):
                    order = list(paths.items())
                    rng.shuffle(order)
                    for name, url in order:
                        _MARKS.clear()
                        t0 = time.perf_counter()
                        _MARKS.append(("client.request sent", t0))
                        ttft = one(http, url, 8, i)[0]
                        _MARKS.append(("client.first token in", t0 + ttft))
                        timelines[name].append({m: (t - t0) * 1000 for m, t in _MARKS})
    finally:
        stop.set()
        engine.join(10)
    print(
        f"\n### the first token's path, stage by stage (synthetic engine, NOT a model: its first event at "
        f"once; relays as threads of one process; {args.requests} interleaved rounds; load avg "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after). Median ms since the client sent the "
        "request; step = the median of the per-request differences to the previous mark"
    )
    for name, rows in timelines.items():
        print(f"\n{name}:\n\n| mark | since sent (ms) | step (ms) |\n|---|---|---|")
        order = sorted(rows[0], key=lambda m: rows[0][m])
        prev = None
        for m in order:
            at = statistics.median(r[m] for r in rows if m in r)
            step = statistics.median(r[m] - r[prev] for r in rows if m in r and prev in r) if prev else at
            print(f"| {m} | {at:.3f} | {step:+.3f} |")
            prev = m


def hops(args: argparse.Namespace, home: Path, model: Path) -> None:
    """--hops: the added time to the first event per path on a synthetic engine (its first event at once; NOT
    a model), the relays as processes (as deployed), paired interleaved rounds; with --before, the other
    tree's front and proxies as paths of the same run."""
    import multiprocessing

    import httpx
    from tests.ai.conftest import running_stack

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gateway_variants import t_975

    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    engine = ctx.Process(target=_synthetic_main, args=(ready, stop, 16, 0.002), daemon=True)
    engine.start()
    load_before = os.getloadavg()[0]
    try:
        engine_url = ready.get(timeout=120)
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(running_stack(home, model=model, threads=1))
            paths = {"synthetic engine": engine_url}
            trees = {"": None} | ({" (before)": args.before} if args.before else {})
            for label, src in trees.items():
                config = dataclasses.replace(
                    s.config, engine_url=engine_url, receipts_dir=home / f"hops{label.strip()}"
                )
                front = stack.enter_context(
                    RelayProcess("front", sock=s.sock, config=dataclasses.asdict(config), src=src)
                ).url
                paths[f"attested app{label}"] = front
                for name, kw in [
                    ("app + proxy", {"e2ee": False}),
                    ("app + proxy, E2EE X25519", {"e2ee": True}),
                    ("app + proxy, E2EE secp256k1", {"e2ee": True, "e2ee_alg": "secp256k1"}),
                ]:
                    policy = dataclasses.asdict(s.policy(**kw))
                    relay = RelayProcess("proxy", home=home, upstream=front, policy=policy, src=src)
                    paths[f"{name}{label}"] = stack.enter_context(relay).url
            firsts: dict[str, list[float]] = {k: [] for k in paths}
            with httpx.Client(timeout=60) as http:
                for url in paths.values():
                    for w in range(3):
                        one(http, url, 4, 9000 + w)
                rng = random.Random(0)
                for i in range(args.requests):
                    order = list(paths.items())
                    rng.shuffle(order)
                    for name, url in order:
                        firsts[name].append(one(http, url, 16, i)[0] * 1000)
    finally:
        stop.set()
        engine.join(10)
    print(
        f"\n### added time to the first event, synthetic engine (NOT a model: its first event at once), "
        f"relays as processes; {args.requests} interleaved rounds; load avg {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print("| path | first event, median (ms) | added, paired median (ms) | added, mean (ms) | 95 % CI (ms) |")
    print("|---|---|---|---|---|")
    base = firsts["synthetic engine"]
    for name, xs in firsts.items():
        added = [x - b for x, b in zip(xs, base, strict=True)]
        mean = statistics.fmean(added)
        half = t_975(len(added) - 1) * statistics.stdev(added) / math.sqrt(len(added))
        print(
            f"| {name} | {statistics.median(xs):.2f} | {statistics.median(added):+.2f} | {mean:+.2f} "
            f"| {mean - half:+.2f} to {mean + half:+.2f} |"
        )


def table(stats: dict[str, list[tuple[float, float, int, float]]], streamed: bool) -> None:
    """One row per path; the differences and ratios are paired per round (same moment, same load)."""
    print(
        "| path | TTFT median (ms) | added TTFT, paired median (ms) | tokens/s median (end to end) "
        "| vs direct, paired median | decode rate vs direct, paired median "
        "| last token to end of stream, median (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    direct = stats["engine direct"]

    def decode(r: tuple[float, float, int, float]) -> float:  # tokens/s from the first to the last token
        return (r[2] - 1) / (r[3] - r[0]) if r[3] > r[0] else float("nan")

    for name, rows in stats.items():
        ttft = statistics.median(r[0] for r in rows)
        tps = statistics.median(r[2] / r[1] for r in rows)
        tail = statistics.median(r[1] - r[3] for r in rows)
        pairs = list(zip(rows, direct, strict=True))
        added = statistics.median(r[0] - d[0] for r, d in pairs)
        ratio = statistics.median((r[2] / r[1]) / (d[2] / d[1]) for r, d in pairs)
        if streamed:
            rate = f"{100 * statistics.median(decode(r) / decode(d) for r, d in pairs):.1f} %"
            print(
                f"| {name} | {ttft * 1000:.1f} | {added * 1000:+.1f} | {tps:.1f} | {100 * ratio:.1f} % "
                f"| {rate} | {tail * 1000:.1f} |"
            )
        else:
            print(f"| {name} | — | — | {tps:.1f} | {100 * ratio:.1f} % | — | — |")


CONFIGS = {
    # the engine uses both cores (llama.cpp's threads = the machine's), as in every earlier round's runs
    "today": {"threads": 2},
    # the engine leaves one core to the host, as a GPU engine does (its compute is on the GPU): one thread
    "gpu-like": {"threads": 1},
    # NOT a model: a synthetic engine (its own process) that sends --tokens OpenAI-shaped chunks paced by the
    # clock (--synthetic-gap-ms apart), as a GPU engine paces them without the host's CPU; the engine's own
    # variance is gone, what is left is the relays' and the machine's (relays as processes only)
    "synthetic": {"threads": 1},
}


def _resolve(loop: str) -> str:
    """ "default": the loop `teecloud ai proxy` serves on (this tree's choice)."""
    from teecloud.ai.proxy import proxy_event_loop

    return proxy_event_loop() if loop == "default" else loop


def measure(
    args: argparse.Namespace,
    home: Path,
    model: Path | None,
    threads: int,
    modes: list[bool],
) -> dict[str, object]:
    """One setup (model, engine threads): the engine, the front and the proxies started, every path timed
    in shuffled rounds; returns the per-mode stats, the proxies' CPU and the load before/after."""
    import httpx
    from tests.ai.conftest import running_stack

    load_before = os.getloadavg()
    out: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(running_stack(home, model=model, threads=threads))
        engine_url = s.engine.url
        if args.synthetic:  # the llama.cpp engine of the stack stays idle
            engine_url = stack.enter_context(SyntheticEngine(args.tokens, args.synthetic_gap_ms / 1000))
        paths = {"engine direct": engine_url}
        relays: dict[str, RelayProcess] = {}  # path -> its own relay process (the proxies'; --relays process)
        if args.relays == "thread":
            paths["attested app"] = s.front.url
            paths["app + proxy"] = stack.enter_context(s.proxy(e2ee=False)).url
            paths["app + proxy, E2EE"] = stack.enter_context(s.proxy(e2ee=True)).url
        else:
            trees = {"": None} | ({" (before)": args.before} if args.before else {})
            for label, src in trees.items():
                config = dataclasses.replace(
                    s.config, engine_url=engine_url, receipts_dir=home / f"receipts-process{label.strip()}"
                )
                front_url = stack.enter_context(
                    RelayProcess("front", sock=s.sock, config=dataclasses.asdict(config), src=src)
                ).url
                paths[f"attested app{label}"] = front_url
                loops = [_resolve(lp) for lp in args.proxy_loops] if not src else ["default"]
                variants = [(False, lp, "inline") for lp in loops] + [(True, loops[0], "inline")]
                if args.verdict and args.with_fetch and not src:
                    variants.append((False, loops[0], "fetch"))
                for e2ee, loop, receipts in variants:
                    policy = dataclasses.asdict(s.policy(e2ee=e2ee))
                    if receipts == "fetch":
                        policy["receipts"] = "fetch"
                    relay_proc = stack.enter_context(
                        RelayProcess(
                            "proxy", home=home, upstream=front_url, policy=policy, src=src, loop=loop
                        )
                    )
                    shown = f" ({loop} loop)" if len(loops) > 1 else ""
                    name = f"app + proxy{', E2EE' if e2ee else shown}{label}"
                    if receipts == "fetch":
                        name = "app + proxy, receipt fetched (before)"
                    paths[name] = relay_proc.url
                    relays[name] = relay_proc
        results: dict[bool, dict[str, list[tuple[float, float, int, float]]]] = {}
        with httpx.Client(timeout=300) as http:
            if args.pin:
                assert s.engine.proc is not None
                pin_engine(s.engine.proc.pid, 0)
            for url in paths.values():  # warm up (and attest, for the proxy)
                one(http, url, 4, 9999)
            i = 0
            rng = random.Random(0)
            per_round = 2 if args.verdict and args.pairing == "palindrome" else 1
            out["per_round"] = per_round
            # Each relay's CPU while idle (uvicorn's once-per-0.1-s tick), taken out of the figure below.
            idle0 = {name: r.cpu_s() for name, r in relays.items()}
            time.sleep(2.0 if relays else 0)
            idle = {name: (r.cpu_s() - idle0[name]) / 2.0 for name, r in relays.items()}
            cpu0 = {name: r.cpu_s() for name, r in relays.items()}
            t_timed = time.monotonic()
            deadline = t_timed + args.budget_s
            if args.verdict:
                # The TTFT goal on its own rounds of short answers (--ttft-tokens): many more pairs in a
                # quarter of the budget than the long answers allow, so its interval narrows.
                ttft_deadline = t_timed + args.budget_s / 4
                tstats: dict[str, list[tuple[float, float, int, float]]] = {k: [] for k in paths}
                for _ in range(args.ttft_rounds):
                    if time.monotonic() > ttft_deadline:
                        done = len(tstats["engine direct"]) // per_round
                        print(f"TTFT rounds: a quarter of the budget reached after {done}")
                        break
                    i += 1
                    for name, row in one_round(http, paths, args.ttft_tokens, i, rng, args.pairing):
                        tstats[name].append(row)
                out["ttft"] = tstats
                # The proxies' CPU after the short answers: with the long ones below, it splits into a cost
                # per answer and one per token.
                out["cpu_ttft"] = {
                    name: r.cpu_s() - cpu0[name] - idle[name] * (time.monotonic() - t_timed)
                    for name, r in relays.items()
                }
            for streamed in modes:
                stats: dict[str, list[tuple[float, float, int, float]]] = {k: [] for k in paths}
                request = one if streamed else one_plain
                for _ in range(args.requests):
                    if time.monotonic() > deadline:
                        print(
                            f"budget of {args.budget_s:.0f} s reached after "
                            f"{len(stats['engine direct']) // per_round} rounds"
                        )
                        break
                    if args.verdict and streamed:
                        i += 1
                        for name, row in one_round(http, paths, args.tokens, i, rng, args.pairing):
                            stats[name].append(row)
                        continue
                    order = list(paths.items())
                    rng.shuffle(order)  # no path is always first (or last) in a round
                    for name, url in order:
                        i += 1  # a different prompt each time: no path gets the engine's prompt cache free
                        stats[name].append(request(http, url, args.tokens, i))
                results[streamed] = stats
            elapsed = time.monotonic() - t_timed
            out["cpu"] = {
                name: (r.cpu_s() - cpu0[name] - idle[name] * elapsed, r.cpu_s() - cpu0[name], idle[name])
                for name, r in relays.items()
            }
            out["elapsed"] = elapsed
        out["results"] = results
        out["load"] = (load_before[0], os.getloadavg()[0])
        if not args.no_extras:
            out["signed"], out["logged"] = receipts_per_second(home)
            out["report_ms"], out["gpu_ms"] = attestation_costs(s.front.url, home)
            out["relay"] = relay_cost(s)
    return out


def one_round(
    http: object, paths: dict[str, str], tokens: int, i: int, rng: random.Random, pairing: str
) -> list[tuple[str, tuple[float, float, int, float]]]:
    """One --verdict round: (path, result) in the order run.

    "palindrome" (the default since AI round 8): every path gets the same prompt (numbered i), so the same
    answer (temperature 0: the same tokens, the same bytes through the relays); a 1-token request with that
    prompt first (not timed) leaves it in the engine's prompt cache, so every timed request finds the same
    cache (llama.cpp reuses the longest prefix of the previous request: without this, the first request of
    a round would pay the prompt's evaluation and the others not); then the paths in a shuffled order and
    again in the mirrored order (A B C D D C B A): each path's two requests sit symmetrically about the
    round's middle, so a load that drifts linearly through the round weighs on every path alike. Two results
    per path per round; the verdict pairs them by round. "shuffled" (rounds 5-7): one request per path in a
    shuffled order, each with a prompt of its own (different answers: their number of content chunks
    varies from prompt to prompt, which is most of that method's round-to-round spread)."""
    if pairing == "shuffled":
        order = list(paths.items())
        rng.shuffle(order)
        out = []
        for k, (name, url) in enumerate(order):
            out.append((name, one(http, url, tokens, i * 16 + k)))
        return out
    one(http, paths["engine direct"], 1, i)  # the prompt into the engine's cache (not timed)
    order = list(paths.items())
    rng.shuffle(order)
    return [(name, one(http, url, tokens, i)) for name, url in order + order[::-1]]


def _judge(low: float, high: float, goal: float, *, higher_is_better: bool) -> str:
    """met / not met / undecidable for an interval against a goal."""
    if math.isnan(low):
        return "undecidable"
    if higher_is_better:
        return "met" if low >= goal else "not met" if high < goal else "undecidable"
    return "met" if high <= goal else "not met" if low > goal else "undecidable"


Row = tuple[float, float, int, float]  # one()'s (ttft_s, total_s, content chunks, last_s)


def _by_round(rows: list[Row], per_round: int) -> list[list[Row]]:
    """A path's results grouped by round (one_round appends `per_round` per path per round)."""
    return [rows[k : k + per_round] for k in range(0, len(rows) - per_round + 1, per_round)]


def verdict(
    stats: dict[str, list[tuple[float, float, int, float]]],
    ttft_stats: dict[str, list[tuple[float, float, int, float]]] | None = None,
    per_round: int = 1,
) -> None:
    """The goals' verdict over paired rounds (module docstring): throughput over `stats` (long answers), the
    added TTFT over `ttft_stats` (short answers: their own rounds) when given, else over `stats`. With
    `per_round` results per path per round (one_round's palindrome), a round's ratio is the geometric mean
    of its requests' ratios (log: the mean of the path's logs less the mean of direct's) and its added TTFT
    the mean of the path's less the mean of direct's: one paired value per round, Student's t over rounds."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gateway_variants import paired_ratio, t_975

    direct = _by_round(stats["engine direct"], per_round)
    tstats = ttft_stats or stats
    tdirect = _by_round(tstats["engine direct"], per_round)
    print(
        "\n| path | rounds (throughput / TTFT) | throughput / direct (geo. mean) | 95 % CI | ≥ 98 % goal "
        "| decode rate / direct | 95 % CI | added TTFT, mean (ms) "
        "| 95 % CI (ms) | ≤ 5 ms goal | last token → end, median (ms) | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def decode(r: tuple[float, float, int, float]) -> float:
        return (r[2] - 1) / (r[3] - r[0]) if r[3] > r[0] else float("nan")

    def geo(xs: list[float]) -> float:
        return math.exp(statistics.fmean(math.log(x) for x in xs))

    def tps(r: tuple[float, float, int, float]) -> float:
        return r[2] / r[1]

    for name, rows in stats.items():
        if name == "engine direct":
            continue
        pairs = list(zip(_by_round(rows, per_round), direct, strict=True))
        ratio = paired_ratio([geo([tps(r) for r in rs]) / geo([tps(d) for d in ds]) for rs, ds in pairs])
        rate = paired_ratio(
            [
                geo([decode(r) for r in rs]) / geo([decode(d) for d in ds])
                for rs, ds in pairs
                if all(decode(x) > 0 for x in rs + ds)
            ]
        )
        added = [
            (statistics.fmean(r[0] for r in rs) - statistics.fmean(d[0] for d in ds)) * 1000
            for rs, ds in zip(_by_round(tstats[name], per_round), tdirect, strict=True)
        ]
        n = len(added)
        mean = statistics.fmean(added)
        half = t_975(n - 1) * statistics.stdev(added) / math.sqrt(n) if n > 1 else float("nan")
        v_tps = _judge(ratio[1], ratio[2], 0.98, higher_is_better=True)
        v_ttft = _judge(mean - half, mean + half, 5.0, higher_is_better=False)
        overall = (
            "met"
            if v_tps == v_ttft == "met"
            else "not met"
            if "not met" in (v_tps, v_ttft)
            else "undecidable on this machine"
        )
        tail = statistics.median(r[1] - r[3] for r in rows) * 1000
        print(
            f"| {name} | {len(pairs)} / {n} | {100 * ratio[0]:.1f} % "
            f"| {100 * ratio[1]:.1f}–{100 * ratio[2]:.1f} % "
            f"| {v_tps} | {100 * rate[0]:.1f} % | {100 * rate[1]:.1f}–{100 * rate[2]:.1f} % "
            f"| {mean:+.2f} | {mean - half:+.2f} to {mean + half:+.2f} | {v_ttft} | {tail:.1f} | {overall} |"
        )
    if per_round > 1:  # the same prompt on every path of a round: the same answer, so the same chunk count
        rounds = zip(*(_by_round(v, per_round) for v in stats.values()), strict=True)
        differ = sum(len({r[2] for rs in group for r in rs}) > 1 for group in rounds)
        print(f"rounds whose answers differ in their number of content chunks across paths: {differ}")


def report(args: argparse.Namespace, title: str, m: dict[str, object], modes: list[bool]) -> None:
    load = m["load"]
    assert isinstance(load, tuple)
    print(f"\n### {title}; load avg (1 min) {load[0]:.1f} before, {load[1]:.1f} after")
    results = m["results"]
    assert isinstance(results, dict)
    for streamed, stats in results.items():
        print(f"\n{'streamed' if streamed else 'not streamed'}:")
        table(stats, streamed)
        if args.verdict and streamed:
            ttft = m.get("ttft")
            if ttft:
                assert isinstance(ttft, dict)
                print(f"\nTTFT rounds ({args.ttft_tokens}-token answers):")
                table(ttft, True)
            verdict(
                stats,
                ttft if isinstance(ttft, dict) and ttft.get("engine direct") else None,
                int(m.get("per_round", 1)),  # type: ignore[call-overload]
            )
    cpu = m.get("cpu") or {}
    assert isinstance(cpu, dict)
    if cpu:
        results_by_mode = m["results"]
        assert isinstance(results_by_mode, dict)
        answers = sum(len(st["engine direct"]) for st in results_by_mode.values())  # the rounds done
        tokens = answers * args.tokens
        ttft_rounds = m.get("ttft")
        if isinstance(ttft_rounds, dict):  # --verdict's TTFT rounds ran on the same proxies
            answers += len(ttft_rounds["engine direct"])
            tokens += len(ttft_rounds["engine direct"]) * args.ttft_tokens
        print(
            "\nverifying proxy's own CPU (its process's threads on a CPU over the timed answers, less its "
            "idle rate measured just before; a VM's steal time inside a syscall counts as CPU here):"
        )
        for name, (busy, seconds, idle) in cpu.items():
            print(
                f"- {name}: {busy * 1000 / answers:.2f} ms per answer, {busy * 1e6 / tokens:.0f} µs per "
                f"token ({seconds:.2f} s in {m['elapsed']:.0f} s, idle {idle * 1000:.2f} ms/s)"
            )
        split = m.get("cpu_ttft")
        if isinstance(split, dict) and isinstance(ttft_rounds, dict) and args.tokens > args.ttft_tokens:
            # CPU per answer of the short rounds (a) and of the long ones (b), each answer of n tokens costing
            # fixed + n * per_token: per_token = (b - a) / (long - short), fixed = a - short * per_token.
            n_short = len(ttft_rounds["engine direct"])
            n_long = answers - n_short
            print("  split (the short rounds' CPU per answer against the long rounds'):")
            for name, (busy, _seconds, _idle) in cpu.items():
                if not n_short or not n_long:
                    continue
                a = split[name] / n_short
                b = (busy - split[name]) / n_long
                per_token = (b - a) / (args.tokens - args.ttft_tokens)
                fixed = a - args.ttft_tokens * per_token
                print(f"  - {name}: {fixed * 1000:.2f} ms per answer + {per_token * 1e6:.0f} µs per token")
    if "relay" not in m:
        return
    print(
        f"receipts signed: {m['signed']:.0f}/s; "
        f"signed + appended to the Merkle log (fsync): {m['logged']:.0f}/s"
    )
    print(
        f"attestation report (GetQuote via the guest API): {m['report_ms']:.1f} ms median; "
        f"simulated GPU evidence collected + verified: {m['gpu_ms']:.1f} ms median"
    )
    relay = m["relay"]
    assert isinstance(relay, dict)
    hops = ", ".join(
        f"{k}: +{v:.0f} µs" for k, v in relay.items() if not k.startswith("synthetic") and "TTFT" not in k
    )
    print(f"relay cost per streamed event (synthetic engine, not a model): {hops}")
    ttfts = ", ".join(
        f"{k.removesuffix(' TTFT')}: +{v / 1000:.2f} ms"
        for k, v in relay.items()
        if not k.startswith("synthetic") and "TTFT" in k
    )
    print(f"added time to the first event (synthetic engine, not a model): {ttfts}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--models",
        default="small",
        help="comma-separated sizes of examples/llm/tinymodel.py: tiny, small (~25 M parameters, hundreds "
        "of tokens/s on this CPU), medium (~57 M, tens of tokens/s: a model's pace)",
    )
    ap.add_argument("--size", help="one model size (the older spelling of --models)")
    ap.add_argument(
        "--configs",
        help="comma-separated engine configurations, each a setup of its own in this run: today (engine "
        "threads 2), gpu-like (engine threads 1, a core left to the host). Default: --threads's",
    )
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--relays", choices=["thread", "process"], default="thread")
    ap.add_argument(
        "--proxy-loops",
        default="default",
        help="comma-separated event loops for the verifying proxy processes (--relays process): default "
        "(the proxy's own choice), asyncio, uvloop; one plain proxy per loop, the E2EE one on the first",
    )
    ap.add_argument("--pin", action="store_true", help="engine on CPU 0, client and relays on CPU 1")
    ap.add_argument("--no-extras", action="store_true", help="only the paths (no receipts/s, relay cost)")
    ap.add_argument("--mode", choices=["stream", "plain", "both"], default="stream")
    ap.add_argument(
        "--verdict", action="store_true", help="the goals' statistical verdict (module docstring)"
    )
    ap.add_argument(
        "--hops",
        action="store_true",
        help="added time to the first event per path, synthetic engine, relays as processes; --before too",
    )
    ap.add_argument(
        "--spans",
        action="store_true",
        help="the first token's path stage by stage, synthetic engine (module docstring); --requests rounds",
    )
    ap.add_argument("--budget-s", type=float, default=3600.0, help="at most this long for the timed rounds")
    ap.add_argument(
        "--ttft-rounds",
        type=int,
        default=600,
        help="--verdict: rounds of short answers for the TTFT goal (at most a quarter of --budget-s)",
    )
    ap.add_argument("--ttft-tokens", type=int, default=4, help="--verdict: tokens per TTFT-round answer")
    ap.add_argument(
        "--pairing",
        choices=["palindrome", "shuffled"],
        default="palindrome",
        help="--verdict rounds: palindrome (the same prompt on every path, cached first, paths in a shuffled "
        "order and mirrored; since AI round 8) or shuffled (rounds 5-7: a prompt per request); one_round",
    )
    ap.add_argument(
        "--synthetic-gap-ms",
        type=float,
        default=5.0,
        help="configuration synthetic: the paced synthetic engine's time between tokens (5 ms: 200 tokens/s)",
    )
    ap.add_argument(
        "--with-fetch",
        action="store_true",
        help="--verdict: also a proxy that fetches each receipt (the protocol before inline receipts)",
    )
    ap.add_argument(
        "--before",
        metavar="SRC",
        help="also the front and proxies of another tree's src/ (e.g. the base commit's, from git archive), "
        "in the same run: a before/after (needs --relays process)",
    )
    args = ap.parse_args()
    args.proxy_loops = args.proxy_loops.split(",")
    if args.verdict or args.hops:
        args.relays = "process"  # as deployed: the front in the CVM, the proxy beside the client
    models = [args.size] if args.size else args.models.split(",")
    configs = args.configs.split(",") if args.configs else [f"threads {args.threads}"]
    for c in configs:
        if c not in CONFIGS and not c.startswith("threads "):
            ap.error(f"unknown configuration {c!r} (today, gpu-like)")
    if args.pin and (args.threads != 1 or args.configs or os.cpu_count() != 2):
        ap.error("--pin splits 2 CPUs: one engine thread (--threads 1) on CPU 0, the rest on CPU 1")
    if (args.before or args.proxy_loops != ["default"]) and args.relays != "process":
        ap.error("--before and --proxy-loops need --relays process")
    import logging

    logging.disable(logging.WARNING)
    if args.pin:
        os.sched_setaffinity(0, {1})  # this process and everything it starts; the engine is moved below
    home = Path(tempfile.mkdtemp(prefix="bench-ai-"))  # the models, logs, receipts: removed at the end
    os.environ["TEECLOUD_HOME"] = str(home)
    import importlib.util

    spec = importlib.util.spec_from_file_location("tinymodel", ROOT / "examples" / "llm" / "tinymodel.py")
    assert spec and spec.loader
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    modes = {"stream": [True], "plain": [False], "both": [True, False]}[args.mode]
    print(
        f"{args.requests} requests x {args.tokens} tokens per path and mode, relays in "
        f"{'threads' if args.relays == 'thread' else 'processes'}"
        f"{', engine pinned to CPU 0, client + relays to CPU 1' if args.pin else ''}"
    )
    try:
        if args.spans or args.hops:
            tiny_model = tiny.write_tiny_llama(home / "tiny.gguf", size="tiny")
            (spans if args.spans else hops)(args, home, tiny_model)
            return
        first = True
        for size in models:
            model = tiny.write_tiny_llama(home / f"{size}.gguf", size=size)
            for c in configs:
                threads = CONFIGS[c]["threads"] if c in CONFIGS else args.threads
                setup_home = home / f"{size}-{c.replace(' ', '')}"
                setup_home.mkdir()
                extras = args.no_extras or not first  # the model-independent extras once
                if c == "synthetic" and args.relays != "process":
                    ap.error("the synthetic configuration needs --relays process (or --verdict)")
                m = measure(
                    argparse.Namespace(**{**vars(args), "no_extras": extras, "synthetic": c == "synthetic"}),
                    setup_home,
                    model,
                    threads,
                    modes,
                )
                report(args, f"model {size}, configuration {c} (engine threads {threads})", m, modes)
                first = False
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
