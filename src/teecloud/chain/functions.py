"""Facades of the functions contracts (docs/functions.md): FunctionRegistry (one per function; its address
is the function_id), FunctionResultVerifier (one per network) and the example FunctionPriceFeed.

A signed result goes to the contracts as the ABI tuple of `FunctionResult` (see FUNCTION_RESULT_ABI_TYPE);
teecloud.functions.SignedResult.to_abi() builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._values import to_address, to_bytes32
from .api import GovernanceAction
from .connection import ChainConnection, abi_of
from .governance import submit_owner_call

__all__ = [
    "FUNCTION_RESULT_ABI_TYPE",
    "FunctionOracle",
    "FunctionPriceFeed",
    "FunctionRegistry",
    "FunctionResultVerifier",
    "OracleRequest",
    "deploy_function_registry",
    "without_chain",
]

# request_id, function_id, function_hash, input_hash, output, expiry, runtime_app_id, runtime_compose_hash,
# signature, result_key (x‖y), app_signature, app_key (x‖y), kms_signature, kms_root_key (x‖y)
FUNCTION_RESULT_ABI_TYPE = (
    "(bytes32,address,bytes32,bytes32,bytes,uint256,address,bytes32,bytes,bytes,bytes,bytes,bytes,bytes)"
)


def without_chain(result_abi: tuple[Any, ...]) -> tuple[Any, ...]:
    """The result with its key's signature chain omitted (app signature, app key, KMS signature and root
    empty): the verifier then reads the key's certification instead of checking the chain, which is cheaper
    for a certified key and refused for any other (FunctionResultVerifier.certify_key, docs/functions.md)."""
    return (*result_abi[:10], b"", b"", b"", b"")


def deploy_function_registry(
    conn: ChainConnection, owner: str | bytes, name: str, runtime_app_id: str | bytes, code_hash: bytes | str
) -> FunctionRegistry:
    if len(name.encode()) > 64:
        raise ValueError("a function name is at most 64 bytes")
    addr = conn.deploy_contract(
        "FunctionRegistry",
        to_address(owner),
        name,
        to_address(runtime_app_id),
        to_bytes32(code_hash, "code hash"),
    )
    return FunctionRegistry(conn, addr)


class FunctionRegistry:
    def __init__(self, conn: ChainConnection, function_id: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(function_id)

    def _call(self, fn: str, *args: Any) -> Any:
        return self.conn.call("FunctionRegistry", self.address, fn, *args)

    def owner(self) -> str:
        return str(self._call("owner"))

    def name(self) -> str:
        return str(self._call("name"))

    def runtime_app_id(self) -> str:
        return str(self._call("runtime_app_id"))

    def is_code_hash_allowed(self, code_hash: bytes | str) -> bool:
        return bool(self._call("allowed_code_hashes", to_bytes32(code_hash, "code hash")))

    def code_hashes(self) -> list[bytes]:
        """The code hashes allowed now (at most 64 at once), in no particular order."""
        return [bytes(h) for h in self._call("allowed_code_hash_list")]

    def is_allowed(self, code_hash: bytes | str, runtime_app_id: str | bytes) -> tuple[bool, str]:
        ok, reason = self._call("is_allowed", to_bytes32(code_hash, "code hash"), to_address(runtime_app_id))
        return bool(ok), str(reason)

    # --- changes, the way the owner requires (directly, multisig, timelock) -------------------------------

    def propose(self, fn: str, *args: Any) -> GovernanceAction:
        data = abi_of("FunctionRegistry").encode_call(fn, *args)
        return submit_owner_call(self.conn, self.address, self.owner(), data, what=f"function {self.address}")

    def propose_add_code_hash(self, code_hash: bytes | str) -> GovernanceAction:
        return self.propose("add_code_hash", to_bytes32(code_hash, "code hash"))

    def propose_remove_code_hash(self, code_hash: bytes | str) -> GovernanceAction:
        return self.propose("remove_code_hash", to_bytes32(code_hash, "code hash"))

    def propose_upgrade(self, old_code_hash: bytes | str, new_code_hash: bytes | str) -> GovernanceAction:
        return self.propose(
            "upgrade", to_bytes32(old_code_hash, "old code hash"), to_bytes32(new_code_hash, "new code hash")
        )

    def propose_set_runtime_app_id(self, runtime_app_id: str | bytes) -> GovernanceAction:
        return self.propose("set_runtime_app_id", to_address(runtime_app_id))

    def history(self) -> list[dict[str, Any]]:
        return self.conn.events("FunctionRegistry", self.address)


class FunctionResultVerifier:
    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(address)

    @classmethod
    def deploy(cls, conn: ChainConnection, kms_auth: str | bytes) -> FunctionResultVerifier:
        return cls(conn, conn.deploy_contract("FunctionResultVerifier", to_address(kms_auth)))

    def check(self, result_abi: tuple[Any, ...]) -> bytes:
        """eth_call of verify (nothing recorded): the output, or ContractReverted with the failing step."""
        return bytes(self.conn.call("FunctionResultVerifier", self.address, "verify", result_abi))

    def verify(self, result_abi: tuple[Any, ...]) -> dict[str, Any]:
        """verify as a transaction from this signer (the signer is the consumer the replay rule keys on)."""
        return self.conn.transact("FunctionResultVerifier", self.address, "verify", result_abi)

    def certify_key(self, result_abi: tuple[Any, ...]) -> bytes:
        """certify_key with the result key's chain from a signed result: later results of that key skip the
        chain's two ecrecovers (while KmsAuth records the same root). Returns the certification id."""
        args = (result_abi[6], result_abi[2], *result_abi[9:14])
        key_id = bytes(self.conn.call("FunctionResultVerifier", self.address, "certify_key", *args))
        if not self.is_certified(result_abi):
            self.conn.transact("FunctionResultVerifier", self.address, "certify_key", *args)
        return key_id

    def is_certified(self, result_abi: tuple[Any, ...]) -> bool:
        """Whether this result's key is certified under the KMS root KmsAuth records now."""
        return bool(
            self.conn.call(
                "FunctionResultVerifier",
                self.address,
                "is_certified",
                result_abi[6],
                result_abi[2],
                result_abi[9],
            )
        )

    def is_accepted(self, consumer: str | bytes, function_id: str | bytes, request_id: bytes | str) -> bool:
        """Whether `consumer` accepted a result of `function_id` for `request_id` (the replay record)."""
        return bool(
            self.conn.call(
                "FunctionResultVerifier",
                self.address,
                "is_accepted",
                to_address(consumer),
                to_address(function_id),
                to_bytes32(request_id, "request id"),
            )
        )

    def estimate_gas(self, result_abi: tuple[Any, ...]) -> int:
        data = abi_of("FunctionResultVerifier").encode_call("verify", result_abi)
        me = self.conn.require_signer().address
        tx = {"from": me, "to": self.address, "data": "0x" + data.hex()}
        return int(self.conn.rpc_call("eth_estimateGas", tx), 16)


