"""Deploy an unchanged docker-compose app to the local cloud: what `teecloud deploy` does.

Procedure (`deploy`):
  (1) build app-compose.json (dstack fields, normalized JSON: its sha256 is the compose_hash), and ask the
      node whether it would create it (name free, the whole compose policy, images present): a refusal
      stops here, before anything is registered on chain
  (2) registering: deploy an AppAuth for the app with this compose hash allowed (its address is the app_id),
      or, with an existing app_id, check that the hash is allowed (adding it if we own the app)
  (3) encrypt the env vars to the app's KMS env key, after checking that key's signature by the KMS root key
      published on chain
  (4) deploy to the node, follow its boot (booting, measuring, keys, starting, healthy)
  (5) verify the running app from the outside (teecloud.cloud.verify): quote, replay, compose, chain
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from teecloud.node.errors import ComposeRejected, NodeError

__all__ = [
    "DeployError",
    "DeployResult",
    "Retirement",
    "Session",
    "build_app_compose",
    "deploy",
    "parse_env_file",
    "retire_instance",
    "upgrade",
]

MAX_ENV_FILE = 256 * 1024
Progress = Callable[[str, str], None]  # (phase, detail)


class DeployError(NodeError):
    pass


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped; optional `export `; one level of matching quotes
    stripped. Anything else is an error with its line number (never silently ignored)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DeployError(f"cannot read env file {path}: {exc.strerror}") from exc
    if len(data) > MAX_ENV_FILE:
        raise DeployError(f"env file {path} is larger than {MAX_ENV_FILE} bytes")
    env: dict[str, str] = {}
    for n, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise DeployError(f"{path}:{n}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def build_app_compose(
    compose_text: str,
    *,
    name: str,
    allowed_envs: Sequence[str] = (),
    public_logs: bool = False,
    public_sysinfo: bool = True,
    public_tcbinfo: bool = True,
) -> tuple[bytes, bytes]:
    """-> (app-compose.json bytes in normalized form, compose_hash). Field names as dstack's AppCompose."""
    from teecloud.appcompose import compose_hash, normalize_app_compose
    from teecloud.node.compose import load_compose

    load_compose(compose_text)  # refuse early what the node would refuse (the node checks again)
    doc: dict[str, Any] = {
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": compose_text,
        "kms_enabled": True,
        "gateway_enabled": False,
        "local_key_provider_enabled": False,
        "key_provider": "kms",
        "public_logs": public_logs,
        "public_sysinfo": public_sysinfo,
        "public_tcbinfo": public_tcbinfo,
        "allowed_envs": sorted(set(allowed_envs)),
        "no_instance_id": False,
        "secure_time": False,
    }
    return normalize_app_compose(doc).encode(), compose_hash(doc)


def wait_gateway_urls(gateway: dict[str, Any], app_id: str, st: Any, timeout: float = 20.0) -> list[str]:
    """https://<app_id>-<port>.<base>:<port>/ for each published TCP port of the CVM, after waiting (at most
    `timeout`) until the app answers through the gateway on the first one (validated with the CA)."""
    ports = sorted(
        {int(p["container_port"]) for c in st.containers for p in c.ports if p.get("protocol") == "tcp"}
    )
    base, public = gateway.get("base_domain"), gateway.get("public_port")
    if not ports or not base or not public:
        return []
    urls = [f"https://{app_id}-{p}.{base}:{public}/" for p in ports]
    host = f"{app_id}-{ports[0]}.{base}"
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=str(gateway.get("ca_file")), timeout=5) as http:
        while time.monotonic() < deadline:
            try:
                r = http.get(
                    f"https://127.0.0.1:{public}/", headers={"Host": host}, extensions={"sni_hostname": host}
                )
                if r.status_code < 500 and r.status_code != 421:  # the app itself answered
                    return urls
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    return urls


@dataclass
class DeployResult:
    app_id: str
    compose_hash: str
    instance_id: str
    name: str
    urls: list[str]
    status: str
    error: str = ""
    verdict: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    boot_timings: dict[str, float] = field(default_factory=dict)
    gateway_urls: list[str] = field(default_factory=list)


