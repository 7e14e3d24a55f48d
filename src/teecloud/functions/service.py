"""The function runtime's logic (no HTTP): deploy, invoke, logs, secrets.

State under `<home>/functions/`:
  <function_hash>/module.wasm, manifest.json, secrets.bin (sealed; never stored opened), log.jsonl
  claims.log                             request ids taken (see _claims): each answered at most once,
                                         across restarts too
  <function_hash>/log.jsonl              its last calls (appended; trimmed to max_log_lines on load)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import wasmtime
from eth_utils.crypto import keccak

from teecloud._fs import atomic_write, atomic_write_json
from teecloud.errors import Error
from teecloud.keys.sigchain import sign_k256_recoverable

from ._claims import ClaimJournal
from ._fetch import Fetcher, FetchPolicy, parse_allowed_host
from ._sandbox import CallReport, Sandbox
from .errors import (
    BadFunction,
    FunctionError,
    InvocationFailed,
    NotAllowed,
    RegistryUnavailable,
    ReservedRequestId,
    SecretError,
    UnknownFunction,
)
from .keys import FunctionKeys
from .limits import MAX_FUNCTION_LIMITS, CallLimits, RuntimeLimits
from .result import ORACLE_ID_TAG, SignedResult, is_oracle_request_id, secrets_key_digest

__all__ = [
    "FunctionRecord",
    "FunctionRuntime",
    "Invocation",
    "RegistryCheck",
    "function_hash_of",
    "normalize_hosts",
]

log = logging.getLogger(__name__)

# (function_id, function_hash, runtime_app_id) -> (allowed, reason); read from the FunctionRegistry
RegistryCheck = Callable[[bytes, bytes, bytes], tuple[bool, str]]


def function_hash_of(wasm: bytes, allowed_hosts: list[str], limits: dict[str, int]) -> bytes:
    """A function's identity: sha256 of the canonical JSON of its module's sha256, its allowlist and its
    limits (what it may reach and use is part of what it is)."""
    doc = {
        "v": 1,
        "wasm_sha256": hashlib.sha256(wasm).hexdigest(),
        "allowed_hosts": allowed_hosts,
        "limits": limits,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).digest()


def normalize_hosts(allowed_hosts: list[str], max_hosts: int = 16) -> list[str]:
    """The allowlist as the function hash covers it: each 'host[:port]' lower-cased, sorted, unique."""
    if not isinstance(allowed_hosts, list) or len(allowed_hosts) > max_hosts:
        raise BadFunction(f"allowed_hosts is a list of at most {max_hosts} hosts")
    try:
        return sorted({parse_allowed_host(h) for h in allowed_hosts})
    except ValueError as exc:
        raise BadFunction(str(exc)) from exc


@dataclass(frozen=True)
class FunctionRecord:
    function_hash: bytes
    function_id: bytes | None  # its FunctionRegistry address, when registered on chain
    allowed_hosts: tuple[str, ...]
    limits: dict[str, int]
    has_secrets: bool
    deployed_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "function_hash": "0x" + self.function_hash.hex(),
            "function_id": "0x" + self.function_id.hex() if self.function_id else None,
            "allowed_hosts": list(self.allowed_hosts),
            "limits": dict(self.limits),
            "has_secrets": self.has_secrets,
            "deployed_at": self.deployed_at,
        }


@dataclass
class Invocation:
    result: SignedResult
    report: CallReport
    logs: list[str] = field(default_factory=list)


class FunctionRuntime:
    def __init__(
        self,
        home: Path,
        keys: FunctionKeys,
        *,
        fetch_policy: FetchPolicy | None = None,
        registry_check: RegistryCheck | None = None,
        max_limits: CallLimits = MAX_FUNCTION_LIMITS,
        limits: RuntimeLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dir = Path(home) / "functions"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys = keys
        self.fetch_policy = fetch_policy or FetchPolicy()
        self.registry_check = registry_check
        self.max_limits = max_limits
        self.limits = limits or RuntimeLimits()
        self.clock = clock
        self.sandbox = Sandbox(tick_ms=self.limits.epoch_tick_ms)
        self._modules: OrderedDict[bytes, wasmtime.Module] = OrderedDict()
        self._records: dict[bytes, FunctionRecord] = {}
        self._lock = threading.Lock()
        self._http = httpx.Client(verify=self.fetch_policy.context(), trust_env=False)
        self._claims = ClaimJournal(self.dir / "claims.log", clock=clock)
        self._logs: dict[bytes, deque[dict[str, Any]]] = {}

    def close(self) -> None:
        self.sandbox.close()
        self._http.close()
        self._claims.close()

    # --- deploy ---------------------------------------------------------------------------------------------

    def secrets_public_key(self, function_hash: bytes) -> bytes:
        """The X25519 key a deployer seals this function's secrets to (encrypt_env format)."""
        return self.keys.secrets_key(function_hash).public_key().public_bytes_raw()

    def secrets_key_statement(self, function_hash: bytes) -> dict[str, Any]:
        """The secrets key, signed by the function's result key (whose chain goes up to the KMS root)."""
        x = self.secrets_public_key(function_hash)
        key = self.keys.signing_key(function_hash)
        sig = sign_k256_recoverable(key.secret, secrets_key_digest(function_hash, x))
        return {
            "function_hash": "0x" + function_hash.hex(),
            "x25519_public_key": "0x" + x.hex(),
            "signature": "0x" + sig.hex(),
            "result_public_key": "0x" + key.public_key.hex(),
            "signature_chain": ["0x" + s.hex() for s in key.signature_chain],
            "runtime_app_id": "0x" + self.keys.identity().app_id.hex(),
        }

    def deploy(
        self,
        wasm: bytes,
        *,
        allowed_hosts: list[str] | None = None,
        limits: dict[str, int] | None = None,
        sealed_secrets: bytes | None = None,
        function_id: bytes | None = None,
    ) -> FunctionRecord:
        """Validate, compile and keep a function (idempotent). Sealed secrets must open with this function's
        key (so a blob sealed to another function is refused here, not at call time)."""
        rl = self.limits
        if not isinstance(wasm, bytes | bytearray) or not 8 <= len(wasm) <= rl.max_module_bytes:
            raise BadFunction(f"a module is 8..{rl.max_module_bytes} bytes")
        hosts = normalize_hosts(allowed_hosts or [], rl.max_allowed_hosts)
        req_limits = dict(limits or {})
        self.max_limits.lowered_by(req_limits)  # validates
        if function_id is not None and len(function_id) != 20:
            raise BadFunction("function_id is a 20-byte registry address")
        fh = function_hash_of(wasm, hosts, req_limits)
        module = self.sandbox.compile(wasm)
        if sealed_secrets is not None:
            if len(sealed_secrets) > rl.max_secrets_blob:
                raise BadFunction(f"sealed secrets are at most {rl.max_secrets_blob} bytes")
            names = self._open_secrets(fh, sealed_secrets)
            if len(names) > rl.max_secrets:
                raise BadFunction(f"at most {rl.max_secrets} secrets")
        with self._lock:
            known = [p for p in self.dir.iterdir() if p.is_dir()]
            if not (self.dir / fh.hex()).exists() and len(known) >= rl.max_functions:
                raise BadFunction(f"this runtime holds at most {rl.max_functions} functions")
            d = self.dir / fh.hex()
            d.mkdir(exist_ok=True, mode=0o700)
            atomic_write(d / "module.wasm", wasm)
            if sealed_secrets is not None:
                atomic_write(d / "secrets.bin", sealed_secrets)
            rec = FunctionRecord(
                fh, function_id, tuple(hosts), req_limits, (d / "secrets.bin").exists(), int(self.clock())
            )
            atomic_write_json(d / "manifest.json", rec.to_json())
            self._records[fh] = rec
            self._cache_module(fh, module)
        return rec

    def _cache_module(self, fh: bytes, module: wasmtime.Module) -> None:
        self._modules[fh] = module
        self._modules.move_to_end(fh)
        while len(self._modules) > self.limits.max_cached_modules:
            self._modules.popitem(last=False)

    def _open_secrets(self, function_hash: bytes, blob: bytes) -> dict[str, str]:
        from teecloud.keys.envcrypt import decrypt_env
        from teecloud.keys.errors import KeysError

        secret = self.keys.secrets_key(function_hash).private_bytes_raw()
        try:
            return decrypt_env(secret, blob)
        except KeysError as exc:
            raise SecretError(
                "the secrets were not sealed to this function's key (each function's secrets open only "
                f"under its own code hash): {exc}"
            ) from exc

    # --- lookup ---------------------------------------------------------------------------------------------

    def record(self, ref: str) -> FunctionRecord:
        """A function by its hash (64 hex) or its registry address (40 hex), 0x optional."""
        h = ref.lower().removeprefix("0x")
        if len(h) not in (40, 64) or any(c not in "0123456789abcdef" for c in h):
            raise UnknownFunction(f"{ref!r} is neither a function hash nor a function id")
        if len(h) == 40:
            found = [r for r in self.functions() if r.function_id == bytes.fromhex(h)]
            if not found:
                raise UnknownFunction(f"no function with id 0x{h}")
            if self.registry_check is not None and len(found) > 1:
                # anyone may deploy code naming any function id: by id, run a version its registry allows
                allowed = [r for r in found if self._registry_allows(r)[0]]
                found = allowed or found
            return max(found, key=lambda r: r.deployed_at)
        fh = bytes.fromhex(h)
        with self._lock:
            rec = self._records.get(fh)
        if rec is not None:
            return rec
        return self._load(fh)

    def _registry_allows(self, rec: FunctionRecord) -> tuple[bool, str]:
        assert self.registry_check is not None
        if rec.function_id is None:
            return False, "no function_id"
        try:
            return self.registry_check(rec.function_id, rec.function_hash, self.keys.identity().app_id)
        except Error as exc:  # the chain (or a contract that is not a registry) failed to answer
            raise RegistryUnavailable(f"cannot read the function's registry: {exc}") from exc

    def _load(self, fh: bytes) -> FunctionRecord:
        path = self.dir / fh.hex() / "manifest.json"
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UnknownFunction(f"no function 0x{fh.hex()}") from exc
        fid = m.get("function_id")
        rec = FunctionRecord(
            fh,
            bytes.fromhex(fid[2:]) if fid else None,
            tuple(m["allowed_hosts"]),
            dict(m["limits"]),
            bool(m["has_secrets"]),
            int(m["deployed_at"]),
        )
        with self._lock:
            self._records[fh] = rec
        return rec

    def functions(self) -> list[FunctionRecord]:
        out = []
        for p in sorted(self.dir.iterdir()):
            if p.is_dir() and len(p.name) == 64:
                try:
                    out.append(self.record(p.name))
                except UnknownFunction:
                    continue
        return out

    def _module(self, fh: bytes) -> wasmtime.Module:
        with self._lock:
            m = self._modules.get(fh)
        if m is not None:
            return m
        m = self.sandbox.compile((self.dir / fh.hex() / "module.wasm").read_bytes())
        with self._lock:
            self._cache_module(fh, m)
        return m

    # --- invoke ---------------------------------------------------------------------------------------------

    def invoke(
        self,
        ref: str,
        input_bytes: bytes,
        *,
        request_id: bytes | None = None,
        ttl_s: int = 300,
        oracle: bool = False,
    ) -> Invocation:
        """Run a function once for `request_id` (random if None) and sign its result.

        Request ids in the oracles' id space (result.ORACLE_ID_TAG) are run only with `oracle=True`, which
        only the oracle watcher passes, for a request it read from the chain; every other caller's id must lie
        outside it (ReservedRequestId, HTTP 409). So no caller can take an oracle's future request id in the
        claim journal first, nor obtain a signed result to post for it.

        Steps: (1) the function and its limits; (2) its registry allows this code and this runtime;
        (3) claim the request id (at most once); (4) run in a fresh isolate; (5) sign."""
        # (1)
        rec = self.record(ref)
        limits = self.max_limits.lowered_by(rec.limits)
        if not 1 <= ttl_s <= self.limits.max_result_ttl_s:
            raise BadFunction(f"ttl_s is 1..{self.limits.max_result_ttl_s}")
        if request_id is None:
            if oracle:
                raise BadFunction("an oracle request has the oracle's request id")
            request_id = os.urandom(32)
            while is_oracle_request_id(request_id):  # 2**-64
                request_id = os.urandom(32)
        if len(request_id) != 32:
            raise BadFunction("request_id is 32 bytes")
        if is_oracle_request_id(request_id) != oracle:
            if oracle:
                raise BadFunction(f"0x{request_id.hex()} is not a FunctionOracle request id")
            raise ReservedRequestId(
                f"request id 0x{request_id.hex()} is in FunctionOracle's id space (it starts with "
                f"0x{ORACLE_ID_TAG.hex()}): it is answered only to the oracle's own request on chain; "
                "choose an id that does not start with that tag"
            )
        if len(input_bytes) > limits.input_bytes:
            raise BadFunction(f"input is {len(input_bytes)} bytes, above {limits.input_bytes}")
        ident = self.keys.identity()
        # (2)
        function_id = rec.function_id or b"\0" * 20
        if self.registry_check is not None:
            if rec.function_id is None:
                raise NotAllowed("this runtime runs only functions registered on chain (no function_id)")
            ok, reason = self._registry_allows(rec)
            if not ok:
                raise NotAllowed(f"the function registry refuses: {reason}")
        expiry = int(self.clock()) + ttl_s
        # (3)
        self._claims.claim(rec.function_hash, request_id, expiry)
        # (4)
        fetcher = Fetcher(
            self.fetch_policy,
            self._http,
            frozenset(rec.allowed_hosts),
            max_requests=limits.http_requests,
            timeout_s=limits.http_timeout_ms / 1000,
            max_bytes=limits.http_response_bytes,
        )
        secrets: dict[str, str] | None = None

        def secret(name: str) -> bytes | None:
            nonlocal secrets
            if secrets is None:
                path = self.dir / rec.function_hash.hex() / "secrets.bin"
                secrets = self._open_secrets(rec.function_hash, path.read_bytes()) if path.exists() else {}
            v = secrets.get(name)
            return v.encode() if v is not None else None

        module = self._module(rec.function_hash)
        try:
            output, report = self.sandbox.run(
                module,
                input_bytes,
                limits,
                fetcher,
                secret,
                max_log_lines=self.limits.max_log_lines_per_call,
                max_log_chars=self.limits.max_log_line_chars,
            )
        except InvocationFailed as exc:
            self._log(rec.function_hash, request_id, "failed", str(exc), exc.report, [])
            raise
        # (5)
        key = self.keys.signing_key(rec.function_hash)
        result = SignedResult.sign(
            key.secret,
            key.public_key,
            key.signature_chain,
            request_id=request_id,
            function_id=function_id,
            function_hash=rec.function_hash,
            input_hash=keccak(input_bytes),
            output=output,
            expiry=expiry,
            runtime_app_id=ident.app_id,
            runtime_compose_hash=ident.compose_hash,
        )
        self._log(rec.function_hash, request_id, "ok", "", report.as_dict(), report.logs)
        return Invocation(result, report, report.logs)

    # --- logs -----------------------------------------------------------------------------------------------

    def _ring(self, fh: bytes) -> deque[dict[str, Any]]:
        """The function's last calls, in memory; loaded from (and trimmed in) log.jsonl the first time."""
        ring = self._logs.get(fh)
        if ring is None:
            ring = deque(maxlen=self.limits.max_log_lines)
            path = self.dir / fh.hex() / "log.jsonl"
            try:
                lines = path.read_text().splitlines()[-self.limits.max_log_lines :]
            except OSError:
                lines = []
            for ln in lines:
                try:
                    ring.append(json.loads(ln))
                except ValueError:
                    continue
            if lines:
                atomic_write(path, "".join(json.dumps(e) + "\n" for e in ring).encode())
            self._logs[fh] = ring
        return ring

    def _log(
        self, fh: bytes, request_id: bytes, status: str, error: str, report: dict[str, Any], lines: list[str]
    ) -> None:
        """Logs are for the developer, not state: appended without fsync, kept in a bounded ring."""
        entry = {
            "time": int(self.clock()),
            "request_id": "0x" + request_id.hex(),
            "status": status,
            "error": error[:512],
            "report": report,
            "logs": lines,
        }
        with self._lock:
            self._ring(fh).append(entry)
            fd = os.open(self.dir / fh.hex() / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (json.dumps(entry) + "\n").encode())
            finally:
                os.close(fd)

    def logs(self, ref: str, *, limit: int = 50) -> list[dict[str, Any]]:
        rec = self.record(ref)
        with self._lock:
            ring = list(self._ring(rec.function_hash))
        return ring[-max(1, min(limit, self.limits.max_log_lines)) :]


def describe_error(exc: FunctionError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": type(exc).__name__, "detail": str(exc)}
    if isinstance(exc, InvocationFailed):
        body["report"] = exc.report
        limit = getattr(exc, "limit", None)
        if limit:
            body["limit"] = limit
    return body
