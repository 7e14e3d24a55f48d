"""Per-app latency histograms and counters in the admin listener's metrics, from HAProxy's access log lines
(teecloud.gateway.accesslog): the parser is strict and bounded, and requests through real HAProxy move the
right app's buckets and counters (an app name and an instance name count for their app)."""

from __future__ import annotations

import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from teecloud.chain import ChainClient
from teecloud.gateway import api
from teecloud.gateway.accesslog import BUCKETS_S, MAX_LINE, AccessLog, parse_line
from teecloud.gateway.client import register
from teecloud.gateway.routing import DataPlaneLimits
from teecloud.gateway.server import GatewayServer
from tests.gateway.conftest import BASE
from tests.gateway.test_registration import TOKEN, boot_cvm, chain, gateway, get, make_gateway

__all__ = ["chain", "gateway"]


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b"teecloud http bh3 200 12 ----", ("bh3", 12, False)),
        (b"teecloud http bhp0 503 -1 SC--", ("bhp0", -1, True)),
        (b"teecloud http bh3 -1 -1 CR--", ("bh3", -1, True)),  # no response at all
        (b"teecloud tcp bt1 5021 ----", ("bt1", 5021, False)),
        (b"teecloud tcp bt1 30 SC", ("bt1", 30, True)),
        (b"teecloud tcp bt1 30 CD", ("bt1", 30, False)),  # the client went away: not the app's error
    ],
)
def test_log_lines_parse(line: bytes, want: tuple[str, int, bool]) -> None:
    got = parse_line(line)
    assert got is not None and (got.backend, got.duration_ms, got.error) == want


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"teecloud http bh3 200 12",
        b"teecloud http bh3 200 12 ---- extra",
        b"teecloud http bh3 2x0 12 ----",
        b"teecloud http bh3 200 99999999999 ----",
        b"teecloud tcp bt1 -- ----",
        b"teecloud tcp bt1 3 ",
        b"teecloud udp bt1 3 ----",
        b"<134>Dec  4 haproxy[1]: teecloud http bh3 200 12 ----",
        "teecloud http bh3 200 12 \u00e9---".encode(),
        b"teecloud http bh3 200 12 " + b"-" * MAX_LINE,
    ],
)
def test_malformed_lines_are_dropped_and_counted(line: bytes, tmp_path: Path) -> None:
    assert parse_line(line) is None
    log = AccessLog(tmp_path / "a.sock")
    log.set_backends({"bh3": "aa" * 20})
    log.observe(line)
    assert log.malformed == 1 and log.snapshot() == {}


def test_histogram_and_the_bound_on_apps(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "a.sock", max_apps=2)
    log.set_backends({"bh0": "a" * 40, "bh1": "b" * 40, "bh2": "c" * 40})
    for ms in (0, 1, 7, 7, 300):
        log.observe(f"teecloud http bh0 200 {ms} ----".encode())
    log.observe(b"teecloud http bh1 502 4 SH--")
    log.observe(b"teecloud http bh2 200 4 ----")  # a third app: counted, under _other
    log.observe(b"teecloud http fe_terminate 421 0 LR--")  # no app
    log.observe(b"teecloud tcp be_terminate 9 ----")  # the hop to the terminator: not an app request
    log.observe(b"teecloud connection_error\n")  # a failed TLS handshake: no request, no app
    log.set_backends({"bh1": "a" * 40})  # a slot reassigned: its lines count for the new app from now on
    log.observe(b"teecloud http bh1 200 4 ----")
    text = log.metrics()
    a = "a" * 40
    assert f'teecloud_gateway_request_duration_seconds_bucket{{app="{a}",le="0.001"}} 2' in text
    assert f'teecloud_gateway_request_duration_seconds_bucket{{app="{a}",le="0.01"}} 5' in text
    assert f'teecloud_gateway_request_duration_seconds_bucket{{app="{a}",le="0.25"}} 5' in text
    assert f'teecloud_gateway_request_duration_seconds_bucket{{app="{a}",le="0.5"}} 6' in text
    assert f'teecloud_gateway_request_duration_seconds_bucket{{app="{a}",le="+Inf"}} 6' in text
    assert f'teecloud_gateway_request_duration_seconds_sum{{app="{a}"}} 0.319' in text
    assert f'teecloud_gateway_request_errors_total{{app="{"b" * 40}"}} 1' in text
    assert f'teecloud_gateway_requests_total{{app="{a}"}} 6' in text
    assert 'teecloud_gateway_requests_total{app="_other"} 1' in text
    assert "teecloud_gateway_unrouted_requests_total 1" in text
    assert "teecloud_gateway_connection_errors_total 1" in text and log.malformed == 0
    assert len(log.snapshot()) == 3 and len(BUCKETS_S) == 15


