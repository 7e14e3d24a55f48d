"""HTTP/2 toward the backend for plain (terminated) names: an app's port policy marks a port `"h2c": true`
(teecloud's extension of dstack's `port_policy` entries), the gateway then routes that port's plain names
to its `g` backend (`proto h2`: HTTP/2 cleartext by prior knowledge). Through real HAProxy with a real h2
client (httpx[http2]) and a real h2c server (hypercorn): the backend sees HTTP/2; on the app's other ports
HTTP/1.1 and WebSocket work as before; a malformed policy is refused with a clear error and registers
nothing."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from teecloud.appcompose import compose_hash, normalize_app_compose
from teecloud.chain import ChainClient
from teecloud.gateway import api
from teecloud.gateway.client import register
from teecloud.gateway.errors import CapacityExceeded, RegistrationRefused
from teecloud.gateway.haproxy import HaproxyPaths, render_config
from teecloud.gateway.portpolicy import BadPortPolicy, PortPolicy, parse_port_policy, port_policy_of
from teecloud.gateway.routing import DataPlaneLimits, Route, plan
from teecloud.gateway.server import GatewayServer

from .conftest import APP, BASE, INST1, INST2, Backend, Gateway, driver_gateway
from .h2c_backend import H2cBackend
from .test_port_policy import boot_with, restricted
from .test_registration import chain, endpoint, gateway

__all__ = ["chain", "gateway"]  # fixtures shared with test_registration

LIMITS = DataPlaneLimits(http_backends=8, tcp_backends=8, grpc_backends=4, servers_per_backend=2)


def test_the_policy_extension_is_strict_and_the_default_unchanged() -> None:
    policy = parse_port_policy(
        {"restrict_mode": True, "ports": [{"port": 8080, "pp": False, "h2c": True}, {"port": 9000}]}
    )
    assert policy == PortPolicy(True, ((8080, False), (9000, False)), h2c=(8080,))
    assert policy.wants_h2c(8080) and not policy.wants_h2c(9000) and not policy.wants_h2c(1)
    # written back as read; a port without it gets no `h2c` key, so a policy without h2c hashes as before
    assert policy.to_json() == {
        "restrict_mode": True,
        "ports": [{"port": 8080, "pp": False, "h2c": True}, {"port": 9000, "pp": False}],
    }
    plain = {"restrict_mode": True, "ports": [{"port": 9000, "pp": False}]}
    assert parse_port_policy(plain).to_json() == plain
    assert parse_port_policy({"restrict_mode": True, "ports": [{"port": 1, "h2c": False}]}).h2c == ()
    for bad in (
        {"ports": [{"port": 8080, "h2c": "yes"}]},
        {"ports": [{"port": 8080, "h2c": 1}]},
        {"ports": [{"port": 8080, "h2c": None}]},
        {"ports": [{"port": 8080, "h2": True}]},  # not the field's name
        {"ports": [{"port": 8080, "h2c": True}, {"port": 8080, "h2c": False}]},
        {"h2c": True, "ports": []},  # per port only
    ):
        with pytest.raises(BadPortPolicy, match="port_policy"):
            parse_port_policy(bad)


def test_deploy_option_writes_h2c_into_the_measured_app_compose() -> None:
    from teecloud.cloud.deploy import build_app_compose
    from teecloud.cloud.errors import InvalidOption
    from teecloud.cloud.options import AppOptions

    opts = AppOptions.build(gateway_ports=["8080:h2c", "9000:pp:h2c", "9100"])
    assert opts.port_policy == PortPolicy(True, ((8080, False), (9000, True), (9100, False)), (8080, 9000))
    app_compose, chash = build_app_compose(
        "services:\n  web:\n    image: nginx:1.27\n", name="web", port_policy=opts.port_policy
    )
    assert port_policy_of(app_compose, chash) == opts.port_policy
    for bad in (["80:h2"], ["80:h2c:h2c"], ["80:pp:pp"], ["80::h2c"], ["80:h2c:"]):
        with pytest.raises(InvalidOption):
            AppOptions.build(gateway_ports=bad)


def test_plan_sends_an_h2c_ports_plain_names_to_its_h2c_backend() -> None:
    routes = [
        Route(APP, INST1, 8080, "127.0.0.1:9001", h2c=True),
        Route(APP, INST1, 9090, "127.0.0.1:9002"),
    ]
    p = plan(routes, BASE, LIMITS)
    g = p.http_map[f"{APP}-8080g.{BASE}"]
    assert g.startswith("bg")
    for name in (f"{APP}-8080.{BASE}", f"{INST1}-8080.{BASE}"):
        assert p.http_map[name].startswith("bg")
    assert p.http_map[f"{APP}-8080.{BASE}"] == g
    assert p.http_map[f"{APP}-9090.{BASE}"].startswith("bh")  # the other port: HTTP/1.1 as before
    # no HTTP/1.1 slot is taken for the h2c port
    assert {b for b in p.servers if b.startswith("bh")} == {
        p.http_map[f"{APP}-9090.{BASE}"],
        p.http_map[f"{INST1}-9090.{BASE}"],
    }
    # the rendered `g` backends speak h2 to the server
    cfg = render_config(
        bind_host="127.0.0.1", port=8443, paths=HaproxyPaths("/r", "t"), limits=LIMITS, plan=p
    )
    assert f"backend {g}\n" in cfg
    section = cfg.split(f"backend {g}\n", 1)[1].split("\n\n", 1)[0]
    assert "server s0 127.0.0.1:9001 maxconn 256 proto h2" in section
    # no `g` slots: the gateway does no h2c, so the h2c port's plain names are not routed (421), never
    # sent HTTP/1.1 to a backend that asked for h2c
    none = plan(routes, BASE, DataPlaneLimits(grpc_backends=0))
    assert f"{APP}-8080.{BASE}" not in none.http_map and f"{APP}-9090.{BASE}" in none.http_map
    # a rollout: the app name follows the most common kind's instances; each instance name its own
    mixed = [Route(APP, INST1, 8080, "127.0.0.1:9001", h2c=True), Route(APP, INST2, 8080, "127.0.0.1:9003")]
    m = plan(mixed, BASE, LIMITS)
    assert m.http_map[f"{APP}-8080.{BASE}"].startswith("bh")  # a tie: no h2c
    assert m.servers[m.http_map[f"{APP}-8080.{BASE}"]][:1] == ("127.0.0.1:9003",)
    assert m.http_map[f"{INST1}-8080.{BASE}"].startswith("bg")
    assert m.http_map[f"{INST2}-8080.{BASE}"].startswith("bh")
    # sticky: turning h2c on moves the group to a `g` slot and frees its HTTP/1.1 one
    before = plan([Route(APP, INST1, 8080, "127.0.0.1:9001")], BASE, LIMITS)
    after = plan(routes, BASE, LIMITS, before)
    assert after.http_map[f"{APP}-8080g.{BASE}"] == before.http_map[f"{APP}-8080g.{BASE}"]
    assert after.http_map[f"{APP}-8080.{BASE}"] == after.http_map[f"{APP}-8080g.{BASE}"]


def test_g_slots_go_to_h2c_ports_first_and_never_refuse_other_apps() -> None:
    """More app ports than `g` slots: the others keep their plain and `s` names (before: the 9th app port
    of a default gateway was refused for want of a `g` slot); an h2c port still gets one."""
    limits = DataPlaneLimits(grpc_backends=4)
    ids = [(f"{i:02x}" * 20, f"{i + 100:02x}" * 20) for i in range(6)]
    routes = [Route(a, b, 8080, f"127.0.0.1:{9000 + i}") for i, (a, b) in enumerate(ids)]
    routes.append(Route(ids[5][0], ids[5][1], 8081, "127.0.0.1:9100", h2c=True))  # sorted last
    p = plan(routes, BASE, limits)
    for a, b in ids:
        assert p.http_map[f"{a}-8080.{BASE}"].startswith("bh") and f"{b}-8080s.{BASE}" in p.tcp_map
    # the h2c port's two groups have `g` slots; two of the twelve other groups got the rest
    app, inst = ids[5]
    assert p.http_map[f"{app}-8081.{BASE}"].startswith("bg") and p.http_map[f"{inst}-8081.{BASE}"].startswith(
        "bg"
    )
    assert len({b for b in p.http_map.values() if b.startswith("bg")}) == 4
    assert sum(1 for h in p.http_map if h.split(".")[0].endswith("8080g")) == 2
    # no `g` slot for an h2c port: that registration is refused (the data plane cannot serve it)
    with pytest.raises(CapacityExceeded, match="grpc"):
        plan(routes, BASE, DataPlaneLimits(grpc_backends=1))


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Gateway]:
    """HAProxy alone (the HaproxyDriver), as conftest's `gateway` (that name is the GatewayServer here)."""
    with driver_gateway(tmp_path, LIMITS) as gw:
        yield gw


