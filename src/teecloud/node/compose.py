"""The compose policy: parse a CVM's docker-compose file (bounded) and decide, before anything else happens,
whether a CVM may run it. Pure: no Docker, no I/O; used by the node's create (before the instance is
registered or any key is fetched), by `teecloud deploy` (before the app is registered on chain), by the CLI.

Parsing (`load_compose`): at most MAX_COMPOSE_BYTES, YAML safe loader, nesting at most MAX_COMPOSE_DEPTH, at
most MAX_YAML_ALIASES alias uses and MAX_YAML_NODES nodes once aliases are expanded (a "billion laughs" file
of a few hundred bytes names 10^9 nodes; counting the expanded size is linear in the file, walking it is not).

Isolation (`check_isolation`): an allowlist. Every key, at every level (top level, service, deploy and
its resources, healthcheck, logging, long-syntax ports/volumes/secrets, a service's networks and depends_on
entries, ulimits, volume/network/secret/config definitions), must be one teecloud supports; the keys are data
in `teecloud.node._compose_keys` (`ALLOWED_KEYS`), and any other key is refused with its path ("service 'web':
key 'use_api_socket' is not allowed: ..."), whatever Compose implementation the node runs. `x-*` extension
fields are accepted at the top level only (inert; YAML anchors and `<<` merge keys are resolved by the loader
before any check). `build`, `extends` and `include` are refused (a node runs images; each service is checked
and capped as written).
The supported keys then have value rules, for what would reach the host (or another CVM) on the docker
runtime: `privileged` only false; `cap_add` within Docker's default set; `security_opt` only
no-new-privileges; `network_mode` only none/service:<own>; no host or `container:` pid/ipc/cgroup; `runtime`
only runc; json-file/local logging; `volumes_from` only the app's own services; bind mounts only of the agent
sockets (never the Docker socket or another host path); short-syntax volume modes only ro/rw/nocopy;
published ports on loopback only (not 0.0.0.0, [::], a host IP); volumes declared, local, not external;
networks bridge, not external, no IPv6, no bridge options but the MTU; secrets/configs from inline content or
`environment`; `restart` not `always` (dockerd would start a container the node stopped) and one replica per
service (the node's caps apply per container); ulimits without real-time or raised priority; sysctls only
`net.*`; no Compose or teecloud labels; `oom_kill_disable` only false and `oom_score_adj` 0..1000 (they would
make the host's OOM killer spare the app and kill host processes or other CVMs instead); and `$` interpolation
only in environment/command/entrypoint/healthcheck/labels, since the checks read the file as written and
Compose substitutes afterwards (`network_mode: ${X:-host}`). Whether the images exist is the runtime's to say
(`Runtime.check_images`); `image_refs` lists them.

App-compose (`check_app_compose`): the app-compose.json a CVM is created with: normalized form (its sha256 is
the compose hash), the docker-compose runner, a docker_compose_file that passes the above, allowed_envs names.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

import yaml

from teecloud.appcompose import MAX_COMPOSE_BYTES, AppComposeError, normalize_app_compose, parse_app_compose
from teecloud.node._compose_keys import (
    ALLOWED_KEYS,
    DEFAULT_CAPS,
    DEPENDS_ON_CONDITIONS,
    EXTENSION_PREFIX,
    HOST_BINDING_OPT,
    LOG_DRIVERS,
    NESTED,
    REFUSED_REASONS,
    RESERVED_LABEL_PREFIXES,
    RESTART_CONDITIONS,
    RESTART_POLICIES,
    SAFE_NETWORK_OPTS,
    SYSCTL_PREFIXES,
    VOLUME_MODES,
)
from teecloud.node.errors import ComposeRejected

__all__ = [
    "AGENT_SOCKET_SOURCES",
    "ALLOWED_KEYS",
    "DEFAULT_CAPS",
    "HOST_BINDING_OPT",
    "LOOPBACK",
    "MAX_COMPOSE_BYTES",
    "MAX_COMPOSE_DEPTH",
    "MAX_YAML_ALIASES",
    "MAX_YAML_NODES",
    "check_app_compose",
    "check_isolation",
    "check_mount_target",
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
_SERVICE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")  # used with fullmatch (`$` admits a trailing \n)


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


# Service keys whose values Compose may interpolate without changing what the node checks.
# Not labels: the node reserves some and checks them as written (second review, finding C).
_INTERPOLATION_OK = frozenset({"environment", "command", "entrypoint", "healthcheck"})
_DEFINITIONS = (("volumes", "volume"), ("networks", "network"), ("secrets", "secret"), ("configs", "config"))
# The Compose Specification's pattern ([a-zA-Z0-9._-]+), narrowed to names starting with a letter or digit: a
# name is a path component on the node (volumes/<name>), and "." or ".." would name the directory holding
# every other volume (issue 16 review, finding 1: a tenant swapped a sibling for a symlink to a host path).
_DEFINITION_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]*")
# pid/ipc/cgroup: the values that keep a namespace inside the CVM ("service:<own>" besides)
_NAMESPACE_VALUES: dict[str, frozenset[str]] = {
    "pid": frozenset(),
    "ipc": frozenset({"private", "shareable", "none"}),
    "cgroup": frozenset({"private"}),
}
_ON_FAILURE = re.compile(r"^on-failure:[0-9]+$")
_MAX_SHOWN_KEY = 64  # characters of a refused key quoted back in the error


def check_isolation(compose: Mapping[str, Any]) -> None:
    """Refuse what would let a CVM's app reach the host or another CVM (see the module docstring).

    (1) structure: every key at every level is one teecloud supports (`_compose_keys.ALLOWED_KEYS`);
    (2) `$` interpolation only where it cannot change what the checks read;
    (3) the value rules of the supported keys: top-level definitions, then each service.
    """
    if not isinstance(compose, Mapping):
        raise ComposeRejected("the compose file must be a mapping with a `services` section")
    # (1) structure: the top level, the definitions, the services
    for key in compose:
        if not (isinstance(key, str) and (key in ALLOWED_KEYS["top"] or key.startswith(EXTENSION_PREFIX))):
            raise _not_allowed("top level", "top", "", key)
    services = compose.get("services")
    if not isinstance(services, dict) or not services:
        raise ComposeRejected("the compose file has no `services`")
    # (2) interpolation outside the services (a `$` in a definition's name or value)
    for key, section in compose.items():
        if key != "services" and not key.startswith(EXTENSION_PREFIX) and _interpolates(section):
            raise ComposeRejected(
                f"top-level `{key}` uses `$` interpolation; the node checks the file as written, so it is "
                "only allowed in environment, command, entrypoint, healthcheck and labels (`$$` is a `$`)"
            )
    for section, level in _DEFINITIONS:
        defs = compose.get(section)
        if defs is None:
            continue
        if not isinstance(defs, dict):
            raise ComposeRejected(f"top-level `{section}` must be a mapping")
        for dname, ddef in defs.items():
            if not isinstance(dname, str) or not _DEFINITION_NAME.fullmatch(dname):
                raise ComposeRejected(
                    f"invalid {level} name {dname[:64]!r}: letters, digits, '.', '_' and '-', starting "
                    "with a letter or digit"
                    if isinstance(dname, str)
                    else f"invalid {level} name {dname!r}"
                )
            _check_structure(ddef, level, f"{level} {dname!r}", "")
    for name, svc in services.items():
        if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
            raise ComposeRejected(f"invalid service name {name!r}")
        if not isinstance(svc, dict):
            raise ComposeRejected(f"service {name!r} must be a mapping")
        _check_structure(svc, "service", f"service {name!r}", "")
        if not isinstance(svc.get("image"), str) or not svc["image"]:
            raise ComposeRejected(f"service {name!r} has no `image`")
    # (3) values
    _check_definitions(compose)
    for name, svc in services.items():
        _check_service(name, svc, compose)


# ------------------------------------------------------------------------------------------ (1) structure


def _check_structure(obj: Any, level: str, where: str, path: str) -> None:
    """Every key of `obj` (and of the levels it holds, per `NESTED`) is in `ALLOWED_KEYS[level]`."""
    if obj is None:
        return
    if not isinstance(obj, dict):
        raise ComposeRejected(
            f"{where}: `{path}` must be a mapping" if path else f"{where} must be a mapping"
        )
    allowed = ALLOWED_KEYS[level]
    nested = NESTED.get(level, {})
    for key, value in obj.items():
        if not isinstance(key, str) or key not in allowed:
            raise _not_allowed(where, level, path, key)
        shape = nested.get(key) or nested.get("*")
        if shape is None:
            continue
        kind, child = shape
        sub = f"{path}.{key}" if path else key
        if kind == "mapping":
            _check_structure(value, child, where, sub)
        elif kind == "scalar_or_mapping":
            if isinstance(value, dict):
                _check_structure(value, child, where, sub)
            elif isinstance(value, bool) or not isinstance(value, int | str):
                raise ComposeRejected(f"{where}: `{sub}` must be a number or a mapping")
        elif kind == "items":
            if not isinstance(value, list):
                raise ComposeRejected(f"{where}: `{sub}` must be a list")
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _check_structure(item, child, where, f"{sub}[{i}]")
        elif isinstance(value, dict):  # "named": name -> None or the child level
            for entry, entry_value in value.items():
                _check_structure(entry_value, child, where, f"{sub}.{entry}")
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ComposeRejected(f"{where}: `{sub}` must be a list of names or a mapping")


def _not_allowed(where: str, level: str, path: str, key: Any) -> ComposeRejected:
    text = key if isinstance(key, str) else repr(key)
    if len(text) > _MAX_SHOWN_KEY:
        text = text[:_MAX_SHOWN_KEY] + "..."
    shown = f"{path}.{text}" if path else text
    reason = REFUSED_REASONS.get(level, {}).get(key) if isinstance(key, str) else None
    if reason is None and isinstance(key, str) and key.startswith(EXTENSION_PREFIX):
        reason = "extension fields (x-*) are accepted at the top level only"
    if reason:
        return ComposeRejected(f"{where}: key {shown!r} is not allowed: {reason}")
    supported = sorted(ALLOWED_KEYS[level]) + ([EXTENSION_PREFIX + "*"] if level == "top" else [])
    under = f" in {path}" if path else ""
    return ComposeRejected(
        f"{where}: key {shown!r} is not allowed (teecloud supports{under}: {', '.join(supported)})"
    )


# ------------------------------------------------------------------------------------- (2) interpolation


def _interpolates(value: Any) -> bool:
    """True if Compose would substitute something in `value` (a `$` that is not `$$`)."""
    if isinstance(value, str):
        return "$" in value.replace("$$", "")
    if isinstance(value, dict):
        return any(_interpolates(k) or _interpolates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_interpolates(v) for v in value)
    return False


# --------------------------------------------------------------------------------------------- (3) values


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ComposeRejected(f"{what} must be a list of strings")


def _names(value: Any, what: str) -> list[str]:
    """The names of a list-or-dict value (`labels`, `sysctls`): dict keys, or what precedes `=`."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [str(k) for k in value]
    return [item.split("=", 1)[0] for item in _str_list(value, what)]


