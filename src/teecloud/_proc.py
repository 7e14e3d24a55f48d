"""Child-process helpers shared by every component that runs a program (the docker runtime's log
commands, the gateway's HAProxy): a line stream over commands run one after another, and a kill that waits.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence

__all__ = ["LogStream", "kill"]


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` if it still runs, then reap it (waits at most 10 s)."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL: only an uninterruptible sleep delays it
        proc.wait(timeout=10)


class LogStream:
    """The output of log commands run one after another, one chunk per line prefixed `service | `.

    `close()` may be called from any thread, also while another thread is blocked reading (an HTTP client
    went away in the middle of `docker logs --follow`): it kills the running process, so the reader sees the
    end of its output at once, starts no further command, and runs the `on_close` callbacks (once). Reading to
    the end closes the stream too, and so does dropping the last reference to one never read.
    """

    def __init__(self, commands: Sequence[tuple[str, Sequence[str]]]) -> None:
        self._commands = [(service, list(argv)) for service, argv in commands]
        self._lock = threading.Lock()
        self._closed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lines: Iterator[bytes] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The command running (or last run) for this stream."""
        return self._proc

    def on_close(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._closed:
                self._callbacks.append(callback)
                return
        callback()

    def __iter__(self) -> LogStream:
        return self

    def __next__(self) -> bytes:
        if self._lines is None:
            self._lines = self._read()
        return next(self._lines)

    def _read(self) -> Iterator[bytes]:
        try:
            for service, argv in self._commands:
                with self._lock:
                    if self._closed:
                        return
                    proc = self._proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                    )
                try:
                    assert proc.stdout is not None
                    prefix = f"{service} | ".encode()
                    for line in proc.stdout:
                        yield prefix + line
                finally:
                    kill(proc)
                    assert proc.stdout is not None
                    proc.stdout.close()
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            proc, callbacks, self._callbacks = self._proc, self._callbacks, []
        if proc is not None:
            kill(proc)
        self._lines = None  # (a generator still running in another thread keeps its own frame)
        for callback in callbacks:
            callback()

    def __enter__(self) -> LogStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