@pytest.fixture
def h2c_backend() -> Iterator[H2cBackend]:
    b = H2cBackend()
    yield b
    b.stop()


def _h2_get(gw: Gateway, host: str, *, http2: bool = True) -> httpx.Response:
    with httpx.Client(verify=gw.client_context(), http2=http2, timeout=10) as c:
        return c.get(
            f"https://127.0.0.1:{gw.port}/p", headers={"Host": host}, extensions={"sni_hostname": host}
        )


def test_h2_client_reaches_an_h2c_backend_on_a_plain_name(
    plane: Gateway, h2c_backend: H2cBackend, backends: list[Backend]
) -> None:
    gateway = plane
    from websockets.sync.client import connect
    from websockets.sync.server import ServerConnection, serve

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ws_port = server.socket.getsockname()[1]
        gateway.driver.apply(
            [
                Route(APP, INST1, 8080, h2c_backend.address, h2c=True),
                Route(APP, INST1, 9090, backends[0].address),
                Route(APP, INST1, 9191, f"127.0.0.1:{ws_port}"),
            ]
        )
        # the h2c port: h2 from the client, h2 to the app (its plain name, its instance name and its `g` name)
        for name in (f"{APP}-8080.{BASE}", f"{INST1}-8080.{BASE}", f"{APP}-8080g.{BASE}"):
            r = _h2_get(gateway, name)
            assert (r.status_code, r.http_version, r.text) == (200, "HTTP/2", "h2c 2 /p"), name
        # an HTTP/1.1 client on that name: HAProxy still speaks h2c to the app
        r = _h2_get(gateway, f"{APP}-8080.{BASE}", http2=False)
        assert (r.http_version, r.text) == ("HTTP/1.1", "h2c 2 /p")
        # the app's other ports: HTTP/1.1 to the backend, whatever the client speaks
        r = _h2_get(gateway, f"{APP}-9090.{BASE}")
        assert r.http_version == "HTTP/2" and r.text == "one /p xff=127.0.0.1"
        assert _h2_get(gateway, f"{APP}-9090.{BASE}", http2=False).text == "one /p xff=127.0.0.1"
        # ... and WebSocket upgrades there
        raw = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        with connect(
            f"wss://{APP}-9191.{BASE}:{gateway.port}/", sock=raw, ssl=gateway.client_context()
        ) as ws:
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
        server.shutdown()
    assert gateway.driver.reloads == 0


