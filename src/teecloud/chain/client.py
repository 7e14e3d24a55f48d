"""ChainClient: the one chain client every teecloud component uses.

Layers (each its own module):
  transport    JSON-RPC over HTTP, or the embedded chain in-process (`request(method, params) -> result`)
  connection   ChainConnection: ABI calls, signed EIP-1559 transactions, events (no contract knowledge)
  facades      typed views of each contract: KmsAuth (kmsauth), AppAuth (appauth), Multisig and Timelock
               (governance), NodeRegistry and Escrow (registry); typed results live in api.py
  client       ChainClient = a connection + where teecloud's contracts are on this chain (deployment.json),
               with the facades as `client.kms`, `client.app(app_id)`, `client.registry`, `client.escrow`,
               `client.multisig(addr)`, `client.timelock(addr)`.

ChainClient also keeps flat methods (`register_app`, `is_app_allowed`, `node`, ...) that delegate to the
facades, so components written against the flat client keep working.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from teecloud._fs import atomic_write_json, data_home

from ._values import to_address as _addr
from .api import AppState, BlockRef, BootInfo, DeploymentEscrow, NodeInfo, Slash
from .appauth import AppAuth
from .connection import ChainConnection, abi_of
from .embedded import DEV_KEYS, EmbeddedChain
from .errors import ChainStateError, NotDeployed
from .governance import Multisig, Timelock, governance_kind
from .kmsauth import KmsAuth, VerdictCache
from .kmsgroup import KmsGroup
from .registry import DEFAULT_NODE_PARAMS, Escrow, NodeRegistry
from .signer import KEY_ENV, load_signer_key
from .transport import REQUEST_TIMEOUT, HttpTransport, LocalTransport, Transport

__all__ = [
    "DEFAULT_NODE_PARAMS",
    "KEY_ENV",
    "ChainClient",
    "HttpTransport",
    "LocalTransport",
    "Transport",
    "abi_of",
    "load_signer_key",
    "running_rpc_url",
]


class ChainClient(ChainConnection):
    """A connection to one chain and teecloud's contracts on it. Addresses come back as checksummed
    strings, hashes as bytes."""

    def __init__(
        self,
        transport: Transport,
        signer_key: str | None = None,
        *,
        chain_id: int | None = None,
        home: Path | None = None,
        label: str = "",
    ) -> None:
        super().__init__(transport, signer_key, chain_id=chain_id, label=label)
        self._home = home
        self._deployment_cache: dict[str, Any] | None = None
        self._verdicts = VerdictCache()
        self._kms: KmsAuth | None = None  # built once: it sits on the KMS's per-request path

    def _fork(self) -> None:
        enabled = self._verdicts.enabled
        self._verdicts = VerdictCache()  # a verdict cache per signer, as before
        self._verdicts.enabled = enabled
        self._kms = None

    @property
    def read_cache(self) -> bool:
        """Whether is_app_allowed / is_kms_allowed verdicts are reused within one block."""
        return self._verdicts.enabled

    @read_cache.setter
    def read_cache(self, on: bool) -> None:
        self._verdicts.enabled = bool(on)

    # --- construction ------------------------------------------------------------------------------------

    @classmethod
    def embedded(cls, home: Path | None = None, signer_key: str | None = None) -> ChainClient:
        """The embedded chain of `home` (default data_home()): through the JSON-RPC URL of the process that
        serves it (`teecloud chain up`), else opened in this process. The signer defaults to dev account 0."""
        home = Path(home) if home is not None else data_home()
        key = signer_key or DEV_KEYS[0]
        url = running_rpc_url(home)
        if url is not None:
            return cls(HttpTransport(url), key, home=home, label=f"embedded via {url}")
        return cls(
            LocalTransport(EmbeddedChain(home / "chain")), key, home=home, label="embedded (in-process)"
        )

    @classmethod
    def rpc(
        cls,
        url: str,
        signer_key: str | None = None,
        *,
        chain_id: int | None = None,
        timeout: float = REQUEST_TIMEOUT,
        home: Path | None = None,
    ) -> ChainClient:
        """Any JSON-RPC endpoint. There is no default signer: without `signer_key`, only reads work."""
        return cls(HttpTransport(url, timeout=timeout), signer_key, chain_id=chain_id, home=home, label=url)

    # --- where teecloud's contracts are --------------------------------------------------------------------

    def _deployment_path(self) -> Path:
        return (self._home or data_home()) / "chain" / "deployment.json"

    def _load_deployments(self) -> dict[str, Any]:
        path = self._deployment_path()
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ChainStateError(f"{path} is unreadable: {exc}") from None
        return data if isinstance(data, dict) else {}

    @property
    def deployment(self) -> dict[str, str]:
        """Addresses of teecloud's contracts on this chain (empty when not deployed yet)."""
        if self._deployment_cache is not None:
            return dict(self._deployment_cache)
        entry = self._load_deployments().get(self.chain_key, {})
        if entry and entry.get("KmsAuth") and self.code(entry["KmsAuth"]):
            self._deployment_cache = dict(entry)
            return dict(entry)
        return {}

    def _require(self, name: str) -> str:
        addr = self.deployment.get(name)
        if not addr:
            raise NotDeployed(
                f"teecloud's contracts are not on this chain ({self.label}): run `teecloud chain deploy`"
            )
        return addr

    @property
    def kms_auth(self) -> str:
        """KmsAuth's address."""
        return self._require("KmsAuth")

    @property
    def node_registry(self) -> str:
        """NodeRegistry's address."""
        return self._require("NodeRegistry")

    @property
    def kms_group_address(self) -> str:
        """KmsGroup's address (the threshold KMS's committees)."""
        return self._require("KmsGroup")

    def deploy(
        self, *, treasury: str | None = None, node_params: dict[str, int] | None = None
    ) -> dict[str, str]:
        """Deploy the AppAuth blueprint, KmsAuth and NodeRegistry once (idempotent); owner = the signer.
        The addresses are recorded atomically in data_home()/chain/deployment.json."""
        current = self.deployment
        if current and ("KmsGroup" in current or self.address is None):
            return current
        acct = self.require_signer()
        if current:  # a deployment made before KmsGroup existed: add it, keep the rest
            upgraded = {**current, "KmsGroup": self.deploy_contract("KmsGroup", acct.address)}
            data = self._load_deployments()
            data[self.chain_key] = upgraded
            atomic_write_json(self._deployment_path(), data, mode=0o644)
            self._deployment_cache = dict(upgraded)
            return dict(upgraded)
        params = {**DEFAULT_NODE_PARAMS, **(node_params or {})}
        blueprint = self.deploy_blueprint("AppAuth")
        kms = self.deploy_contract("KmsAuth", acct.address, blueprint)
        registry = self.deploy_contract(
            "NodeRegistry",
            acct.address,
            _addr(treasury) if treasury else acct.address,
            params["min_stake"],
            params["unstake_delay"],
            params["close_delay"],
            params["challenger_reward_bps"],
        )
        group = self.deploy_contract("KmsGroup", acct.address)
        entry = {
            "AppAuthBlueprint": blueprint,
            "KmsAuth": kms,
            "NodeRegistry": registry,
            "KmsGroup": group,
            "chain_id": self.chain_id,
            "deployed_at_block": self.block_number(),
        }
        data = self._load_deployments()
        data[self.chain_key] = entry
        atomic_write_json(self._deployment_path(), data, mode=0o644)
        self._deployment_cache = dict(entry)
        return {k: v for k, v in entry.items()}  # type: ignore[misc]

    def deploy_kms_auth(self) -> str:
        return self.deploy()["KmsAuth"]

    # --- the facades -------------------------------------------------------------------------------------

    @property
    def kms(self) -> KmsAuth:
        if self._kms is None:
            self._kms = KmsAuth(self, self.kms_auth, cache=self._verdicts)
        return self._kms

    @property
    def kms_group(self) -> KmsGroup:
        return KmsGroup(self, self.kms_group_address)

    @property
    def registry(self) -> NodeRegistry:
        return NodeRegistry(self, self.node_registry)

    @property
    def escrow(self) -> Escrow:
        return Escrow(self, self.node_registry)

    def app(self, app_id: str | bytes) -> AppAuth:
        kms = self.kms if self.deployment else None
        return AppAuth(self, app_id, kms=kms)

    def multisig(self, address: str | bytes) -> Multisig:
        return Multisig(self, address)

    def timelock(self, address: str | bytes) -> Timelock:
        return Timelock(self, address)

    def governance_kind(self, address: str | bytes) -> str:
        """'account' (no code), 'multisig', 'timelock' or 'contract'."""
        return governance_kind(self, address)

    def deploy_multisig(self, owners: Iterable[str | bytes], threshold: int) -> str:
        return self.deploy_contract("Multisig", [_addr(o) for o in owners], int(threshold))

    def deploy_timelock(self, admin: str | bytes, min_delay: int) -> str:
        return self.deploy_contract("Timelock", _addr(admin), int(min_delay))

    # --- flat methods, delegating to the facades --------------------------------------------------------

    # KmsAuth
    def is_app_allowed(self, boot_info: BootInfo, *, at: int | BlockRef | None = None) -> tuple[bool, str]:
        return self.kms.is_app_allowed(boot_info, at=at)

    def is_kms_allowed(self, boot_info: BootInfo, *, at: int | BlockRef | None = None) -> tuple[bool, str]:
        return self.kms.is_kms_allowed(boot_info, at=at)

    def is_app_deployed(self, app_id: str | bytes, *, at: int | BlockRef | None = None) -> tuple[bool, str]:
        return self.kms.is_app_deployed(app_id, at=at)

    def register_app(
        self,
        owner: str | bytes | None,
        compose_hash: bytes | str,
        *,
        allow_any_device: bool = True,
        device_id: bytes | str | None = None,
        require_tcb_up_to_date: bool = False,
        disable_upgrades: bool = False,
    ) -> str:
        """Deploy an AppAuth and register it (owner default: the signer); -> app_id."""
        return self.kms.register_app(
            owner or self.require_signer().address,
            compose_hash,
            allow_any_device=allow_any_device,
            device_id=device_id,
            require_tcb_up_to_date=require_tcb_up_to_date,
            disable_upgrades=disable_upgrades,
        )

    def register_existing_app(self, app_id: str | bytes) -> dict[str, Any]:
        return self.kms.register_existing_app(app_id)

    def is_registered(self, app_id: str | bytes) -> bool:
        return self.kms.is_registered(app_id)

    def add_os_image(self, os_image_hash: bytes | str) -> dict[str, Any]:
        return self.kms.add_os_image(os_image_hash)

    def remove_os_image(self, os_image_hash: bytes | str) -> dict[str, Any]:
        return self.kms.remove_os_image(os_image_hash)

    def add_kms_mr(self, mr_aggregated: bytes | str) -> dict[str, Any]:
        return self.kms.add_kms_mr(mr_aggregated)

    def add_kms_device(self, device_id: bytes | str) -> dict[str, Any]:
        return self.kms.add_kms_device(device_id)

    def set_kms_info(
        self, k256_pubkey: bytes, ca_pubkey: bytes, quote_hash: bytes | str = b"\0" * 32
    ) -> dict[str, Any]:
        return self.kms.set_info(k256_pubkey, ca_pubkey, quote_hash)

    def kms_info(self) -> dict[str, Any]:
        """KmsAuth's published KMS keys as a dict (typed: `client.kms.info()`)."""
        return asdict(self.kms.info())

    def set_gateway_app_id(self, app_id: str | bytes) -> dict[str, Any]:
        return self.kms.set_gateway_app_id(app_id)

    # AppAuth
    def add_compose_hash(self, app_id: str | bytes, compose_hash: bytes | str) -> dict[str, Any]:
        return self.app(app_id).add_compose_hash(compose_hash)

    def remove_compose_hash(self, app_id: str | bytes, compose_hash: bytes | str) -> dict[str, Any]:
        return self.app(app_id).remove_compose_hash(compose_hash)

    def is_compose_hash_allowed(self, app_id: str | bytes, compose_hash: bytes | str) -> bool:
        return self.app(app_id).is_compose_hash_allowed(compose_hash)

    def retire_instance(self, app_id: str | bytes, instance_id: str | bytes) -> dict[str, Any]:
        """AppAuth owner: retire an instance for good (governed apps: app(a).propose_retire_instance)."""
        return self.app(app_id).retire_instance(instance_id)

    def is_instance_retired(self, app_id: str | bytes, instance_id: str | bytes) -> bool:
        return self.app(app_id).is_instance_retired(instance_id)

    def app_owner(self, app_id: str | bytes) -> str:
        return self.app(app_id).owner()

    def app_state(self, app_id: str | bytes) -> AppState:
        return self.app(app_id).state()

    def propose_app_change(self, app_id: str | bytes, fn: str, *args: Any) -> dict[str, Any]:
        """AppAuth.propose as a dict {"kind", "governance", "id", ...} (typed: `client.app(a).propose_*`)."""
        return self.app(app_id).propose(fn, *args).as_dict()

    # Multisig, Timelock
    def multisig_propose(
        self, multisig: str | bytes, target: str | bytes, data: bytes, value: int = 0
    ) -> int:
        return self.multisig(multisig).propose(target, data, value)

    def multisig_approve(self, multisig: str | bytes, proposal_id: int) -> dict[str, Any]:
        return self.multisig(multisig).approve(proposal_id)

    def multisig_proposal(self, multisig: str | bytes, proposal_id: int) -> dict[str, Any]:
        return asdict(self.multisig(multisig).proposal(proposal_id))

    def multisig_execute(self, multisig: str | bytes, proposal_id: int) -> dict[str, Any]:
        return self.multisig(multisig).execute(proposal_id)

    def timelock_queue(
        self,
        timelock: str | bytes,
        target: str | bytes,
        data: bytes,
        *,
        value: int = 0,
        delay: int | None = None,
        salt: bytes | None = None,
    ) -> str:
        return self.timelock(timelock).queue(target, data, value=value, delay=delay, salt=salt)

    def timelock_queued(self, timelock: str | bytes, call_id: str | bytes) -> dict[str, Any]:
        return asdict(self.timelock(timelock).queued(call_id))

    def timelock_execute(self, timelock: str | bytes, call_id: str | bytes) -> dict[str, Any]:
        return self.timelock(timelock).execute(call_id)

    def timelock_cancel(self, timelock: str | bytes, call_id: str | bytes) -> dict[str, Any]:
        return self.timelock(timelock).cancel(call_id)

    # NodeRegistry
    def register_node(
        self,
        *,
        tee_kind: str,
        device_id: bytes | str,
        attestation_hash: bytes | str,
        capacity: int,
        price_per_hour: int,
        stake: int,
    ) -> int:
        return self.registry.register_node(
            tee_kind=tee_kind,
            device_id=device_id,
            attestation_hash=attestation_hash,
            capacity=capacity,
            price_per_hour=price_per_hour,
            stake=stake,
        )

    def node(self, node_id: int) -> NodeInfo:
        return self.registry.node(node_id)

    def deployment_escrow(self, dep_id: int) -> DeploymentEscrow:
        return self.escrow.deployment(dep_id)

    def stake(self, node_id: int, amount: int) -> dict[str, Any]:
        return self.registry.stake(node_id, amount)

    def request_unstake(self, node_id: int, amount: int) -> dict[str, Any]:
        return self.registry.request_unstake(node_id, amount)

    def withdraw_unstaked(self, node_id: int) -> dict[str, Any]:
        return self.registry.withdraw_unstaked(node_id)

    def open_deployment(self, node_id: int, amount: int, usage_signer: str | bytes | None = None) -> int:
        return self.escrow.open(node_id, amount, usage_signer)

    def fund_deployment(self, dep_id: int, amount: int) -> dict[str, Any]:
        return self.escrow.fund(dep_id, amount)

    def sign_usage(self, dep_id: int, served_seconds: int) -> bytes:
        return self.escrow.sign_usage(dep_id, served_seconds)

    def claim(self, dep_id: int, served_seconds: int, signature: bytes) -> int:
        return self.registry.claim(dep_id, served_seconds, signature)

    def request_close(self, dep_id: int) -> dict[str, Any]:
        return self.escrow.request_close(dep_id)

    def withdraw_escrow(self, dep_id: int) -> int:
        """-> wei refunded to the user's withdrawable balance."""
        return self.escrow.withdraw_escrow(dep_id)

    def set_challenger(self, challenger: str | bytes, allowed: bool = True) -> dict[str, Any]:
        return self.registry.set_challenger(challenger, allowed)

    def slash(self, node_id: int, amount: int, evidence_hash: bytes | str) -> Slash:
        return self.registry.slash(node_id, amount, evidence_hash)

    def withdrawable(self, account: str | bytes) -> int:
        return self.registry.withdrawable(account)

    def withdraw(self) -> int:
        return self.registry.withdraw()


def running_rpc_url(home: Path) -> str | None:
    """The URL recorded by a running `teecloud chain up` for this home, if that process is alive."""
    path = Path(home) / "chain" / "rpc.json"
    try:
        info = json.loads(path.read_text())
        pid = int(info["pid"])
        url = str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return url
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return url
