"""The compose policy is an allowlist (issue 16, F10): every key of the Compose Specification's schema is
accepted exactly when teecloud's allowlist (teecloud.node._compose_keys) names it, and any key it does not
name, inserted anywhere in a valid file, is refused with an error naming it."""

from __future__ import annotations

import copy
import hashlib
import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teecloud.node._compose_keys import ALLOWED_KEYS, EXTENSION_PREFIX
from teecloud.node.compose import check_isolation, load_compose
from teecloud.node.errors import ComposeRejected

SCHEMA_PATH = Path(__file__).parent / "data" / "compose-spec.json"  # provenance: data/README.md
SCHEMA_SHA256 = "1f91e091f16b2dd50ab8860e02bb391d22df553d91c145eacedb1b6eff9c3f0e"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())


def base() -> dict[str, Any]:
    """A valid compose file with one of each definition, for keys to be inserted into."""
    return {
        "services": {"a": {"image": "x"}, "b": {"image": "y"}},
        "volumes": {"data": {}},
        "networks": {"n": {}},
        "secrets": {"s": {"environment": "S"}},
        "configs": {"c": {"content": "hi"}},
    }


def _new(container: dict[str, Any], key: str, value: Any) -> Any:
    container[key] = value
    return value


def _svc(doc: dict[str, Any]) -> dict[str, Any]:
    svc: dict[str, Any] = doc["services"]["a"]
    return svc


def _deploy(doc: dict[str, Any], **content: Any) -> dict[str, Any]:
    deploy: dict[str, Any] = _new(_svc(doc), "deploy", content)
    return deploy


_VOLUME = {"type": "volume", "source": "data", "target": "/data"}

# A place in a compose file: (the object a key is inserted into, its path as the policy names it).
Place = Callable[[dict[str, Any]], tuple[dict[str, Any], str]]

# Where each level of the allowlist sits in `base()`.
LEVELS: dict[str, Place] = {
    "top": lambda d: (d, ""),
    "service": lambda d: (_svc(d), ""),
    "service.deploy": lambda d: (_deploy(d), "deploy"),
    "service.deploy.resources": lambda d: (_deploy(d, resources={})["resources"], "deploy.resources"),
    "service.deploy.resources.limits": lambda d: (
        _deploy(d, resources={"limits": {}})["resources"]["limits"],
        "deploy.resources.limits",
    ),
    "service.deploy.resources.reservations": lambda d: (
        _deploy(d, resources={"reservations": {}})["resources"]["reservations"],
        "deploy.resources.reservations",
    ),
    "service.deploy.restart_policy": lambda d: (
        _deploy(d, restart_policy={})["restart_policy"],
        "deploy.restart_policy",
    ),
    "service.healthcheck": lambda d: (_new(_svc(d), "healthcheck", {}), "healthcheck"),
    "service.logging": lambda d: (_new(_svc(d), "logging", {}), "logging"),
    "service.logging.options": lambda d: (
        _new(_svc(d), "logging", {"driver": "json-file", "options": {}})["options"],
        "logging.options",
    ),
    "service.ports[]": lambda d: (_new(_svc(d), "ports", [{"target": 80}])[0], "ports[0]"),
    "service.volumes[]": lambda d: (_new(_svc(d), "volumes", [dict(_VOLUME)])[0], "volumes[0]"),
    "service.volumes[].volume": lambda d: (
        _new(_svc(d), "volumes", [{**_VOLUME, "volume": {}}])[0]["volume"],
        "volumes[0].volume",
    ),
    "service.volumes[].tmpfs": lambda d: (
        _new(_svc(d), "volumes", [{"type": "tmpfs", "target": "/t", "tmpfs": {}}])[0]["tmpfs"],
        "volumes[0].tmpfs",
    ),
    "service.networks.*": lambda d: (_new(_svc(d), "networks", {"n": {}})["n"], "networks.n"),
    "service.depends_on.*": lambda d: (_new(_svc(d), "depends_on", {"b": {}})["b"], "depends_on.b"),
    "service.secrets[]": lambda d: (_new(_svc(d), "secrets", [{"source": "s"}])[0], "secrets[0]"),
    "service.configs[]": lambda d: (_new(_svc(d), "configs", [{"source": "c"}])[0], "configs[0]"),
    "service.ulimits": lambda d: (_new(_svc(d), "ulimits", {}), "ulimits"),
    "service.ulimits.*": lambda d: (_new(_svc(d), "ulimits", {"nofile": {}})["nofile"], "ulimits.nofile"),
    "volume": lambda d: (d["volumes"]["data"], ""),
    "network": lambda d: (d["networks"]["n"], ""),
    "secret": lambda d: (d["secrets"]["s"], ""),
    "config": lambda d: (d["configs"]["c"], ""),
}

