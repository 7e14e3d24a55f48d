"""Route names and the data-plane plan, pure (no I/O, no clock).

Names are dstack's: `<id>[-<port>][s].<base_domain>`, where `<id>` is an app_id (balanced over the app's
registered instances) or an instance_id (pins one CVM), both 40 hex digits; `<port>` defaults to 80; no
suffix = TLS terminated at the gateway (HTTP/1.1 and WebSocket to the CVM; h2c when the app's port policy
marks the port `h2c`); `s` = TLS passthrough (the client's TLS reaches the app's own certificate); `g` = TLS
terminated, then HTTP/2 cleartext (h2c, gRPC) to the CVM.

    parse_host(name, base)            -> HostName        what a name asks for, or BadHostName
    route_hosts(route, base)          -> hosts           every name a route answers to
    plan(routes, base, limits, prev, custom_domains)     (custom_domains: resolved domain -> (app_id, port))
                                      -> Plan            HAProxy's map entries and server slots for the
                                                         routes; sticky (a group keeps its backend and an
                                                         address its server slot), so a change is small
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from teecloud.gateway.errors import BadHostName, CapacityExceeded, GatewayUsageError

__all__ = [
    "MAX_HOST_NAME",
    "DataPlaneLimits",
    "HostName",
    "Plan",
    "Route",
    "check_base_domain",
    "parse_host",
    "plan",
    "route_hosts",
]

MAX_HOST_NAME = 253  # RFC 1035
_ID = re.compile(r"[0-9a-f]{40}")
_FIRST_LABEL = re.compile(r"(?P<id>[0-9a-f]{40})(?:-(?P<port>[1-9][0-9]{0,4}))?(?P<suffix>[sg]?)")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
Mode = Literal["http", "tcp", "grpc"]
_SUFFIX: dict[str, str] = {"http": "", "tcp": "s", "grpc": "g"}
_PREFIX: dict[str, str] = {"http": "bh", "tcp": "bt", "grpc": "bg"}
_PP = "p"  # pools of backends whose servers send PROXY protocol v2 (`bhp<i>`, `btp<i>`, `bgp<i>`)
_BY_SUFFIX: dict[str, Mode] = {"": "http", "s": "tcp", "g": "grpc"}


@dataclass(frozen=True)
class DataPlaneLimits:
    """Pre-allocated HAProxy slots (routes change at run time, backends cannot be added without a reload)
    and the connection caps. `http_backends`/`tcp_backends`: route groups (one app port, or one pinned
    instance port) per mode; `servers_per_backend`: instances one group balances over. `passthrough`:
    `s` names are served; False: none are (and, without custom domains, HAProxy terminates TLS on the
    public port itself, with no ClientHello reader and no hop: faster, docs/benchmarks.md)."""

    http_backends: int = 64
    tcp_backends: int = 64
    grpc_backends: int = 16  # `g` names: HTTP/2 cleartext (h2c) toward the CVM; 0 = not served
    # per mode, route groups whose port the app's port_policy marks `pp` (their servers send PROXY v2)
    pp_backends: int = 8
    servers_per_backend: int = 8
    max_conn_per_server: int = 256
    max_conn_per_app: int = 1024
    max_connections: int = 4096
    passthrough: bool = True
    # with passthrough: the second public port that serves `s` names and custom domains (SNI routing, TCP),
    # while the main port terminates TLS itself with no hop; 0 = both on the main port (the hop)
    passthrough_port: int = 0
    # HAProxy processes of one thread each on the same ports (SO_REUSEPORT: the kernel spreads new
    # connections), as nginx runs workers; 1: one process with a thread per core (HAProxy's default). With
    # more, every runtime change goes to each process, and the caps above are split between them
    # (teecloud.gateway.haproxy.per_process): their sum never exceeds the configured cap
    processes: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.processes <= 64:
            raise GatewayUsageError("processes must be in 1..64")
        if not 0 <= self.passthrough_port <= 65535:
            raise GatewayUsageError("passthrough_port must be in 0..65535 (0: none)")
        if self.passthrough_port and not self.passthrough:
            raise GatewayUsageError("a passthrough port needs passthrough on")
        for name in ("grpc_backends", "pp_backends"):
            if not 0 <= getattr(self, name) <= 4096:
                raise GatewayUsageError(f"{name} must be in 0..4096")
        for name in ("http_backends", "tcp_backends", "servers_per_backend"):
            if not 1 <= getattr(self, name) <= 4096:
                raise GatewayUsageError(f"{name} must be in 1..4096")
        for name in ("max_conn_per_server", "max_conn_per_app", "max_connections"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise GatewayUsageError(f"{name} must be in 1..1000000")
            if getattr(self, name) < self.processes:  # each process gets a share of at least 1
                raise GatewayUsageError(f"{name} must be at least processes ({self.processes})")


def check_base_domain(base: str) -> str:
    """A lower-case DNS name of at least two labels (e.g. `teecloud.localhost`)."""
    b = base.strip().lower().rstrip(".")
    labels = b.split(".")
    if len(b) > 200 or len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels):
        raise GatewayUsageError(f"base domain {base[:80]!r} is not a DNS name of two labels or more")
    return b


@dataclass(frozen=True)
class HostName:
    id: str  # app_id or instance_id, 40 lower-case hex digits
    port: int
    mode: Mode


def parse_host(name: str | bytes, base: str) -> HostName:
    """What a host name (SNI or Host header, without a port) asks for. Raises BadHostName for anything that
    is not exactly one route label under `base` (a deeper name, a wildcard, non-ASCII, overlong, `g`)."""
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError as exc:
            raise BadHostName("host name is not ASCII") from exc
    if not name or len(name) > MAX_HOST_NAME or not name.isascii():
        raise BadHostName("host name is empty, not ASCII or longer than 253 characters")
    host = name.lower().rstrip(".")
    suffix = "." + base
    if not host.endswith(suffix):
        raise BadHostName(f"{host[:80]!r} is not under {base}")
    m = _FIRST_LABEL.fullmatch(host[: -len(suffix)])
    if m is None:
        raise BadHostName(f"{host[:80]!r} is not <app_id|instance_id>[-<port>][s].{base}")
    port = int(m["port"] or 80)
    if port > 65535:
        raise BadHostName(f"port {port} is out of range")
    return HostName(m["id"], port, _BY_SUFFIX[m["suffix"]])


@dataclass(frozen=True, order=True)
class Route:
    """One registered instance's app port: where the gateway reaches it."""

    app_id: str
    instance_id: str
    port: int
    address: str  # "ip:port" (IPv6 in brackets)
    proxy_protocol: bool = False  # the app's port_policy marks this port `pp`: PROXY v2 toward the CVM
    h2c: bool = False  # the app's port_policy marks this port `h2c`: plain names speak h2c to the CVM too

    def __post_init__(self) -> None:
        if not (_ID.fullmatch(self.app_id) and _ID.fullmatch(self.instance_id)):
            raise GatewayUsageError("app_id and instance_id must be 40 lower-case hex digits")
        if not 1 <= self.port <= 65535:
            raise GatewayUsageError("port must be in 1..65535")
        split_address(self.address)


