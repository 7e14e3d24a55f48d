"""The isolate: one WebAssembly module run in a fresh wasmtime Store per call.

Isolation rests on wasmtime: a module sees only its own linear memory (bounds-checked) and the host
functions below; a Store per call means no state survives a call and no call sees another's. Limits:
  cpu     fuel (an instruction budget)           -> trap OUT_OF_FUEL
  wall    epoch interruption (a ticker thread)   -> trap INTERRUPT; fetches get the remaining time
  memory  Store limits on linear memory growth   -> memory.grow returns -1 (the guest then traps; a trap
                                                    with >= 3/4 of the limit in use reports "memory")
  output  the result's size                      -> trap from `output`
  http    count / allowlist / response cap       -> negative return codes (see _fetch)

Guest ABI (imports from module "teecloud"; the module exports `memory` and `run() -> i32`, 0 = success):
  input_len() -> i32                 input_read(ptr)                        the call's input bytes
  output(ptr, len) -> i32            the result (once; later calls replace it)
  http_get(url_ptr, url_len, buf_ptr, buf_cap) -> i32   body length, or a negative E_* code
  http_status() -> i32               status of the last fetch
  secret_get(name_ptr, name_len, buf_ptr, buf_cap) -> i32   value length, or -1 (no such secret), -3
  log(ptr, len)                      a line into the function's log
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from ._fetch import E_TOO_LARGE, Fetcher
from .errors import BadFunction, InvocationFailed, LimitExceeded
from .limits import CallLimits

__all__ = ["CallReport", "Sandbox", "compile_module"]

IMPORTS = {
    "input_len": ([], [wasmtime.ValType.i32()]),
    "input_read": ([wasmtime.ValType.i32()], []),
    "output": ([wasmtime.ValType.i32(), wasmtime.ValType.i32()], [wasmtime.ValType.i32()]),
    "http_get": ([wasmtime.ValType.i32()] * 4, [wasmtime.ValType.i32()]),
    "http_status": ([], [wasmtime.ValType.i32()]),
    "secret_get": ([wasmtime.ValType.i32()] * 4, [wasmtime.ValType.i32()]),
    "log": ([wasmtime.ValType.i32(), wasmtime.ValType.i32()], []),
}


@dataclass
class CallReport:
    """What a call used, against its limits (returned with every result and every failure)."""

    cpu_fuel_used: int | None = 0  # None: unknown (wasmtime does not write fuel back on an interrupt)
    cpu_ms: float = 0.0
    wall_ms: float = 0.0
    memory_bytes: int = 0
    http_requests: int = 0
    http_refused: int = 0
    http_bytes_in: int = 0
    output_bytes: int = 0
    stopped_by: str = ""  # "", or the limit that stopped the call
    events: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_fuel_used": self.cpu_fuel_used,
            "cpu_ms": round(self.cpu_ms, 3),
            "wall_ms": round(self.wall_ms, 3),
            "memory_bytes": self.memory_bytes,
            "http_requests": self.http_requests,
            "http_refused": self.http_refused,
            "http_bytes_in": self.http_bytes_in,
            "output_bytes": self.output_bytes,
            "stopped_by": self.stopped_by,
            "events": list(self.events),
        }


def _engine() -> wasmtime.Engine:
    cfg = wasmtime.Config()
    cfg.consume_fuel = True
    cfg.epoch_interruption = True
    cfg.max_wasm_stack = 512 << 10
    # proposals a function does not need stay off (smaller attack surface)
    cfg.wasm_threads = False
    cfg.wasm_memory64 = False
    cfg.wasm_multi_memory = False
    cfg.wasm_gc = False
    cfg.wasm_component_model = False
    return wasmtime.Engine(cfg)


def compile_module(engine: wasmtime.Engine, wasm: bytes) -> wasmtime.Module:
    """Validate and compile; check the imports and exports against the ABI."""
    try:
        module = wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        raise BadFunction(f"not a valid WebAssembly module: {str(exc).splitlines()[0]}") from exc
    for imp in module.imports:
        if imp.module != "teecloud" or imp.name not in IMPORTS:
            raise BadFunction(
                f"the module imports {imp.module}.{imp.name}, which the runtime does not provide"
            )
    exports = {e.name: e.type for e in module.exports}
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise BadFunction("the module must export its memory as `memory`")
    run = exports.get("run")
    if not isinstance(run, wasmtime.FuncType) or list(run.params) or [str(r) for r in run.results] != ["i32"]:
        raise BadFunction("the module must export `run: () -> i32`")
    return module


class _Ticker:
    """Advances the engine's epoch every tick while at least one call runs (wall-time limits)."""

    def __init__(self, engine: wasmtime.Engine, tick_s: float) -> None:
        self._engine = engine
        self._tick_s = tick_s
        self._active = 0
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._active == 0 and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
            time.sleep(self._tick_s)
            self._engine.increment_epoch()

    def __enter__(self) -> None:
        with self._cv:
            self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fn-epoch", daemon=True)
                self._thread.start()
            self._cv.notify()

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._active -= 1

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(2)


