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
from typing import TYPE_CHECKING, Any

import httpx

from teecloud.cloud.errors import DeployError, InvalidOption
from teecloud.cloud.options import AppOptions, ComposePlan, parse_env_file, plan_compose

if TYPE_CHECKING:
    from teecloud.cloud.governance import GovernanceSpec, PendingChange
    from teecloud.gateway.portpolicy import PortPolicy

__all__ = [
    "AppOptions",
    "ComposePlan",
    "DeployError",
    "DeployResult",
    "Retirement",
    "Session",
    "build_app_compose",
    "deploy",
    "parse_env_file",
    "plan_compose",
    "retire_instance",
    "upgrade",
]

Progress = Callable[[str, str], None]  # (phase, detail)


def build_app_compose(
    compose_text: str,
    *,
    name: str,
    allowed_envs: Sequence[str] = (),
    public_logs: bool = False,
    public_sysinfo: bool = True,
    public_tcbinfo: bool = True,
    port_policy: PortPolicy | None = None,
) -> tuple[bytes, bytes]:
    """-> (app-compose.json bytes in normalized form, compose_hash). Field names as dstack's AppCompose."""
    from teecloud.appcompose import compose_hash, normalize_app_compose
    from teecloud.node.compose import load_compose

    load_compose(compose_text)  # the whole compose policy, before anything else (the node checks again)
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
    if port_policy is not None:  # dstack's field; the gateway reads it from the attested app-compose.json
        doc["port_policy"] = port_policy.to_json()
    return normalize_app_compose(doc).encode(), compose_hash(doc)


def wait_gateway_urls(
    gateway: dict[str, Any], app_id: str, st: Any, timeout: float = 20.0, backend_grace: float = 3.0
) -> list[str]:
    """https://<app_id>-<port>.<base>:<port>/ for each published TCP port of the CVM, after waiting (at most
    `timeout`) until the app answers through the gateway on the first one (validated with the CA). Once the
    gateway knows the name (no 421) but the backend keeps failing (5xx: e.g. an app serving its own TLS, which
    only its passthrough name `-<port>s` reaches), the wait ends `backend_grace` seconds later."""
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
                if r.status_code >= 500:  # routed; the backend does not answer plain HTTP (yet)
                    deadline = min(deadline, time.monotonic() + backend_grace)
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
    warnings: list[str] = field(default_factory=list)
    previous_compose_hash: str = ""  # upgrade: the version that ran before
    pending: PendingChange | None = None  # upgrade: the governance call the new hash waits for
    done: list[str] = field(default_factory=list)  # upgrade: what was done on chain, in words

    def to_json(self) -> dict[str, Any]:
        return {
            "app_id": "0x" + self.app_id,
            "compose_hash": "0x" + self.compose_hash,
            "previous_compose_hash": ("0x" + self.previous_compose_hash)
            if self.previous_compose_hash
            else None,
            "instance_id": self.instance_id,
            "name": self.name,
            "urls": self.urls,
            "gateway_urls": self.gateway_urls,
            "status": self.status,
            "error": self.error,
            "warnings": self.warnings,
            "chain": self.done,
            "pending": self.pending.to_json(self.name) if self.pending is not None else None,
            "verdict": self.verdict.to_json() if self.verdict is not None else None,
            "timings": self.timings,
            "boot_timings": self.boot_timings,
        }


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


def _encrypt_env(
    session: Session, app_id: bytes, env: Mapping[str, str], app_compose: bytes = b""
) -> str | None:
    if not env:
        return None
    from teecloud.keys.envcrypt import encrypt_env

    try:
        threshold = _threshold_env_key(session, app_id, app_compose)
        pub = threshold if threshold is not None else session.kms_client().get_env_encrypt_pubkey(app_id)[0]
    except Exception as exc:  # KmsClientError and transport failures, reported as a deploy error
        raise DeployError(
            f"cannot get a verified env-encryption key for the app from the KMS: {exc}"
        ) from exc
    return encrypt_env(pub, dict(env)).hex()


