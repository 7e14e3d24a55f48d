"""ChainConnection: the RPC and transaction plumbing under every contract facade.

It knows JSON-RPC, ABI encoding and signing, and nothing of teecloud's contracts: calls are ABI-encoded
here (eth_abi) and transactions signed here (eth_account, EIP-1559). Every transaction is first estimated,
so a revert is reported with its reason before any gas is spent; the signer key is never printed or logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from eth_abi.abi import encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils.address import to_checksum_address

from ._abi import ContractAbi, _type
from ._compile import compiled
from ._values import to_address, to_int
from .api import BlockRef
from .errors import ChainError, ChainUnreachable, ContractReverted, WrongChainId
from .signer import KEY_ENV
from .transport import Transport

__all__ = ["PRIORITY_FEE", "RECEIPT_TIMEOUT", "ChainConnection", "Event", "abi_of"]

RECEIPT_TIMEOUT = 30.0
PRIORITY_FEE = 10**9
Event = dict[str, Any]  # {event, args, block, tx, log_index, address}

_ABIS: dict[str, ContractAbi] = {}


def abi_of(name: str) -> ContractAbi:
    """The ABI of one of teecloud's contracts (compiled once per process)."""
    if name not in _ABIS:
        _ABIS[name] = ContractAbi(compiled(name).abi)
    return _ABIS[name]


def _ctor_types(ctor: dict[str, Any] | None) -> list[str]:
    return [] if ctor is None else [_type(i) for i in ctor["inputs"]]


def _block_ref(block: Any, what: str) -> BlockRef:
    """A JSON-RPC block object as a BlockRef (strict: number, hash and parentHash must all be there)."""
    if not isinstance(block, dict):
        raise ChainError(f"the endpoint does not know {what}")
    try:
        return BlockRef(to_int(block["number"]), str(block["hash"]).lower(), str(block["parentHash"]).lower())
    except (KeyError, TypeError, ValueError) as exc:
        raise ChainError(f"malformed block object for {what}: {exc}") from exc


