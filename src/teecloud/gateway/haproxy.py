"""HAProxy's configuration, map files and runtime commands for a routing plan, pure (no I/O).

The data plane (HAProxy 2.6, Debian's package) has two frontends when it serves passthrough (`s`) names or
custom domains (the split; `needs_split`):

    fe_sni        TCP on the public port. Waits (at most `hello_timeout_s`) for a TLS ClientHello; anything
                  else is dropped. An SNI in passthrough.map goes to that TCP backend untouched (`s` names:
                  the app's own certificate answers); everything else goes to fe_terminate.
    fe_terminate  TLS with the wildcard certificate of the base domain only (`strict-sni`: an unknown name
                  gets a TLS alert), HTTP/1.1 + h2 from clients, HTTP/1.1 and WebSocket to the CVM. The
                  Host header must name the TLS server name, and that name must be in http.map (else 421);
                  the one exception: `GET <base domain apex>/.well-known/teecloud/cert-keys` goes to the
                  gateway's own listener (`cert_keys_port`). No app name is the apex, so no app shadows it.

Without passthrough names and custom domains (`DataPlaneLimits(passthrough=False)`) fe_terminate binds the
public port itself: no ClientHello reader, no hop (one HAProxy session per connection instead of two). The
TLS handshake is then bounded by `timeout client` (the ClientHello reader's 5 s `hello_timeout_s` is
fe_sni's). The choice follows the configuration, never the routes: a change is a restart.

With passthrough on and `DataPlaneLimits(passthrough_port=N)` (the second layout, no hop): fe_terminate binds
the public port itself and fe_sni binds port N, where it serves `s` names and custom domains only; any other
name there is closed after its ClientHello (nothing forwarded). On the public port an `s` name is an
unknown name (421), a custom domain gets the TLS alert, as with passthrough off.

Backends are pre-allocated slots (`bh<i>` HTTP, `bt<i>` TCP, each with `servers_per_backend` servers in
maintenance) because HAProxy cannot add a backend without a reload; the runtime API (`set map`, `add map`,
`del map`, `set server ... addr`, `set server ... state`) moves routes into them with no reload and no
dropped connection. `runtime_commands(old, new)` orders a change so that no request meets a half-made
route: servers first, then the map entries that point at them, then removals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from teecloud.gateway.certkeys import CERT_KEYS_PATH
from teecloud.gateway.routing import (
    DataPlaneLimits,
    Plan,
    backend_names,
    sends_proxy_protocol,
    split_address,
)

__all__ = [
    "CustomDomainHook",
    "HaproxyPaths",
    "HaproxyTimeouts",
    "TerminateMode",
    "merge_metrics",
    "needs_split",
    "per_process",
    "render_config",
    "render_lua",
    "render_map",
    "runtime_commands",
    "serves_sni",
]

TerminateMode = Literal["http", "tcp"]
# access log lines (teecloud.gateway.accesslog parses them): backend, HTTP status, Ta / Tt (ms), termination
_HTTP_LOG = "teecloud http %b %ST %Ta %ts"
_TCP_LOG = "teecloud tcp %b %Tt %ts"


@dataclass(frozen=True)
class HaproxyPaths:
    run_dir: str  # holds the config, the map files, the certificate directory and the admin socket
    terminate_socket: str  # abstract unix socket name between the two frontends (unique per gateway)
    # which HAProxy process (DataPlaneLimits.processes): each has its own configuration file, runtime and
    # metrics sockets and hop; the maps, certificates, Lua file and access log socket are shared
    process: int = 0

    def for_process(self, k: int) -> HaproxyPaths:
        return HaproxyPaths(self.run_dir, self.terminate_socket, k)

    @property
    def _suffix(self) -> str:
        return f"-{self.process}" if self.process else ""

    @property
    def hop_socket(self) -> str:
        return f"{self.terminate_socket}{self._suffix}"

    @property
    def config(self) -> str:
        return f"{self.run_dir}/haproxy{self._suffix}.cfg"

    @property
    def admin_socket(self) -> str:
        return f"{self.run_dir}/admin{self._suffix}.sock"

    @property
    def http_map(self) -> str:
        return f"{self.run_dir}/http.map"

    @property
    def tcp_map(self) -> str:
        return f"{self.run_dir}/passthrough.map"

    @property
    def metrics_socket(self) -> str:
        return f"{self.run_dir}/metrics{self._suffix}.sock"

    @property
    def access_log(self) -> str:
        return f"{self.run_dir}/access.sock"

    @property
    def lua(self) -> str:
        return f"{self.run_dir}/custom_domains.lua"

    @property
    def cert_dir(self) -> str:
        return f"{self.run_dir}/certs"


@dataclass(frozen=True)
class CustomDomainHook:
    """Where fe_sni asks the gateway which backend serves a custom domain (a TLS name outside the base
    domain and not in passthrough.map): `GET /resolve/<sni>` on 127.0.0.1:`port`, with `token`."""

    port: int
    token: str  # hex; the Lua file holding it is 0600 in the 0700 run directory


def render_lua(hook: CustomDomainHook) -> str:
    """The Lua action: for a syntactically sane SNI, ask the gateway (2 s at most) and set
    `txn.custom_backend` to the answer when it is one of the passthrough backends (bt<i>)."""
    if not hook.token.isalnum() or not 1 <= hook.port <= 65535:
        raise ValueError("bad custom domain hook")
    return f"""-- Rendered by teecloud.gateway.haproxy: custom domains (passthrough only).
