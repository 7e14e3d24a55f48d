"""ChainClient: the one chain client every teecloud component uses.

Backends (a transport is one method, `request(method, params) -> result`):
  * embedded: py-evm in this process (EmbeddedChain), or, when `teecloud chain up` owns it, its JSON-RPC URL;
  * rpc: any Ethereum JSON-RPC URL (anvil in the tests, a real network in production).
Calls are ABI-encoded here (eth_abi) and transactions signed here (eth_account, EIP-1559); the signer key is
never printed or logged. Every transaction is first estimated, so a revert is reported with its reason
before any gas is spent.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils.address import is_address, to_checksum_address

from teecloud._fs import atomic_write_json, data_home

from ._abi import ContractAbi, decode_revert
from ._compile import compiled
from .api import AppState, BootInfo, PendingUpgrade
from .embedded import DEV_KEYS, EmbeddedChain, RpcError
from .errors import (
    ChainError,
    ChainStateError,
    ChainUnreachable,
    ContractReverted,
    InsufficientFunds,
    NotDeployed,
    WrongChainId,
)

__all__ = ["ChainClient", "load_signer_key"]

KEY_ENV = "TEECLOUD_CHAIN_KEY"
CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 10.0
RECEIPT_TIMEOUT = 30.0
PRIORITY_FEE = 10**9
DEFAULT_NODE_PARAMS = {
    "min_stake": 10**17,
    "unstake_delay": 7 * 86400,
    "close_delay": 86400,
    "challenger_reward_bps": 2000,
}


class Transport(Protocol):
    def request(self, method: str, params: list[Any]) -> Any: ...

    def close(self) -> None: ...


def _rpc_error(code: int, message: str, data: Any) -> ChainError:
    text = message or ""
    low = text.lower()
    if "insufficient funds" in low or "enough balance" in low or "cannot afford" in low:
        return InsufficientFunds(f"the signer cannot pay for gas and value ({text})")
    if code == 3 or "revert" in low:
        reason = ""
        if isinstance(data, str) and data.startswith("0x"):
            try:
                reason = decode_revert(bytes.fromhex(data[2:]))
            except ValueError:
                reason = ""
        if not reason and "execution reverted:" in text:
            reason = text.split("execution reverted:", 1)[1].strip()
        return ContractReverted(reason)
    return ChainError(f"JSON-RPC error {code}: {text}")


class HttpTransport:
    def __init__(self, url: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RPC URL must start with http:// or https://: {url!r}")
        self.url = url
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))
        self._id = 0

    def request(self, method: str, params: list[Any]) -> Any:
        self._id += 1
        try:
            resp = self._http.post(
                self.url, json={"jsonrpc": "2.0", "id": self._id, "method": method, "params": params}
            )
        except httpx.TimeoutException as exc:
            raise ChainUnreachable(f"no answer from {self.url} within the timeout ({method})") from exc
        except httpx.HTTPError as exc:
            raise ChainUnreachable(f"cannot reach the chain at {self.url}: {exc}") from exc
        if resp.status_code != 200:
            raise ChainUnreachable(f"{self.url} answered HTTP {resp.status_code} to {method}")
        try:
            body = resp.json()
        except ValueError as exc:
            raise ChainUnreachable(f"{self.url} did not answer JSON-RPC") from exc
        if not isinstance(body, dict):
            raise ChainError(f"malformed JSON-RPC answer from {self.url}")
        if body.get("error"):
            err = body["error"]
            raise _rpc_error(int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
        return body.get("result")

    def close(self) -> None:
        self._http.close()


class LocalTransport:
    """The embedded chain in this process (no HTTP)."""

    def __init__(self, chain: EmbeddedChain) -> None:
        self.chain = chain

    def request(self, method: str, params: list[Any]) -> Any:
        try:
            return self.chain.request(method, params)
        except RpcError as exc:
            raise _rpc_error(exc.code, exc.message, exc.data) from None

    def close(self) -> None:
        self.chain.close()


def load_signer_key(key_file: Path | str | None = None) -> str | None:
    """The signer's private key (0x hex) from a key file (hex text, or an eth keystore JSON with the
    password in TEECLOUD_CHAIN_KEY_PASSWORD) or from $TEECLOUD_CHAIN_KEY; None when neither is given."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ChainError(f"cannot read key file {path}: {exc.strerror}") from None
        if text.startswith("{"):
            password = os.environ.get("TEECLOUD_CHAIN_KEY_PASSWORD", "")
            try:
                return "0x" + bytes(Account.decrypt(json.loads(text), password)).hex()
            except Exception:
                raise ChainError(f"cannot decrypt keystore {path} (TEECLOUD_CHAIN_KEY_PASSWORD?)") from None
        return _check_key(text, str(path))
    env = os.environ.get(KEY_ENV)
    if env:
        return _check_key(env.strip(), f"${KEY_ENV}")
    return None


