"""The options deploy and upgrade share, validated once, and the app-compose.json they produce.

One set of options and behaviours for every front end (the CLI today, the REST API later):

    AppOptions.build(...)   name, `-e/--env KEY=VALUE`, `--env-file`, `--allowed-env`,
                            `--replace-allowed-envs`, `--public-logs`, caps; every value checked here, so
                            a bad one is a clear InvalidOption before the chain or a node is contacted
                            (never a pydantic trace)
    resolve_allowed_envs    the allowed env names of the new version: the current version's merged with
                            --allowed-env (or, when none is given, with the names of the env given);
                            replaced only with `replace_allowed_envs`; a warning for every variable the
                            CVM will drop
    plan_compose            docker-compose.yml + options -> the exact app-compose.json and its compose hash
                            (what `teecloud compose-hash` prints and a multisig is asked to approve), after
                            the whole file passed the compose policy (the allowlist of node/compose.py)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teecloud.cloud.errors import ComposeRefused, InvalidOption
from teecloud.gateway.portpolicy import BadPortPolicy, PortPolicy, parse_port_policy

__all__ = [
    "MAX_ENV_FILE",
    "MAX_ENV_VARS",
    "NAME_RULE",
    "AppOptions",
    "ComposePlan",
    "default_name",
    "parse_env_file",
    "parse_env_items",
    "plan_compose",
    "resolve_allowed_envs",
    "validate_name",
]

MAX_ENV_FILE = 256 * 1024
MAX_ENV_VARS = 256
MAX_ENV_NAME = 128
MAX_ENV_VALUE = 64 * 1024
MAX_NAME = 64

# The node's rule for a CVM name (node.api.CreateCvmRequest): it names a compose project and a directory.
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
NAME_RULE = (
    f"1 to {MAX_NAME} characters: ASCII letters, digits, '_', '.' and '-', starting with a letter or digit"
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def validate_name(name: str, *, what: str = "--name") -> str:
    if not isinstance(name, str) or not (1 <= len(name) <= MAX_NAME) or not _NAME.fullmatch(name):
        raise InvalidOption(f"{what} {_shown(str(name))} is not a valid app name: use {NAME_RULE}")
    return name


def default_name(compose_path: Path) -> str:
    """The compose file's folder name, which must itself be a valid name (else: say to pass --name)."""
    folder = Path(compose_path).absolute().parent.name or "app"
    try:
        return validate_name(folder)
    except InvalidOption:
        raise InvalidOption(
            f"the default app name (the compose file's folder, {_shown(folder)}) is not a valid app name: "
            f"pass --name NAME ({NAME_RULE})"
        ) from None


def _env_name(key: str, where: str) -> str:
    if len(key) > MAX_ENV_NAME or not _ENV_NAME.fullmatch(key):
        raise InvalidOption(
            f"{where}: {_shown(key)} is not an env var name (letters, digits and '_', not starting with a "
            f"digit, at most {MAX_ENV_NAME} characters)"
        )
    return key


