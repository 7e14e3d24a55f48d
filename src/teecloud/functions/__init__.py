"""teecloud.functions: attested off-chain functions (docs/functions.md).

A function is a WebAssembly module (plus its host allowlist and limits) identified by its function hash.
The runtime — itself an ordinary teecloud app that gets its keys through the guest API — runs each call in
a fresh wasmtime isolate under per-call limits, and signs each result with a key derived for (runtime app,
function hash) whose GetKey signature chain goes up to the KMS root; `FunctionResultVerifier.vy` checks
such a result on chain.

    rt = FunctionRuntime(home, FunctionKeys(GuestAgentKeys()))
    rec = rt.deploy(wasm, allowed_hosts=["api.example.com"], sealed_secrets=blob)
    inv = rt.invoke(rec.function_hash.hex(), b"input")     # inv.result: SignedResult, inv.report
    verify_result(inv.result, kms_root_public_key=root, now=int(time.time()))
"""

from ._fetch import FetchPolicy
from ._sandbox import CallReport
from .errors import (
    BadFunction,
    FunctionError,
    InvocationFailed,
    LimitExceeded,
    NotAllowed,
    RegistryUnavailable,
    ReservedRequestId,
    ResultInvalid,
    SecretError,
    UnknownFunction,
)
from .keys import FunctionKeys, GuestAgentKeys, KeySource, RuntimeIdentity, result_key_purpose
from .limits import MAX_FUNCTION_LIMITS, CallLimits, RuntimeLimits
from .result import (
    ORACLE_ID_TAG,
    SignedResult,
    is_oracle_request_id,
    result_digest,
    sequential_request_id,
    uncompressed_xy,
    verify_result,
)
from .service import FunctionRecord, FunctionRuntime, Invocation, function_hash_of

__all__ = [
    "MAX_FUNCTION_LIMITS",
    "ORACLE_ID_TAG",
    "BadFunction",
    "CallLimits",
    "CallReport",
    "FetchPolicy",
    "FunctionError",
    "FunctionKeys",
    "FunctionRecord",
    "FunctionRuntime",
    "GuestAgentKeys",
    "Invocation",
    "InvocationFailed",
    "KeySource",
    "LimitExceeded",
    "NotAllowed",
    "RegistryUnavailable",
    "ReservedRequestId",
    "ResultInvalid",
    "RuntimeIdentity",
    "RuntimeLimits",
    "SecretError",
    "SignedResult",
    "UnknownFunction",
    "function_hash_of",
    "is_oracle_request_id",
    "result_digest",
    "result_key_purpose",
    "sequential_request_id",
    "uncompressed_xy",
    "verify_result",
]
