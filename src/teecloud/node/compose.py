"""The compose policy: parse a CVM's docker-compose file (bounded) and decide, before anything else happens,
whether a CVM may run it. Pure: no Docker, no I/O; used by the node's create (before the instance is
registered or any key is fetched), by `teecloud deploy` (before the app is registered on chain), by the CLI.

Parsing (`load_compose`): at most MAX_COMPOSE_BYTES, YAML safe loader, nesting at most MAX_COMPOSE_DEPTH, at
most MAX_YAML_ALIASES alias uses and MAX_YAML_NODES nodes once aliases are expanded (a "billion laughs" file
of a few hundred bytes names 10^9 nodes; counting the expanded size is linear in the file, walking it is not).

Isolation (`check_isolation`): things a CVM would allow inside its own VM but that would reach the host (or
another CVM) on the docker runtime are refused with a reason: privileged mode, capabilities beyond Docker's
default set, security_opt other than no-new-privileges, host/other-container namespaces (network_mode other
than none/service:, pid, ipc, uts, userns, cgroup), cgroup_parent, devices (also device_cgroup_rules, GPU
reservations, gpus), a non-default OCI runtime, logging drivers that ship logs out of the host's store,
volumes_from another container, host files (bind mounts but the agent sockets, the Docker socket included;
env_file, secrets/configs from a file, extends/include of another file), published ports on an address other
than loopback (0.0.0.0, [::], a host IP), external volumes and networks, network drivers other than bridge
(macvlan, ipvlan, host, overlay), explicit `name:` of volumes and networks (Compose v2 would attach another
project's existing volume or network), volumes a service uses but the file does not declare,
`oom_kill_disable` and a negative `oom_score_adj` (they make the host's OOM killer spare the app and kill host
processes or other CVMs instead), and interpolation (`${...}`) outside environment/command/entrypoint/
healthcheck/labels, since the checks read the file as written and Compose would substitute afterwards
(`network_mode: ${X:-host}`). Whether the images exist is the runtime's to say (`Runtime.check_images`);
`image_refs` lists them.

App-compose (`check_app_compose`): the app-compose.json a CVM is created with: normalized form (its sha256 is
the compose hash), the docker-compose runner, a docker_compose_file that passes the above, allowed_envs names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from teecloud.appcompose import MAX_COMPOSE_BYTES, AppComposeError, normalize_app_compose, parse_app_compose
from teecloud.node.errors import ComposeRejected

__all__ = [
    "AGENT_SOCKET_SOURCES",
    "DEFAULT_CAPS",
    "HOST_BINDING_OPT",
    "LOOPBACK",
    "MAX_COMPOSE_BYTES",
    "MAX_COMPOSE_DEPTH",
    "MAX_YAML_ALIASES",
    "MAX_YAML_NODES",
    "check_app_compose",
    "check_isolation",
    "image_refs",
    "load_compose",
    "parse_volume",
]

MAX_COMPOSE_DEPTH = 64
# Real compose files use a handful of anchors (`x-common: &common`, `<<: *common`); these are far beyond that.
MAX_YAML_ALIASES = 256
MAX_YAML_NODES = 100_000
# Where dstack apps mount the guest agent from (dstack OS: /var/run == /run) -> the CVM's socket file.
AGENT_SOCKET_SOURCES = {
    "/var/run/dstack.sock": "dstack.sock",
    "/run/dstack.sock": "dstack.sock",
    "/var/run/tappd.sock": "tappd.sock",
    "/run/tappd.sock": "tappd.sock",
}
LOOPBACK = "127.0.0.1"
HOST_BINDING_OPT = "com.docker.network.bridge.host_binding_ipv4"
_SERVICE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


class _BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type stubs
    """PyYAML's composer recurses once per nesting level, and shares aliased nodes (so composing is cheap)
    while everything that walks the result afterwards expands them. Bounded here, before any walk: nesting
    (`[[[[...` is a RecursionError, or many seconds of CPU once py-evm has raised the recursion limit), alias
    uses, and the number of nodes the document has once its aliases are expanded."""

    _depth = 0
    _aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise ComposeRejected(
                    f"the compose file uses YAML aliases (*name) more than {MAX_YAML_ALIASES} times"
                )
        self._depth += 1
        try:
            if self._depth > MAX_COMPOSE_DEPTH:
                raise ComposeRejected(f"the compose file nests deeper than {MAX_COMPOSE_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root: Any) -> None:
    """Nodes of the document with every alias expanded, computed over the (shared) node graph in one pass:
    size(n) = 1 + sum(size(child)), memoized per node object. Refuses before the constructor or any check
    walks the expansion."""
    sizes: dict[int, int] = {}
    # iterative post-order: children before parents (the graph is acyclic; PyYAML refuses recursive aliases
    # only at construction, so a node met again while open is refused here)
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            total = 1
            for child in _children(node):
                total += sizes[id(child)]
            if total > MAX_YAML_NODES:
                raise ComposeRejected(
                    f"the compose file expands to more than {MAX_YAML_NODES} YAML nodes once its aliases "
                    'are expanded (nested aliases, as in a "billion laughs" file)'
                )
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in open_:
            raise ComposeRejected("the compose file has a recursive YAML alias")
        open_.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_compose(text: str) -> dict[str, Any]:
    """Parse a compose file (bounded, see the module docstring) and apply the whole isolation policy."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_COMPOSE_BYTES:
        raise ComposeRejected(f"the compose file is larger than {MAX_COMPOSE_BYTES} bytes")
    try:
        doc = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ComposeRejected(f"the compose file is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ComposeRejected("the compose file nests too deeply") from None
    if not isinstance(doc, dict):
        raise ComposeRejected("the compose file must be a mapping with a `services` section")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        raise ComposeRejected("the compose file has no `services`")
    for name, svc in services.items():
        if not isinstance(name, str) or not _SERVICE_NAME.match(name):
            raise ComposeRejected(f"invalid service name {name!r}")
        if not isinstance(svc, dict):
            raise ComposeRejected(f"service {name!r} must be a mapping")
        if "build" in svc:
            raise ComposeRejected(
                f"service {name!r} uses `build`: a CVM runs images, not build contexts; build the image "
                "first and refer to it with `image:`"
            )
        if not isinstance(svc.get("image"), str) or not svc["image"]:
            raise ComposeRejected(f"service {name!r} has no `image`")
    for section in ("volumes", "networks"):
        if not isinstance(doc.get(section) or {}, dict):
            raise ComposeRejected(f"top-level `{section}` must be a mapping")
    check_isolation(doc)
    return doc


def image_refs(compose: Mapping[str, Any]) -> list[str]:
    """The images a (loaded) compose file runs, each once, in file order."""
    refs: list[str] = []
    for svc in (compose.get("services") or {}).values():
        ref = svc.get("image") if isinstance(svc, dict) else None
        if isinstance(ref, str) and ref not in refs:
            refs.append(ref)
    return refs


def check_app_compose(app_compose: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (app-compose document, its loaded docker-compose file), or ComposeRejected with the reason."""
    try:
        doc = parse_app_compose(app_compose)
    except AppComposeError as exc:
        raise ComposeRejected(str(exc)) from exc
    if normalize_app_compose(doc).encode() != app_compose:
        raise ComposeRejected(
            "app-compose.json must be in normalized form (sorted keys, no spaces), since its sha256 is "
            "the compose hash"
        )
    if doc.get("runner", "docker-compose") != "docker-compose":
        raise ComposeRejected(f"runner {doc.get('runner')!r} is not supported by the docker runtime")
    text = doc.get("docker_compose_file")
    if not isinstance(text, str):
        raise ComposeRejected("app-compose.json has no docker_compose_file")
    compose = load_compose(text)
    allowed = doc.get("allowed_envs", [])
    if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
        raise ComposeRejected("allowed_envs must be a list of names")
    return doc, compose


# Docker's default capability set: adding one of these changes nothing; anything else widens the host's kernel
# attack surface (SYS_ADMIN, SYS_MODULE, DAC_READ_SEARCH, SYS_PTRACE, ...) and is refused.
DEFAULT_CAPS = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
# Service keys whose values Compose may interpolate without changing what the node checks.
_INTERPOLATION_OK = frozenset(
    {"environment", "command", "entrypoint", "healthcheck", "labels", "annotations"}
)
_SAFE_LOG_DRIVERS = (None, "json-file", "local")
_SAFE_NETWORK_OPTS = frozenset({HOST_BINDING_OPT, "com.docker.network.driver.mtu"})


def _interpolates(value: Any) -> bool:
    """True if Compose would substitute something in `value` (a `$` that is not `$$`)."""
    if isinstance(value, str):
        return "$" in value.replace("$$", "")
    if isinstance(value, dict):
        return any(_interpolates(k) or _interpolates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_interpolates(v) for v in value)
    return False


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ComposeRejected(f"{what} must be a list of strings")


def _refuse_name(kind: str, name: str, definition: Any) -> None:
    if isinstance(definition, dict) and "name" in definition:
        raise ComposeRejected(
            f"{kind} {name!r} sets `name:`: a CVM's {kind}s are scoped to its own project (an existing "
            f"{kind} of that name, another CVM's included, would be reused); drop `name:`"
        )


def check_isolation(compose: Mapping[str, Any]) -> None:
    """Refuse what would let a CVM's app reach the host or another CVM (see the module docstring)."""
    for key in ("include",):
        if key in compose:
            raise ComposeRejected(
                f"`{key}` reads other files on the host; put everything in one compose file"
            )
    for key, section in compose.items():
        if key == "services" or (isinstance(key, str) and key.startswith("x-")):
            continue
        if _interpolates(section):
            raise ComposeRejected(
                f"top-level `{key}` uses `$` interpolation; the node checks the file as written, so it is "
                "only allowed in environment, command, entrypoint, healthcheck and labels (`$$` is a `$`)"
            )
    services: Mapping[str, Any] = compose.get("services") or {}
    for name, svc in services.items():
        for key, value in svc.items():
            if key not in _INTERPOLATION_OK and _interpolates(value):
                raise ComposeRejected(
                    f"service {name!r}: `{key}` uses `$` interpolation; the node checks the file as written, "
                    "so it is only allowed in environment, command, entrypoint, healthcheck and labels "
                    "(write `$$` for a literal `$`)"
                )
        if svc.get("privileged") not in (None, False):
            raise ComposeRejected(f"service {name!r}: privileged containers are not allowed")
        for cap in _str_list(svc.get("cap_add"), f"service {name!r}: cap_add"):
            norm = cap.upper().removeprefix("CAP_")
            if norm not in DEFAULT_CAPS:
                raise ComposeRejected(
                    f"service {name!r}: cap_add {cap!r} is not allowed (only Docker's default capabilities)"
                )
        for opt in _str_list(svc.get("security_opt"), f"service {name!r}: security_opt"):
            if opt.replace("=", ":") not in ("no-new-privileges", "no-new-privileges:true"):
                raise ComposeRejected(
                    f"service {name!r}: security_opt {opt!r} is not allowed (only no-new-privileges)"
                )
        net = svc.get("network_mode")
        if net is not None and not (
            net == "none" or (isinstance(net, str) and net.startswith("service:") and net[8:] in services)
        ):
            raise ComposeRejected(
                f"service {name!r}: `network_mode: {net}` would share a network namespace outside the CVM "
                "(host, the shared default bridge, another container's); use `networks:` or `service:<name>`"
            )
        for key in ("pid", "ipc", "userns_mode", "uts", "cgroup"):
            value = svc.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or value == "host" or value.startswith("container:"):
                raise ComposeRejected(f"service {name!r}: `{key}: {value}` would share the host's namespace")
            if value.startswith("service:") and value.removeprefix("service:") not in services:
                raise ComposeRejected(f"service {name!r}: `{key}: {value}` names no service of this app")
        for key in ("devices", "device_cgroup_rules", "gpus"):
            if svc.get(key):
                raise ComposeRejected(f"service {name!r}: host devices are not available to a CVM (`{key}`)")
        resources = (
            (svc.get("deploy") or {}).get("resources") if isinstance(svc.get("deploy"), dict) else None
        )
        if isinstance(resources, dict) and ((resources.get("reservations") or {}).get("devices")):
            raise ComposeRejected(f"service {name!r}: host devices are not available to a CVM (`deploy`)")
        if svc.get("cgroup_parent") is not None:
            raise ComposeRejected(f"service {name!r}: `cgroup_parent` would escape the CVM's resource limits")
        _check_oom(name, svc)
        if svc.get("runtime") not in (None, "runc"):
            raise ComposeRejected(f"service {name!r}: runtime {svc.get('runtime')!r} is not allowed")
        logging_cfg = svc.get("logging")
        if logging_cfg is not None and (
            not isinstance(logging_cfg, dict) or logging_cfg.get("driver") not in _SAFE_LOG_DRIVERS
        ):
            raise ComposeRejected(
                f"service {name!r}: only the json-file and local logging drivers are allowed (others "
                "send the logs from the host)"
            )
        for src in _str_list(svc.get("volumes_from"), f"service {name!r}: volumes_from"):
            if src.split(":", 1)[0] not in services:
                raise ComposeRejected(
                    f"service {name!r}: volumes_from {src!r} is not a service of this app (another "
                    "container's volumes are not the CVM's)"
                )
        for key in ("env_file", "label_file"):
            if svc.get(key) is not None:
                raise ComposeRejected(
                    f"service {name!r}: `{key}` reads a file on the host; pass env vars encrypted "
                    "(`teecloud deploy --env-file`) or write them under `environment:`"
                )
        extends = svc.get("extends")
        if isinstance(extends, dict) and "file" in extends:
            raise ComposeRejected(f"service {name!r}: `extends` from another file reads the host's files")
        ports = svc.get("ports") or []
        if not isinstance(ports, list):
            raise ComposeRejected(f"service {name!r}: `ports` must be a list")
        for port in ports:
            _check_port(name, port)
        _check_service_volumes(name, svc, compose)
    for section in ("secrets", "configs"):
        defs = compose.get(section) or {}
        if not isinstance(defs, dict):
            raise ComposeRejected(f"top-level `{section}` must be a mapping")
        for sname, sdef in defs.items():
            if not isinstance(sdef, dict) or "file" in sdef or sdef.get("external"):
                raise ComposeRejected(
                    f"{section[:-1]} {sname!r} comes from the host (`file` or `external`); only inline "
                    "`content` or `environment` sources are allowed"
                )
    for vname, vdef in (compose.get("volumes") or {}).items():
        _refuse_name("volume", vname, vdef)
        if isinstance(vdef, dict) and vdef.get("external"):
            raise ComposeRejected(
                f"volume {vname!r} is external: a CVM's data lives in its own encrypted disk"
            )
        if isinstance(vdef, dict) and vdef.get("driver") not in (None, "local"):
            raise ComposeRejected(
                f"volume {vname!r}: driver {vdef.get('driver')!r} is not allowed (a CVM's volumes are "
                "directories of its encrypted disk)"
            )
        if isinstance(vdef, dict) and vdef.get("driver_opts"):
            raise ComposeRejected(
                f"volume {vname!r}: `driver_opts` are not allowed (they can bind a host path)"
            )
    for nname, ndef in (compose.get("networks") or {}).items():
        _refuse_name("network", nname, ndef)
        if ndef is not None and not isinstance(ndef, dict):
            raise ComposeRejected(f"network {nname!r} must be a mapping")
        if isinstance(ndef, dict):
            if ndef.get("external"):
                raise ComposeRejected(f"network {nname!r} is external: each CVM has its own networks")
            if ndef.get("driver", "bridge") != "bridge":
                raise ComposeRejected(
                    f"network {nname!r}: driver {ndef.get('driver')!r} is not allowed (only bridge networks: "
                    "macvlan, ipvlan, host and overlay reach beyond the CVM)"
                )
            if ndef.get("enable_ipv6"):
                raise ComposeRejected(f"network {nname!r}: IPv6 is not supported (ports bind to 127.0.0.1)")
            ipam = ndef.get("ipam")
            if isinstance(ipam, dict) and ipam.get("driver") not in (None, "default"):
                raise ComposeRejected(f"network {nname!r}: only the default IPAM driver is supported")
            for opt in ndef.get("driver_opts") or {}:
                if opt not in _SAFE_NETWORK_OPTS:
                    raise ComposeRejected(
                        f"network {nname!r}: driver option {opt!r} is not allowed (the node sets the "
                        "bridge's options)"
                    )


_TRUE_STRINGS = frozenset({"true", "yes", "on", "1"})


def _check_oom(name: str, svc: Mapping[str, Any]) -> None:
    """The host's OOM killer must stay free to pick the app: under memory pressure an app that disabled it
    (`oom_kill_disable`) or lowered its score (`oom_score_adj` < 0) makes the kernel kill host processes or
    other CVMs instead. A positive score (kill me first) is the app's own business."""
    disable = svc.get("oom_kill_disable")
    if disable is True or (isinstance(disable, str) and disable.strip().lower() in _TRUE_STRINGS):
        raise ComposeRejected(
            f"service {name!r}: `oom_kill_disable` is not allowed (the host's OOM killer would kill other "
            "processes instead of this app)"
        )
    if disable not in (None, False) and not isinstance(disable, str):
        raise ComposeRejected(f"service {name!r}: `oom_kill_disable` must be a boolean")
    adj = svc.get("oom_score_adj")
    if adj is not None:
        try:
            if isinstance(adj, bool) or not isinstance(adj, int | str):
                raise ValueError
            score = int(adj)
        except ValueError:
            raise ComposeRejected(f"service {name!r}: `oom_score_adj` must be an integer") from None
        if score < 0:
            raise ComposeRejected(
                f"service {name!r}: a negative `oom_score_adj` ({score}) is not allowed (it shifts the "
                "host's OOM killer onto other processes); 0 to 1000 is"
            )
        if score > 1000:
            raise ComposeRejected(f"service {name!r}: `oom_score_adj` is at most 1000, got {score}")
    swap = svc.get("memswap_limit")
    if swap is not None and (isinstance(swap, bool) or not isinstance(swap, int | str)):
        raise ComposeRejected(f"service {name!r}: `memswap_limit` must be a number or a size like 512m")


def _check_port(service: str, port: Any) -> None:
    host_ip: str | None = None
    if isinstance(port, dict):
        host_ip = port.get("host_ip")
    elif isinstance(port, str | int):
        spec = str(port).split("/", 1)[0]
        if spec.startswith("["):
            raise ComposeRejected(f"service {service!r}: IPv6 host addresses are not supported ({port!r})")
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            host_ip = parts[0]
    else:
        raise ComposeRejected(f"service {service!r}: invalid port {port!r}")
    if host_ip not in (None, "", LOOPBACK, "localhost"):
        raise ComposeRejected(
            f"service {service!r} publishes {port!r} on {host_ip}: a CVM's ports are bound to 127.0.0.1 "
            "(reach them through the gateway); drop the host address"
        )


def parse_volume(service: str, vol: Any) -> tuple[str, str | None, str, str]:
    """-> (kind, source, target, mode) with kind in volume | anonymous | bind | tmpfs."""
    if isinstance(vol, dict):
        kind = vol.get("type", "volume")
        target = vol.get("target")
        source = vol.get("source")
        mode = "ro" if vol.get("read_only") else "rw"
        if not isinstance(target, str):
            raise ComposeRejected(f"service {service!r}: volume without a target: {vol!r}")
        if kind == "tmpfs":
            return "tmpfs", None, target, mode
        if kind == "bind":
            return "bind", str(source), target, mode
        if kind != "volume":
            raise ComposeRejected(f"service {service!r}: volume type {kind!r} is not supported")
        return ("volume" if source else "anonymous"), source, target, mode
    if not isinstance(vol, str):
        raise ComposeRejected(f"service {service!r}: invalid volume {vol!r}")
    parts = vol.split(":")
    if len(parts) == 1:
        return "anonymous", None, parts[0], "rw"
    source, target = parts[0], parts[1]
    mode = parts[2] if len(parts) > 2 else "rw"
    if source.startswith(("/", ".", "~")):
        return "bind", source, target, mode
    return "volume", source, target, mode


def _check_service_volumes(name: str, svc: Mapping[str, Any], compose: Mapping[str, Any]) -> None:
    vols = svc.get("volumes") or []
    if not isinstance(vols, list):
        raise ComposeRejected(f"service {name!r}: `volumes` must be a list")
    declared = compose.get("volumes") or {}
    for vol in vols:
        kind, source, _target, _mode = parse_volume(name, vol)
        if kind == "bind" and source not in AGENT_SOCKET_SOURCES:
            docker_sock = bool(source) and str(source).rstrip("/").endswith("docker.sock")
            what = " (the Docker socket: control of the whole host)" if docker_sock else ""
            raise ComposeRejected(
                f"service {name!r} bind-mounts the host path {source!r}{what}: a CVM cannot see the host's "
                "files; use a named volume (stored encrypted)"
            )
        if kind == "volume" and source not in declared:
            raise ComposeRejected(f"service {name!r} uses volume {source!r}, not declared in `volumes`")