def _check_key(text: str, where: str) -> str:
    hexpart = text.removeprefix("0x")
    if len(hexpart) != 64:
        raise ChainError(f"{where} does not hold a 32-byte hex private key")  # the key itself is never shown
    try:
        bytes.fromhex(hexpart)
    except ValueError:
        raise ChainError(f"{where} does not hold a 32-byte hex private key") from None
    return "0x" + hexpart.lower()


def _addr(a: str | bytes) -> str:
    if isinstance(a, bytes | bytearray):
        if len(a) != 20:
            raise ValueError("an address is 20 bytes")
        return to_checksum_address("0x" + bytes(a).hex())
    if not isinstance(a, str) or not is_address(a):
        raise ValueError(f"not an address: {a!r}")
    return to_checksum_address(a)


def _b32(h: str | bytes, what: str = "hash") -> bytes:
    if isinstance(h, str):
        try:
            h = bytes.fromhex(h.removeprefix("0x"))
        except ValueError:
            raise ValueError(f"{what} must be 32 bytes of hex") from None
    if len(h) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(h)


def _int(v: Any) -> int:
    return int(v, 16) if isinstance(v, str) else int(v)


_ABIS: dict[str, ContractAbi] = {}


def abi_of(name: str) -> ContractAbi:
    if name not in _ABIS:
        _ABIS[name] = ContractAbi(compiled(name).abi)
    return _ABIS[name]


