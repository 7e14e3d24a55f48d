#!/usr/bin/env python3
"""What a custom domain costs per new TLS connection through the gateway (real HAProxy), against the same
app's `s` (passthrough) name; all on 127.0.0.1, baselines in the same run.

    s name          <app_id>-8443s.<base>: SNI found in passthrough.map, HAProxy alone
    custom, pinned  app.example.test after its first connection: the gateway's tick (<= 1 s) put it in
                    passthrough.map until its TXT TTL ends, so HAProxy routes it alone
    custom, cold    <n>.wild.test, each name new: the hook, then three DNS questions to a local dnslib
                    server (the exact name under the current prefix `_dstack-app-address`, then under the
                    legacy `_tapp-address`, then the parent's `-wildcard` record, which answers)
    cold, no legacy the same with the legacy question off (`CustomDomains(legacy=False)`: two questions),
                    what the third question costs

Each connection: TCP connect, TLS 1.3 handshake verifying the app's own certificate (so the connection
reached the app), close; sequential, one Python client (so the client's own cost is in every figure, equally).
Bounded: --count connections per case, at most 30 s each. Not run in CI.

    python3 bench/bench_gateway_domains.py [--count 300]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.gateway.dns_server import LocalDns  # noqa: E402
from tests.gateway.tls_backend import TlsEchoBackend  # noqa: E402

from teecloud.gateway.customdomain import CustomDomains, DnslibResolver  # noqa: E402
from teecloud.gateway.routing import DataPlaneLimits, Route  # noqa: E402
from teecloud.gateway.server import GatewayServer  # noqa: E402

APP = "a1" * 20
INST = "b1" * 20
BASE = "teecloud.localhost"


def one(port: int, sni: str, ctx: ssl.SSLContext) -> float:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:  # verifies the app's own certificate
            if tls.version() != "TLSv1.3":
                raise RuntimeError("not TLS 1.3")
    return (time.perf_counter() - t) * 1000


def run(name: str, port: int, names: list[str], ctx: ssl.SSLContext) -> None:
    times: list[float] = []
    errors = 0
    deadline = time.monotonic() + 30
    for sni in names:
        if time.monotonic() > deadline:
            break
        try:
            times.append(one(port, sni, ctx))
        except (OSError, RuntimeError):
            errors += 1
    times.sort()
    total_s = sum(times) / 1000
    print(
        f"| {name} | {len(times)} | {len(times) / total_s:.0f} | {statistics.median(times):.2f} | "
        f"{times[int(len(times) * 0.99) - 1]:.2f} | {errors} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=300)
    args = ap.parse_args()
    count = max(10, min(args.count, 5000))
    dns = LocalDns()
    dns.zone.set("_dstack-app-address.app.example.test", f"{APP}:8443", ttl=3600)
    dns.zone.set("_dstack-app-address-wildcard.wild.test", f"{APP}:8443", ttl=3600)
    with (
        tempfile.TemporaryDirectory(prefix="teecloud-bench-domains-") as tmp,
        TlsEchoBackend(Path(tmp)) as app,
    ):
        custom = CustomDomains(DnslibResolver("127.0.0.1", dns.port), base_domain=BASE)
        gw = GatewayServer(
            Path(tmp) / "gw",
            base_domain=BASE,
            peers=None,  # type: ignore[arg-type]  # no registration in this bench: routes are set directly
            chain=None,  # type: ignore[arg-type]
            admin_token="bench-admin-token-0123456789",
            limits=DataPlaneLimits(http_backends=4, tcp_backends=4, grpc_backends=0, servers_per_backend=2),
            custom_domains=custom,
        ).start()
        try:
            gw.registry.register(APP, INST, "00" * 32, [Route(APP, INST, 8443, app.address)], now=time.time())
            gw.sync()
            ctx = ssl.create_default_context(cadata=app.cert_pem)
            ctx.check_hostname = False
            print("| case | connections | conn/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
            run("`s` name (passthrough map)", gw.public_port, [f"{APP}-8443s.{BASE}"] * count, ctx)
            one(gw.public_port, "app.example.test", ctx)  # resolved, then pinned at the next tick
            time.sleep(1.2)
            run("custom domain, pinned in passthrough.map", gw.public_port, ["app.example.test"] * count, ctx)
            n_cold = min(count, 200)
            for legacy in (True, False):
                custom.legacy = legacy  # read per lookup; only new names below, so no cached answer applies
                asked = custom.queries
                cold = [f"{'n' if legacy else 'm'}{i}.wild.test" for i in range(n_cold)]
                label = (
                    "3 DNS questions: current, legacy, wildcard" if legacy else "legacy off: 2 DNS questions"
                )
                run(f"custom domain, each name new ({label})", gw.public_port, cold, ctx)
                print(f"  DNS questions asked: {custom.queries - asked} for {n_cold} new names")
        finally:
            gw.stop()
            dns.stop()


if __name__ == "__main__":
    main()