def split_address(address: str) -> tuple[str, int]:
    """("ip", port) of an "ip:port" / "[ipv6]:port" backend address; GatewayUsageError otherwise."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
        p = int(port)
    except ValueError as exc:
        raise GatewayUsageError(f"backend address {address[:60]!r} is not ip:port") from exc
    if not sep or not 1 <= p <= 65535 or ip.is_unspecified or ip.is_multicast:
        raise GatewayUsageError(f"backend address {address[:60]!r} is not a usable ip:port")
    return str(ip), p


def format_address(host: str, port: int) -> str:
    ip = ipaddress.ip_address(host)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _names(ident: str, port: int, suffix: str, base: str) -> list[str]:
    names = [f"{ident}-{port}{suffix}.{base}"]
    if port == 80:
        names.append(f"{ident}{suffix}.{base}")
    return names


def route_hosts(route: Route, base: str) -> dict[str, Mode]:
    """Every host name a route answers to, with its mode."""
    out: dict[str, Mode] = {}
    for ident in (route.app_id, route.instance_id):
        for n in _names(ident, route.port, "", base):
            out[n] = "http"
        for n in _names(ident, route.port, "s", base):
            out[n] = "tcp"
        for n in _names(ident, route.port, "g", base):
            out[n] = "grpc"
    return out


# A group: the routes one backend balances over. ("app", app_id, port) or ("instance", instance_id, port).
GroupKey = tuple[str, str, int]


@dataclass(frozen=True)
class Plan:
    """What HAProxy should hold: host -> backend name per map, and each used backend's server slots
    (an address, or None for a free slot in maintenance)."""

    http_map: dict[str, str] = field(default_factory=dict)
    tcp_map: dict[str, str] = field(default_factory=dict)
    servers: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    groups: dict[tuple[Mode, GroupKey], str] = field(default_factory=dict)

    def backend_servers(self, backend: str, limits: DataPlaneLimits) -> tuple[str | None, ...]:
        return self.servers.get(backend, (None,) * limits.servers_per_backend)


def backend_names(mode: Mode, limits: DataPlaneLimits, *, proxy_protocol: bool = False) -> list[str]:
    """The slot backends of a mode; with `proxy_protocol`, the pool whose servers send PROXY v2."""
    if proxy_protocol:
        return [f"{_PREFIX[mode]}{_PP}{i}" for i in range(limits.pp_backends)]
    n = {"http": limits.http_backends, "tcp": limits.tcp_backends, "grpc": limits.grpc_backends}[mode]
    return [f"{_PREFIX[mode]}{i}" for i in range(n)]


def sends_proxy_protocol(backend: str) -> bool:
    """Whether a slot backend's servers send PROXY v2 (it is one of the `pp` pools)."""
    return len(backend) > 3 and backend[2] == _PP


