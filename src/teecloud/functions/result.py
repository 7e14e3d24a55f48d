"""Signed function results: the message a contract checks (FunctionResultVerifier.vy), signing and the
offline check.

    digest = keccak256(abi.encode(
        keccak256("teecloud-fn-result-v1"), request_id: bytes32, function_id: address,
        function_hash: bytes32, input_hash: bytes32, output_hash: bytes32, expiry: uint256,
        runtime_app_id: address, runtime_compose_hash: bytes32))

input_hash = keccak256(input bytes), output_hash = keccak256(output bytes). `signature` is the function's
result key over `digest` (65 bytes r‖s‖v, v in {0,1}); `signature_chain` is that key's GetKey chain
(purpose "teecloud-fn-result:<function hash hex>"), so the chain binds the key to the function hash and
the runtime app, up to the KMS root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import coincurve
from eth_abi.abi import encode
from eth_utils.crypto import keccak

from teecloud.keys.errors import KeysError
from teecloud.keys.sigchain import (
    kms_issued_digest,
    purpose_digest,
    recover_k256,
    sign_k256_recoverable,
    verify_key_signature_chain,
)

from .errors import ResultInvalid
from .keys import result_key_purpose

__all__ = [
    "ORACLE_ID_TAG",
    "REQUEST_STREAM_BYTES",
    "RESULT_TYPEHASH",
    "SignedResult",
    "is_oracle_request_id",
    "result_digest",
    "secrets_key_digest",
    "sequential_request_id",
    "uncompressed_xy",
    "verify_result",
    "verify_secrets_key",
]

RESULT_TYPEHASH = keccak(b"teecloud-fn-result-v1")
MAX_RESULT_JSON = 64 << 10


def result_digest(
    *,
    request_id: bytes,
    function_id: bytes,
    function_hash: bytes,
    input_hash: bytes,
    output_hash: bytes,
    expiry: int,
    runtime_app_id: bytes,
    runtime_compose_hash: bytes,
) -> bytes:
    return keccak(
        encode(
            [
                "bytes32",
                "bytes32",
                "address",
                "bytes32",
                "bytes32",
                "bytes32",
                "uint256",
                "address",
                "bytes32",
            ],
            [
                RESULT_TYPEHASH,
                request_id,
                function_id,
                function_hash,
                input_hash,
                output_hash,
                expiry,
                runtime_app_id,
                runtime_compose_hash,
            ],
        )
    )


def secrets_key_digest(function_hash: bytes, x25519_public_key: bytes) -> bytes:
    return keccak(b"teecloud-fn-secrets-key:" + function_hash + x25519_public_key)


def verify_secrets_key(
    statement: dict[str, Any], *, function_hash: bytes, kms_root_public_key: bytes
) -> bytes:
    """Check a runtime's secrets-key statement for `function_hash`; return the X25519 key to seal to.
    Steps: (1) it names this function; (2) the result key signed the X25519 key; (3) the result key's chain
    (purpose bound to this function hash) goes up to `kms_root_public_key` through the runtime app key."""
    # (1)
    if _b(statement, "function_hash", 32) != function_hash:
        raise ResultInvalid("the secrets key statement is for another function")
    x = _b(statement, "x25519_public_key", 32)
    pub = _b(statement, "result_public_key", 33)
    chain = statement.get("signature_chain")
    if not isinstance(chain, list) or len(chain) != 2:
        raise ResultInvalid("signature_chain must list 2 signatures")
    links = (_b({"s": chain[0]}, "s", 65), _b({"s": chain[1]}, "s", 65))
    try:
        # (2)
        if recover_k256(secrets_key_digest(function_hash, x), _b(statement, "signature", 65)) != pub:
            raise ResultInvalid("the secrets key is not signed by the function's result key")
        # (3)
        verify_key_signature_chain(
            app_id=_b(statement, "runtime_app_id", 20),
            public_key=pub,
            purpose=result_key_purpose(function_hash),
            signature_chain=links,
            kms_root_public_key=kms_root_public_key,
        )
    except KeysError as exc:
        raise ResultInvalid(f"the secrets key's signature chain does not verify: {exc}") from exc
    return x


def uncompressed_xy(public_key: bytes) -> bytes:
    """x‖y (64 bytes) of a secp256k1 public key: what the contract hashes into an address."""
    try:
        return coincurve.PublicKey(public_key).format(compressed=False)[1:]
    except Exception as exc:  # coincurve raises ValueError / bare Exception on bad points
        raise ResultInvalid("not a secp256k1 public key") from exc


def _b(d: dict[str, Any], k: str, n: int | None) -> bytes:
    v = d.get(k)
    if not isinstance(v, str) or len(v) > 4 * MAX_RESULT_JSON:
        raise ResultInvalid(f"field {k!r} must be a 0x-hex string")
    try:
        out = bytes.fromhex(v.removeprefix("0x"))
    except ValueError as exc:
        raise ResultInvalid(f"field {k!r} is not hex") from exc
    if n is not None and len(out) != n:
        raise ResultInvalid(f"field {k!r} must be {n} bytes, got {len(out)}")
    return out


REQUEST_STREAM_BYTES = 24
# The first 8 bytes of every FunctionOracle request id (chain/contracts/FunctionOracle.vy, ORACLE_ID_TAG):
# ids in this space are answered only to an oracle's request read from the chain by the runtime's own
# watcher; the runtime refuses them from every other caller (service.FunctionRuntime.invoke).
ORACLE_ID_TAG = b"tcfn.orq"


def is_oracle_request_id(request_id: bytes) -> bool:
    """Whether `request_id` lies in the oracles' id space (any FunctionOracle, any chain)."""
    return request_id[: len(ORACLE_ID_TAG)] == ORACLE_ID_TAG