core.register_action("teecloud_custom_domain", {{ "tcp-req" }}, function(txn)
    local sni = txn.f:req_ssl_sni()
    if sni == nil or #sni < 3 or #sni > 253 or not sni:match("^[%w%.%-]+$") then return end
    local s = core.tcp()
    s:settimeout(2)
    if not s:connect("127.0.0.1", {hook.port}) then return end
    s:send("GET /resolve/" .. sni:lower() .. " HTTP/1.0\\r\\nHost: gateway\\r\\n"
        .. "X-Teecloud-Hook: {hook.token}\\r\\n\\r\\n")
    local answer = s:receive("*a")
    s:close()
    if answer == nil then return end
    local backend = answer:match("\\r\\n\\r\\n(btp?%d+)$")
    if backend ~= nil then txn:set_var("txn.custom_backend", backend) end
end, 0)
"""


@dataclass(frozen=True)
class HaproxyTimeouts:
    hello_timeout_s: int = 5  # ClientHello must arrive within this (slowloris on the TLS layer)
    http_request_s: int = 10  # request headers must arrive within this (slowloris on HTTP)
    connect_s: int = 3
    client_s: int = 30
    server_s: int = 30
    tunnel_s: int = 3600  # WebSocket / passthrough idle
    queue_s: int = 5


def _log_lines(paths: HaproxyPaths, log_format: str) -> list[str]:
    # in the frontends only (the global section has no log target, so server state events are not sent);
    # never blocks: a line the socket cannot take now is dropped (and counted by HAProxy)
    return [
        f"    log {paths.access_log} len 512 format raw local0 info",
        f'    log-format "{log_format}"',
        '    error-log-format "teecloud connection_error"',  # e.g. a failed TLS handshake (no request)
    ]


def per_process(cap: int, limits: DataPlaneLimits) -> int:
    """A cap's share in each of `limits.processes` HAProxy processes: their sum never exceeds `cap` (a
    process cannot see the others' connections; the kernel spreads connections unevenly, so one process may
    refuse at its share while the total is below the cap: stricter, never looser)."""
    return max(1, cap // limits.processes)


def render_map(entries: dict[str, str]) -> str:
    return "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))


def serves_sni(limits: DataPlaneLimits, custom_domains: CustomDomainHook | None) -> bool:
    """Whether there is a ClientHello reader (fe_sni): passthrough names or custom domains (both are TLS the
    gateway must not terminate)."""
    return limits.passthrough or custom_domains is not None


def needs_split(limits: DataPlaneLimits, custom_domains: CustomDomainHook | None) -> bool:
    """Whether the public port needs the ClientHello reader and the hop: it serves passthrough names or
    custom domains itself (no separate `passthrough_port`)."""
    return serves_sni(limits, custom_domains) and not limits.passthrough_port


def render_config(
    *,
    bind_host: str,
    port: int,
    paths: HaproxyPaths,
    limits: DataPlaneLimits,
    plan: Plan,
    timeouts: HaproxyTimeouts = HaproxyTimeouts(),
    max_header_bytes: int = 16384,
    terminate_mode: TerminateMode = "http",
    custom_domains: CustomDomainHook | None = None,
    base_domain: str = "",
    access_log: bool = False,
    cert_keys_port: int = 0,
) -> str:
    """The whole configuration; the plan's servers are written in (a restart starts with current routes).
    `terminate_mode` "http" parses HTTP after TLS (421 for a Host that is not the TLS name or an unknown
    name, 400 for oversized headers, X-Forwarded-For, h2 from clients, per-app HTTP metrics); "tcp" forwards
    the decrypted byte stream (HTTP/1.1 and WebSocket work unchanged; an unknown name is closed after the
    handshake; faster: docs/benchmarks.md). `access_log`: one line per HTTP request / TCP connection to
    the unix datagram socket `paths.access_log` (teecloud.gateway.accesslog: per-app latency histograms).
    `cert_keys_port` (HTTP mode, with `base_domain`): the loopback port of the gateway's own listener that
    answers CERT_KEYS_PATH on the base domain's apex."""
    t = timeouts
    if custom_domains is not None and not limits.passthrough:
        raise ValueError("custom domains are served in passthrough: they need passthrough")
    split = needs_split(limits, custom_domains)
    # fe_sni: on the public port (the split, with the hop), on its own port (passthrough_port), or none
    sni_port = (limits.passthrough_port or port) if serves_sni(limits, custom_domains) else 0
    if sni_port and sni_port == port and not split:
        raise ValueError("the passthrough port must differ from the public port")
    self_route = terminate_mode == "http" and bool(base_domain) and 0 < cert_keys_port < 65536
    if self_route and not all(c.isalnum() or c in ".-" for c in base_domain):
        raise ValueError("bad base domain")
    host = f"[{bind_host}]" if ":" in bind_host else bind_host
    lines = [
        "# Rendered by teecloud.gateway.haproxy; changes at run time go through the runtime API.",
        "global",
        f"    maxconn {per_process(limits.max_connections, limits)}",
        *(["    nbthread 1"] if limits.processes > 1 else []),
        f"    stats socket {paths.admin_socket} mode 600 level admin",
        "    stats timeout 10s",
        "    hard-stop-after 60s",  # after a reload, the old worker's connections end within this
        f"    tune.bufsize {max(16384, max_header_bytes + 1024)}",
        "    tune.http.maxhdr 101",
        *([f"    lua-load {paths.lua}", "    tune.lua.session-timeout 3s"] if custom_domains else []),
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "    ssl-default-bind-ciphersuites "
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
        "",
        "defaults",
        "    log global",
        "    option dontlognull",
        f"    timeout connect {t.connect_s}s",
        f"    timeout client {t.client_s}s",
        f"    timeout server {t.server_s}s",
        f"    timeout tunnel {t.tunnel_s}s",
        f"    timeout http-request {t.http_request_s}s",
        "    timeout http-keep-alive 10s",
        f"    timeout queue {t.queue_s}s",
        "    timeout client-fin 5s",
        "",
    ]
    fe_sni = [
        "frontend fe_sni",
        "    mode tcp",
        f"    bind {host}:{sni_port}",
        *(_log_lines(paths, _TCP_LOG) if access_log else []),
        f"    tcp-request inspect-delay {t.hello_timeout_s}s",
        *(
            [
                # before `accept`, which ends the rules: a name outside the base domain and not a route
                "    tcp-request content lua.teecloud_custom_domain if { req.ssl_hello_type 1 } "
                f"{{ req.ssl_sni -m found }} !{{ req.ssl_sni,lower,map({paths.tcp_map}) -m found }} "
                f"!{{ req.ssl_sni,lower -m end .{base_domain} }} "
                f"!{{ req.ssl_sni,lower -m str {base_domain} }}",  # nor the apex (the gateway's own)
            ]
            if custom_domains
            else []
        ),
        *(
            # its own port: only passthrough names and custom domains; anything else is closed here
            [
                "    tcp-request content reject if { req.ssl_hello_type 1 } "
                f"!{{ req.ssl_sni,lower,map({paths.tcp_map}) -m found }} "
                "!{ var(txn.custom_backend) -m found }"
            ]
            if not split
            else []
        ),
        "    tcp-request content accept if { req.ssl_hello_type 1 }",
        "    tcp-request content reject",
        *(
            ["    use_backend %[var(txn.custom_backend)] if { var(txn.custom_backend) -m found }"]
            if custom_domains
            else []
        ),
        f"    use_backend %[req.ssl_sni,lower,map({paths.tcp_map})] "
        f"if {{ req.ssl_sni,lower,map({paths.tcp_map}) -m found }}",
        *(["    default_backend be_terminate"] if split else []),
        "",
    ]
    lines += fe_sni if sni_port else []
    lines += [
        "frontend fe_metrics",
        "    mode http",
        "    no log",
        f"    bind unix@{paths.metrics_socket} mode 600",
        "    http-request use-service prometheus-exporter",
        "",
    ]
    if split:
        lines += [
            "backend be_terminate",
            "    mode tcp",
            f"    server terminate abns@{paths.hop_socket} send-proxy-v2",
            "",
        ]
    # the TLS frontend's address: behind the hop (the client address comes in PROXY v2), or the public port
    tls_bind = f"abns@{paths.hop_socket} accept-proxy" if split else f"{host}:{port}"
    if terminate_mode == "http":
        lines += [
            "frontend fe_terminate",
            "    mode http",
            f"    bind {tls_bind} ssl crt {paths.cert_dir}/ strict-sni alpn h2,http/1.1",
            "    option forwardfor",
            *(_log_lines(paths, _HTTP_LOG) if access_log else []),
            "    http-request set-var(txn.host) req.hdr(host),field(1,:),lower",
            "    http-request set-var(txn.sni) ssl_fc_sni,lower",
            *(
                [
                    f"    acl gateway_apex var(txn.sni) -m str {base_domain}",
                    f"    acl gateway_cert_keys path {CERT_KEYS_PATH}",
                ]
                if self_route
                else []
            ),
            '    http-request return status 421 content-type text/plain string "misdirected request: '
            'the Host header does not name the TLS server name" '
            "unless { var(txn.sni),strcmp(txn.host) eq 0 }",
            '    http-request return status 421 content-type text/plain string "misdirected request: '
            f'no app is registered under this name" unless {{ var(txn.sni),map({paths.http_map}) -m found }}'
            + (" || gateway_apex gateway_cert_keys" if self_route else ""),
            "    http-request set-header X-Forwarded-Proto https",
            *(["    use_backend be_gateway_self if gateway_apex gateway_cert_keys"] if self_route else []),
            f"    use_backend %[var(txn.sni),map({paths.http_map})]",
            "",
            *(
                [
                    "backend be_gateway_self",  # the gateway's own listener (cert-keys only), loopback
                    "    mode http",
                    f"    server gateway 127.0.0.1:{cert_keys_port} maxconn 64",
                    "",
                ]
                if self_route
                else []
            ),
        ]
    else:  # TLS terminated, then the byte stream (HTTP/1.1, WebSocket) forwarded as it is
        lines += [
            "frontend fe_terminate",
            "    mode tcp",
            f"    bind {tls_bind} ssl crt {paths.cert_dir}/ strict-sni alpn http/1.1",
            *(_log_lines(paths, _TCP_LOG) if access_log else []),
            f"    tcp-request content reject unless {{ ssl_fc_sni,lower,map({paths.http_map}) -m found }}",
            f"    use_backend %[ssl_fc_sni,lower,map({paths.http_map})]",
            "",
        ]
    app_cap = per_process(limits.max_conn_per_app, limits)
    for mode in ("http", "tcp", "grpc"):
        h2c = " proto h2" if mode == "grpc" and terminate_mode == "http" else ""  # h2c to the CVM
        pools = (False, True) if mode != "grpc" or limits.grpc_backends else ()
        for backend in [b for pp in pools for b in backend_names(mode, limits, proxy_protocol=pp)]:
            # PROXY v2 (the client's address) at the start of each connection to a `pp` port's servers;
            # HAProxy never shares such a connection between clients
            proto = h2c + (" send-proxy-v2" if sends_proxy_protocol(backend) else "")
            backend_mode = "tcp" if mode == "tcp" or terminate_mode == "tcp" else "http"
            lines += [
                f"backend {backend}",
                f"    mode {backend_mode}",
                "    balance leastconn",
                "    retries 2",
            ]
            if backend_mode == "http":
                lines += [
                    "    option redispatch",
                    '    http-request return status 503 content-type text/plain string "the app is at its '
                    f'connection cap" if {{ be_conn gt {app_cap} }}',
                ]
            else:
                lines += [
                    "    option redispatch",
                    f"    tcp-request content reject if {{ be_conn gt {app_cap} }}",
                ]
            server_cap = per_process(limits.max_conn_per_server, limits)
            for i, address in enumerate(plan.backend_servers(backend, limits)):
                if address is None:
                    lines.append(f"    server s{i} 127.0.0.1:1 disabled maxconn {server_cap}{proto}")
                else:
                    ip, p = split_address(address)
                    ip = f"[{ip}]" if ":" in ip else ip
                    lines.append(f"    server s{i} {ip}:{p} maxconn {server_cap}{proto}")
            lines.append("")
    return "\n".join(lines)