# A benign value for every allowlisted key (accepted), by level.
BENIGN: dict[str, dict[str, Any]] = {
    "top": {
        "version": "3.8",
        "services": {"a": {"image": "x"}},
        "volumes": {"data": {}},
        "networks": {"n": {"driver": "bridge"}},
        "secrets": {"s": {"environment": "S"}},
        "configs": {"c": {"content": "hi"}},
    },
    "service": {
        "image": "x",
        "command": ["run", "--port", "80"],
        "entrypoint": ["/init"],
        "environment": {"A": "1", "B": "${B:-x}"},
        "labels": {"app": "web"},
        "working_dir": "/app",
        "user": "1000:1000",
        "group_add": ["users"],
        "platform": "linux/amd64",
        "init": True,
        "tty": True,
        "stdin_open": True,
        "read_only": True,
        "stop_signal": "SIGINT",
        "stop_grace_period": "5s",
        "healthcheck": {"test": ["CMD", "true"]},
        "restart": "unless-stopped",
        "depends_on": ["b"],
        "logging": {"driver": "json-file", "options": {"max-size": "10m"}},
        "hostname": "web",
        "domainname": "example.org",
        "ports": ["8080:80", "127.0.0.1:8443:443"],
        "expose": ["80"],
        "networks": ["n"],
        "network_mode": "service:b",
        "links": ["b"],
        "extra_hosts": ["db.local:10.0.0.2"],
        "dns": ["1.1.1.1"],
        "dns_search": ["example.org"],
        "dns_opt": ["ndots:1"],
        "volumes": ["data:/data:ro", "/cache", "/var/run/dstack.sock:/var/run/dstack.sock"],
        "volumes_from": ["b:ro"],
        "tmpfs": ["/tmp"],
        "shm_size": "64m",
        "secrets": ["s"],
        "configs": ["c"],
        "cap_add": ["NET_BIND_SERVICE"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "pid": "service:b",
        "ipc": "private",
        "cgroup": "private",
        "runtime": "runc",
        "sysctls": {"net.core.somaxconn": "1024"},
        "ulimits": {"nofile": {"soft": 1024, "hard": 2048}, "nproc": 512},
        "oom_kill_disable": False,
        "oom_score_adj": 500,
        "cpus": 0.5,
        "mem_limit": "256m",
        "mem_reservation": "128m",
        "memswap_limit": "256m",
        "mem_swappiness": 0,
        "pids_limit": 100,
        "deploy": {"resources": {"limits": {"memory": "256M"}}},
        "scale": 1,
    },
    "service.deploy": {
        "resources": {"limits": {"cpus": "1"}},
        "restart_policy": {"condition": "on-failure"},
        "replicas": 1,
    },
    "service.deploy.resources": {"limits": {"memory": "1G"}, "reservations": {"memory": "64M"}},
    "service.deploy.resources.limits": {"cpus": "0.5", "memory": "256M", "pids": 100},
    "service.deploy.resources.reservations": {"cpus": "0.25", "memory": "64M"},
    "service.deploy.restart_policy": {
        "condition": "on-failure",
        "delay": "5s",
        "max_attempts": 3,
        "window": "60s",
    },
    "service.healthcheck": {
        "test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"],
        "interval": "10s",
        "timeout": "5s",
        "retries": 3,
        "start_period": "5s",
        "start_interval": "1s",
        "disable": False,
    },
    "service.logging": {"driver": "local", "options": {"max-file": "3"}},
    "service.logging.options": {
        "max-size": "10m",
        "max-file": "3",
        "compress": "true",
        "labels": "app",
        "labels-regex": "^app",
        "env": "A",
        "env-regex": "^A",
        "tag": "{{.Name}}",
    },
    "service.ports[]": {
        "target": 80,
        "published": "8080",
        "host_ip": "127.0.0.1",
        "protocol": "tcp",
        "name": "web",
        "app_protocol": "http",
    },
    "service.volumes[]": {
        "type": "volume",
        "source": "data",
        "target": "/data",
        "read_only": True,
        "volume": {"nocopy": True},
        "tmpfs": {"size": 1024},
    },
    "service.volumes[].volume": {"nocopy": True},
    "service.volumes[].tmpfs": {"size": "64m", "mode": 1777},
    "service.networks.*": {"aliases": ["db"], "priority": 1},
    "service.depends_on.*": {"condition": "service_healthy", "restart": True, "required": True},
    "service.secrets[]": {"source": "s", "target": "/run/s", "uid": "1000", "gid": "1000", "mode": 0o440},
    "service.configs[]": {"source": "c", "target": "/etc/c", "uid": "1000", "gid": "1000", "mode": 0o440},
    "service.ulimits": {
        name: 1024 for name in ("nofile", "nproc", "core", "stack", "fsize", "cpu", "data", "as", "locks")
    }
    | {"memlock": {"soft": -1, "hard": -1}},
    "service.ulimits.*": {"soft": 1024, "hard": 2048},
    "volume": {"driver": "local", "labels": {"backup": "daily"}, "external": False},
    "network": {
        "driver": "bridge",
        "driver_opts": {"com.docker.network.driver.mtu": "1400"},
        "internal": True,
        "labels": ["tier=back"],
        "enable_ipv6": False,
        "external": False,
    },
    "secret": {"environment": "S"},
    "config": {"content": "hi", "environment": "C"},
}


