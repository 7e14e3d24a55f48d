"""The pure parts: route names (dstack's), the sticky plan, the rendered configuration (checked by the real
`haproxy -c`) and the order of runtime commands."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from teecloud.gateway.devca import DevCa
from teecloud.gateway.driver import find_haproxy
from teecloud.gateway.errors import BadHostName, CapacityExceeded, GatewayUsageError
from teecloud.gateway.haproxy import (
    CustomDomainHook,
    HaproxyPaths,
    render_config,
    render_map,
    runtime_commands,
)
from teecloud.gateway.routing import (
    DataPlaneLimits,
    HostName,
    Plan,
    Route,
    check_base_domain,
    parse_host,
    plan,
)
from tests.gateway.conftest import APP, BASE, INST1, INST2

LIMITS = DataPlaneLimits(http_backends=3, tcp_backends=3, servers_per_backend=2)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        (f"{APP}.{BASE}", HostName(APP, 80, "http")),
        (f"{APP}-8080.{BASE}", HostName(APP, 8080, "http")),
        (f"{APP}-443s.{BASE}", HostName(APP, 443, "tcp")),
        (f"{APP.upper()}s.{BASE.upper()}.", HostName(APP, 80, "tcp")),
        (f"{APP}-50051g.{BASE}", HostName(APP, 50051, "grpc")),
        (f"{INST1}g.{BASE}", HostName(INST1, 80, "grpc")),
    ],
)
def test_route_names(name: str, want: HostName) -> None:
    assert parse_host(name, BASE) == want


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 254,
        f"x.{APP}.{BASE}",  # two labels deep
        f"*.{BASE}",
        f"{APP}-0.{BASE}",
        f"{APP}-99999.{BASE}",
        f"{APP}-8080gs.{BASE}",  # dstack refuses `gs` too
        f"{APP}-8080sg.{BASE}",
        f"{APP[:-1]}.{BASE}",
        f"{APP}.evil{BASE}",
        f"{APP}.{BASE}.evil.com",
        f"{APP}é.{BASE}",
        f"{APP}.{BASE}".encode() + b"\xff",
        BASE,
    ],
)
def test_hostile_names_are_refused(name: str | bytes) -> None:
    with pytest.raises(BadHostName):
        parse_host(name, BASE)


def test_base_domain_and_route_checks() -> None:
    assert check_base_domain("TeeCloud.Localhost.") == BASE
    for bad in ("localhost", "a..b", "-a.b", "a b.c"):
        with pytest.raises(GatewayUsageError):
            check_base_domain(bad)
    with pytest.raises(GatewayUsageError):
        Route(APP, INST1, 80, "example.com:80")
    with pytest.raises(GatewayUsageError):
        Route(APP, INST1, 80, "0.0.0.0:80")
    with pytest.raises(GatewayUsageError):
        Route("xyz", INST1, 80, "127.0.0.1:80")


def test_plan_is_sticky_and_bounded() -> None:
    r1 = Route(APP, INST1, 8080, "127.0.0.1:1001")
    r2 = Route(APP, INST2, 8080, "127.0.0.1:1002")
    p1 = plan([r1], BASE, LIMITS)
    p2 = plan([r1, r2], BASE, LIMITS, p1)
    app_backend = p1.http_map[f"{APP}-8080.{BASE}"]
    assert p2.http_map[f"{APP}-8080.{BASE}"] == app_backend
    assert p2.servers[app_backend][:1] == ("127.0.0.1:1001",)  # r1 kept its slot
    assert "127.0.0.1:1002" in p2.servers[app_backend]
    assert p2.tcp_map[f"{INST2}-8080s.{BASE}"].startswith("bt")
    p3 = plan([r2], BASE, LIMITS, p2)
    assert p3.servers[app_backend] == (None, "127.0.0.1:1002")
    assert f"{INST1}-8080.{BASE}" not in p3.http_map
    # 3 backends per mode: an app group and 2 instance groups fit, a fourth group does not.
    r3 = Route(APP, "c1" * 20, 8080, "127.0.0.1:1003")
    with pytest.raises(CapacityExceeded):
        plan([r1, r2, r3], BASE, LIMITS)
    many = [Route("d1" * 20, f"{i:040x}", 9, f"127.0.0.1:{2000 + i}") for i in range(3)]
    with pytest.raises(CapacityExceeded):
        plan(many, BASE, DataPlaneLimits(http_backends=8, tcp_backends=8, servers_per_backend=2))


def test_runtime_commands_make_servers_before_maps_and_remove_after() -> None:
    paths = HaproxyPaths("/run/gw", "t")
    r1 = Route(APP, INST1, 80, "127.0.0.1:1001")
    p1 = plan([r1], BASE, LIMITS)
    cmds = runtime_commands(Plan(), p1, paths, LIMITS)
    first_map = next(i for i, c in enumerate(cmds) if "map" in c)
    assert all(c.startswith("set server") for c in cmds[:first_map])
    assert f"add map /run/gw/http.map {APP}.{BASE} bh0" in cmds
    back = runtime_commands(p1, Plan(), paths, LIMITS)
    first_maint = next(i for i, c in enumerate(back) if c.endswith("state maint"))
    assert all("del map" in c for c in back[:first_maint])
    assert runtime_commands(p1, p1, paths, LIMITS) == []


def test_rendered_configuration_passes_haproxy_check(tmp_path: Path) -> None:
    import time

    paths = HaproxyPaths(str(tmp_path), "teecloud-gw-test")
    ca = DevCa(now=int(time.time()))
    cert = ca.issue_wildcard(BASE, now=int(time.time()))
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "w.pem").write_text(cert.haproxy_pem(ca.cert_pem))
    p = plan([Route(APP, INST1, 8080, "127.0.0.1:1001"), Route(APP, INST2, 8080, "[::1]:1002")], BASE, LIMITS)
    Path(paths.http_map).write_text(render_map(p.http_map))
    Path(paths.tcp_map).write_text(render_map(p.tcp_map))
    Path(paths.config).write_text(
        render_config(bind_host="127.0.0.1", port=1, paths=paths, limits=LIMITS, plan=p)
    )
    out = subprocess.run(
        [find_haproxy(), "-c", "-f", paths.config], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "server s1 [::1]:1002" in Path(paths.config).read_text()
    tcp = render_config(
        bind_host="127.0.0.1", port=1, paths=paths, limits=LIMITS, plan=p, terminate_mode="tcp"
    )
    Path(paths.config).write_text(tcp)
    out = subprocess.run(
        [find_haproxy(), "-c", "-f", paths.config], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "backend bh0\n    mode tcp" in tcp and "frontend fe_terminate\n    mode tcp" in tcp
    # and a broken one does not (the check is real)
    Path(paths.config).write_text(
        Path(paths.config).read_text().replace("balance leastconn", "balance nope", 1)
    )
    bad = subprocess.run(
        [find_haproxy(), "-c", "-f", paths.config], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0


def test_custom_domains_follow_their_app_port_in_the_plan() -> None:
    r = Route(APP, INST1, 8443, "127.0.0.1:9001")
    custom = {"app.example.com": (APP, 8443), "other.example.com": (APP, 9999)}
    p = plan([r], BASE, LIMITS, None, custom)
    assert p.tcp_map["app.example.com"] == p.tcp_map[f"{APP}-8443s.{BASE}"]
    assert "other.example.com" not in p.tcp_map  # the app has no route for that port
    gone = plan([], BASE, LIMITS, p, custom)
    assert "app.example.com" not in gone.tcp_map
    cmds = runtime_commands(p, gone, HaproxyPaths("/run/gw", "t"), LIMITS)
    assert any(c.endswith(" app.example.com") and c.startswith("del map") for c in cmds)


def test_pp_ports_take_backends_whose_servers_send_proxy_v2() -> None:
    pp = Route(APP, INST1, 8080, "127.0.0.1:1001", proxy_protocol=True)
    plain = Route(APP, INST1, 9090, "127.0.0.1:1002")
    p = plan([pp, plain], BASE, LIMITS)
    assert p.http_map[f"{APP}-8080.{BASE}"] == "bhp0" and p.tcp_map[f"{APP}-8080s.{BASE}"] == "btp0"
    assert p.http_map[f"{APP}-8080g.{BASE}"] == "bgp0"
    assert p.http_map[f"{APP}-9090.{BASE}"] == "bh0" and p.tcp_map[f"{APP}-9090s.{BASE}"] == "bt0"
    paths = HaproxyPaths("/run/gw", "t")
    cfg = render_config(bind_host="127.0.0.1", port=1, paths=paths, limits=LIMITS, plan=p)
    # golden: the pp pool's servers send PROXY v2, free slots included (a route moves in at run time)
    assert (
        "backend bhp0\n"
        "    mode http\n"
        "    balance leastconn\n"
        "    retries 2\n"
        "    option redispatch\n"
        '    http-request return status 503 content-type text/plain string "the app is at its connection '
        'cap" if { be_conn gt 1024 }\n'
        "    server s0 127.0.0.1:1001 maxconn 256 send-proxy-v2\n"
        "    server s1 127.0.0.1:1 disabled maxconn 256 send-proxy-v2\n"
    ) in cfg
    assert (
        "backend btp0\n"
        "    mode tcp\n"
        "    balance leastconn\n"
        "    retries 2\n"
        "    option redispatch\n"
        "    tcp-request content reject if { be_conn gt 1024 }\n"
        "    server s0 127.0.0.1:1001 maxconn 256 send-proxy-v2\n"
    ) in cfg
    assert "    server s0 127.0.0.1:1001 maxconn 256 proto h2 send-proxy-v2\n" in cfg  # bgp0
    # non-pp ports are unchanged: no server outside the pp pools sends PROXY v2
    blocks = [b for b in cfg.split("\nbackend ")[1:] if not b.startswith("be_terminate")]
    for block in blocks:
        name = block.split("\n", 1)[0]
        sends = "send-proxy-v2" in block
        assert sends == (name[:3] in ("bhp", "btp", "bgp")), name
    assert sum(b.startswith(("bhp", "btp", "bgp")) for b in blocks) == 3 * LIMITS.pp_backends
    assert "    server s0 127.0.0.1:1002 maxconn 256\n" in cfg


def test_pp_rollouts_and_pool_limits() -> None:
    a = Route(APP, INST1, 8080, "127.0.0.1:1001", proxy_protocol=True)
    b = Route(APP, INST2, 8080, "127.0.0.1:1002", proxy_protocol=True)
    old = Route(APP, "c3" * 20, 8080, "127.0.0.1:1003")  # an instance of the previous compose (no pp)
    p = plan([a, b, old], BASE, LIMITS)
    app_backend = p.http_map[f"{APP}-8080.{BASE}"]
    # the app name balances over the majority (pp) only; each instance's own name reaches it correctly
    assert app_backend.startswith("bhp") and set(p.servers[app_backend]) == {a.address, b.address}
    assert not p.http_map[f"{'c3' * 20}-8080.{BASE}"].startswith("bhp")
    assert p.http_map[f"{INST1}-8080.{BASE}"].startswith("bhp")
    # a tie sends no PROXY v2
    tie = plan([a, old], BASE, LIMITS)
    assert set(tie.servers[tie.http_map[f"{APP}-8080.{BASE}"]]) == {old.address, None}
    # an app port that turns pp moves to the pp pool; its old backend goes to maintenance
    before = plan([Route(APP, INST1, 8080, "127.0.0.1:1001")], BASE, LIMITS)
    after = plan([a], BASE, LIMITS, before)
    assert before.http_map[f"{APP}-8080.{BASE}"] == "bh0" and after.http_map[f"{APP}-8080.{BASE}"] == "bhp0"
    cmds = runtime_commands(before, after, HaproxyPaths("/run/gw", "t"), LIMITS)
    assert "set server bh0/s0 state maint" in cmds and "set server bhp0/s0 state ready" in cmds
    assert f"set map /run/gw/http.map {APP}-8080.{BASE} bhp0" in cmds
    with pytest.raises(CapacityExceeded, match="PROXY v2"):
        plan([a], BASE, DataPlaneLimits(http_backends=3, tcp_backends=3, pp_backends=0))


def test_cert_keys_self_route_is_the_apex_path_only(tmp_path: Path) -> None:
    """Golden: with `cert_keys_port`, fe_terminate sends exactly `<apex>` + CERT_KEYS_PATH to the gateway's
    own loopback listener, before the app map, and exempts only that from the no-route 421; nothing else
    changes, and HAProxy accepts the result."""
    paths = HaproxyPaths(str(tmp_path), "teecloud-gw-test")
    p = plan([Route(APP, INST1, 8080, "127.0.0.1:1001")], BASE, LIMITS)
    plain = render_config(bind_host="127.0.0.1", port=1, paths=paths, limits=LIMITS, plan=p, base_domain=BASE)
    cfg = render_config(
        bind_host="127.0.0.1",
        port=1,
        paths=paths,
        limits=LIMITS,
        plan=p,
        base_domain=BASE,
        cert_keys_port=4567,
    )
    import difflib

    diff = list(difflib.ndiff(plain.splitlines(), cfg.splitlines()))
    added = [line[2:] for line in diff if line.startswith("+ ")]
    removed = [line[2:] for line in diff if line.startswith("- ")]
    assert removed == [  # only the no-route 421 changes: it gains the apex exemption
        '    http-request return status 421 content-type text/plain string "misdirected request: no app is '
        f'registered under this name" unless {{ var(txn.sni),map({paths.http_map}) -m found }}'
    ]
    assert added == [
        f"    acl gateway_apex var(txn.sni) -m str {BASE}",
        "    acl gateway_cert_keys path /.well-known/teecloud/cert-keys",
        '    http-request return status 421 content-type text/plain string "misdirected request: no app is '
        f'registered under this name" unless {{ var(txn.sni),map({paths.http_map}) -m found }} '
        "|| gateway_apex gateway_cert_keys",
        "    use_backend be_gateway_self if gateway_apex gateway_cert_keys",
        "backend be_gateway_self",
        "    mode http",
        "    server gateway 127.0.0.1:4567 maxconn 64",
        "",
    ]
    # the self route comes before the app map's use_backend
    lines = cfg.splitlines()
    assert lines.index("    use_backend be_gateway_self if gateway_apex gateway_cert_keys") < lines.index(
        f"    use_backend %[var(txn.sni),map({paths.http_map})]"
    )
    # tcp terminate mode parses no HTTP: no self route there
    tcp = render_config(
        bind_host="127.0.0.1",
        port=1,
        paths=paths,
        limits=LIMITS,
        plan=p,
        base_domain=BASE,
        cert_keys_port=4567,
        terminate_mode="tcp",
    )
    assert "be_gateway_self" not in tcp
    with pytest.raises(ValueError):
        render_config(
            bind_host="127.0.0.1",
            port=1,
            paths=paths,
            limits=LIMITS,
            plan=p,
            base_domain='x" bad',
            cert_keys_port=4567,
        )
    # with custom domains, the apex never goes to the hook (an app's TXT record cannot claim it)
    hooked = render_config(
        bind_host="127.0.0.1",
        port=1,
        paths=paths,
        limits=LIMITS,
        plan=p,
        base_domain=BASE,
        cert_keys_port=4567,
        custom_domains=CustomDomainHook(4568, "ab" * 16),
    )
    (hook_line,) = [line for line in hooked.splitlines() if "lua.teecloud_custom_domain" in line]
    apex_excluded = f"!{{ req.ssl_sni,lower -m end .{BASE} }} !{{ req.ssl_sni,lower -m str {BASE} }}"
    assert hook_line.endswith(apex_excluded)
    ca = DevCa(now=1_700_000_000)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "w.pem").write_text(
        ca.issue_wildcard(BASE, now=1_700_000_000).haproxy_pem(ca.cert_pem)
    )
    Path(paths.http_map).write_text(render_map(p.http_map))
    Path(paths.tcp_map).write_text(render_map(p.tcp_map))
    Path(paths.config).write_text(cfg)
    out = subprocess.run(
        [find_haproxy(), "-c", "-f", paths.config], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