def _threshold_env_key(session: Session, app_id: bytes, app_compose: bytes = b"") -> bytes | None:
    """With a threshold KMS (`teecloud up --kms-nodes N`): the app's env key under the root epoch its
    app-compose names (`kms_key_epoch`, default 1) from the serving committee KmsGroup records, t nodes
    agreeing and every signature recovering to the group's signing key as KmsGroup records it
    (teecloud.kms.threshold_client.fetch_env_public_key); a node that disagrees or fails is named in a
    warning. None with a single KMS."""
    import logging

    from teecloud.chain.errors import NotDeployed
    from teecloud.kms.client import connect_kms
    from teecloud.kms.errors import KmsClientError
    from teecloud.kms.threshold import read_group
    from teecloud.kms.threshold_client import fetch_env_public_key, group_from_chain

    group = read_group(getattr(session, "home", None))
    if group is None or group.n < 2:
        return None
    try:
        # the committee and the group's signing key as KmsGroup records them (the local record must agree)
        trusted = group_from_chain(session.chain.kms_group, group.epoch, local=group)
    except NotDeployed as exc:
        raise DeployError(f"KmsGroup is not deployed: {exc}") from exc
    except KmsClientError as exc:
        raise DeployError(str(exc)) from exc
    if not trusted.signing_key:
        raise DeployError("the threshold KMS group has no signing key: env public keys cannot be verified")
    p = session.platform
    clients = {
        i: connect_kms(
            url,
            collateral_for=lambda _q, _n: p.collateral(),
            dev_root_der=p.dev_root_der(),
            chain=session.chain,
        )
        for i, url in trusted.nodes.items()
    }
    from teecloud.kms.rotation import key_epochs_of_text

    epoch = key_epochs_of_text(app_compose.decode()).current
    pub, faults = fetch_env_public_key(
        clients, app_id, t=trusted.t, signing_key=trusted.signing_key, epoch=epoch
    )
    for i, why in sorted(faults.items()):
        logging.getLogger(__name__).warning("KMS node %d: %s", i, why)
    return pub


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


def _options(
    options: AppOptions | None,
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    allowed_envs: Sequence[str] | None = None,
    public_logs: bool | None = None,
    cpus: float | None = None,
    memory_mb: int | None = None,
) -> AppOptions:
    """The options of a call, from an AppOptions or (older callers) from keyword arguments."""
    if options is not None:
        if name is not None and name != options.name:
            from dataclasses import replace

            from teecloud.cloud.options import validate_name

            return replace(options, name=validate_name(name))
        return options
    return AppOptions.build(
        name=name,
        env=dict(env or {}),
        allowed_envs=list(allowed_envs or []),
        public_logs=public_logs,
        cpus=cpus,
        memory_mb=memory_mb,
    )


def _wait(session: Session, instance_id: str, timeout: float, progress: Progress) -> Any:
    return session.node.wait(
        instance_id,
        timeout=timeout,
        on_phase=lambda s: progress(s.phase if s.status == "booting" else s.status, s.error),
    )