def parse_env_items(items: Iterable[str], *, where: str = "-e/--env") -> dict[str, str]:
    """`KEY=VALUE` arguments."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidOption(f"{where} expects KEY=VALUE, got {_shown(item)}")
        _env_name(key, where)
        if len(value.encode("utf-8", "surrogatepass")) > MAX_ENV_VALUE:
            raise InvalidOption(f"{where}: the value of {key} is larger than {MAX_ENV_VALUE} bytes")
        env[key] = value
    if len(env) > MAX_ENV_VARS:
        raise InvalidOption(f"at most {MAX_ENV_VARS} env vars")
    return env


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped; optional `export `; one level of matching quotes
    stripped. Anything else is an error with its line number (never silently ignored)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ENV_FILE + 1)
    except OSError as exc:
        raise InvalidOption(f"cannot read env file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_ENV_FILE:
        raise InvalidOption(f"env file {path} is larger than {MAX_ENV_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidOption(f"env file {path} is not UTF-8 text") from None
    env: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_NAME.fullmatch(key) or len(key) > MAX_ENV_NAME:
            raise InvalidOption(f"{path}:{n}: expected KEY=VALUE, got {_shown(raw)}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    if len(env) > MAX_ENV_VARS:
        raise InvalidOption(f"env file {path} has more than {MAX_ENV_VARS} variables")
    return env


@dataclass(frozen=True)
class AppOptions:
    """What a user chooses for a deploy or an upgrade, validated (build with `AppOptions.build`).

    env_given: an env was given (-e or --env-file). On upgrade it replaces the app's encrypted env as a
    whole (the client cannot read the current one); without it the current encrypted env is kept."""

    name: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    env_given: bool = False
    allowed_envs: tuple[str, ...] = ()
    replace_allowed_envs: bool = False
    public_logs: bool | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    # dstack's app-compose `port_policy` (measured): with it only the listed ports get gateway routes, and
    # `pp` ports get PROXY protocol v2; None keeps the current version's policy on upgrade (a new app: none)
    port_policy: PortPolicy | None = None

    @classmethod
    def build(
        cls,
        *,
        name: str | None = None,
        env: Sequence[str] | Mapping[str, str] = (),
        env_file: Path | None = None,
        allowed_envs: Sequence[str] = (),
        replace_allowed_envs: bool = False,
        public_logs: bool | None = None,
        cpus: float | None = None,
        memory_mb: int | None = None,
        gateway_ports: Sequence[str] | None = None,
    ) -> AppOptions:
        if name is not None:
            validate_name(name)
        values: dict[str, str] = parse_env_file(env_file) if env_file is not None else {}
        if isinstance(env, Mapping):
            values.update(parse_env_items(f"{k}={v}" for k, v in env.items()))
        else:
            values.update(parse_env_items(env))
        if len(values) > MAX_ENV_VARS:
            raise InvalidOption(f"at most {MAX_ENV_VARS} env vars")
        allowed = tuple(dict.fromkeys(_env_name(a, "--allowed-env") for a in allowed_envs))
        if len(allowed) > MAX_ENV_VARS:
            raise InvalidOption(f"at most {MAX_ENV_VARS} allowed env names")
        if replace_allowed_envs and not allowed:
            raise InvalidOption("--replace-allowed-envs needs the new list: give it with --allowed-env NAME")
        if cpus is not None and not (0 < cpus <= 1024):
            raise InvalidOption("--cpus must be above 0 and at most 1024")
        if memory_mb is not None and not (6 <= memory_mb <= 16 * 1024 * 1024):
            raise InvalidOption("--memory must be at least 6 (MB) and at most 16777216")
        return cls(
            port_policy=_port_policy(gateway_ports) if gateway_ports is not None else None,
            name=name,
            env=values,
            env_given=env_file is not None or bool(env),
            allowed_envs=allowed,
            replace_allowed_envs=replace_allowed_envs,
            public_logs=public_logs,
            cpus=cpus,
            memory_mb=memory_mb,
        )


def _port_policy(items: Sequence[str]) -> PortPolicy:
    """`--gateway-port PORT[:pp][:h2c]` items -> a restricting port policy (only these ports routed)."""
    ports: list[dict[str, Any]] = []
    for item in items:
        port, *flags = item.strip().split(":")
        if not port.isdigit() or len(port) > 5 or len(set(flags)) != len(flags) or set(flags) - {"pp", "h2c"}:
            raise InvalidOption(f"--gateway-port {item[:40]!r} is not PORT, PORT:pp, PORT:h2c or PORT:pp:h2c")
        ports.append({"port": int(port), "pp": "pp" in flags, **({"h2c": True} if "h2c" in flags else {})})
    try:
        return parse_port_policy({"restrict_mode": True, "ports": ports})
    except BadPortPolicy as exc:
        raise InvalidOption(f"--gateway-port: {exc}") from exc


def resolve_allowed_envs(options: AppOptions, previous: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """-> (allowed env names of the new version, warnings). `previous` is the current version's list (None
    for a new app). Merged: previous + --allowed-env, or previous + the names of the env given when no
    --allowed-env is given; replaced only with `replace_allowed_envs`. One warning per variable the CVM
    will drop or no longer get."""
    before = list(previous or [])
    given_env = list(options.env)
    if options.replace_allowed_envs:
        allowed = list(options.allowed_envs)
    elif options.allowed_envs:  # an explicit list: the env's other names stay out (and are warned about)
        allowed = list(dict.fromkeys([*before, *options.allowed_envs]))
    else:  # no list given: the names of the env given are allowed
        allowed = list(dict.fromkeys([*before, *given_env]))
    warnings: list[str] = []
    for n in before:
        if n not in allowed:
            warnings.append(
                f"{n} is no longer in allowed_envs (--replace-allowed-envs): the new version's CVM drops it"
            )
    for n in given_env:
        if n not in allowed:
            warnings.append(f"env var {n} is not in allowed_envs: the CVM will drop it")
    if previous is not None and options.env_given:
        for n in before:
            if n in allowed and n not in options.env:
                warnings.append(
                    f"{n} is not in the env given: the new env replaces the app's current encrypted env, so "
                    f"the app will no longer receive {n} (give it again, or give no env to keep the current)"
                )
    return sorted(allowed), warnings


@dataclass
class ComposePlan:
    """The exact app-compose.json a CVM will boot with and its compose hash (what the chain must allow)."""

    name: str
    app_compose: bytes
    compose_hash: bytes
    allowed_envs: list[str]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compose_hash": "0x" + self.compose_hash.hex(),
            "app_compose": self.app_compose.decode(),
            "allowed_envs": self.allowed_envs,
            "warnings": self.warnings,
        }


def read_compose_file(path: Path) -> str:
    from teecloud.appcompose import MAX_COMPOSE_BYTES

    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_COMPOSE_BYTES + 1)
    except IsADirectoryError:
        raise ComposeRefused(f"cannot read {path}: it is a directory (give the docker-compose.yml)") from None
    except OSError as exc:
        raise ComposeRefused(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_COMPOSE_BYTES:
        raise ComposeRefused(f"{path} is larger than {MAX_COMPOSE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ComposeRefused(f"{path} is not UTF-8 text") from None


def plan_compose(
    compose_path: Path,
    options: AppOptions,
    *,
    name: str | None = None,
    previous: Mapping[str, Any] | None = None,
) -> ComposePlan:
    """The app-compose.json for `compose_path` under `options`. `previous`: the current version's
    app-compose document on upgrade (its allowed_envs are merged, its public_logs kept unless given).
    The whole compose file passes the compose policy here (node.compose.load_compose: the allowlist and
    the value rules), so nothing the node would refuse reaches the chain."""
    from teecloud.cloud.deploy import build_app_compose
    from teecloud.node.errors import ComposeRejected

    text = read_compose_file(compose_path)
    final_name = validate_name(name) if name else options.name or default_name(compose_path)
    prev_allowed: list[str] | None = None
    prev_public_logs = False
    if previous is not None:
        raw = previous.get("allowed_envs", [])
        prev_allowed = [a for a in raw if isinstance(a, str)] if isinstance(raw, list) else []
        prev_public_logs = bool(previous.get("public_logs", False))
    allowed, warnings = resolve_allowed_envs(options, prev_allowed)
    public_logs = prev_public_logs if options.public_logs is None else options.public_logs
    port_policy = options.port_policy
    if port_policy is None and previous is not None and previous.get("port_policy") is not None:
        try:
            port_policy = parse_port_policy(previous.get("port_policy"))
        except BadPortPolicy as exc:
            raise ComposeRefused(f"the current version's port_policy: {exc}") from exc
    try:
        app_compose, chash = build_app_compose(
            text, name=final_name, allowed_envs=allowed, public_logs=public_logs, port_policy=port_policy
        )
    except ComposeRejected as exc:
        raise ComposeRefused(f"{compose_path}: {exc}") from exc
    return ComposePlan(final_name, app_compose, chash, allowed, warnings)
