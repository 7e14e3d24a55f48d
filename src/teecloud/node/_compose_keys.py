"""What a CVM's compose file may contain: every key teecloud supports, level by level of the Compose
Specification (https://github.com/compose-spec/compose-spec, schema/compose-spec.json), and the values that
matter. The compose policy (teecloud.node.compose) refuses any other key, naming it and its path, whatever
Compose implementation the node runs: a key Compose v1 ignores, v2 may honour (`use_api_socket`, `provider`,
`models`, lifecycle hooks, ...), and the next Compose release may add more.

A level is named by where it sits in a compose file (`service.deploy.resources.limits`, `service.ports[]` for
a long-syntax item of `ports`, `service.networks.*` for one entry of a service's `networks` mapping).
`ALLOWED_KEYS[level]` lists its keys; `NESTED[level]` says which of them hold another level, and in what
shape. Free-form mappings (environment, labels, sysctls, extra_hosts, driver_opts) are values, checked by
the value rules in teecloud.node.compose, not levels.

Left out on purpose (each refused with the reason in `REFUSED_REASONS`, or with the list of supported keys):
`build` (a node runs images and has no build context or registry: `up --no-build`), `extends` and `include`
(a service must be checked, and capped, as written), `container_name` (one name for every CVM on the node),
host resources (devices, GPUs, block-I/O device settings, the Docker socket, host cgroups, CPU pinning and
real-time scheduling), network addressing (subnets and fixed addresses become host routes), anything Compose
runs or reads on the host (`provider`, `models`, hooks, `develop`, `env_file`, `label_file`, `pull_policy`,
OCI `annotations`), and swarm-only settings. `x-*` extension fields are accepted at the top level only, where
they are inert and carry YAML anchors (`<<: *common` is merged by the YAML loader before any check).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "ALLOWED_KEYS",
    "DEFAULT_CAPS",
    "DEPENDS_ON_CONDITIONS",
    "EXTENSION_PREFIX",
    "LOG_DRIVERS",
    "NESTED",
    "REFUSED_REASONS",
    "RESERVED_LABEL_PREFIXES",
    "RESTART_CONDITIONS",
    "RESTART_POLICIES",
    "SAFE_NETWORK_OPTS",
    "SYSCTL_PREFIXES",
    "VOLUME_MODES",
]

# Top-level keys starting with this are Compose extension fields (inert; the usual home of YAML anchors).
EXTENSION_PREFIX = "x-"

_SERVICE = frozenset(
    {
        # what runs
        "image",
        "command",
        "entrypoint",
        "environment",
        "labels",
        "working_dir",
        "user",
        "group_add",
        "platform",
        "init",
        "tty",
        "stdin_open",
        "read_only",
        "stop_signal",
        "stop_grace_period",
        "healthcheck",
        "restart",
        "depends_on",
        "logging",
        # network (inside the CVM's own bridges; ports bind to loopback)
        "hostname",
        "domainname",
        "ports",
        "expose",
        "networks",
        "network_mode",
        "links",
        "extra_hosts",
        "dns",
        "dns_search",
        "dns_opt",
        # storage (named volumes are encrypted, tmpfs is charged to the container's memory)
        "volumes",
        "volumes_from",
        "tmpfs",
        "shm_size",
        "secrets",
        "configs",
        # isolation, each with a value rule
        "cap_add",
        "cap_drop",
        "security_opt",
        "privileged",
        "pid",
        "ipc",
        "cgroup",
        "runtime",
        "sysctls",
        "ulimits",
        "oom_kill_disable",
        "oom_score_adj",
        # resources (the node caps cpus, memory and pids per container; replicas stay at 1)
        "cpus",
        "mem_limit",
        "mem_reservation",
        "memswap_limit",
        "mem_swappiness",
        "pids_limit",
        "deploy",
        "scale",
    }
)

ALLOWED_KEYS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "top": frozenset({"version", "services", "volumes", "networks", "secrets", "configs"}),
        "service": _SERVICE,
        "service.deploy": frozenset({"resources", "restart_policy", "replicas"}),
        "service.deploy.resources": frozenset({"limits", "reservations"}),
        "service.deploy.resources.limits": frozenset({"cpus", "memory", "pids"}),
        "service.deploy.resources.reservations": frozenset({"cpus", "memory"}),
        "service.deploy.restart_policy": frozenset({"condition", "delay", "max_attempts", "window"}),
        "service.healthcheck": frozenset(
            {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
        ),
        "service.logging": frozenset({"driver", "options"}),
        # json-file and local: rotation and what each line carries. Not `mode`/`max-buffer-size` (a
        # non-blocking buffer lives in dockerd's memory, outside the CVM's cap).
        "service.logging.options": frozenset(
            {"max-size", "max-file", "compress", "labels", "labels-regex", "env", "env-regex", "tag"}
        ),
        "service.ports[]": frozenset({"target", "published", "host_ip", "protocol", "name", "app_protocol"}),
        "service.volumes[]": frozenset({"type", "source", "target", "read_only", "volume", "tmpfs"}),
        "service.volumes[].volume": frozenset({"nocopy"}),
        "service.volumes[].tmpfs": frozenset({"size", "mode"}),
        "service.networks.*": frozenset({"aliases", "priority"}),
        "service.depends_on.*": frozenset({"condition", "restart", "required"}),
        "service.secrets[]": frozenset({"source", "target", "uid", "gid", "mode"}),
        "service.configs[]": frozenset({"source", "target", "uid", "gid", "mode"}),
        # Not rtprio/rttime/nice (real-time or raised priority over the host's processes) nor
        # msgqueue/sigpending (kernel memory); locked and file memory is charged to the container's cap.
        "service.ulimits": frozenset(
            {"nofile", "nproc", "core", "stack", "memlock", "fsize", "cpu", "data", "as", "locks"}
        ),
        "service.ulimits.*": frozenset({"soft", "hard"}),
        "volume": frozenset({"driver", "labels", "external"}),
        "network": frozenset({"driver", "driver_opts", "internal", "labels", "enable_ipv6", "external"}),
        "secret": frozenset({"environment"}),
        "config": frozenset({"content", "environment"}),
    }
)

# level -> {key (or "*": every key): (shape, child level)} for the keys whose value holds another level.
# Shapes: "mapping" (None or a mapping), "items" (a list; its mapping items are the child level, its strings
# short syntax), "named" (a list of names, or a mapping name -> None or the child level), "scalar_or_mapping".
NESTED: Mapping[str, Mapping[str, tuple[str, str]]] = MappingProxyType(
    {
        "service": {
            "deploy": ("mapping", "service.deploy"),
            "healthcheck": ("mapping", "service.healthcheck"),
            "logging": ("mapping", "service.logging"),
            "ulimits": ("mapping", "service.ulimits"),
            "ports": ("items", "service.ports[]"),
            "volumes": ("items", "service.volumes[]"),
            "secrets": ("items", "service.secrets[]"),
            "configs": ("items", "service.configs[]"),
            "networks": ("named", "service.networks.*"),
            "depends_on": ("named", "service.depends_on.*"),
        },
        "service.deploy": {
            "resources": ("mapping", "service.deploy.resources"),
            "restart_policy": ("mapping", "service.deploy.restart_policy"),
        },
        "service.deploy.resources": {
            "limits": ("mapping", "service.deploy.resources.limits"),
            "reservations": ("mapping", "service.deploy.resources.reservations"),
        },
        "service.logging": {"options": ("mapping", "service.logging.options")},
        "service.volumes[]": {
            "volume": ("mapping", "service.volumes[].volume"),
            "tmpfs": ("mapping", "service.volumes[].tmpfs"),
        },
        "service.ulimits": {"*": ("scalar_or_mapping", "service.ulimits.*")},
    }
)

_HOST_FILES = "it reads a file on the host; "
_NOT_ON_NODE = "host devices are not available to a CVM"
_CPU = "the node sets each CVM's CPU share (use `cpus` or deploy.resources.limits.cpus, which it caps)"
_NAME = (
    "a CVM's {0}s are scoped to its own project (an existing {0} of that name, another CVM's included, "
    "would be reused); drop `name:`"
)

# Why a key is refused, where a reason helps more than the list of supported keys.
REFUSED_REASONS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "top": {
            "include": "it reads other files on the host; put everything in one compose file",
            "name": "the node names each CVM's Compose project",
            "models": "Compose would run the models through a provider on the host",
        },
        "service": {
            "build": (
                "a CVM runs images, not build contexts; build the image first and refer to it with `image:`"
            ),
            "extends": (
                "the node checks and caps each service as written; write the service out in full (`extends` "
                "from another file would also read the host's files)"
            ),
            "use_api_socket": "it mounts the Docker socket (control of the whole host) into the container",
            "provider": "Compose would run a program on the host for it",
            "models": "Compose would run the models through a provider on the host",
            "container_name": (
                "container names are shared by every CVM on the node; Compose names containers per project"
            ),
            "env_file": _HOST_FILES
            + "pass env vars encrypted (`teecloud deploy --env-file`) or write them under `environment:`",
            "label_file": _HOST_FILES + "write the labels under `labels:`",
            **{
                hook: "lifecycle hooks run commands (privileged ones too) outside the app's entrypoint"
                for hook in ("post_start", "pre_stop", "pre_start")
            },
            "uts": "its only setting, `host`, shares the host's namespace",
            "userns_mode": "its only setting, `host`, shares the host's namespace",
            "develop": "watch mode copies files from the host into the container",
            "devices": _NOT_ON_NODE,
            "device_cgroup_rules": _NOT_ON_NODE,
            "gpus": _NOT_ON_NODE,
            "blkio_config": "block-I/O settings name the host's devices",
            "cgroup_parent": "it would escape the CVM's resource limits",
            "cpu_shares": _CPU,
            "cpu_quota": _CPU,
            "cpu_period": _CPU,
            "cpu_rt_period": _CPU,
            "cpu_rt_runtime": _CPU,
            "cpu_count": _CPU,
            "cpu_percent": _CPU,
            "cpuset": _CPU,
            "storage_opt": "storage-driver options are the host's",
            "mac_address": "the CVM's bridge assigns addresses",
            "external_links": "it links containers outside the app",
            "pull_policy": "the node runs the images it has (nothing is pulled or built at start)",
            "pull_refresh_after": "the node runs the images it has (nothing is pulled or built at start)",
            "annotations": "OCI annotations are read by the host's container runtime",
            "profiles": "every service of a CVM runs",
            "credential_spec": "Windows containers only",
            "isolation": "Windows containers only",
        },
        "service.deploy": {
            "mode": "a CVM runs one container per service",
            "placement": "swarm placement does not apply to a CVM",
        },
        "service.deploy.resources.reservations": {
            "devices": _NOT_ON_NODE,
            "generic_resources": _NOT_ON_NODE,
        },
        "service.volumes[]": {
            "bind": "bind-mount options do not apply (only the agent sockets are bind-mounted)",
        },
        "service.volumes[].volume": {
            "subpath": "mount the whole volume (a CVM's volumes are directories of its encrypted disk)",
        },
        "service.networks.*": {
            key: "the CVM's bridge assigns addresses (fixed ones need a subnet of your choosing, which is a "
            "route on the host)"
            for key in ("ipv4_address", "ipv6_address", "link_local_ips", "mac_address")
        },
        "service.ulimits": {
            "rtprio": "real-time scheduling would take CPU from the host and other CVMs",
            "rttime": "real-time scheduling would take CPU from the host and other CVMs",
            "nice": "a raised priority would take CPU from the host and other CVMs",
        },
        "service.logging.options": {
            "mode": "the non-blocking buffer lives in dockerd's memory, outside the CVM's cap",
            "max-buffer-size": "the non-blocking buffer lives in dockerd's memory, outside the CVM's cap",
        },
        "volume": {
            "name": _NAME.format("volume"),
            "driver_opts": "they can bind a host path",
        },
        "network": {
            "name": _NAME.format("network"),
            "ipam": (
                "Docker assigns each CVM's subnets (a subnet of your choosing becomes a route on the host, "
                "which could capture the host's own traffic)"
            ),
            "attachable": "only this app's containers join its networks",
        },
        "secret": {
            "file": "it comes from the host; only an `environment` source is allowed",
            "external": "it comes from the host; only an `environment` source is allowed",
        },
        "config": {
            "file": "it comes from the host; only inline `content` or an `environment` source is allowed",
            "external": "it comes from the host; only inline `content` or an `environment` source is allowed",
        },
    }
)

# ------------------------------------------------------------------------------------------ value rules

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
# `restart`: not `always`, which dockerd honours at its next start even for a container the node stopped
# (a stopped CVM must stay stopped until the node boots it). `on-failure:<n>` is accepted too.
RESTART_POLICIES = frozenset({"no", "on-failure", "unless-stopped"})
RESTART_CONDITIONS = frozenset({"none", "on-failure"})  # deploy.restart_policy; `any` is `always`
DEPENDS_ON_CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})
LOG_DRIVERS = frozenset({"json-file", "local"})  # the others ship logs off the host
# Volume short syntax `source:target:mode`: not propagation (`shared`, ...), SELinux relabelling (`z`/`Z`
# relabel the host directory) or Docker Desktop consistency options.
VOLUME_MODES = frozenset({"ro", "rw", "nocopy"})
SYSCTL_PREFIXES = ("net.",)  # per network namespace: the container's own
# Labels Compose and the node set and read to find a project's containers, networks and volumes.
RESERVED_LABEL_PREFIXES = ("com.docker.compose.", "io.teecloud.")
HOST_BINDING_OPT = "com.docker.network.bridge.host_binding_ipv4"
SAFE_NETWORK_OPTS = frozenset({HOST_BINDING_OPT, "com.docker.network.driver.mtu"})