def _check_labels(where: str, value: Any) -> None:
    for label in _names(value, f"{where}: `labels`"):
        if label.strip().startswith(RESERVED_LABEL_PREFIXES):
            raise ComposeRejected(
                f"{where}: label {label!r} is not allowed (Compose and the node use the "
                f"{' and '.join(p + '*' for p in RESERVED_LABEL_PREFIXES)} labels to find a CVM's containers)"
            )


def _falsy(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() == "false")


def _check_definitions(compose: Mapping[str, Any]) -> None:
    for vname, vdef in (compose.get("volumes") or {}).items():
        vdef = vdef or {}
        if not _falsy(vdef.get("external")):
            raise ComposeRejected(
                f"volume {vname!r} is external: a CVM's data lives in its own encrypted disk"
            )
        if vdef.get("driver") not in (None, "local"):
            raise ComposeRejected(
                f"volume {vname!r}: driver {vdef.get('driver')!r} is not allowed (a CVM's volumes are "
                "directories of its encrypted disk)"
            )
        _check_labels(f"volume {vname!r}", vdef.get("labels"))
    for nname, ndef in (compose.get("networks") or {}).items():
        ndef = ndef or {}
        if not _falsy(ndef.get("external")):
            raise ComposeRejected(f"network {nname!r} is external: each CVM has its own networks")
        if ndef.get("driver", "bridge") != "bridge":
            raise ComposeRejected(
                f"network {nname!r}: driver {ndef.get('driver')!r} is not allowed (only bridge networks: "
                "macvlan, ipvlan, host and overlay reach beyond the CVM)"
            )
        if not _falsy(ndef.get("enable_ipv6")):
            raise ComposeRejected(f"network {nname!r}: IPv6 is not supported (ports bind to 127.0.0.1)")
        opts = ndef.get("driver_opts") or {}
        if not isinstance(opts, dict):
            raise ComposeRejected(f"network {nname!r}: `driver_opts` must be a mapping")
        for opt in opts:
            if opt not in SAFE_NETWORK_OPTS:
                raise ComposeRejected(
                    f"network {nname!r}: driver option {opt!r} is not allowed (the node sets the "
                    "bridge's options)"
                )
        _check_labels(f"network {nname!r}", ndef.get("labels"))
    for section, kind in (("secrets", "secret"), ("configs", "config")):
        for sname, sdef in (compose.get(section) or {}).items():
            if not sdef:
                raise ComposeRejected(
                    f"{kind} {sname!r} has no source; only inline `content` (configs) or `environment` "
                    "sources are allowed"
                )