class FunctionPriceFeed:
    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(address)

    @classmethod
    def deploy(
        cls,
        conn: ChainConnection,
        verifier: str | bytes,
        function_id: str | bytes,
        input_hash: bytes | str,
        *,
        oracle: str | bytes | None = None,
    ) -> FunctionPriceFeed:
        addr = conn.deploy_contract(
            "FunctionPriceFeed",
            to_address(verifier),
            to_address(oracle) if oracle else "0x" + "00" * 20,
            to_address(function_id),
            to_bytes32(input_hash, "input hash"),
        )
        return cls(conn, addr)

    def submit(self, result_abi: tuple[Any, ...]) -> dict[str, Any]:
        return self.conn.transact("FunctionPriceFeed", self.address, "submit", result_abi)

    def price(self) -> int:
        return int(self.conn.call("FunctionPriceFeed", self.address, "price"))

    def updates(self) -> int:
        return int(self.conn.call("FunctionPriceFeed", self.address, "updates"))


@dataclass(frozen=True)
class OracleRequest:
    request_id: bytes
    requester: str
    function_id: str
    input_hash: bytes
    callback: str
    callback_gas: int
    deposit: int
    created: int
    state: int  # 0 unknown, 1 pending, 2 fulfilled, 3 cancelled

    @property
    def pending(self) -> bool:
        return self.state == 1


class FunctionOracle:
    """Function calls on chain: request (with a deposit) -> Requested event -> fulfill (signed result)."""

    def __init__(self, conn: ChainConnection, address: str | bytes) -> None:
        self.conn = conn
        self.address = to_address(address)

    @classmethod
    def deploy(cls, conn: ChainConnection, verifier: str | bytes) -> FunctionOracle:
        return cls(conn, conn.deploy_contract("FunctionOracle", to_address(verifier)))

    def request(
        self,
        function_id: str | bytes,
        input: bytes,
        *,
        deposit: int,
        callback: str | bytes | None = None,
        callback_gas: int = 200_000,
    ) -> bytes:
        if len(input) > 1024:
            raise ValueError("an on-chain request's input is at most 1024 bytes")
        receipt = self.conn.transact(
            "FunctionOracle",
            self.address,
            "request",
            to_address(function_id),
            input,
            to_address(callback) if callback else "0x" + "00" * 20,
            int(callback_gas),
            value=int(deposit),
        )
        return bytes(self.conn.event_of(receipt, "FunctionOracle", "Requested")["request_id"])

    def get(self, request_id: bytes) -> OracleRequest:
        v = self.conn.call("FunctionOracle", self.address, "requests", to_bytes32(request_id, "request id"))
        return OracleRequest(request_id, str(v[0]), str(v[1]), bytes(v[2]), str(v[3]), *map(int, v[4:]))

    def fulfill(self, result_abi: tuple[Any, ...]) -> dict[str, Any]:
        return self.conn.transact("FunctionOracle", self.address, "fulfill", result_abi)

    def verifier(self) -> FunctionResultVerifier:
        """The result verifier this oracle checks every result with."""
        return FunctionResultVerifier(
            self.conn, str(self.conn.call("FunctionOracle", self.address, "verifier"))
        )

    def cancel(self, request_id: bytes) -> dict[str, Any]:
        return self.conn.transact(
            "FunctionOracle", self.address, "cancel", to_bytes32(request_id, "request id")
        )

    def requested(self, from_block: int = 0) -> list[dict[str, Any]]:
        """Requested events from `from_block` on (each with its block number)."""
        return self.conn.events("FunctionOracle", self.address, from_block=from_block, names=["Requested"])