def test_h2c_from_the_registered_app_compose(
    teecloud_home: Path, chain: ChainClient, gateway: GatewayServer, h2c_backend: H2cBackend
) -> None:
    compose = restricted("h2c", [{"port": 8080, "pp": False, "h2c": True}, {"port": 9090}])
    cvm = boot_with(teecloud_home, chain, compose)
    plain = Backend("plain")
    try:
        # a malformed policy: refused at step `compose` with the reason, nothing registered
        bad = restricted("h2c", [{"port": 8080, "h2c": "yes"}])
        bad_cvm = boot_with(teecloud_home, chain, bad)
        with pytest.raises(RegistrationRefused) as exc:
            register(
                gateway.registration_url,
                bad_cvm.key,
                bad_cvm.cert_der,
                [endpoint(plain)],
                ca_pem=gateway.ca.cert_pem,
                app_compose=normalize_app_compose(bad),
            )
        assert exc.value.step == "compose" and "h2c" in str(exc.value)
        assert gateway.registry.registrations() == []
        assert compose_hash(bad) != compose_hash(compose)
        register(
            gateway.registration_url,
            cvm.key,
            cvm.cert_der,
            [api.Endpoint(port=8080, host="127.0.0.1", host_port=h2c_backend.port), endpoint(plain, 9090)],
            ca_pem=gateway.ca.cert_pem,
            app_compose=json.dumps(compose),
        )
        routes = {r.port: r.h2c for reg in gateway.registry.registrations() for r in reg.routes}
        assert routes == {8080: True, 9090: False}
        # one connection per name (a connection is for its TLS name: another Host on it gets 421)
        for host, body in (
            (f"{cvm.app_id}-8080.{BASE}", "h2c 2 /p"),
            (f"{cvm.app_id}-9090.{BASE}", "plain /p"),
        ):
            with httpx.Client(verify=gateway.ca_file.as_posix(), http2=True, timeout=10) as c:
                r = c.get(
                    f"https://127.0.0.1:{gateway.public_port}/p",
                    headers={"Host": host},
                    extensions={"sni_hostname": host},
                )
            assert r.http_version == "HTTP/2" and r.text.startswith(body), (host, r.text)
        views = httpx.get(
            f"{gateway.admin_url}/admin/routes", headers={"Authorization": f"Bearer {gateway.admin_token}"}
        ).json()
        assert {v["port"]: v["h2c"] for v in views} == {8080: True, 9090: False}
    finally:
        plain.stop()