def _check_service(name: str, svc: Mapping[str, Any], compose: Mapping[str, Any]) -> None:
    services: Mapping[str, Any] = compose["services"]
    where = f"service {name!r}"
    for key, value in svc.items():
        if key not in _INTERPOLATION_OK and _interpolates(value):
            raise ComposeRejected(
                f"{where}: `{key}` uses `$` interpolation; the node checks the file as written, "
                "so it is only allowed in environment, command, entrypoint, healthcheck and labels "
                "(write `$$` for a literal `$`)"
            )
    if not _falsy(svc.get("privileged")):
        raise ComposeRejected(f"{where}: privileged containers are not allowed")
    for cap in _str_list(svc.get("cap_add"), f"{where}: cap_add"):
        norm = cap.upper().removeprefix("CAP_")
        if norm not in DEFAULT_CAPS:
            raise ComposeRejected(
                f"{where}: cap_add {cap!r} is not allowed (only Docker's default capabilities)"
            )
    for opt in _str_list(svc.get("security_opt"), f"{where}: security_opt"):
        if opt.replace("=", ":") not in ("no-new-privileges", "no-new-privileges:true"):
            raise ComposeRejected(f"{where}: security_opt {opt!r} is not allowed (only no-new-privileges)")
    net = svc.get("network_mode")
    if net is not None and not (
        net == "none" or (isinstance(net, str) and net.startswith("service:") and net[8:] in services)
    ):
        raise ComposeRejected(
            f"{where}: `network_mode: {net}` would share a network namespace outside the CVM "
            "(host, the shared default bridge, another container's); use `networks:` or `service:<name>`"
        )
    for key, plain in _NAMESPACE_VALUES.items():
        # an allowlist of exact values (the review found " host" and "Host" accepted by the old denylist)
        value = svc.get(key)
        if value is None or (isinstance(value, str) and value in plain):
            continue
        if isinstance(value, str) and value.startswith("service:") and value[8:] in services:
            continue
        raise ComposeRejected(
            f"{where}: `{key}: {str(value)[:64]}` is not allowed: it could share a namespace outside the "
            "CVM (only "
            f"{', '.join(sorted(plain)) + ' or ' if plain else ''}service:<a service of this app>)"
        )
    for link in _str_list(svc.get("links"), f"{where}: links"):
        # `service` or `service:alias`, a service of this app (a container of another app is not reachable)
        if link.split(":", 1)[0] not in services:
            raise ComposeRejected(f"{where}: links {link[:64]!r} names no service of this app")
    _check_oom(name, svc)
    if svc.get("runtime") not in (None, "runc"):
        raise ComposeRejected(f"{where}: runtime {svc.get('runtime')!r} is not allowed")
    logging_cfg = svc.get("logging") or {}
    if logging_cfg.get("driver") not in (None, *LOG_DRIVERS):
        raise ComposeRejected(
            f"{where}: only the json-file and local logging drivers are allowed (others send the logs from "
            "the host)"
        )
    for src in _str_list(svc.get("volumes_from"), f"{where}: volumes_from"):
        # `service[:ro|rw]`, or `container:<name>[:mode]`: another container's volumes, never the CVM's
        source = src.split(":", 1)[0]
        if src.startswith("container:") or source not in services:
            raise ComposeRejected(
                f"{where}: volumes_from {src!r} is not a service of this app (another container's volumes "
                "are not the CVM's)"
            )
    _check_restart(name, svc)
    _check_labels(where, svc.get("labels"))
    for sysctl in _names(svc.get("sysctls"), f"{where}: `sysctls`"):
        if not sysctl.strip().startswith(SYSCTL_PREFIXES):
            raise ComposeRejected(
                f"{where}: sysctl {sysctl!r} is not allowed (only the container's own network settings, "
                f"{', '.join(p + '*' for p in SYSCTL_PREFIXES)})"
            )
    for dep in svc.get("depends_on") or []:
        if dep not in services:
            raise ComposeRejected(f"{where}: depends_on {dep!r} is not a service of this app")
        entry = svc["depends_on"][dep] if isinstance(svc["depends_on"], dict) else None
        condition = (entry or {}).get("condition")
        if condition is not None and not (isinstance(condition, str) and condition in DEPENDS_ON_CONDITIONS):
            raise ComposeRejected(f"{where}: depends_on {dep!r}: unknown condition {condition!r}")
    ports = svc.get("ports") or []
    for port in ports:
        _check_port(name, port)
    _check_service_volumes(name, svc, compose)
    _check_tmpfs(name, svc)