class SlowBackend:
    """Answers every GET after `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_requests_through_the_gateway_move_their_apps_buckets(
    teecloud_home: Path, chain: ChainClient
) -> None:
    with make_gateway(teecloud_home, chain, ttl_s=120.0) as gateway:
        _requests_move_buckets(teecloud_home, chain, gateway)


def test_two_haproxy_processes_log_and_export_as_one(teecloud_home: Path, chain: ChainClient) -> None:
    """DataPlaneLimits(processes=2) (the one-port layout: each process with its own hop): the access log
    lines of both processes reach the same histograms, and HAProxy's exporters come out as one exposition,
    each series labelled with its process and its route group."""
    limits = DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2, processes=2)
    with make_gateway(teecloud_home, chain, ttl_s=120.0, limits=limits) as gateway:
        assert len(gateway.driver.pids) == 2 and None not in gateway.driver.pids
        _requests_move_buckets(teecloud_home, chain, gateway)
        text = httpx.get(
            gateway.admin_url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        ).text
        assert re.search(r'^haproxy_process_nbthread\{haproxy_process="0"\} 1$', text, re.M), text[:2000]
        assert re.search(r'^haproxy_process_nbthread\{haproxy_process="1"\} 1$', text, re.M)
        assert text.count("# TYPE haproxy_process_nbthread ") == 1
        assert re.search(r'\{haproxy_process="[01]",proxy="bh\d+",app_id="[0-9a-f]{40}",port="8080"', text)


def _requests_move_buckets(teecloud_home: Path, chain: ChainClient, gateway: GatewayServer) -> None:
    slow, broken = boot_cvm(teecloud_home, chain, "slow"), boot_cvm(teecloud_home, chain, "broken")
    backend = SlowBackend(0.15)
    with socket.socket() as s:  # a port nothing listens on: the broken app's requests get 503
        s.bind(("127.0.0.1", 0))
        dead_port = int(s.getsockname()[1])
    try:
        for cvm, port in ((slow, backend.port), (broken, dead_port)):
            register(
                gateway.registration_url,
                cvm.key,
                cvm.cert_der,
                [api.Endpoint(port=8080, host="127.0.0.1", host_port=port)],
                ca_pem=gateway.ca.cert_pem,
            )
        for host in [f"{slow.app_id}-8080.{BASE}"] * 3 + [f"{slow.instance_id}-8080.{BASE}"]:
            assert get(gateway, host).status_code == 200
        for _ in range(2):
            assert get(gateway, f"{broken.app_id}-8080.{BASE}").status_code == 503
        assert get(gateway, f"{'ee' * 20}-8080.{BASE}").status_code == 421
        # a client that does not trust the certificate: the handshake fails, no request
        with pytest.raises(httpx.ConnectError), httpx.Client(timeout=10) as untrusting:
            untrusting.get(
                f"https://127.0.0.1:{gateway.public_port}/",
                headers={"Host": f"{slow.app_id}-8080.{BASE}"},
                extensions={"sni_hostname": f"{slow.app_id}-8080.{BASE}"},
            )
        auth = {"Authorization": f"Bearer {TOKEN}"}
        name = "teecloud_gateway_request_duration_seconds"
        deadline = time.monotonic() + 10
        while True:  # the log lines arrive asynchronously (a datagram each, from any HAProxy process)
            text = httpx.get(gateway.admin_url + "/metrics", headers=auth, timeout=10).text
            counts = (
                _value(text, f'teecloud_gateway_requests_total{{app="{slow.app_id}"}}'),
                _value(text, f'teecloud_gateway_requests_total{{app="{broken.app_id}"}}'),
            )
            failed = _value(text, "teecloud_gateway_connection_errors_total")
            if (counts == (4, 2) and failed >= 1) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counts == (4, 2), text[:3000]
        s_app, b_app = slow.app_id, broken.app_id
        # 150 ms each: above the 0.1 s bucket, inside the 0.25 s one
        assert _value(text, f'{name}_bucket{{app="{s_app}",le="0.1"}}') == 0
        assert _value(text, f'{name}_bucket{{app="{s_app}",le="0.25"}}') == 4
        assert _value(text, f'{name}_count{{app="{s_app}"}}') == 4
        assert 0.6 <= _value(text, f'{name}_sum{{app="{s_app}"}}') < 1.0
        assert _value(text, f'teecloud_gateway_request_errors_total{{app="{s_app}"}}') == 0
        assert _value(text, f'teecloud_gateway_request_errors_total{{app="{b_app}"}}') == 2
        assert _value(text, "teecloud_gateway_unrouted_requests_total") >= 1
        assert _value(text, "teecloud_gateway_access_log_lines_dropped_total") == 0
        assert _value(text, "teecloud_gateway_connection_errors_total") >= 1
        assert "haproxy_backend_http_responses_total" in text  # HAProxy's own exporter follows
    finally:
        backend.stop()