class Sandbox:
    """Compiles modules once (by their hash) and runs each call in a fresh Store."""

    def __init__(self, *, tick_ms: int = 5) -> None:
        self.engine = _engine()
        self._tick_s = tick_ms / 1000
        self._ticker = _Ticker(self.engine, self._tick_s)

    def close(self) -> None:
        self._ticker.close()

    def compile(self, wasm: bytes) -> wasmtime.Module:
        return compile_module(self.engine, wasm)

    def run(
        self,
        module: wasmtime.Module,
        input_bytes: bytes,
        limits: CallLimits,
        fetcher: Fetcher,
        secret: Callable[[str], bytes | None],
        *,
        max_log_lines: int = 20,
        max_log_chars: int = 1024,
    ) -> tuple[bytes, CallReport]:
        """Run `run()`: (output, report), or LimitExceeded / InvocationFailed carrying the report."""
        if len(input_bytes) > limits.input_bytes:
            raise LimitExceeded("input", f"input is {len(input_bytes)} bytes, above {limits.input_bytes}")
        report = CallReport()
        out: list[bytes] = [b""]
        t0 = time.monotonic()
        c0 = time.thread_time()
        deadline = t0 + limits.wall_ms / 1000
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=limits.memory_bytes, instances=1, tables=1, memories=1)
        store.set_fuel(limits.cpu_fuel)
        store.set_epoch_deadline(max(1, int(limits.wall_ms / 1000 / self._tick_s)))

        def mem(caller: wasmtime.Caller) -> wasmtime.Memory:
            m = caller.get("memory")
            assert isinstance(m, wasmtime.Memory)
            return m

        def read(caller: wasmtime.Caller, ptr: int, n: int) -> bytes:
            m = mem(caller)
            if ptr < 0 or n < 0 or ptr + n > m.data_len(caller):
                raise wasmtime.WasmtimeError("out-of-bounds memory access by a host call")
            return bytes(m.read(caller, ptr, ptr + n))

        def write(caller: wasmtime.Caller, ptr: int, data: bytes) -> None:
            m = mem(caller)
            if ptr < 0 or ptr + len(data) > m.data_len(caller):
                raise wasmtime.WasmtimeError("out-of-bounds memory access by a host call")
            m.write(caller, data, ptr)

        def output(caller: wasmtime.Caller, ptr: int, n: int) -> int:
            if n > limits.output_bytes:
                report.stopped_by = "output"
                raise wasmtime.WasmtimeError(f"output of {n} bytes is above {limits.output_bytes}")
            out[0] = read(caller, ptr, n)
            return 0

        def http_get(caller: wasmtime.Caller, up: int, ul: int, bp: int, bc: int) -> int:
            if ul > 2048:
                return -5
            try:
                url = read(caller, up, ul).decode("utf-8")
            except UnicodeDecodeError:
                return -5
            body = fetcher.get(url, deadline - time.monotonic())
            if isinstance(body, int):
                return body
            if len(body) > bc:
                return E_TOO_LARGE
            write(caller, bp, body)
            return len(body)

        def secret_get(caller: wasmtime.Caller, np_: int, nl: int, bp: int, bc: int) -> int:
            if nl > 64:
                return -1
            value = secret(read(caller, np_, nl).decode("utf-8", "replace"))
            if value is None:
                return -1
            if len(value) > bc:
                return E_TOO_LARGE
            write(caller, bp, value)
            return len(value)

        def log(caller: wasmtime.Caller, ptr: int, n: int) -> None:
            if len(report.logs) < max_log_lines:
                text = read(caller, ptr, min(n, max_log_chars)).decode("utf-8", "replace")
                report.logs.append(text)

        impls: dict[str, Callable[..., Any]] = {
            "input_len": lambda _c: len(input_bytes),
            "input_read": lambda c, p: write(c, p, input_bytes),
            "output": output,
            "http_get": http_get,
            "http_status": lambda _c: fetcher.last_status,
            "secret_get": secret_get,
            "log": log,
        }
        linker = wasmtime.Linker(self.engine)
        for name, (params, results) in IMPORTS.items():
            linker.define_func(
                "teecloud", name, wasmtime.FuncType(params, results), impls[name], access_caller=True
            )

        error: str | None = None
        exit_code = 0
        instance: wasmtime.Instance | None = None
        with self._ticker:
            try:
                instance = linker.instantiate(store, module)
                run = instance.exports(store)["run"]
                assert isinstance(run, wasmtime.Func)
                exit_code = int(run(store))
            except wasmtime.Trap as exc:
                error = self._classify(exc, report)
            except wasmtime.WasmtimeError as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if ("memory" in msg and "limit" in msg) or "minimum" in msg:
                    report.stopped_by = report.stopped_by or "memory"
                error = msg
        report.wall_ms = (time.monotonic() - t0) * 1000
        report.cpu_ms = (time.thread_time() - c0) * 1000
        used = limits.cpu_fuel - store.get_fuel()
        report.cpu_fuel_used = None if report.stopped_by == "wall" and used == 0 else used
        report.http_requests = fetcher.requests
        report.http_refused = fetcher.refused
        report.http_bytes_in = fetcher.bytes_in
        report.events.extend(fetcher.events)
        if instance is not None:
            memory = instance.exports(store)["memory"]
            assert isinstance(memory, wasmtime.Memory)
            report.memory_bytes = memory.data_len(store)
        if error is not None and not report.stopped_by and report.memory_bytes * 4 >= limits.memory_bytes * 3:
            # wasmtime refuses a memory.grow past the Store's limit (the guest sees -1, then usually traps);
            # Python's wasmtime cannot make the refusal itself a trap, so a trap with at least 3/4 of the
            # limit in use is reported as the memory limit.
            report.stopped_by = "memory"
        report.output_bytes = len(out[0])
        if report.stopped_by:
            raise LimitExceeded(
                report.stopped_by, f"stopped at its {report.stopped_by} limit: {error}", report.as_dict()
            )
        if error is not None:
            raise InvocationFailed(f"the function trapped: {error}", report.as_dict())
        if exit_code != 0:
            raise InvocationFailed(f"the function returned {exit_code}", report.as_dict())
        return out[0], report

    @staticmethod
    def _classify(exc: wasmtime.Trap, report: CallReport) -> str:
        code = exc.trap_code
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            report.stopped_by = "cpu"
        elif code == wasmtime.TrapCode.INTERRUPT:
            report.stopped_by = "wall"
        msg = str(exc)
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        return lines[-1] if lines else "trap"
