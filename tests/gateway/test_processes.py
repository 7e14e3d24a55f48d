"""`DataPlaneLimits(processes=N)`: N HAProxy processes of one thread each on the same ports (SO_REUSEPORT), as
nginx runs workers (faster than one process of N threads here: docs/benchmarks.md). Rendered with
`nbthread 1`, per-process runtime and metrics sockets and hop, and the caps split so their sum never exceeds
the configured cap; through real HAProxy: every process serves the public port, every route change reaches
each process (route churn under load loses no request, no reload), a certificate reload and supervision act
on each, the metrics of all processes come out as one exposition."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from teecloud.cli import app as cli_app
from teecloud.gateway.devca import DevCa
from teecloud.gateway.driver import find_haproxy
from teecloud.gateway.errors import GatewayUsageError
from teecloud.gateway.haproxy import HaproxyPaths, merge_metrics, render_config, render_map
from teecloud.gateway.routing import DataPlaneLimits, Route, plan

from .conftest import APP, BASE, INST1, INST2, Backend, Gateway, driver_gateway, free_port

PATHS = HaproxyPaths("/run/gw", "teecloud-gw-test")


def _limits(processes: int, **kw: object) -> DataPlaneLimits:
    return DataPlaneLimits(
        http_backends=8,
        tcp_backends=8,
        servers_per_backend=2,
        processes=processes,
        max_connections=4096,
        max_conn_per_app=1024,
        max_conn_per_server=256,
        **kw,  # type: ignore[arg-type]
    )


def test_rendered_per_process_with_the_caps_split(tmp_path: Path) -> None:
    routes = [Route(APP, INST1, 8080, "127.0.0.1:9000")]
    one = render_config(
        bind_host="127.0.0.1", port=8443, paths=PATHS, limits=_limits(1), plan=plan(routes, BASE, _limits(1))
    )
    assert "nbthread" not in one and "    maxconn 4096" in one and "be_conn gt 1024" in one
    assert "server s0 127.0.0.1:9000 maxconn 256" in one
    limits = _limits(3)
    second = PATHS.for_process(1)
    cfg = render_config(
        bind_host="127.0.0.1", port=8443, paths=second, limits=limits, plan=plan(routes, BASE, limits)
    )
    # one thread each; every cap is the configured one divided between the processes (sum <= cap)
    assert "    nbthread 1" in cfg and "    maxconn 1365" in cfg and "    maxconn 4096" not in cfg
    assert "be_conn gt 341 }" in cfg and "be_conn gt 1024" not in cfg
    assert "server s0 127.0.0.1:9000 maxconn 85" in cfg and "maxconn 256" not in cfg
    # its own runtime and metrics sockets and its own hop (an abstract socket cannot be shared); the maps
    # and certificates are the same files for every process
    assert "stats socket /run/gw/admin-1.sock " in cfg and "unix@/run/gw/metrics-1.sock " in cfg
    assert "abns@teecloud-gw-test-1 " in cfg and "abns@teecloud-gw-test " not in cfg
    assert second.config == "/run/gw/haproxy-1.cfg" and PATHS.config == "/run/gw/haproxy.cfg"
    assert "map(/run/gw/http.map)" in cfg and "crt /run/gw/certs/" in cfg
    # HAProxy accepts it (the one-port layout: with its hop)
    paths = HaproxyPaths(str(tmp_path), "teecloud-gw-test").for_process(1)
    ca = DevCa(now=int(time.time()))
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "w.pem").write_text(
        ca.issue_wildcard(BASE, now=int(time.time())).haproxy_pem(ca.cert_pem)
    )
    p = plan(routes, BASE, limits)
    Path(paths.http_map).write_text(render_map(p.http_map))
    Path(paths.tcp_map).write_text(render_map(p.tcp_map))
    Path(paths.config).write_text(
        render_config(bind_host="127.0.0.1", port=8443, paths=paths, limits=limits, plan=p)
    )
    r = subprocess.run([find_haproxy(), "-c", "-f", paths.config], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]


def test_processes_and_caps_are_checked() -> None:
    for bad in (0, 65, -1):
        with pytest.raises(GatewayUsageError, match="processes"):
            DataPlaneLimits(processes=bad)
    # a cap below the number of processes would give some process a share of 0 (or the sum past the cap)
    with pytest.raises(GatewayUsageError, match="max_conn_per_app must be at least processes"):
        DataPlaneLimits(processes=4, max_conn_per_app=3)
    assert DataPlaneLimits(processes=4, max_conn_per_app=4).max_conn_per_app == 4


def test_metrics_of_all_processes_are_one_exposition() -> None:
    a = (
        b"# HELP haproxy_backend_bytes_in_total Bytes in.\n# TYPE haproxy_backend_bytes_in_total counter\n"
        b'haproxy_backend_bytes_in_total{proxy="bh0"} 10\n'
        b"# HELP haproxy_process_nbthread Threads.\n# TYPE haproxy_process_nbthread gauge\n"
        b"haproxy_process_nbthread 1\n"
    )
    b = a.replace(b"} 10", b"} 32")
    merged = merge_metrics([a, b]).decode()
    assert merged.splitlines() == [
        "# HELP haproxy_backend_bytes_in_total Bytes in.",
        "# TYPE haproxy_backend_bytes_in_total counter",
        'haproxy_backend_bytes_in_total{haproxy_process="0",proxy="bh0"} 10',
        'haproxy_backend_bytes_in_total{haproxy_process="1",proxy="bh0"} 32',
        "# HELP haproxy_process_nbthread Threads.",
        "# TYPE haproxy_process_nbthread gauge",
        'haproxy_process_nbthread{haproxy_process="0"} 1',
        'haproxy_process_nbthread{haproxy_process="1"} 1',
    ]
    assert merge_metrics([a]) == a  # one process: unchanged
    assert 'x{haproxy_process="1"} 2' in merge_metrics([b"x{} 1\n", b"x{} 2\n"]).decode()


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[Gateway]:
    with driver_gateway(tmp_path, _limits(2, passthrough_port=free_port())) as gw:
        yield gw


def _sessions(gw: Gateway, k: int) -> int:
    """Client sessions process k's public frontend accepted (`show stat`, column stot)."""
    for line in gw.driver.command("show stat", process=k).splitlines():
        fields = line.split(",")
        if fields[:2] == ["fe_terminate", "FRONTEND"]:
            return int(fields[7])
    raise AssertionError("no fe_terminate in show stat")