class ChainConnection:
    """One JSON-RPC endpoint and (optionally) one signer."""

    def __init__(
        self,
        transport: Transport,
        signer_key: str | None = None,
        *,
        chain_id: int | None = None,
        label: str = "",
    ) -> None:
        self.transport = transport
        self.label = label
        self._account = Account.from_key(signer_key) if signer_key else None
        self._tx_lock = threading.Lock()
        actual = to_int(self.transport.request("eth_chainId", []))
        if chain_id is not None and actual != chain_id:
            raise WrongChainId(chain_id, actual)
        self.chain_id = actual
        genesis = self.transport.request("eth_getBlockByNumber", ["0x0", False])
        # names this chain across restarts and endpoints (deployment records are keyed by it)
        self.chain_key = f"{self.chain_id}:{genesis['hash']}"

    def __repr__(self) -> str:  # never shows the key
        return (
            f"{type(self).__name__}({self.label or 'rpc'}, chain_id={self.chain_id}, signer={self.address})"
        )

    def with_signer(self, signer_key: str) -> Any:
        """Another signer on the same connection (same transport, same class)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._account = Account.from_key(signer_key)
        other._tx_lock = threading.Lock()
        other._fork()
        return other

    def _fork(self) -> None:
        """Reset per-signer state in a copy made by with_signer (subclasses extend it)."""

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str | None:
        return self._account.address if self._account else None

    def require_signer(self) -> Any:
        if self._account is None:
            raise ChainError(
                f"no signer key for {self.label or 'this chain'}: pass --key-file FILE or set ${KEY_ENV} "
                "(the public development keys sign only on the embedded chain)"
            )
        return self._account

    def sign_message(self, digest: bytes) -> bytes:
        """EIP-191 personal signature of `digest` by the signer."""
        acct = self.require_signer()
        return bytes(acct.sign_message(encode_defunct(primitive=bytes(digest))).signature)

    # --- plain JSON-RPC ------------------------------------------------------------------------------------

    def rpc_call(self, method: str, *params: Any) -> Any:
        return self.transport.request(method, list(params))

    def block_number(self) -> int:
        return to_int(self.rpc_call("eth_blockNumber"))

    def check_chain_id(self) -> None:
        """Raises WrongChainId unless the endpoint still serves the chain this connection was opened on."""
        actual = to_int(self.rpc_call("eth_chainId"))
        if actual != self.chain_id:
            raise WrongChainId(self.chain_id, actual)

    def head(self) -> BlockRef:
        """The head block as (number, hash, parent hash), read in one request: questions asked at it
        (`call(..., block=head.rpc_id())`) are answered from that block on that fork only."""
        return _block_ref(self.rpc_call("eth_getBlockByNumber", "latest", False), "the head block")

    def checked_head(self) -> BlockRef:
        """The head block, after checking that the endpoint still serves the chain this connection was
        opened on (its chain id): an endpoint switched to another chain answers nothing. Raises
        WrongChainId. Both in one request (a JSON-RPC batch) where the transport sends batches."""
        batch = getattr(self.transport, "request_batch", None)
        if batch is None:
            self.check_chain_id()
            return self.head()
        chain_id, block = batch([("eth_chainId", []), ("eth_getBlockByNumber", ["latest", False])])
        actual = to_int(chain_id)
        if actual != self.chain_id:
            raise WrongChainId(self.chain_id, actual)
        return _block_ref(block, "the head block")

    def block_by_hash(self, block_hash: str) -> BlockRef:
        """The block with this hash; ChainError if the endpoint does not know it (or answers another)."""
        ref = _block_ref(self.rpc_call("eth_getBlockByHash", block_hash, False), f"block {block_hash}")
        if ref.hash != block_hash:
            raise ChainError(f"asked for block {block_hash}, the endpoint answered block {ref.hash}")
        return ref

    def balance(self, address: str | bytes) -> int:
        return to_int(self.rpc_call("eth_getBalance", to_address(address), "latest"))

    def code(self, address: str | bytes) -> bytes:
        return bytes.fromhex(str(self.rpc_call("eth_getCode", to_address(address), "latest"))[2:])

    def timestamp(self) -> int:
        return to_int(self.rpc_call("eth_getBlockByNumber", "latest", False)["timestamp"])

    def increase_time(self, seconds: int) -> None:
        """Development chains only: anvil, the embedded chain in this process, or its RPC when served with
        time travel on (`--dev-time-travel`). Moves the clock forward and mines a block."""
        self.rpc_call("evm_increaseTime", int(seconds))
        self.rpc_call("evm_mine")

    # --- contracts -----------------------------------------------------------------------------------------

    def call(
        self, contract: str, address: str | bytes, fn: str, *args: Any, block: str | dict[str, Any] = "latest"
    ) -> Any:
        abi = abi_of(contract)
        data = abi.encode_call(fn, *args)
        tx: dict[str, Any] = {"to": to_address(address), "data": "0x" + data.hex()}
        if self.address:
            tx["from"] = self.address
        out = self.rpc_call("eth_call", tx, block)
        raw = bytes.fromhex(str(out)[2:])
        if not raw and abi.fn(fn).outputs:
            raise ContractReverted(
                f"no contract code at {to_address(address)} (or it does not implement {fn})"
            )
        return abi.decode_output(fn, raw)

    def send(self, to: str | None, data: bytes, *, value: int = 0, gas: int | None = None) -> dict[str, Any]:
        """Sign and send one transaction; wait for its receipt. Raises ContractReverted with the reason."""
        acct = self.require_signer()
        with self._tx_lock:
            call: dict[str, Any] = {"from": acct.address, "data": "0x" + data.hex(), "value": hex(value)}
            if to is not None:
                call["to"] = to_address(to)
            if gas is None:
                est = to_int(self.rpc_call("eth_estimateGas", call))
                gas = est * 6 // 5 + 20_000
            nonce = to_int(self.rpc_call("eth_getTransactionCount", acct.address, "pending"))
            latest = self.rpc_call("eth_getBlockByNumber", "latest", False)
            base = to_int(latest.get("baseFeePerGas") or "0x0")
            gas = min(gas, to_int(latest["gasLimit"]))
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
                tx["to"] = to_address(to)
            raw = acct.sign_transaction(tx).raw_transaction
            tx_hash = self.rpc_call("eth_sendRawTransaction", "0x" + bytes(raw).hex())
            receipt = self._wait(tx_hash)
        if to_int(receipt["status"]) != 1:
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
        return self.send(to_address(address), abi_of(contract).encode_call(fn, *args), value=value)

    def deploy_contract(self, name: str, *args: Any, value: int = 0) -> str:
        c = compiled(name)
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
    ) -> list[Event]:
        """Decoded logs of one contract: [{event, args, block, tx, log_index, address}] in chain order."""
        abi = abi_of(contract)
        logs = self.rpc_call(
            "eth_getLogs", {"address": to_address(address), "fromBlock": hex(from_block), "toBlock": "latest"}
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
                    "block": to_int(log["blockNumber"]),
                    "tx": log["transactionHash"],
                    "log_index": to_int(log["logIndex"]),
                    "address": to_checksum_address(log["address"]),
                }
            )
        out.sort(key=lambda e: (e["block"], e["log_index"]))
        return out

    @staticmethod
    def event_of(receipt: dict[str, Any], contract: str, name: str) -> dict[str, Any]:
        """The arguments of the first `name` event in a receipt."""
        abi = abi_of(contract)
        for log in receipt.get("logs", []):
            decoded = abi.decode_log(log)
            if decoded is not None and decoded[0] == name:
                return decoded[1]
        raise ChainError(f"event {name} not found in the receipt")