def deploy(
    session: Session,
    compose_path: Path,
    options: AppOptions | None = None,
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    allowed_envs: Sequence[str] = (),
    public_logs: bool = False,
    app_id: str | None = None,
    governance: GovernanceSpec | None = None,
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

    opts = _options(
        options,
        name=name,
        env=env,
        allowed_envs=allowed_envs,
        public_logs=public_logs,
        cpus=cpus,
        memory_mb=memory_mb,
    )
    if governance is not None and app_id is not None:
        raise DeployError(
            "--multisig/--timelock create a new app's owner; for an existing app use "
            "`teecloud app transfer-ownership`"
        )
    # (1)
    plan = plan_compose(Path(compose_path), opts)
    for w in plan.warnings:
        progress("warning", w)
    _node_check(session, plan.name, plan.app_compose)
    chash = plan.compose_hash
    mark("compose")
    # (2)
    chain = session.chain
    if app_id is None:
        progress("registering", f"compose_hash {chash.hex()}")
        owner = None
        if governance is not None:
            owner, done = governance.create(chain)
            for line in done:
                progress("governance", line)
        app_id = chain.register_app(owner, chash)
    else:
        from teecloud.cloud.governance import ensure_allowed
        from teecloud.ids import parse_app_id as _parse

        app_id = "0x" + _parse(str(app_id), name="--app-id").hex()
        outcome = ensure_allowed(chain, app_id, chash, propose=False)
        if not outcome.allowed:
            raise DeployError(
                f"compose hash 0x{chash.hex()} is not allowed for app {app_id} yet"
                + (f": {outcome.pending.describe(plan.name)}" if outcome.pending else "")
            )
    from teecloud.ids import parse_app_id

    app_id_bytes = parse_app_id(str(app_id))
    mark("registering")
    # (3)
    enc = _encrypt_env(session, app_id_bytes, opts.env, plan.app_compose)
    mark("env")
    # (4)
    progress("booting", f"app {app_id}")
    st = session.node.create(
        CreateCvmRequest(
            name=plan.name,
            app_compose=plan.app_compose.decode(),
            app_id=app_id_bytes.hex(),
            encrypted_env=enc,
            cpus=opts.cpus,
            memory_mb=opts.memory_mb,
        )
    )
    st = _wait(session, st.instance_id, timeout, progress)
    mark("boot")
    result = DeployResult(
        app_id=app_id_bytes.hex(),
        compose_hash=chash.hex(),
        instance_id=st.instance_id,
        name=plan.name,
        urls=st.urls,
        status=st.status,
        error=st.error,
        timings=timings,
        boot_timings=st.timings,
        warnings=plan.warnings,
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
    compose_path: Path | None,
    options: AppOptions | None = None,
    *,
    env: Mapping[str, str] | None = None,
    allowed_envs: Sequence[str] | None = None,
    public_logs: bool | None = None,
    commit: bool = False,
    propose: bool = True,
    register: bool = True,
    verify: bool = True,
    progress: Progress = lambda phase, detail: None,
    timeout: float = 180.0,
) -> DeployResult:
    """New compose (and optionally env) for an existing CVM: same app_id, instance and data. Never takes the
    app down for a hash the chain does not allow yet.

    Steps:
      (1) plan: the new app-compose.json from the current one (allowed envs merged, warnings for every
          variable dropped) and the node's check of it; nothing changes if it is the running version
      (2) chain first (`ensure_allowed`): allowed already, or allowed now (this signer owns the app), or
          pending under the app's multisig/timelock: then the current version keeps running and the result
          has status "pending" and the pending call (approvals so far, or the ETA). With `commit`, a pending
          call that may run now is executed first. `propose`: start the governance call when none exists
      (3) rollout: the node swaps the compose (and the env, when one was given) and boots; the KMS releases
          the keys only to a boot whose measured compose hash the chain allows
      (4) a failed rollout returns to the previous compose (status "rolled-back")
      (5) the running app's attestation is verified from the outside

    `register=False` skips (2) entirely and rolls out whatever the chain says: for tests of the node's and
    the KMS's own refusal of an unapproved hash, not for users.

    A pending upgrade's plan is stored (cloud.pending, atomic, keyed by app): `compose_path=None` takes
    it from there, so `--commit` needs no file; any rollout, or the running version again, removes it."""
    import json

    from teecloud.cloud.pending import PendingPlan, discard_plan, load_plan, save_plan
    from teecloud.node.api import UpgradeCvmRequest

    opts = _options(options, env=env, allowed_envs=allowed_envs, public_logs=public_logs)
    home = getattr(session, "home", None)
    # (1)
    current = session.node.get(ref)
    stored: PendingPlan | None = None
    if compose_path is None:
        stored = load_plan(current.app_id, home)
        if stored is None:
            raise DeployError(
                f"no pending upgrade of {current.name} is stored: give the new docker-compose.yml "
                f"(`teecloud upgrade {current.name} FILE`)"
            )
        if opts.env_given or opts.allowed_envs or opts.public_logs is not None:
            raise InvalidOption(
                "the stored upgrade plan is rolled out as it was approved; to change its env, allowed "
                "envs or logs, run `teecloud upgrade` with the compose file again"
            )
        if stored.previous_compose_hash != current.compose_hash:
            progress(
                "warning",
                f"the plan was made while {stored.previous_compose_hash[:16]} ran; "
                f"{current.compose_hash[:16]} runs now",
            )
        plan_doc = json.loads(stored.app_compose)
        allowed = plan_doc.get("allowed_envs", []) if isinstance(plan_doc, dict) else []
        plan = ComposePlan(stored.name, stored.app_compose, stored.compose_hash, list(allowed), [])
        progress("plan", f"the stored upgrade plan to compose hash 0x{stored.compose_hash.hex()}")
    else:
        try:
            previous: dict[str, Any] = json.loads(current.app_compose) if current.app_compose else {}
        except ValueError:
            previous = {}
        if not isinstance(previous, dict):
            previous = {}
        plan = plan_compose(Path(compose_path), opts, name=current.name, previous=previous)
    env_given = opts.env_given or (stored is not None and stored.encrypted_env is not None)
    for w in plan.warnings:
        progress("warning", w)
    chash = plan.compose_hash
    app_id = "0x" + current.app_id.removeprefix("0x")
    result = DeployResult(
        app_id=current.app_id.removeprefix("0x"),
        compose_hash=chash.hex(),
        instance_id=current.instance_id,
        name=current.name,
        urls=current.urls,
        status=current.status,
        previous_compose_hash=current.compose_hash,
        warnings=plan.warnings,
    )
    if chash.hex() == current.compose_hash and not env_given and current.status == "running":
        discard_plan(current.app_id, home)
        result.status = "unchanged"
        return result
    _node_check(session, None, plan.app_compose)
    # (2)
    if register:
        from teecloud.cloud.governance import ensure_allowed

        progress("checking", f"is compose hash 0x{chash.hex()} allowed on chain")
        outcome = ensure_allowed(session.chain, app_id, chash, propose=propose, commit=commit)
        result.done = outcome.done
        for line in outcome.done:
            progress("chain", line)
        if not outcome.allowed:
            result.status = "pending"
            result.pending = outcome.pending
            if stored is None:  # keep what was planned, so --commit needs no file
                enc_now = (
                    _encrypt_env(session, bytes.fromhex(result.app_id), opts.env, plan.app_compose)
                    if opts.env_given
                    else None
                )
                save_plan(
                    PendingPlan(
                        app_id=result.app_id,
                        instance_id=current.instance_id,
                        name=current.name,
                        app_compose=plan.app_compose,
                        compose_hash=chash,
                        previous_compose_hash=current.compose_hash,
                        encrypted_env=enc_now,
                        warnings=list(plan.warnings),
                    ),
                    home,
                )
            return result
    # (3)
    if stored is not None:
        enc = stored.encrypted_env
    else:
        enc = (
            _encrypt_env(session, bytes.fromhex(result.app_id), opts.env, plan.app_compose)
            if opts.env_given
            else None
        )
    discard_plan(current.app_id, home)  # rolled out now (or rolled back): no longer pending
    progress("booting", f"upgrade to {chash.hex()[:16]}")
    st = session.node.upgrade(
        ref, UpgradeCvmRequest(app_compose=plan.app_compose.decode(), encrypted_env=enc)
    )
    st = _wait(session, st.instance_id, timeout, progress)
    result.status, result.error, result.urls, result.boot_timings = st.status, st.error, st.urls, st.timings
    # (4)
    if st.status != "running" and register and current.app_compose and current.compose_hash != chash.hex():
        progress("rollback", f"the new version failed ({st.error}): back to {current.compose_hash[:16]}")
        back = session.node.upgrade(ref, UpgradeCvmRequest(app_compose=current.app_compose))
        back = _wait(session, back.instance_id, timeout, progress)
        kept_env = " (the env given with this upgrade stays in place)" if env_given else ""
        result.status = "rolled-back"
        result.error = (
            f"the new version (compose hash {chash.hex()}) did not start: {st.error}; rolled back to "
            f"compose hash {current.compose_hash}{kept_env}, which is {back.status}"
            + (f": {back.error}" if back.error else "")
        )
        result.urls = back.urls
        return result
    # (5)
    if st.status == "running" and verify:
        from teecloud.cloud.verify import verify_app

        progress("attesting", "")
        result.verdict = verify_app(
            session.node, st.instance_id, platform=session.platform, chain=session.chain
        )
    return result