class Session:
    """Clients of a running local cloud (read from its endpoints.json)."""

    def __init__(self, home: Path | None = None) -> None:
        from teecloud.chain.client import ChainClient, HttpTransport
        from teecloud.chain.embedded import DEV_KEYS
        from teecloud.cloud.endpoints import read_endpoints
        from teecloud.node.api import NodeClient

        ep = read_endpoints(home)
        if ep is None:
            raise DeployError(
                "no local cloud is running for this data directory: start it with `teecloud up`"
            )
        self.endpoints = ep
        self.home = home
        self.chain = ChainClient(HttpTransport(ep.chain_rpc), DEV_KEYS[0], home=home, label=ep.chain_rpc)
        token = Path(ep.node_token_file).read_text().strip()
        self.node = NodeClient(ep.node, token)
        self._platform: Any = None

    @property
    def platform(self) -> Any:
        if self._platform is None:
            from teecloud.tee.simulated import SimulatedTdx

            self._platform = SimulatedTdx(self.home)
        return self._platform

    def kms_client(self) -> Any:
        from teecloud.kms.client import connect_kms

        p = self.platform
        return connect_kms(
            self.endpoints.kms,
            collateral_for=lambda _q, _n: p.collateral(),
            dev_root_der=p.dev_root_der(),
            chain=self.chain,
        )

    def close(self) -> None:
        self.node.close()
        self.chain.close()


def _encrypt_env(session: Session, app_id: bytes, env: Mapping[str, str]) -> str | None:
    if not env:
        return None
    from teecloud.keys.envcrypt import encrypt_env

    try:
        pub, _resp = session.kms_client().get_env_encrypt_pubkey(app_id)
    except Exception as exc:  # KmsClientError and transport failures, reported as a deploy error
        raise DeployError(
            f"cannot get a verified env-encryption key for the app from the KMS: {exc}"
        ) from exc
    return encrypt_env(pub, dict(env)).hex()


def _node_check(session: Session, name: str | None, app_compose: bytes) -> None:
    """What the node would refuse (name taken, compose policy, absent images), before the chain is touched."""
    from teecloud.node.api import CheckCvmRequest, NodeApiError

    try:
        session.node.check(CheckCvmRequest(name=name, app_compose=app_compose.decode()))
    except NodeApiError as exc:
        raise DeployError(f"the node refuses this app: {exc}") from exc


@dataclass
class Retirement:
    """What `teecloud rm` achieved on chain for one instance."""

    retired: bool  # True: AppAuth refuses the instance from now on, so no KMS releases its keys again
    detail: str


def retire_instance(session: Session, app_id: str, instance_id: str) -> Retirement:
    """Retire `instance_id` in the app's AppAuth when this session's signer owns the app directly. An app
    governed by a multisig or a timelock needs a governance proposal instead: nothing is sent, and the
    answer says so (its keys stay releasable to the measured code until the proposal is executed)."""
    from teecloud.chain.errors import ChainError

    chain = session.chain
    try:
        if chain.is_instance_retired(app_id, instance_id):
            return Retirement(True, "already retired on chain")
        owner = chain.app_owner(app_id)
        kind = chain.governance_kind(owner)
        if kind != "account" or owner != chain.address:
            what = f"a {kind}" if kind != "account" else "another account"
            return Retirement(
                False,
                f"app {app_id} is owned by {what} ({owner}), not by this signer: retiring the instance needs "
                f"a governance proposal (`teecloud app retire-instance {app_id} {instance_id}`)",
            )
        r = chain.retire_instance(app_id, instance_id)
    except ChainError as exc:
        return Retirement(False, f"the chain did not retire it: {exc}")
    return Retirement(True, f"retired on chain in block {int(str(r['blockNumber']), 0)}")


