"""Per-app request latency and counts from HAProxy's access log (HAProxy 2.6's Prometheus exporter has only
per-backend averages, and its backends are slots, not apps).

HAProxy logs one line per HTTP request (per connection in TCP mode: passthrough `s` names, and everything
in `terminate_mode="tcp"`) to a unix datagram socket in the run directory (`format raw`, at most
`MAX_LINE` bytes), in the formats `teecloud.gateway.haproxy` renders:

    teecloud http <backend> <status> <Ta ms> <termination state>    Ta: request header in -> response out
    teecloud tcp <backend> <Tt ms> <termination state>              Tt: the whole connection
    teecloud connection_error                                       a connection that failed before any
                                                                    request (a TLS handshake failure)

`AccessLog` reads them in one thread, maps the slot backend to its app (`set_backends`, after each route
change) and keeps, per app, a histogram of durations (`teecloud_gateway_request_duration_seconds`, ms
resolution: HAProxy's timers are in ms) and counters of requests and errors (HTTP: status >= 500 or no
response; TCP: a connection that ended on a server, proxy, resource or internal error, termination state
`S…`, `P…`, `R…`, `I…`). Bounded: nothing is queued here — a datagram is counted as it is read, and when
the reader falls behind the kernel's socket buffer fills and HAProxy drops lines (it never blocks on its
log); at most `max_apps` apps get series of their own, later ones are counted under `app="_other"`.
Lines that are not in these formats are counted as malformed and dropped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BUCKETS_S", "MAX_LINE", "AccessLog", "AppStats", "parse_line"]

MAX_LINE = 512
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ERROR_STATES = frozenset("SPRI")  # HAProxy's termination state, first letter: who ended the session, why
_OTHER = "_other"
_NOT_AN_APP = frozenset({"be_terminate"})  # fe_sni's hop to the terminator: its requests are logged there


CONNECTION_ERROR = b"teecloud connection_error"


@dataclass(frozen=True)
class LogLine:
    backend: str
    duration_ms: int  # -1: no duration (the request did not complete)
    error: bool


def parse_line(raw: bytes) -> LogLine | None:
    """A line in one of the two formats above, or None (malformed). Strict: fields, widths and digits."""
    if len(raw) > MAX_LINE:
        return None
    try:
        parts = raw.decode("ascii").strip().split(" ")
    except UnicodeDecodeError:
        return None
    if len(parts) == 6 and parts[:2] == ["teecloud", "http"]:
        _t, _m, backend, status, ta, state = parts
        if not (_int(status) and _int(ta)):
            return None
        code = int(status)
        return LogLine(backend, int(ta), code >= 500 or code < 100)
    if len(parts) == 5 and parts[:2] == ["teecloud", "tcp"]:
        _t, _m, backend, tt, state = parts
        if not _int(tt) or not 1 <= len(state) <= 4:
            return None
        return LogLine(backend, int(tt), state[0] in _ERROR_STATES)
    return None


def _int(text: str) -> bool:
    body = text[1:] if text.startswith("-") else text
    return 0 < len(body) <= 10 and body.isdigit()


@dataclass
class AppStats:
    buckets: list[int] = field(
        default_factory=lambda: [0] * len(BUCKETS_S)
    )  # counts per bucket (not cumulative)
    sum_s: float = 0.0
    count: int = 0  # requests with a duration (histogram count)
    requests: int = 0
    errors: int = 0

    def observe(self, line: LogLine) -> None:
        self.requests += 1
        self.errors += line.error
        if line.duration_ms < 0:
            return
        seconds = line.duration_ms / 1000
        self.count += 1
        self.sum_s += seconds
        for i, bound in enumerate(BUCKETS_S):
            if seconds <= bound:
                self.buckets[i] += 1
                break


class AccessLog:
    def __init__(self, path: Path, *, max_apps: int = 1024, rcvbuf: int = 1 << 18) -> None:
        self.path = Path(path)
        self.max_apps = max_apps
        self.rcvbuf = rcvbuf
        self.malformed = 0
        self.connection_errors = 0  # failed before any request (TLS handshake failures): no app to count
        self.unrouted = 0  # lines for no app backend (an unknown name answered 421, the terminator hop)
        self._apps: dict[str, AppStats] = {}
        self._backend_app: dict[str, str] = {}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def set_backends(self, backend_app: Mapping[str, str]) -> None:
        """slot backend -> app_id, for the routes now in HAProxy. A slot no longer used keeps its last app
        (a request that ended just before its route went is logged after it; a slot is only reused by
        another app through this call): bounded by the number of slots."""
        with self._lock:
            self._backend_app.update(backend_app)

    def observe(self, raw: bytes) -> None:
        if raw.rstrip(b"\n") == CONNECTION_ERROR:
            with self._lock:
                self.connection_errors += 1
            return
        line = parse_line(raw)
        with self._lock:
            if line is None:
                self.malformed += 1
                return
            if line.backend in _NOT_AN_APP:
                return
            app = self._backend_app.get(line.backend)
            if app is None:
                self.unrouted += 1
                return
            stats = self._apps.get(app)
            if stats is None:
                if len(self._apps) >= self.max_apps:
                    app = _OTHER
                stats = self._apps.setdefault(app, AppStats())
            stats.observe(line)

    def start(self) -> AccessLog:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.settimeout(0.5)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="teecloud-gateway-accesslog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                raw = self._sock.recv(MAX_LINE + 1)
            except TimeoutError:
                continue
            except OSError:
                return
            self.observe(raw)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def snapshot(self) -> dict[str, AppStats]:
        with self._lock:
            return {
                a: AppStats(list(s.buckets), s.sum_s, s.count, s.requests, s.errors)
                for a, s in self._apps.items()
            }

    def metrics(self) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        apps = sorted(self.snapshot().items())
        name = "teecloud_gateway_request_duration_seconds"
        out = [
            f"# HELP {name} Duration of requests through the gateway (HTTP: request in to response out; "
            "TCP: the connection), per app, from HAProxy's log (ms resolution).",
            f"# TYPE {name} histogram",
        ]
        for app, s in apps:
            running = 0
            for bound, n in zip(BUCKETS_S, s.buckets, strict=True):
                running += n
                out.append(f'{name}_bucket{{app="{app}",le="{bound}"}} {running}')
            out.append(f'{name}_bucket{{app="{app}",le="+Inf"}} {s.count}')
            out.append(f'{name}_sum{{app="{app}"}} {s.sum_s:.3f}')
            out.append(f'{name}_count{{app="{app}"}} {s.count}')
        out += [
            "# HELP teecloud_gateway_requests_total Requests (TCP: connections) through the gateway.",
            "# TYPE teecloud_gateway_requests_total counter",
            *(f'teecloud_gateway_requests_total{{app="{app}"}} {s.requests}' for app, s in apps),
            "# HELP teecloud_gateway_request_errors_total Requests answered >= 500 or not at all, "
            "connections ended by a server/proxy/resource error.",
            "# TYPE teecloud_gateway_request_errors_total counter",
            *(f'teecloud_gateway_request_errors_total{{app="{app}"}} {s.errors}' for app, s in apps),
            "# HELP teecloud_gateway_access_log_lines_dropped_total Log lines not counted (malformed).",
            "# TYPE teecloud_gateway_access_log_lines_dropped_total counter",
            f"teecloud_gateway_access_log_lines_dropped_total {self.malformed}",
            "# HELP teecloud_gateway_connection_errors_total Connections that failed before any request "
            "(TLS handshake failures).",
            "# TYPE teecloud_gateway_connection_errors_total counter",
            f"teecloud_gateway_connection_errors_total {self.connection_errors}",
            "# HELP teecloud_gateway_unrouted_requests_total Requests for no registered app (421).",
            "# TYPE teecloud_gateway_unrouted_requests_total counter",
            f"teecloud_gateway_unrouted_requests_total {self.unrouted}",
            "",
        ]
        return "\n".join(out)