def runtime_commands(old: Plan, new: Plan, paths: HaproxyPaths, limits: DataPlaneLimits) -> list[str]:
    """Runtime API commands taking HAProxy from `old` to `new`, ordered so no request meets a half-made
    route: (1) servers get their address and go ready; (2) map entries are added or repointed; (3) map
    entries are deleted; (4) servers no longer used go to maintenance (their open connections finish)."""
    up: list[str] = []
    down: list[str] = []
    for backend in sorted(set(old.servers) | set(new.servers)):
        before = old.backend_servers(backend, limits)
        after = new.backend_servers(backend, limits)
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            if a == b:
                continue
            if b is not None:
                ip, p = split_address(b)
                up.append(f"set server {backend}/s{i} addr {ip} port {p}")
                up.append(f"set server {backend}/s{i} state ready")
            else:
                down.append(f"set server {backend}/s{i} state maint")
    maps: list[str] = []
    dels: list[str] = []
    for path, before_map, after_map in (
        (paths.http_map, old.http_map, new.http_map),
        (paths.tcp_map, old.tcp_map, new.tcp_map),
    ):
        for host, backend in sorted(after_map.items()):
            if host not in before_map:
                maps.append(f"add map {path} {host} {backend}")
            elif before_map[host] != backend:
                maps.append(f"set map {path} {host} {backend}")
        dels += [f"del map {path} {host}" for host in sorted(before_map) if host not in after_map]
    return up + maps + dels + down