def deploy(
    session: Session,
    compose_path: Path,
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    allowed_envs: Sequence[str] = (),
    public_logs: bool = False,
    app_id: str | None = None,
    cpus: float | None = None,
    memory_mb: int | None = None,
    progress: Progress = lambda phase, detail: None,
    verify: bool = True,
    timeout: float = 180.0,
) -> DeployResult:
    from teecloud.node.api import CreateCvmRequest

    timings: dict[str, float] = {}
    t = time.perf_counter()

    def mark(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[phase] = now - t
        t = now

    env = dict(env or {})
    missing = sorted(k for k in env if k not in allowed_envs)
    if missing:
        # Sent anyway (encrypted): the CVM itself enforces allowed_envs and drops them, which is measured.
        progress("warning", f"env vars {', '.join(missing)} are not in allowed_envs: the CVM will drop them")
    compose_path = Path(compose_path)
    try:
        compose_text = compose_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeployError(f"cannot read {compose_path}: {exc}") from exc
    name = name or compose_path.resolve().parent.name or "app"
    # (1)
    try:
        app_compose, chash = build_app_compose(
            compose_text, name=name, allowed_envs=allowed_envs, public_logs=public_logs
        )
    except ComposeRejected as exc:
        raise DeployError(f"{compose_path}: {exc}") from exc
    _node_check(session, name, app_compose)
    mark("compose")
    # (2)
    progress("registering", f"compose_hash {chash.hex()}")
    chain = session.chain
    if app_id is None:
        app_id = chain.register_app(None, chash)
    elif not chain.is_compose_hash_allowed(app_id, chash):
        try:
            chain.add_compose_hash(app_id, chash)
        except Exception as exc:
            raise DeployError(
                f"compose hash {chash.hex()} is not allowed for app {app_id} and this account cannot add "
                f"it: {exc}"
            ) from exc
    from teecloud.ids import parse_app_id

    app_id_bytes = parse_app_id(str(app_id))
    mark("registering")
    # (3)
    enc = _encrypt_env(session, app_id_bytes, env)
    mark("env")
    # (4)
    progress("booting", f"app {app_id}")
    st = session.node.create(
        CreateCvmRequest(
            name=name,
            app_compose=app_compose.decode(),
            app_id=app_id_bytes.hex(),
            encrypted_env=enc,
            cpus=cpus,
            memory_mb=memory_mb,
        )
    )
    st = session.node.wait(
        st.instance_id,
        timeout=timeout,
        on_phase=lambda s: progress(s.phase if s.status == "booting" else s.status, s.error),
    )
    mark("boot")
    result = DeployResult(
        app_id=app_id_bytes.hex(),
        compose_hash=chash.hex(),
        instance_id=st.instance_id,
        name=name,
        urls=st.urls,
        status=st.status,
        error=st.error,
        timings=timings,
        boot_timings=st.timings,
    )
    if st.status == "running" and session.endpoints.gateway:
        # --- gateway: the app's https URLs, once the gateway serves them (the CVM registers within seconds)
        result.gateway_urls = wait_gateway_urls(session.endpoints.gateway, result.app_id, st)
        mark("gateway")
    if st.status != "running":
        return result
    # (5)
    if verify:
        from teecloud.cloud.verify import verify_app

        progress("attesting", "")
        result.verdict = verify_app(session.node, st.instance_id, platform=session.platform, chain=chain)
        mark("attest")
    return result


def upgrade(
    session: Session,
    ref: str,
    compose_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    allowed_envs: Sequence[str] | None = None,
    public_logs: bool | None = None,
    register: bool = True,
    progress: Progress = lambda phase, detail: None,
    timeout: float = 180.0,
) -> DeployResult:
    """New compose for an existing CVM (same app_id and instance). With `register`, the new compose hash is
    added to the app's AppAuth first (works when this account owns the app directly; under a multisig or
    timelock the CVM gets no keys until the change is executed on chain)."""
    import json

    from teecloud.node.api import UpgradeCvmRequest

    current = session.node.get(ref)
    try:
        att_compose: dict[str, Any] = json.loads(current.app_compose) if current.app_compose else {}
    except ValueError:
        att_compose = {}
    prev_allowed = att_compose.get("allowed_envs", []) if att_compose else []
    allowed = list(allowed_envs) if allowed_envs is not None else list(prev_allowed)
    try:
        compose_text = Path(compose_path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeployError(f"cannot read {compose_path}: {exc}") from exc
    app_compose, chash = build_app_compose(
        compose_text,
        name=current.name,
        allowed_envs=allowed,
        public_logs=bool(att_compose.get("public_logs", False)) if public_logs is None else public_logs,
    )
    _node_check(session, None, app_compose)
    app_id = current.app_id
    if register and not session.chain.is_compose_hash_allowed(app_id, chash):
        progress("registering", f"compose_hash {chash.hex()}")
        try:
            session.chain.add_compose_hash(app_id, chash)
        except Exception as exc:
            raise DeployError(f"cannot allow compose hash {chash.hex()} for app {app_id}: {exc}") from exc
    enc = _encrypt_env(session, bytes.fromhex(app_id), env or {}) if env else None
    progress("booting", f"upgrade to {chash.hex()[:16]}")
    st = session.node.upgrade(ref, UpgradeCvmRequest(app_compose=app_compose.decode(), encrypted_env=enc))
    st = session.node.wait(
        st.instance_id,
        timeout=timeout,
        on_phase=lambda s: progress(s.phase if s.status == "booting" else s.status, s.error),
    )
    return DeployResult(
        app_id=app_id,
        compose_hash=chash.hex(),
        instance_id=st.instance_id,
        name=st.name,
        urls=st.urls,
        status=st.status,
        error=st.error,
        boot_timings=st.timings,
    )