def _under(key: str, inner: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[str, Place]:
    return key, lambda d: (inner(d), key)


# Every object of the schema (its location, as `schema_objects` names it) -> the allowlist levels it is
# (SCHEMA_LEVELS), or the refused key it sits under (UNDER_REFUSED: the policy's error names that key).
SCHEMA_LEVELS: dict[str, list[str]] = {
    "top": ["top"],
    "service": ["service"],
    "service.depends_on.*": ["service.depends_on.*"],
    "service.logging": ["service.logging"],
    "service.networks.*": ["service.networks.*"],
    "service.ports[]": ["service.ports[]"],
    "service.volumes[]": ["service.volumes[]"],
    "service.volumes[].volume": ["service.volumes[].volume"],
    "service.volumes[].tmpfs": ["service.volumes[].tmpfs"],
    "healthcheck": ["service.healthcheck"],
    "deployment": ["service.deploy"],
    "deployment.resources": ["service.deploy.resources"],
    "deployment.resources.limits": ["service.deploy.resources.limits"],
    "deployment.resources.reservations": ["service.deploy.resources.reservations"],
    "deployment.restart_policy": ["service.deploy.restart_policy"],
    "service_config_or_secret[]": ["service.secrets[]", "service.configs[]"],
    "ulimits.*": ["service.ulimits.*"],
    "volume": ["volume"],
    "network": ["network"],
    "secret": ["secret"],
    "config": ["config"],
}
_RES = "deploy.resources.reservations"
UNDER_REFUSED: dict[str, tuple[str, Place]] = {
    "service.build": _under("build", lambda d: _new(_svc(d), "build", {})),
    "service.blkio_config": _under("blkio_config", lambda d: _new(_svc(d), "blkio_config", {})),
    "blkio_limit": _under(
        "blkio_config",
        lambda d: _new(_svc(d), "blkio_config", {"device_read_bps": [{}]})["device_read_bps"][0],
    ),
    "blkio_weight": _under(
        "blkio_config", lambda d: _new(_svc(d), "blkio_config", {"weight_device": [{}]})["weight_device"][0]
    ),
    "service.credential_spec": _under("credential_spec", lambda d: _new(_svc(d), "credential_spec", {})),
    "service.devices[]": _under("devices", lambda d: _new(_svc(d), "devices", [{}])[0]),
    "service.extends": _under("extends", lambda d: _new(_svc(d), "extends", {})),
    "service.provider": _under("provider", lambda d: _new(_svc(d), "provider", {})),
    "service.models.*": _under("models", lambda d: _new(_svc(d), "models", {"m": {}})["m"]),
    "model": _under("models", lambda d: _new(d, "models", {"m": {}})["m"]),
    "service.volumes[].bind": (
        "volumes[0].bind",
        lambda d: (
            _new(
                _svc(d),
                "volumes",
                [
                    {
                        "type": "bind",
                        "source": "/var/run/dstack.sock",
                        "target": "/var/run/dstack.sock",
                        "bind": {},
                    }
                ],
            )[0]["bind"],
            "",
        ),
    ),
    "service.volumes[].image": (
        "volumes[0].image",
        lambda d: (_new(_svc(d), "volumes", [{**_VOLUME, "image": {}}])[0]["image"], ""),
    ),
    "development": _under("develop", lambda d: _new(_svc(d), "develop", {})),
    "development.watch[]": _under("develop", lambda d: _new(_svc(d), "develop", {"watch": [{}]})["watch"][0]),
    "service_hook": _under("post_start", lambda d: _new(_svc(d), "post_start", [{}])[0]),
    "env_file[]": _under("env_file", lambda d: _new(_svc(d), "env_file", [{}])[0]),
    "gpus[]": _under("gpus", lambda d: _new(_svc(d), "gpus", [{}])[0]),
    "deployment.rollback_config": _under(
        "deploy.rollback_config", lambda d: _deploy(d, rollback_config={})["rollback_config"]
    ),
    "deployment.update_config": _under(
        "deploy.update_config", lambda d: _deploy(d, update_config={})["update_config"]
    ),
    "deployment.placement": _under("deploy.placement", lambda d: _deploy(d, placement={})["placement"]),
    "deployment.placement.preferences[]": _under(
        "deploy.placement",
        lambda d: _deploy(d, placement={"preferences": [{}]})["placement"]["preferences"][0],
    ),
    "devices[]": _under(
        f"{_RES}.devices",
        lambda d: _deploy(d, resources={"reservations": {"devices": [{}]}})["resources"]["reservations"][
            "devices"
        ][0],
    ),
    "generic_resources[]": _under(
        f"{_RES}.generic_resources",
        lambda d: _deploy(d, resources={"reservations": {"generic_resources": [{}]}})["resources"][
            "reservations"
        ]["generic_resources"][0],
    ),
    "generic_resources[].discrete_resource_spec": _under(
        f"{_RES}.generic_resources",
        lambda d: _deploy(
            d, resources={"reservations": {"generic_resources": [{"discrete_resource_spec": {}}]}}
        )["resources"]["reservations"]["generic_resources"][0]["discrete_resource_spec"],
    ),
    "include": _under("include", lambda d: _new(d, "include", [{}])[0]),
    "network.ipam": _under("ipam", lambda d: _new(d["networks"]["n"], "ipam", {})),
    "network.ipam.config[]": _under(
        "ipam", lambda d: _new(d["networks"]["n"], "ipam", {"config": [{}]})["config"][0]
    ),
    # `external: {name: ...}`: external is supported with the value false only
    "network.external": ("is external", lambda d: (_new(d["networks"]["n"], "external", {}), "")),
    "volume.external": ("is external", lambda d: (_new(d["volumes"]["data"], "external", {}), "")),
    "secret.external": _under("external", lambda d: _new(d["secrets"]["s"], "external", {})),
    "config.external": _under("external", lambda d: _new(d["configs"]["c"], "external", {})),
}


def schema_objects() -> dict[str, dict[str, Any]]:
    """location -> {key: property schema} for every object with `properties` anywhere in the schema.
    A location is a definition's name (or `top`) followed by `.key`, `[]` for list items and `.*` for the
    values of a mapping; the alternatives of oneOf/anyOf/allOf share their location; `$ref`s are not followed
    (each definition is walked on its own)."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any, loc: str) -> None:
        if not isinstance(node, dict) or "$ref" in node:
            return
        for key, prop in (node.get("properties") or {}).items():
            found.setdefault(loc, {})[key] = prop
            walk(prop, f"{loc}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{loc}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{loc}.*")
        for sub in (node.get("patternProperties") or {}).values():
            walk(sub, f"{loc}.*")
        for combinator in ("oneOf", "anyOf", "allOf"):
            for alt in node.get(combinator) or []:
                walk(alt, loc)

    walk({"properties": SCHEMA["properties"]}, "top")
    for name, definition in SCHEMA["definitions"].items():
        walk(definition, name)
    return found


def plausible(prop: dict[str, Any]) -> Any:
    """A value of the type the schema gives a property (for keys refused whatever their value)."""
    if "$ref" in prop:
        return plausible(SCHEMA["definitions"][prop["$ref"].rsplit("/", 1)[1]])
    if "enum" in prop:
        return prop["enum"][0]
    for combinator in ("oneOf", "anyOf"):
        if prop.get(combinator):
            return plausible(prop[combinator][0])
    kind = prop.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "array":
        return [plausible(prop["items"]) if isinstance(prop.get("items"), dict) else "x"]
    return {"string": "x", "boolean": True, "integer": 1, "number": 1}.get(kind, {})


def _verdict(doc: dict[str, Any]) -> str | None:
    """None if the policy accepts `doc` (as a file: YAML text through load_compose), else its reason."""
    try:
        load_compose(yaml.safe_dump(doc, sort_keys=False))
    except ComposeRejected as exc:
        return str(exc)
    return None


SCHEMA_CASES = [
    pytest.param(loc, key, id=f"{loc}:{key}")
    for loc, props in sorted(schema_objects().items())
    for key in props
]


def test_the_vendored_schema_is_the_one_the_readme_names() -> None:
    assert hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_every_object_of_the_schema_is_placed() -> None:
    """A new object in an updated schema must be placed (a level of the allowlist, or under a refused key)."""
    assert set(schema_objects()) == set(SCHEMA_LEVELS) | set(UNDER_REFUSED)


def test_every_allowlisted_key_is_a_key_of_the_schema() -> None:
    """The allowlist accepts no key Compose does not know (a typo would be a hole Compose fills later)."""
    objects = schema_objects()
    for loc, levels in SCHEMA_LEVELS.items():
        for level in levels:
            assert ALLOWED_KEYS[level] <= set(objects[loc]), (level, ALLOWED_KEYS[level] - set(objects[loc]))


@pytest.mark.parametrize(("loc", "key"), SCHEMA_CASES)
def test_every_key_of_the_compose_spec_gets_the_allowlists_verdict(loc: str, key: str) -> None:
    prop = schema_objects()[loc][key]
    if loc in UNDER_REFUSED:
        named, place = UNDER_REFUSED[loc]
        doc = base()
        obj, _ = place(doc)
        obj[key] = plausible(prop)
        reason = _verdict(doc)
        assert reason is not None, f"{loc}.{key} accepted under a refused key"
        assert (f"key '{named}' is not allowed" in reason) or (named == "is external" and named in reason), (
            reason
        )
        return
    for level in SCHEMA_LEVELS[loc]:
        doc = base()
        obj, path = LEVELS[level](doc)
        allowed = key in ALLOWED_KEYS[level]
        obj[key] = BENIGN[level][key] if allowed else plausible(prop)
        reason = _verdict(doc)
        if allowed:
            assert reason is None, f"{level}: {key} refused: {reason}"
        else:
            shown = f"{path}.{key}" if path else key
            assert reason is not None and f"key '{shown}' is not allowed" in reason, (level, key, reason)


@pytest.mark.parametrize(
    ("level", "key"), [(level, key) for level, keys in sorted(ALLOWED_KEYS.items()) for key in sorted(keys)]
)
def test_every_allowlisted_key_is_accepted_with_a_benign_value(level: str, key: str) -> None:
    doc = base()
    obj, _ = LEVELS[level](doc)
    obj[key] = BENIGN[level][key]
    assert _verdict(doc) is None


def test_the_allowlist_in_figures() -> None:
    """How many of the schema's keys (each at each place it can be written) are accepted, as docs/node.md
    says: an update of the schema or of the allowlist shows here."""
    accepted = refused = 0
    for loc, props in schema_objects().items():
        for key in props:
            levels = SCHEMA_LEVELS.get(loc, [])
            if any(key in ALLOWED_KEYS[level] for level in levels):
                accepted += 1
            else:
                refused += 1
    assert (accepted + refused, accepted, refused) == (316, 124, 192)


# ------------------------------------------------------------------------------ extension fields, anchors


def test_extension_fields_are_accepted_at_the_top_level_only() -> None:
    load_compose("x-anything: {privileged: true}\nservices:\n  a:\n    image: x\n")  # inert there
    with pytest.raises(ComposeRejected, match="'x-foo' is not allowed: extension fields"):
        load_compose("services:\n  a:\n    image: x\n    x-foo: 1\n")
    with pytest.raises(ComposeRejected, match="'x-foo' is not allowed"):
        load_compose("services:\n  a:\n    image: x\nnetworks:\n  n: {x-foo: 1}\n")


def test_a_merge_key_brings_its_keys_under_the_policy() -> None:
    """`<<: *anchor` is merged by the YAML loader: a refused key in an x- anchor is refused where it lands."""
    text = "x-common: &common\n  use_api_socket: true\nservices:\n  a:\n    <<: *common\n    image: x\n"
    with pytest.raises(ComposeRejected, match="service 'a': key 'use_api_socket' is not allowed"):
        load_compose(text)
    text = "x-limits: &limits {memory: 1G}\nservices:\n  a:\n    image: x\n    deploy:\n      resources:\n"
    text += "        limits: {<<: *limits, cpus: '1'}\n"
    assert load_compose(text)["services"]["a"]["deploy"]["resources"]["limits"] == {
        "memory": "1G",
        "cpus": "1",
    }


# ------------------------------------------------------------------------- the keys of the finding (F10)


def _svc_text(extra: str) -> str:
    return "services:\n  web:\n    image: x\n" + extra


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            _svc_text("    use_api_socket: true\n"),
            "key 'use_api_socket' is not allowed: it mounts the Docker socket",
        ),
        (_svc_text("    provider: {type: model, options: {model: ai/x}}\n"), "key 'provider' is not allowed"),
        ("models: {m: {model: ai/x}}\n" + _svc_text(""), "top level: key 'models' is not allowed"),
        (_svc_text("    models: [m]\n"), "key 'models' is not allowed"),
        (_svc_text("    post_start: [{command: id, privileged: true}]\n"), "key 'post_start' is not allowed"),
        (_svc_text("    pre_stop: [{command: id, user: root}]\n"), "key 'pre_stop' is not allowed"),
        (_svc_text("    pre_start: [{image: x, privileged: true}]\n"), "key 'pre_start' is not allowed"),
        (
            _svc_text("    networks: {n: {ipv4_address: 10.1.2.3}}\nnetworks:\n  n: {}\n"),
            "key 'networks.n.ipv4_address' is not allowed",
        ),
        (
            _svc_text("networks:\n  n: {ipam: {config: [{subnet: 10.0.0.0/8}]}}\n"),
            "network 'n': key 'ipam' is not allowed",
        ),
        (
            _svc_text("    volumes: [{type: volume, source: data, target: /d, volume: {subpath: ../..}}]\n")
            + "volumes:\n  data: {}\n",
            "key 'volumes[0].volume.subpath' is not allowed",
        ),
        (_svc_text("    scale: 4\n"), "`scale: 4` is not allowed: a CVM runs one container per service"),
        (_svc_text("    deploy: {replicas: 4}\n"), "`deploy.replicas: 4` is not allowed"),
        (_svc_text("    deploy: {mode: global}\n"), "key 'deploy.mode' is not allowed"),
        (_svc_text("    ulimits: {rtprio: 99}\n"), "key 'ulimits.rtprio' is not allowed: real-time"),
        (_svc_text("    ulimits: {nice: {soft: -20, hard: -20}}\n"), "key 'ulimits.nice' is not allowed"),
        (_svc_text("    container_name: tc-victim-web-1\n"), "key 'container_name' is not allowed"),
        (_svc_text("    restart: always\n"), "`restart: always` is not allowed"),
        (_svc_text("    deploy: {restart_policy: {condition: any}}\n"), "condition: any` is not allowed"),
        (_svc_text("    extends: other\n  other:\n    image: x\n"), "key 'extends' is not allowed"),
        (
            _svc_text("    extends: {service: other}\n  other:\n    image: x\n"),
            "key 'extends' is not allowed",
        ),
        (_svc_text("    cpu_shares: 100000\n"), "key 'cpu_shares' is not allowed"),
        (_svc_text("    cpu_rt_runtime: 950000\n"), "key 'cpu_rt_runtime' is not allowed"),
        (_svc_text("    annotations: {run.oci.handler: krun}\n"), "key 'annotations' is not allowed"),
        (_svc_text("    pull_policy: always\n"), "key 'pull_policy' is not allowed"),
        (
            _svc_text("    develop: {watch: [{path: /, action: sync, target: /h}]}\n"),
            "key 'develop' is not allowed",
        ),
        (_svc_text("    uts: host\n"), "key 'uts' is not allowed"),
        (_svc_text("    userns_mode: host\n"), "key 'userns_mode' is not allowed"),
        (_svc_text("    sysctls: {kernel.shmmax: '1'}\n"), "sysctl 'kernel.shmmax' is not allowed"),
        (
            _svc_text("    labels: [com.docker.compose.project=tc-victim]\n"),
            "label 'com.docker.compose.project'",
        ),
        (
            _svc_text("    logging: {driver: json-file, options: {mode: non-blocking}}\n"),
            "'logging.options.mode'",
        ),
        ("name: tc-victim\n" + _svc_text(""), "top level: key 'name' is not allowed"),
        # Compose v2 reads these short-syntax volumes otherwise than the policy would
        (_svc_text("    volumes: ['data:/data:rshared']\nvolumes:\n  data: {}\n"), "mode 'rshared'"),
        (_svc_text("    volumes: ['d:/etc:/host']\nvolumes:\n  d: {}\n"), "Windows drive"),
        (_svc_text("    volumes: ['data:/a:ro:rw']\nvolumes:\n  data: {}\n"), "too many"),
        # `container:` is another container, even where a service of the app is named `container`
        (
            _svc_text("    volumes_from: ['container:tc-victim-web-1']\n  container:\n    image: x\n"),
            "volumes_from 'container:tc-victim-web-1'",
        ),
    ],
)
def test_the_keys_of_the_finding_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ComposeRejected) as exc:
        load_compose(text)
    assert reason in str(exc.value)


def test_the_errors_are_short_and_name_no_host_path() -> None:
    with pytest.raises(ComposeRejected) as exc:
        load_compose(_svc_text("    " + "k" * 5000 + ": 1\n"))
    assert len(str(exc.value)) < 1000 and "k" * 65 not in str(exc.value)


# ----------------------------------------------------------------------------- generated mutations


def rich() -> dict[str, Any]:
    """A valid compose file using every level of the allowlist."""
    doc = {
        "version": "3.8",
        "x-common": {"restart": "unless-stopped"},
        "services": {
            "web": {
                "image": "x",
                "ports": ["8080:80", {"target": 443, "published": "8443", "host_ip": "127.0.0.1"}],
                "volumes": [
                    "data:/data",
                    {"type": "volume", "source": "data", "target": "/d2", "volume": {"nocopy": True}},
                    {"type": "tmpfs", "target": "/t", "tmpfs": {"size": "64m"}},
                ],
                "networks": {"n": {"aliases": ["w"]}},
                "depends_on": {"db": {"condition": "service_healthy"}},
                "secrets": [{"source": "s", "target": "/run/s"}],
                "configs": [{"source": "c", "target": "/etc/c"}],
                "healthcheck": {"test": ["CMD", "true"], "interval": "10s"},
                "logging": {"driver": "json-file", "options": {"max-size": "10m"}},
                "ulimits": {"nofile": {"soft": 1024, "hard": 2048}},
                "deploy": {
                    "replicas": 1,
                    "resources": {"limits": {"memory": "256M"}, "reservations": {"cpus": "0.25"}},
                    "restart_policy": {"condition": "on-failure"},
                },
            },
            "db": {"image": "y", "networks": ["n"]},
        },
        "volumes": {"data": {"driver": "local"}},
        "networks": {"n": {"driver": "bridge"}},
        "secrets": {"s": {"environment": "S"}},
        "configs": {"c": {"content": "hi"}},
    }
    return doc


def _at(doc: dict[str, Any], path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


# (path to an object of `rich()`, its level, its path as the policy names it)
_W = ("services", "web")
RICH_OBJECTS: list[tuple[tuple[Any, ...], str, str]] = [
    ((), "top", ""),
    (_W, "service", ""),
    (("services", "db"), "service", ""),
    ((*_W, "ports", 1), "service.ports[]", "ports[1]"),
    ((*_W, "volumes", 1), "service.volumes[]", "volumes[1]"),
    ((*_W, "volumes", 1, "volume"), "service.volumes[].volume", "volumes[1].volume"),
    ((*_W, "volumes", 2, "tmpfs"), "service.volumes[].tmpfs", "volumes[2].tmpfs"),
    ((*_W, "networks", "n"), "service.networks.*", "networks.n"),
    ((*_W, "depends_on", "db"), "service.depends_on.*", "depends_on.db"),
    ((*_W, "secrets", 0), "service.secrets[]", "secrets[0]"),
    ((*_W, "configs", 0), "service.configs[]", "configs[0]"),
    ((*_W, "healthcheck"), "service.healthcheck", "healthcheck"),
    ((*_W, "logging"), "service.logging", "logging"),
    ((*_W, "logging", "options"), "service.logging.options", "logging.options"),
    ((*_W, "ulimits"), "service.ulimits", "ulimits"),
    ((*_W, "ulimits", "nofile"), "service.ulimits.*", "ulimits.nofile"),
    ((*_W, "deploy"), "service.deploy", "deploy"),
    ((*_W, "deploy", "resources"), "service.deploy.resources", "deploy.resources"),
    ((*_W, "deploy", "resources", "limits"), "service.deploy.resources.limits", "deploy.resources.limits"),
    (
        (*_W, "deploy", "resources", "reservations"),
        "service.deploy.resources.reservations",
        "deploy.resources.reservations",
    ),
    ((*_W, "deploy", "restart_policy"), "service.deploy.restart_policy", "deploy.restart_policy"),
    (("volumes", "data"), "volume", ""),
    (("networks", "n"), "network", ""),
    (("secrets", "s"), "secret", ""),
    (("configs", "c"), "config", ""),
]
_SPEC_KEYS = sorted({key for props in schema_objects().values() for key in props})
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(string.printable, max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(string.ascii_letters, max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_keys = st.sampled_from(_SPEC_KEYS) | st.text(
    string.ascii_letters + string.digits + "_-.", min_size=1, max_size=20
)


def test_the_rich_file_is_accepted_and_covers_every_level() -> None:
    assert _verdict(rich()) is None
    assert {level for _, level, _ in RICH_OBJECTS} == set(ALLOWED_KEYS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(where=st.sampled_from(RICH_OBJECTS), key=_keys, value=_values)
def test_an_unknown_key_anywhere_is_refused(
    where: tuple[tuple[Any, ...], str, str], key: str, value: Any
) -> None:
    path, level, shown_path = where
    if key in ALLOWED_KEYS[level] or (level == "top" and key.startswith(EXTENSION_PREFIX)):
        return
    doc = rich()
    _at(doc, path)[key] = value
    with pytest.raises(ComposeRejected) as exc:
        check_isolation(copy.deepcopy(doc))
    reason = str(exc.value)
    shown = f"{shown_path}.{key}" if shown_path else key
    assert f"key '{shown}' is not allowed" in reason or (
        "interpolation" in reason and "$" in repr(value)  # a definition's `$` is refused before its keys
    ), reason


@settings(max_examples=400, deadline=None)
@given(where=st.sampled_from(RICH_OBJECTS), data=st.data(), value=_values)
def test_any_value_of_a_supported_key_is_accepted_or_refused_never_a_crash(
    where: tuple[tuple[Any, ...], str, str], data: st.DataObject, value: Any
) -> None:
    path, level, _ = where
    key = data.draw(st.sampled_from(sorted(ALLOWED_KEYS[level])))
    doc = rich()
    _at(doc, path)[key] = value
    try:
        check_isolation(doc)
    except ComposeRejected:
        pass
