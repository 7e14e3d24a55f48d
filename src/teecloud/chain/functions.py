"""Facades of the functions contracts (docs/functions.md): FunctionRegistry (one per function; its address
is the function_id), FunctionResultVerifier (one per network) and the example FunctionPriceFeed.

A signed result goes to the contracts as the ABI tuple of `FunctionResult` (see FUNCTION_RESULT_ABI_TYPE);
teecloud.functions.SignedResult.to_abi() builds it."""

from __future__ import annotations

from typing import Any

from ._values import to_address, to_bytes32
from .api import GovernanceAction
from .connection import ChainConnection, abi_of
from .governance import submit_owner_call

__all__ = [
    "FUNCTION_RESULT_ABI_TYPE",
    "FunctionPriceFeed",
    "FunctionRegistry",
    "FunctionResultVerifier",
    "deploy_function_registry",
]

# request_id, function_id, function_hash, input_hash, output, expiry, runtime_app_id, runtime_compose_hash,
# signature, result_key (x‖y), app_signature, app_key (x‖y), kms_signature, kms_root_key (x‖y)
FUNCTION_RESULT_ABI_TYPE = (
    "(bytes32,address,bytes32,bytes32,bytes,uint256,address,bytes32,bytes,bytes,bytes,bytes,bytes,bytes)"
)


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
        cls, conn: ChainConnection, verifier: str | bytes, function_id: str | bytes, input_hash: bytes | str
    ) -> FunctionPriceFeed:
        addr = conn.deploy_contract(
            "FunctionPriceFeed",
            to_address(verifier),
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
