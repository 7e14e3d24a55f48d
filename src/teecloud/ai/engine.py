"""The model engine as a supervised child process: llama-cpp-python's OpenAI server (`python -m
llama_cpp.server`) on CPU, or vLLM's (`vllm serve`) where a GPU is present. The front talks to it over HTTP on
127.0.0.1; when it crashes the front answers 503 and the supervisor starts it again (bounded backoff)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

__all__ = ["EngineProcess", "llama_cpp_argv"]

log = logging.getLogger("teecloud.ai.engine")


def llama_cpp_argv(
    model: Path, *, port: int, alias: str, n_ctx: int = 2048, threads: int = 2, embedding: bool = False
) -> list[str]:
    """llama-cpp-python's OpenAI server; `embedding`: serve /v1/embeddings too (per-token vectors for a model
    without a pooling type; generation works as before)."""
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        *(["--embedding", "true"] if embedding else []),
    ]


# The engine gets a clean environment: llama-cpp-python's server reads settings such as PORT, HOST and MODEL
# from it (they would override its arguments), and the app's own variables are none of its business.
_ENGINE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR", "CUDA_VISIBLE_DEVICES")


def _engine_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _ENGINE_ENV}


# The engine must not outlive the app that started it, however the app ends (uvicorn re-raises SIGTERM after
# its shutdown, so a `finally` in the app never runs): Linux's PR_SET_PDEATHSIG sends it SIGKILL when its
# parent thread dies. libc is loaded here, in the parent: the child runs only the one prctl call.
_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux/glibc: the supervisor's stop() remains the only way
    _LIBC = None


def _die_with_parent() -> None:
    if _LIBC is not None and hasattr(_LIBC, "prctl"):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # no state worth a graceful stop; never lingers


class EngineProcess:
    """Start `argv`, wait for `url`/v1/models, restart it whenever it exits until `stop()`."""

    def __init__(
        self, argv: Sequence[str], url: str, *, max_backoff_s: float = 10.0, log_path: Path | None = None
    ) -> None:
        self.argv = list(argv)
        self.url = url.rstrip("/")
        self.max_backoff_s = max_backoff_s
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            return subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_engine_env(),
                preexec_fn=_die_with_parent,  # one prctl call in the child, see above
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]

    def _supervise(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            proc = self.proc
            if proc is None:
                return
            started = time.monotonic()
            code = proc.wait()
            if self._stop.is_set():
                return
            log.warning("model engine exited with %s; restarting", code)
            if time.monotonic() - started > 30:
                backoff = 0.2
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff_s)
            self.proc = self._spawn()
            self.restarts += 1

    def start(self) -> EngineProcess:
        self.proc = self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="engine-supervisor", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the model engine did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine and nothing else
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