def _check_restart(name: str, svc: Mapping[str, Any]) -> None:
    """One container per service, restarted only while the node runs the CVM: `restart: always` (and
    `deploy.restart_policy.condition: any`) would have dockerd start it again after the node stopped it; more
    than one replica would multiply the per-container caps."""
    where = f"service {name!r}"
    restart = svc.get("restart")
    if not (
        restart is None
        or restart is False  # YAML 1.1 reads an unquoted `no` as false
        or (isinstance(restart, str) and (restart in RESTART_POLICIES or _ON_FAILURE.match(restart)))
    ):
        raise ComposeRejected(
            f"{where}: `restart: {restart}` is not allowed (use no, on-failure[:N] or unless-stopped: Docker "
            "would restart an `always` container even after the node stopped the CVM)"
        )
    deploy = svc.get("deploy") or {}
    condition = (deploy.get("restart_policy") or {}).get("condition")
    if condition is not None and not (isinstance(condition, str) and condition in RESTART_CONDITIONS):
        raise ComposeRejected(
            f"{where}: `deploy.restart_policy.condition: {condition}` is not allowed (use none or "
            "on-failure: Docker would restart an `any` container even after the node stopped the CVM)"
        )
    for key, value in (("scale", svc.get("scale")), ("deploy.replicas", deploy.get("replicas"))):
        if value is not None and (isinstance(value, bool) or str(value).strip() != "1"):
            raise ComposeRejected(
                f"{where}: `{key}: {value}` is not allowed: a CVM runs one container per service (the "
                "node's resource caps apply per container)"
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
        published = port.get("published")
        if published is not None and not (
            (isinstance(published, int) and not isinstance(published, bool))
            or (isinstance(published, str) and re.fullmatch(r"[0-9]{1,5}(-[0-9]{1,5})?", published))
        ):
            raise ComposeRejected(
                f"service {service!r}: published {str(published)[:64]!r} must be a port number or range "
                "(the host address is the node's: 127.0.0.1)"
            )
    elif isinstance(port, str | int) and not isinstance(port, bool):
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
    """-> (kind, source, target, mode) with kind in volume | anonymous | bind | tmpfs.

    The short syntax is read as Compose v1 reads it (`source:target[:mode]`), and refused where Compose v2
    would read it otherwise: a one-letter source (a Windows drive: `d:/x:/y` is the bind mount `d:/x` there),
    more than three parts, modes other than ro/rw/nocopy (v2 also takes propagation and SELinux options)."""
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
        if source is not None and not isinstance(source, str):
            raise ComposeRejected(f"service {service!r}: invalid volume source {source!r}")
        return ("volume" if source else "anonymous"), source, target, mode
    if not isinstance(vol, str):
        raise ComposeRejected(f"service {service!r}: invalid volume {vol!r}")
    parts = vol.split(":")
    if len(parts) == 1:
        return "anonymous", None, parts[0], "rw"
    if len(parts) > 3:
        raise ComposeRejected(f"service {service!r}: volume {vol!r} has too many `:`")
    source, target = parts[0], parts[1]
    mode = parts[2] if len(parts) > 2 else "rw"
    if len(source) == 1 and source.isalpha():
        raise ComposeRejected(
            f"service {service!r}: volume {vol!r}: a one-letter source reads as a Windows drive in "
            "Compose v2; give the volume a longer name"
        )
    if not set(mode.split(",")) <= VOLUME_MODES:
        raise ComposeRejected(
            f"service {service!r}: volume {vol!r}: mode {mode!r} is not allowed (only "
            f"{', '.join(sorted(VOLUME_MODES))})"
        )
    if source.startswith(("/", ".", "~")):
        return "bind", source, target, mode
    return "volume", source, target, mode


# Where the container runtime mounts its own file systems (and masks host files with /dev/null)
RESERVED_MOUNT_ROOTS = ("/dev", "/proc", "/sys")
TMPFS_OPTIONS = re.compile(
    r"(size=[0-9]+[kmgKMG]?|mode=[0-7]{3,4}|uid=[0-9]+|gid=[0-9]+|noexec|nosuid|nodev|ro|rw)"
)


def check_mount_target(service: str, target: Any) -> str:
    """A container path a volume, tmpfs or image VOLUME may be mounted at: absolute, and not at or under
    the runtime's own mounts (RESERVED_MOUNT_ROOTS). Returns it normalized."""
    if not isinstance(target, str) or not target.startswith("/") or "\x00" in target:
        raise ComposeRejected(
            f"service {service!r}: mount target {str(target)[:128]!r} must be an absolute path"
        )
    norm = posixpath.normpath(target)
    norm = "/" + norm.lstrip("/")  # normpath keeps a leading "//"
    for root in RESERVED_MOUNT_ROOTS:
        if norm == root or norm.startswith(root + "/"):
            raise ComposeRejected(
                f"service {service!r}: nothing may be mounted at {target[:128]!r} (at or under {root}, where "
                "the container runtime mounts its own)"
            )
    if norm == "/":
        raise ComposeRejected(f"service {service!r}: nothing may be mounted at the container's root")
    return norm


def _check_tmpfs(name: str, svc: Mapping[str, Any]) -> None:
    """Service-level `tmpfs: [path[:options]]`: each path a mount target as above, options from an allowlist
    (others, like rbind or remount, reach runc as mount flags)."""
    for entry in _str_list(svc.get("tmpfs"), f"service {name!r}: tmpfs"):
        path, _, opts = entry.partition(":")
        check_mount_target(name, path)
        for opt in opts.split(",") if opts else ():
            if not TMPFS_OPTIONS.fullmatch(opt):
                raise ComposeRejected(
                    f"service {name!r}: tmpfs option {opt[:64]!r} is not allowed (only size=, mode=, uid=, "
                    "gid=, noexec, nosuid, nodev, ro, rw)"
                )


def _check_service_volumes(name: str, svc: Mapping[str, Any], compose: Mapping[str, Any]) -> None:
    vols = svc.get("volumes") or []
    if not isinstance(vols, list):
        raise ComposeRejected(f"service {name!r}: `volumes` must be a list")
    declared = compose.get("volumes") or {}
    targets: set[str] = set()
    for vol in vols:
        kind, source, target, _mode = parse_volume(name, vol)
        # (issue 16, second review) one mount per target: Compose keeps the file's last entry for a target,
        # so a second entry would replace the node's agent-socket bind with the host path it names (A);
        # and nothing at or under /dev, /proc, /sys, where runc mounts its own (a volume at /dev let an
        # image's /dev/null symlink redirect runc's masking of /proc entries to the host's: B)
        norm = check_mount_target(name, target)
        if norm in targets:
            raise ComposeRejected(f"service {name!r} mounts two volumes at {target[:128]!r}")
        targets.add(norm)
        if kind == "bind" and source not in AGENT_SOCKET_SOURCES:
            docker_sock = bool(source) and str(source).rstrip("/").endswith("docker.sock")
            what = " (the Docker socket: control of the whole host)" if docker_sock else ""
            raise ComposeRejected(
                f"service {name!r} bind-mounts the host path {source!r}{what}: a CVM cannot see the host's "
                "files; use a named volume (stored encrypted)"
            )
        if kind == "volume" and source not in declared:
            raise ComposeRejected(f"service {name!r} uses volume {source!r}, not declared in `volumes`")