def plan(
    routes: Iterable[Route],
    base: str,
    limits: DataPlaneLimits,
    previous: Plan | None = None,
    custom_domains: Mapping[str, tuple[str, int]] | None = None,
) -> Plan:
    """The data plane for `routes`. A group keeps the backend it had in `previous`, an address its server
    slot, so that a change touches only what changed. A group whose port is `pp` (PROXY v2) takes its
    backend from the pp pool. A group whose port is `h2c` gets no HTTP/1.1 backend: its plain names go to
    its `g` backend (h2c toward the CVM; none when `grpc_backends` is 0: then those names are not routed).
    An app port whose instances disagree on `pp` or `h2c` (a rollout between two app-compose versions) is
    balanced over the most common kind's instances (ties: no PROXY v2, then no h2c), each instance's own
    name still reaching it correctly. `g` slots go to h2c groups first; a group that is not h2c and finds
    none free gets no `g` names (they are 421) rather than a refusal. Raises CapacityExceeded when any
    other slots run out."""
    prev = previous or Plan()
    members: dict[GroupKey, dict[str, tuple[bool, bool]]] = {}
    for r in routes:
        attrs = (r.proxy_protocol, r.h2c)
        members.setdefault(("app", r.app_id, r.port), {})[r.address] = attrs
        members.setdefault(("instance", r.instance_id, r.port), {})[r.address] = attrs
    chosen: dict[GroupKey, tuple[bool, bool, list[str]]] = {}
    for group, by_address in members.items():
        kinds = list(by_address.values())
        pp, h2c = max(set(kinds), key=lambda k: (kinds.count(k), not k[0], not k[1]))
        chosen[group] = (pp, h2c, sorted(a for a, v in by_address.items() if v == (pp, h2c)))
    out = Plan()
    modes: tuple[Mode, ...] = (
        "http",
        *(("tcp",) if limits.passthrough else ()),
        *(("grpc",) if limits.grpc_backends else ()),
    )
    for mode in modes:
        pools = {pp: backend_names(mode, limits, proxy_protocol=pp) for pp in (False, True)}
        # h2c groups have no HTTP/1.1 backend (their plain names go to the `g` one); `g` slots go to h2c
        # groups first (they need one), then to the others as long as any is free
        served = [g for g in sorted(members) if mode != "http" or not chosen[g][1]]
        if mode == "grpc":
            served.sort(key=lambda g: not chosen[g][1])
        kept = {g: prev.groups.get((mode, g)) for g in served}
        used = {b for g, b in kept.items() if b is not None and b in pools[chosen[g][0]]}
        free = {pp: [b for b in names if b not in used] for pp, names in pools.items()}
        for group in served:
            pp, h2c, addresses = chosen[group]
            backend = kept[group]
            if backend is None or backend not in pools[pp]:
                if not free[pp] and mode == "grpc" and not h2c:
                    continue  # no `g` slot left: this group's `g` names are not routed (421)
                if not free[pp]:
                    kind = f"{mode} PROXY v2 (pp)" if pp else mode
                    raise CapacityExceeded(f"all {len(pools[pp])} {kind} backends are in use")
                backend = free[pp].pop(0)
            out.groups[(mode, group)] = backend
            out.servers[backend] = _slots(addresses, prev.servers.get(backend), limits.servers_per_backend)
            _kind, ident, port = group
            for host in _names(ident, port, _SUFFIX[mode], base):
                (out.tcp_map if mode == "tcp" else out.http_map)[host] = backend
            if mode == "grpc" and h2c:  # the port's plain names: h2c too
                for host in _names(ident, port, "", base):
                    out.http_map[host] = backend
    # custom domains (resolved from TXT by the gateway): passthrough to the app port's backend, only while
    # that app has routes for that port; derived in the same plan, so a slot given to another group never
    # keeps a stale custom domain entry
    for domain, (app_id, port) in sorted((custom_domains or {}).items()):
        backend = out.groups.get(("tcp", ("app", app_id, port)))
        if backend is not None and domain not in out.tcp_map:
            out.tcp_map[domain] = backend
    return out


def _slots(addresses: list[str], previous: tuple[str | None, ...] | None, n: int) -> tuple[str | None, ...]:
    if len(addresses) > n:
        raise CapacityExceeded(f"{len(addresses)} instances, but a backend has {n} server slots")
    slots: list[str | None] = list(previous) if previous is not None else [None] * n
    slots = [a if a in addresses else None for a in slots[:n]] + [None] * (n - len(slots[:n]))
    for a in addresses:
        if a not in slots:
            slots[slots.index(None)] = a
    return tuple(slots)