class ChainClient:
    """Reads and writes teecloud's contracts. Addresses come back as checksummed strings, hashes as bytes."""

    def __init__(
        self,
        transport: Transport,
        signer_key: str | None = None,
        *,
        chain_id: int | None = None,
        home: Path | None = None,
        label: str = "",
    ) -> None:
        self.transport = transport
        self.label = label
        self._home = home
        self._account = Account.from_key(signer_key) if signer_key else None
        self._tx_lock = threading.Lock()
        self._deployment_cache: dict[str, Any] | None = None
        # is_app_allowed / is_kms_allowed verdicts, valid for the block they were read at only
        self.read_cache = True
        self._read_cache: dict[tuple[str, BootInfo], tuple[int, tuple[bool, str]]] = {}
        actual = _int(self.transport.request("eth_chainId", []))
        if chain_id is not None and actual != chain_id:
            raise WrongChainId(chain_id, actual)
        self.chain_id = actual
        genesis = self.transport.request("eth_getBlockByNumber", ["0x0", False])
        self.chain_key = f"{self.chain_id}:{genesis['hash']}"

    def __repr__(self) -> str:  # never shows the key
        return f"ChainClient({self.label or 'rpc'}, chain_id={self.chain_id}, signer={self.address})"

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

    def with_signer(self, signer_key: str) -> ChainClient:
        """Another signer on the same connection."""
        other = object.__new__(ChainClient)
        other.__dict__.update(self.__dict__)
        other._account = Account.from_key(signer_key)
        other._tx_lock = threading.Lock()
        other._read_cache = {}
        return other

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> ChainClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str | None:
        return self._account.address if self._account else None

    # --- low level -----------------------------------------------------------------------------------------

    def rpc_call(self, method: str, *params: Any) -> Any:
        return self.transport.request(method, list(params))

    def block_number(self) -> int:
        return _int(self.rpc_call("eth_blockNumber"))

    def balance(self, address: str | bytes) -> int:
        return _int(self.rpc_call("eth_getBalance", _addr(address), "latest"))

    def code(self, address: str | bytes) -> bytes:
        return bytes.fromhex(str(self.rpc_call("eth_getCode", _addr(address), "latest"))[2:])

    def timestamp(self) -> int:
        return _int(self.rpc_call("eth_getBlockByNumber", "latest", False)["timestamp"])

    def increase_time(self, seconds: int) -> None:
        """Development chains only: anvil, the embedded chain in this process, or its RPC when served with
        time travel on (`--dev-time-travel`). Moves the clock forward and mines a block."""
        self.rpc_call("evm_increaseTime", int(seconds))
        self.rpc_call("evm_mine")

    def call(self, contract: str, address: str | bytes, fn: str, *args: Any, block: str = "latest") -> Any:
        abi = abi_of(contract)
        data = abi.encode_call(fn, *args)
        tx: dict[str, Any] = {"to": _addr(address), "data": "0x" + data.hex()}
        if self.address:
            tx["from"] = self.address
        out = self.rpc_call("eth_call", tx, block)
        raw = bytes.fromhex(str(out)[2:])
        if not raw and abi.fn(fn).outputs:
            raise ContractReverted(f"no contract code at {_addr(address)} (or it does not implement {fn})")
        return abi.decode_output(fn, raw)

    def _require_signer(self) -> Any:
        if self._account is None:
            raise ChainError(
                f"no signer key for {self.label or 'this chain'}: pass --key-file FILE or set ${KEY_ENV} "
                "(the public development keys sign only on the embedded chain)"
            )
        return self._account

    def send(self, to: str | None, data: bytes, *, value: int = 0, gas: int | None = None) -> dict[str, Any]:
        """Sign and send one transaction; wait for its receipt. Raises ContractReverted with the reason."""
        acct = self._require_signer()
        with self._tx_lock:
            call: dict[str, Any] = {"from": acct.address, "data": "0x" + data.hex(), "value": hex(value)}
            if to is not None:
                call["to"] = _addr(to)
            if gas is None:
                est = _int(self.rpc_call("eth_estimateGas", call))
                gas = est * 6 // 5 + 20_000
            nonce = _int(self.rpc_call("eth_getTransactionCount", acct.address, "pending"))
            latest = self.rpc_call("eth_getBlockByNumber", "latest", False)
            base = _int(latest.get("baseFeePerGas") or "0x0")
            gas = min(gas, _int(latest["gasLimit"]))
            tx: dict[str, Any] = {
                "type": 2,
                "chainId": self.chain_id,
                "nonce": nonce,
                "value": value,
                "gas": gas,
                "maxFeePerGas": 2 * base + PRIORITY_FEE,
                "maxPriorityFeePerGas": PRIORITY_FEE,
                "data": data,
            }
            if to is not None:
                tx["to"] = _addr(to)
            raw = acct.sign_transaction(tx).raw_transaction
            tx_hash = self.rpc_call("eth_sendRawTransaction", "0x" + bytes(raw).hex())
            receipt = self._wait(tx_hash)
        if _int(receipt["status"]) != 1:
            reason = ""
            try:
                self.rpc_call("eth_call", call, receipt["blockNumber"])
            except ContractReverted as exc:
                reason = exc.reason
            raise ContractReverted(reason or f"transaction {tx_hash} failed")
        return dict(receipt)

    def _wait(self, tx_hash: str) -> dict[str, Any]:
        deadline = time.monotonic() + RECEIPT_TIMEOUT
        delay = 0.005
        while True:
            receipt = self.rpc_call("eth_getTransactionReceipt", tx_hash)
            if receipt:
                return dict(receipt)
            if time.monotonic() > deadline:
                raise ChainUnreachable(f"transaction {tx_hash} not mined within {RECEIPT_TIMEOUT:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def transact(
        self, contract: str, address: str | bytes, fn: str, *args: Any, value: int = 0
    ) -> dict[str, Any]:
        return self.send(_addr(address), abi_of(contract).encode_call(fn, *args), value=value)

    def deploy_contract(self, name: str, *args: Any, value: int = 0) -> str:
        c = compiled(name)
        from eth_abi.abi import encode

        ctor = next((i for i in c.abi if i["type"] == "constructor"), None)
        types = _ctor_types(ctor)
        data = c.bytecode + (encode(types, list(args)) if types else b"")
        receipt = self.send(None, data, value=value)
        return to_checksum_address(receipt["contractAddress"])

    def deploy_blueprint(self, name: str) -> str:
        receipt = self.send(None, compiled(name).blueprint_bytecode)
        return to_checksum_address(receipt["contractAddress"])

    def events(
        self, contract: str, address: str | bytes, *, from_block: int = 0, names: Iterable[str] | None = None
    ) -> list[dict[str, Any]]:
        """Decoded logs of one contract: [{event, args, block, tx, log_index}] in chain order."""
        abi = abi_of(contract)
        logs = self.rpc_call(
            "eth_getLogs", {"address": _addr(address), "fromBlock": hex(from_block), "toBlock": "latest"}
        )
        wanted = set(names) if names is not None else None
        out = []
        for log in logs:
            decoded = abi.decode_log(log)
            if decoded is None or (wanted is not None and decoded[0] not in wanted):
                continue
            out.append(
                {
                    "event": decoded[0],
                    "args": decoded[1],
                    "block": _int(log["blockNumber"]),
                    "tx": log["transactionHash"],
                    "log_index": _int(log["logIndex"]),
                    "address": to_checksum_address(log["address"]),
                }
            )
        out.sort(key=lambda e: (e["block"], e["log_index"]))
        return out

    @staticmethod
    def event_of(receipt: dict[str, Any], contract: str, name: str) -> dict[str, Any]:
        abi = abi_of(contract)
        for log in receipt.get("logs", []):
            decoded = abi.decode_log(log)
            if decoded is not None and decoded[0] == name:
                return decoded[1]
        raise ChainError(f"event {name} not found in the receipt")

    # --- deployment --------------------------------------------------------------------------------------

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
        return self._require("KmsAuth")

    @property
    def node_registry(self) -> str:
        return self._require("NodeRegistry")

    def deploy(
        self, *, treasury: str | None = None, node_params: dict[str, int] | None = None
    ) -> dict[str, str]:
        """Deploy the AppAuth blueprint, KmsAuth and NodeRegistry once (idempotent); owner = the signer.
        The addresses are recorded atomically in data_home()/chain/deployment.json."""
        current = self.deployment
        if current:
            return current
        acct = self._require_signer()
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
        entry = {
            "AppAuthBlueprint": blueprint,
            "KmsAuth": kms,
            "NodeRegistry": registry,
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

    # --- KmsAuth -------------------------------------------------------------------------------------------

    def _cached_check(self, fn: str, boot_info: BootInfo) -> tuple[bool, str]:
        """A verdict is reused only while the chain head is the block it was read at (never longer)."""
        key = (fn, boot_info)
        head = self.block_number() if self.read_cache else None
        if head is not None:
            hit = self._read_cache.get(key)
            if hit is not None and hit[0] == head:
                return hit[1]
        ok, reason = self.call(
            "KmsAuth",
            self.kms_auth,
            fn,
            boot_info.to_abi(),
            block=hex(head) if head is not None else "latest",
        )
        verdict = (bool(ok), str(reason))
        if head is not None:
            if len(self._read_cache) > 4096:
                self._read_cache.clear()
            self._read_cache[key] = (head, verdict)
        return verdict

    def is_app_allowed(self, boot_info: BootInfo) -> tuple[bool, str]:
        """KmsAuth.is_app_allowed: registered app, allowed OS image, then the app's own AppAuth rules."""
        return self._cached_check("is_app_allowed", boot_info)

    def is_kms_allowed(self, boot_info: BootInfo) -> tuple[bool, str]:
        """KmsAuth.is_kms_allowed: TCB UpToDate, allowed OS image, KMS measurement and device."""
        return self._cached_check("is_kms_allowed", boot_info)

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
        """Deploy an AppAuth (through KmsAuth's factory) and register it, in one transaction; -> app_id."""
        receipt = self.transact(
            "KmsAuth",
            self.kms_auth,
            "deploy_and_register_app",
            _addr(owner) if owner else self._require_signer().address,
            disable_upgrades,
            require_tcb_up_to_date,
            allow_any_device,
            _b32(device_id, "device_id") if device_id else b"\0" * 32,
            _b32(compose_hash, "compose hash"),
        )
        return str(self.event_of(receipt, "KmsAuth", "AppDeployed")["app_id"])

    def register_existing_app(self, app_id: str | bytes) -> dict[str, Any]:
        return self.transact("KmsAuth", self.kms_auth, "register_app", _addr(app_id))

    def is_registered(self, app_id: str | bytes) -> bool:
        return bool(self.call("KmsAuth", self.kms_auth, "registered_apps", _addr(app_id)))

    def add_os_image(self, os_image_hash: bytes | str) -> dict[str, Any]:
        return self.transact(
            "KmsAuth", self.kms_auth, "add_os_image_hash", _b32(os_image_hash, "OS image hash")
        )

    def remove_os_image(self, os_image_hash: bytes | str) -> dict[str, Any]:
        return self.transact(
            "KmsAuth", self.kms_auth, "remove_os_image_hash", _b32(os_image_hash, "OS image hash")
        )

    def add_kms_mr(self, mr_aggregated: bytes | str) -> dict[str, Any]:
        return self.transact(
            "KmsAuth", self.kms_auth, "add_kms_aggregated_mr", _b32(mr_aggregated, "measurement")
        )

    def add_kms_device(self, device_id: bytes | str) -> dict[str, Any]:
        return self.transact("KmsAuth", self.kms_auth, "add_kms_device", _b32(device_id, "device_id"))

    def set_kms_info(
        self, k256_pubkey: bytes, ca_pubkey: bytes, quote_hash: bytes | str = b"\0" * 32
    ) -> dict[str, Any]:
        return self.transact(
            "KmsAuth", self.kms_auth, "set_kms_info", k256_pubkey, ca_pubkey, _b32(quote_hash)
        )

    def kms_info(self) -> dict[str, Any]:
        k = self.kms_auth
        return {
            "k256_pubkey": self.call("KmsAuth", k, "kms_k256_pubkey"),
            "ca_pubkey": self.call("KmsAuth", k, "kms_ca_pubkey"),
            "quote_hash": self.call("KmsAuth", k, "kms_quote_hash"),
            "gateway_app_id": self.call("KmsAuth", k, "gateway_app_id"),
        }

    def set_gateway_app_id(self, app_id: str | bytes) -> dict[str, Any]:
        return self.transact("KmsAuth", self.kms_auth, "set_gateway_app_id", _addr(app_id))

    # --- AppAuth (direct owner calls) ---------------------------------------------------------------------

    def add_compose_hash(self, app_id: str | bytes, compose_hash: bytes | str) -> dict[str, Any]:
        return self.transact("AppAuth", app_id, "add_compose_hash", _b32(compose_hash, "compose hash"))

    def remove_compose_hash(self, app_id: str | bytes, compose_hash: bytes | str) -> dict[str, Any]:
        return self.transact("AppAuth", app_id, "remove_compose_hash", _b32(compose_hash, "compose hash"))

    def is_compose_hash_allowed(self, app_id: str | bytes, compose_hash: bytes | str) -> bool:
        return bool(self.call("AppAuth", app_id, "allowed_compose_hashes", _b32(compose_hash)))

    def retire_instance(self, app_id: str | bytes, instance_id: str | bytes) -> dict[str, Any]:
        """AppAuth owner: retire an instance for good; is_app_allowed (and so the KMS) refuses it from the
        next block on. Under a multisig or timelock owner, use propose_app_change("retire_instance", ...)."""
        return self.transact("AppAuth", app_id, "retire_instance", _addr(instance_id))

    def is_instance_retired(self, app_id: str | bytes, instance_id: str | bytes) -> bool:
        return bool(self.call("AppAuth", app_id, "retired_instances", _addr(instance_id)))

    def app_owner(self, app_id: str | bytes) -> str:
        return str(self.call("AppAuth", app_id, "owner"))

    # --- governance ------------------------------------------------------------------------------------

    def deploy_multisig(self, owners: Iterable[str | bytes], threshold: int) -> str:
        return self.deploy_contract("Multisig", [_addr(o) for o in owners], int(threshold))

    def deploy_timelock(self, admin: str | bytes, min_delay: int) -> str:
        return self.deploy_contract("Timelock", _addr(admin), int(min_delay))

    def governance_kind(self, address: str | bytes) -> str:
        """'account' (no code), 'multisig', 'timelock' or 'contract'."""
        if not self.code(address):
            return "account"
        for kind, contract, fn in (
            ("multisig", "Multisig", "threshold"),
            ("timelock", "Timelock", "min_delay"),
        ):
            try:
                self.call(contract, address, fn)
                return kind
            except ChainError:
                continue
        return "contract"

    def multisig_propose(
        self, multisig: str | bytes, target: str | bytes, data: bytes, value: int = 0
    ) -> int:
        r = self.transact("Multisig", multisig, "propose", _addr(target), value, data)
        return int(self.event_of(r, "Multisig", "ProposalCreated")["proposal_id"])

    def multisig_approve(self, multisig: str | bytes, proposal_id: int) -> dict[str, Any]:
        return self.transact("Multisig", multisig, "approve", int(proposal_id))

    def multisig_proposal(self, multisig: str | bytes, proposal_id: int) -> dict[str, Any]:
        for e in self.events("Multisig", multisig, names=["ProposalCreated"]):
            if e["args"]["proposal_id"] == int(proposal_id):
                _call_hash, _proposer, executed, cancelled = self.call(
                    "Multisig", multisig, "proposals", int(proposal_id)
                )
                return {
                    **e["args"],
                    "executed": executed,
                    "cancelled": cancelled,
                    "approvals": self.call("Multisig", multisig, "approval_count", int(proposal_id)),
                    "threshold": self.call("Multisig", multisig, "threshold"),
                }
        raise ChainError(f"no proposal {proposal_id} in multisig {_addr(multisig)}")

    def multisig_execute(self, multisig: str | bytes, proposal_id: int) -> dict[str, Any]:
        p = self.multisig_proposal(multisig, proposal_id)
        return self.transact(
            "Multisig", multisig, "execute", int(proposal_id), p["target"], p["value"], p["data"]
        )

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
        if delay is None:
            delay = int(self.call("Timelock", timelock, "min_delay"))
        salt = salt or os.urandom(32)
        r = self.transact("Timelock", timelock, "queue", _addr(target), value, data, salt, int(delay))
        return "0x" + bytes(self.event_of(r, "Timelock", "CallQueued")["call_id"]).hex()

    def timelock_queued(self, timelock: str | bytes, call_id: str | bytes) -> dict[str, Any]:
        cid = _b32(call_id, "call id")
        for e in reversed(self.events("Timelock", timelock, names=["CallQueued"])):
            if bytes(e["args"]["call_id"]) == cid:
                return {
                    **e["args"],
                    "pending_eta": self.call("Timelock", timelock, "eta", cid),
                    "done": self.call("Timelock", timelock, "done", cid),
                }
        raise ChainError(f"no queued call 0x{cid.hex()} in timelock {_addr(timelock)}")

    def timelock_execute(self, timelock: str | bytes, call_id: str | bytes) -> dict[str, Any]:
        q = self.timelock_queued(timelock, call_id)
        return self.transact("Timelock", timelock, "execute", q["target"], q["value"], q["data"], q["salt"])

    def timelock_cancel(self, timelock: str | bytes, call_id: str | bytes) -> dict[str, Any]:
        return self.transact("Timelock", timelock, "cancel", _b32(call_id, "call id"))

    def propose_app_change(self, app_id: str | bytes, fn: str, *args: Any) -> dict[str, Any]:
        """Start an AppAuth owner call (e.g. add_compose_hash) the way the app's owner requires:
        directly (owner = this signer), as a multisig proposal, or queued in a timelock (whose admin
        may itself be a multisig). Returns {"kind", "governance", "id", ...}."""
        app = _addr(app_id)
        data = abi_of("AppAuth").encode_call(fn, *args)
        owner = self.app_owner(app)
        kind = self.governance_kind(owner)
        me = self._require_signer().address
        if kind == "account":
            if owner != me:
                raise ChainError(f"app {app} is owned by {owner}, not by this signer ({me})")
            r = self.send(app, data)
            return {"kind": "direct", "governance": owner, "id": None, "tx": r["transactionHash"]}
        if kind == "multisig":
            pid = self.multisig_propose(owner, app, data)
            return {"kind": "multisig", "governance": owner, "id": pid}
        if kind == "timelock":
            admin = str(self.call("Timelock", owner, "admin"))
            if self.governance_kind(admin) == "multisig":
                delay = int(self.call("Timelock", owner, "min_delay"))
                queue = abi_of("Timelock").encode_call("queue", app, 0, data, os.urandom(32), delay)
                pid = self.multisig_propose(admin, owner, queue)
                return {"kind": "multisig->timelock", "governance": admin, "id": pid, "timelock": owner}
            cid = self.timelock_queue(owner, app, data)
            eta = self.timelock_queued(owner, cid)["eta"]
            return {"kind": "timelock", "governance": owner, "id": cid, "eta": eta}
        raise ChainError(f"app {app} is owned by a contract teecloud does not know how to drive ({owner})")

    # --- views -------------------------------------------------------------------------------------------

    def app_state(self, app_id: str | bytes) -> AppState:
        app = _addr(app_id)
        if not self.code(app):
            raise ChainError(f"no app contract at {app}")
        owner = self.app_owner(app)
        kind = self.governance_kind(owner)
        app_abi = abi_of("AppAuth")
        history: list[dict[str, Any]] = []
        hashes: dict[str, None] = {}
        devices: dict[str, None] = {}
        retired: list[str] = []
        for e in self.events("AppAuth", app):
            history.append({"source": "app", **e})
            a = e["args"]
            if e["event"] == "ComposeHashAdded":
                hashes["0x" + bytes(a["compose_hash"]).hex()] = None
            elif e["event"] == "DeviceAdded":
                devices["0x" + bytes(a["device_id"]).hex()] = None
            elif e["event"] == "InstanceRetired":
                retired.append(str(a["instance_id"]))
        allowed = [h for h in hashes if self.is_compose_hash_allowed(app, h)]
        allowed_devs = [d for d in devices if self.call("AppAuth", app, "allowed_device_ids", _b32(d))]
        governance: dict[str, Any] = {"address": owner, "kind": kind}
        pending: list[PendingUpgrade] = []

        def decode(target: str, data: bytes) -> tuple[str, tuple[Any, ...]]:
            for abi in (app_abi, abi_of("Timelock")):
                d = abi.decode_calldata(data)
                if d is not None:
                    return d
            return "0x" + bytes(data[:4]).hex(), ()

        def multisig_pending(ms: str) -> None:
            governance.setdefault("multisig", {})
            governance["multisig"] = {
                "address": ms,
                "owners": self.call("Multisig", ms, "get_owners"),
                "threshold": self.call("Multisig", ms, "threshold"),
            }
            threshold = governance["multisig"]["threshold"]
            for e in self.events("Multisig", ms):
                history.append({"source": "multisig", **e})
                if e["event"] != "ProposalCreated":
                    continue
                pid = e["args"]["proposal_id"]
                _, _, executed, cancelled = self.call("Multisig", ms, "proposals", pid)
                if executed or cancelled:
                    continue
                fn, args = decode(e["args"]["target"], e["args"]["data"])
                pending.append(
                    PendingUpgrade(
                        "multisig",
                        ms,
                        str(pid),
                        e["args"]["target"],
                        fn,
                        args,
                        approvals=self.call("Multisig", ms, "approval_count", pid),
                        threshold=threshold,
                    )
                )

        def timelock_pending(tl: str) -> None:
            governance["timelock"] = {
                "address": tl,
                "admin": self.call("Timelock", tl, "admin"),
                "min_delay": self.call("Timelock", tl, "min_delay"),
            }
            for e in self.events("Timelock", tl):
                history.append({"source": "timelock", **e})
                if e["event"] != "CallQueued":
                    continue
                cid = bytes(e["args"]["call_id"])
                if self.call("Timelock", tl, "eta", cid) == 0:
                    continue
                fn, args = decode(e["args"]["target"], e["args"]["data"])
                pending.append(
                    PendingUpgrade(
                        "timelock", tl, "0x" + cid.hex(), e["args"]["target"], fn, args, eta=e["args"]["eta"]
                    )
                )

        if kind == "multisig":
            multisig_pending(owner)
        elif kind == "timelock":
            timelock_pending(owner)
            admin = governance["timelock"]["admin"]
            if self.governance_kind(admin) == "multisig":
                multisig_pending(admin)
        history.sort(key=lambda e: (e["block"], e["log_index"]))
        registered = False
        try:
            registered = self.is_registered(app)
        except NotDeployed:
            pass
        return AppState(
            app_id=app,
            registered=registered,
            owner=owner,
            owner_kind=kind,
            governance=governance,
            allowed_compose_hashes=allowed,
            allowed_device_ids=allowed_devs,
            allow_any_device=bool(self.call("AppAuth", app, "allow_any_device")),
            require_tcb_up_to_date=bool(self.call("AppAuth", app, "require_tcb_up_to_date")),
            upgrades_disabled=bool(self.call("AppAuth", app, "upgrades_disabled")),
            retired_instances=retired,
            pending=pending,
            history=history,
        )

    # --- NodeRegistry ------------------------------------------------------------------------------------

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
        r = self.transact(
            "NodeRegistry",
            self.node_registry,
            "register_node",
            tee_kind,
            _b32(device_id, "device_id"),
            _b32(attestation_hash, "attestation hash"),
            int(capacity),
            int(price_per_hour),
            value=int(stake),
        )
        return int(self.event_of(r, "NodeRegistry", "NodeRegistered")["node_id"])

    def node(self, node_id: int) -> dict[str, Any]:
        fields = (
            "operator",
            "tee_kind",
            "device_id",
            "attestation_hash",
            "capacity",
            "price_per_hour",
            "stake",
            "unstaking",
            "unstake_ready_at",
            "active",
            "slashed_total",
        )
        return dict(
            zip(fields, self.call("NodeRegistry", self.node_registry, "nodes", int(node_id)), strict=True)
        )

    def deployment_escrow(self, dep_id: int) -> dict[str, Any]:
        fields = (
            "user",
            "usage_signer",
            "node_id",
            "price_per_hour",
            "balance",
            "served_seconds",
            "paid",
            "close_ready_at",
        )
        return dict(
            zip(
                fields, self.call("NodeRegistry", self.node_registry, "deployments", int(dep_id)), strict=True
            )
        )

    def stake(self, node_id: int, amount: int) -> dict[str, Any]:
        return self.transact("NodeRegistry", self.node_registry, "stake", int(node_id), value=int(amount))

    def request_unstake(self, node_id: int, amount: int) -> dict[str, Any]:
        return self.transact("NodeRegistry", self.node_registry, "request_unstake", int(node_id), int(amount))

    def withdraw_unstaked(self, node_id: int) -> dict[str, Any]:
        return self.transact("NodeRegistry", self.node_registry, "withdraw_unstaked", int(node_id))

    def open_deployment(self, node_id: int, amount: int, usage_signer: str | bytes | None = None) -> int:
        signer = _addr(usage_signer) if usage_signer else self._require_signer().address
        r = self.transact(
            "NodeRegistry", self.node_registry, "open_deployment", int(node_id), signer, value=int(amount)
        )
        return int(self.event_of(r, "NodeRegistry", "DeploymentOpened")["deployment_id"])

    def fund_deployment(self, dep_id: int, amount: int) -> dict[str, Any]:
        return self.transact(
            "NodeRegistry", self.node_registry, "fund_deployment", int(dep_id), value=int(amount)
        )

    def sign_usage(self, dep_id: int, served_seconds: int) -> bytes:
        """The signer (a deployment's usage signer) signs a cumulative usage record."""
        acct = self._require_signer()
        digest = self.call(
            "NodeRegistry", self.node_registry, "usage_digest", int(dep_id), int(served_seconds)
        )
        return bytes(acct.sign_message(encode_defunct(primitive=bytes(digest))).signature)

    def claim(self, dep_id: int, served_seconds: int, signature: bytes) -> int:
        r = self.transact(
            "NodeRegistry", self.node_registry, "claim", int(dep_id), int(served_seconds), signature
        )
        return int(self.event_of(r, "NodeRegistry", "UsageClaimed")["paid"])

    def request_close(self, dep_id: int) -> dict[str, Any]:
        return self.transact("NodeRegistry", self.node_registry, "request_close", int(dep_id))

    def withdraw_escrow(self, dep_id: int) -> dict[str, Any]:
        return self.transact("NodeRegistry", self.node_registry, "withdraw_escrow", int(dep_id))

    def set_challenger(self, challenger: str | bytes, allowed: bool = True) -> dict[str, Any]:
        return self.transact("NodeRegistry", self.node_registry, "set_challenger", _addr(challenger), allowed)

    def slash(self, node_id: int, amount: int, evidence_hash: bytes | str) -> dict[str, Any]:
        return self.transact(
            "NodeRegistry",
            self.node_registry,
            "slash",
            int(node_id),
            int(amount),
            _b32(evidence_hash, "evidence hash"),
        )

    def withdrawable(self, account: str | bytes) -> int:
        return int(self.call("NodeRegistry", self.node_registry, "withdrawable", _addr(account)))

    def withdraw(self) -> int:
        r = self.transact("NodeRegistry", self.node_registry, "withdraw")
        return int(self.event_of(r, "NodeRegistry", "Withdrawn")["amount"])


def _ctor_types(ctor: dict[str, Any] | None) -> list[str]:
    if ctor is None:
        return []
    from ._abi import _type

    return [_type(i) for i in ctor["inputs"]]


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