def _get_new_connection(gw: Gateway, host: str) -> httpx.Response:
    return gw.get(host, timeout=10)  # a new client: a new TCP + TLS connection, the kernel picks the process


def test_every_process_serves_and_gets_every_route(two_processes: Gateway, backends: list[Backend]) -> None:
    gw = two_processes
    pids = gw.driver.pids
    assert len(pids) == 2 and None not in pids and pids[0] != pids[1]
    gw.driver.apply([Route(APP, INST1, 8080, backends[0].address)])
    host = f"{APP}-8080.{BASE}"
    for k in (0, 1):  # the route is in each process's map
        assert f"{host} bh" in gw.driver.command(f"show map {gw.driver.paths.http_map}", process=k)
    for _ in range(40):
        r = _get_new_connection(gw, host)
        assert r.status_code == 200 and r.text == "one / xff=127.0.0.1"
    # the kernel spread the 40 connections over both processes (each > 0: the chance of all 40 on one of
    # two is 2^-39 with SO_REUSEPORT's hash of the client port)
    assert _sessions(gw, 0) > 0 and _sessions(gw, 1) > 0
    assert _sessions(gw, 0) + _sessions(gw, 1) >= 40
    # a removed route is gone from every process: 421
    gw.driver.apply([])
    for _ in range(10):
        assert _get_new_connection(gw, host).status_code == 421
    assert gw.driver.pids == pids and gw.driver.reloads == 0


def test_route_churn_under_load_loses_no_request(two_processes: Gateway, backends: list[Backend]) -> None:
    """A bounded load loop (4 s; a new connection per request, so both processes take requests) while
    routes come and go in every process through the runtime API: every request answered 200, no reload."""
    gw = two_processes
    stable = Route(APP, INST1, 8080, backends[0].address)
    extra = Route(APP, INST2, 8080, backends[1].address)
    other = Route("c1" * 20, "c2" * 20, 9000, backends[1].address)
    gw.driver.apply([stable])
    pids = gw.driver.pids
    host = f"{APP}-8080.{BASE}"
    stop = time.monotonic() + 4.0
    results: list[int | str] = []
    lock = threading.Lock()

    def load() -> None:
        n = 0
        while time.monotonic() < stop and n < 2000:
            n += 1
            try:
                code: int | str = _get_new_connection(gw, host).status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            with lock:
                results.append(code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    changes = 0
    while time.monotonic() < stop - 0.3:
        gw.driver.apply([stable, extra, other])
        time.sleep(0.05)
        gw.driver.apply([stable])
        time.sleep(0.05)
        changes += 2
    for t in threads:
        t.join()
    errors = [c for c in results if c != 200]
    assert len(results) > 40 and changes > 10
    assert errors == [], f"{len(errors)} of {len(results)} requests failed: {errors[:5]}"
    assert _sessions(gw, 0) > 0 and _sessions(gw, 1) > 0
    assert gw.driver.pids == pids and gw.driver.reloads == 0


def test_reload_and_supervision_act_on_each_process(two_processes: Gateway, backends: list[Backend]) -> None:
    gw = two_processes
    gw.driver.apply([Route(APP, INST1, 8080, backends[0].address)])
    host = f"{APP}-8080.{BASE}"
    workers = [gw.driver._worker_pid(k) for k in (0, 1)]
    assert None not in workers
    # a new certificate: both processes reload (new workers), the routes stay
    gw.driver.reload_certs(gw.ca.issue_wildcard(BASE, now=int(time.time())), gw.ca.cert_pem)
    after = [gw.driver._worker_pid(k) for k in (0, 1)]
    assert after[0] not in (None, workers[0]) and after[1] not in (None, workers[1])
    assert _get_new_connection(gw, host).status_code == 200
    # the second process dies: check() restarts it alone, with the current routes
    first, second = gw.driver.pids
    assert first is not None and second is not None
    os.killpg(second, signal.SIGKILL)  # its own session: that master and its worker
    deadline = time.monotonic() + 10
    while gw.driver.pids[1] is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.driver.check() and gw.driver.restarts == 1
    assert gw.driver.pids[0] == first and gw.driver.pids[1] not in (None, second)
    assert f"{host} bh" in gw.driver.command(f"show map {gw.driver.paths.http_map}", process=1)
    for _ in range(10):
        assert _get_new_connection(gw, host).status_code == 200
    # stop: no process left
    gw.driver.stop()
    assert gw.driver.pids == [None, None]
    for pid in (first, second):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_gateway_up_refuses_a_bad_process_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    for bad in ("-1", "65"):
        result = CliRunner().invoke(
            cli_app, ["gateway", "up", "--trust-dev-root", "--haproxy-processes", bad]
        )
        assert result.exit_code == 2 and "0..64" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "gateway-server").exists()