def merge_metrics(texts: list[bytes]) -> bytes:
    """The Prometheus text expositions of N HAProxy processes (DataPlaneLimits.processes) as one: every
    sample labelled `haproxy_process="<k>"`, each metric family's HELP and TYPE lines once, followed by its
    samples from every process (the text format wants a family's lines together). One process: unchanged."""
    if len(texts) == 1:
        return texts[0]
    families: dict[bytes, tuple[list[bytes], list[bytes]]] = {}  # name -> (HELP/TYPE lines, samples)
    for k, text in enumerate(texts):
        label = f'haproxy_process="{k}"'.encode()
        family = b""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith(b"#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in (b"HELP", b"TYPE"):
                    family = parts[2]
                    comments = families.setdefault(family, ([], []))[0]
                    if line not in comments:
                        comments.append(line)
                continue
            end = min((i for i in (line.find(b"{"), line.find(b" ")) if i >= 0), default=-1)
            if end < 0:
                continue  # not a sample line
            if line[end : end + 1] == b"{":
                rest = line[end + 1 :]
                line = line[: end + 1] + label + (b"" if rest.startswith(b"}") else b",") + rest
            else:
                line = line[:end] + b"{" + label + b"}" + line[end:]
            families.setdefault(family, ([], []))[1].append(line)
    return b"".join(b"\n".join([*c, *samples]) + b"\n" for c, samples in families.values())