def sequential_request_id(stream: bytes, seq: int) -> bytes:
    """The `seq`-th request id of a caller that counts its requests: `stream` (24 bytes, random, chosen once
    per caller) then `seq` as 8 bytes big-endian. Ids that differ only in their low byte share a word of
    FunctionResultVerifier's replay record, so a consumer's check of such a result costs ~17k gas less than
    one with a random id, 255 times in 256 (docs/functions.md, gas). FunctionOracle numbers its requests
    the same way, under ORACLE_ID_TAG, which a caller's stream must not start with."""
    if len(stream) != REQUEST_STREAM_BYTES:
        raise ValueError(f"a request stream is {REQUEST_STREAM_BYTES} bytes")
    if not 0 <= seq < 2**64:
        raise ValueError("a request sequence number is 0 ≤ seq < 2**64")
    if is_oracle_request_id(stream):
        raise ValueError("a request stream must not start with the oracles' id tag (ORACLE_ID_TAG)")
    return stream + seq.to_bytes(8, "big")


@dataclass(frozen=True)
class SignedResult:
    request_id: bytes
    function_id: bytes  # the function's registry address (20 bytes)
    function_hash: bytes
    input_hash: bytes
    output: bytes
    expiry: int
    runtime_app_id: bytes
    runtime_compose_hash: bytes
    signature: bytes
    public_key: bytes  # compressed result key
    signature_chain: tuple[bytes, bytes]

    def digest(self) -> bytes:
        return result_digest(
            request_id=self.request_id,
            function_id=self.function_id,
            function_hash=self.function_hash,
            input_hash=self.input_hash,
            output_hash=keccak(self.output),
            expiry=self.expiry,
            runtime_app_id=self.runtime_app_id,
            runtime_compose_hash=self.runtime_compose_hash,
        )

    @classmethod
    def sign(
        cls, secret: bytes, public_key: bytes, chain: tuple[bytes, bytes], **fields: Any
    ) -> SignedResult:
        unsigned = cls(signature=b"", public_key=public_key, signature_chain=chain, **fields)
        sig = sign_k256_recoverable(secret, unsigned.digest())
        return cls(signature=sig, public_key=public_key, signature_chain=chain, **fields)

    def to_abi(self) -> tuple[Any, ...]:
        """The FunctionResult tuple the contracts take (teecloud.chain.functions): keys as x‖y, the app key
        and the KMS root recovered from the signature chain (the contract checks them against it)."""
        try:
            app_key = recover_k256(
                purpose_digest(result_key_purpose(self.function_hash), self.public_key),
                self.signature_chain[0],
            )
            root = recover_k256(kms_issued_digest(self.runtime_app_id, app_key), self.signature_chain[1])
        except KeysError as exc:
            raise ResultInvalid(f"the signature chain does not recover: {exc}") from exc
        return (
            self.request_id,
            "0x" + self.function_id.hex(),
            self.function_hash,
            self.input_hash,
            self.output,
            self.expiry,
            "0x" + self.runtime_app_id.hex(),
            self.runtime_compose_hash,
            self.signature,
            uncompressed_xy(self.public_key),
            self.signature_chain[0],
            uncompressed_xy(app_key),
            self.signature_chain[1],
            uncompressed_xy(root),
        )

    def to_json(self) -> dict[str, Any]:
        def h(b: bytes) -> str:
            return "0x" + b.hex()

        return {
            "request_id": h(self.request_id),
            "function_id": h(self.function_id),
            "function_hash": h(self.function_hash),
            "input_hash": h(self.input_hash),
            "output": h(self.output),
            "expiry": self.expiry,
            "runtime_app_id": h(self.runtime_app_id),
            "runtime_compose_hash": h(self.runtime_compose_hash),
            "signature": h(self.signature),
            "public_key": h(self.public_key),
            "signature_chain": [h(s) for s in self.signature_chain],
        }

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> SignedResult:
        """Parse (structure only; verify_result checks signatures)."""
        if isinstance(data, bytes | str):
            if len(data) > MAX_RESULT_JSON:
                raise ResultInvalid(f"a signed result is at most {MAX_RESULT_JSON} bytes of JSON")
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ResultInvalid(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ResultInvalid("a signed result is a JSON object")
        chain = data.get("signature_chain")
        if not isinstance(chain, list) or len(chain) != 2:
            raise ResultInvalid("signature_chain must list 2 signatures")
        expiry = data.get("expiry")
        if not isinstance(expiry, int) or isinstance(expiry, bool) or not 0 <= expiry < 2**64:
            raise ResultInvalid("expiry must be a unix time")
        c = {"signature_chain": chain[0]}, {"signature_chain": chain[1]}
        return cls(
            request_id=_b(data, "request_id", 32),
            function_id=_b(data, "function_id", 20),
            function_hash=_b(data, "function_hash", 32),
            input_hash=_b(data, "input_hash", 32),
            output=_b(data, "output", None),
            expiry=expiry,
            runtime_app_id=_b(data, "runtime_app_id", 20),
            runtime_compose_hash=_b(data, "runtime_compose_hash", 32),
            signature=_b(data, "signature", 65),
            public_key=_b(data, "public_key", 33),
            signature_chain=(_b(c[0], "signature_chain", 65), _b(c[1], "signature_chain", 65)),
        )


def verify_result(
    result: SignedResult,
    *,
    kms_root_public_key: bytes,
    now: int,
    function_hash: bytes | None = None,
    runtime_app_id: bytes | None = None,
) -> None:
    """Offline check of a signed result (what the verifier contract checks, except the chain's state:
    registry versions, allowed compose hashes and replay).

    Steps: (1) not expired at `now`; (2) the signature over the digest recovers to `public_key`;
    (3) the GetKey chain of `public_key` for this function hash recovers to the runtime app and up to
    `kms_root_public_key`; (4) optional pins: the expected function hash and runtime app."""
    # (1)
    if result.expiry < now:
        raise ResultInvalid(f"the result expired at {result.expiry} (now {now})")
    try:
        # (2)
        if recover_k256(result.digest(), result.signature) != result.public_key:
            raise ResultInvalid("the signature is not the result key's over this result")
        # (3)
        verify_key_signature_chain(
            app_id=result.runtime_app_id,
            public_key=result.public_key,
            purpose=result_key_purpose(result.function_hash),
            signature_chain=result.signature_chain,
            kms_root_public_key=kms_root_public_key,
        )
    except KeysError as exc:
        raise ResultInvalid(f"the signature chain does not verify: {exc}") from exc
    # (4)
    if function_hash is not None and result.function_hash != function_hash:
        raise ResultInvalid(f"the result is from function {result.function_hash.hex()}, not the one expected")
    if runtime_app_id is not None and result.runtime_app_id != runtime_app_id:
        raise ResultInvalid(f"the result is from runtime {result.runtime_app_id.hex()}")
