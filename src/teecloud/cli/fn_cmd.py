"""`teecloud fn ...`: deploy, call and check attested functions (docs/functions.md).

    teecloud fn serve [--port 8090]                          run the runtime (inside the runtime app)
    teecloud fn deploy FILE [--secret K=V]... [--allow-host H]... [--limit NAME=N]... [--register APP_ID]
    teecloud fn call ID [--input JSON]                       prints the signed result and the call's report
    teecloud fn logs ID
    teecloud fn verify RESULT [--kms-root HEX]               offline check of a signed result
    teecloud fn upgrade FUNCTION_ID OLD_HASH NEW_HASH        through the registry's governance

The runtime's URL: --url, else $TEECLOUD_FN_URL, else http://127.0.0.1:8090. The KMS root public key
(to check a result or the runtime's secrets key): --kms-root, else the one recorded in KmsAuth.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from teecloud.cli._chain_common import client as chain_client
from teecloud.cli._chain_common import friendly, group
from teecloud.errors import Error

__all__ = ["app"]

app = group("Attested off-chain functions: deploy, call, logs, verify.")
DEFAULT_URL = "http://127.0.0.1:8090"
MAX_FILE = 8 << 20

UrlOpt = Annotated[str | None, typer.Option("--url", help="the runtime's URL (else $TEECLOUD_FN_URL)")]
RootOpt = Annotated[
    str | None, typer.Option("--kms-root", help="KMS root k256 public key (hex); else read from KmsAuth")
]


def _url(url: str | None) -> str:
    return url or os.environ.get("TEECLOUD_FN_URL") or DEFAULT_URL


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE:
            _fail(f"{path} is larger than {MAX_FILE} bytes", 2)
        return path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}", 2)
    raise AssertionError


def _module(path: Path) -> bytes:
    """A .wasm module, or WebAssembly text (.wat) compiled here."""
    data = _read(path)
    if data[:4] == b"\0asm":
        return data
    import wasmtime

    try:
        return bytes(wasmtime.wat2wasm(data.decode("utf-8")))
    except (UnicodeDecodeError, wasmtime.WasmtimeError) as exc:
        _fail(
            f"{path} is neither a WebAssembly module nor valid WebAssembly text: {str(exc).splitlines()[0]}",
            2,
        )
    raise AssertionError


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            _fail(f"{what} must be NAME=VALUE, got {item!r}", 2)
        out[k] = v
    return out


def _hex(text: str, what: str, size: int | None = None) -> bytes:
    try:
        b = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        _fail(f"{what} is not hex", 2)
        raise
    if size is not None and len(b) != size:
        _fail(f"{what} must be {size} bytes", 2)
    return b


def _kms_root(ctx: typer.Context, kms_root: str | None) -> bytes:
    if kms_root:
        return _hex(kms_root, "--kms-root")
    with chain_client(ctx) as chain:
        root = chain.kms.info().k256_pubkey
    if not root:
        _fail("no KMS root recorded in KmsAuth: pass --kms-root", 2)
    return bytes(root)


def _print(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


def _guest_agent_keys(endpoint: str | None) -> Any:
    """The guest agent's key source, or a clear error when its socket is not there (the dstack SDK raises
    FileNotFoundError at construction)."""
    from teecloud.functions import GuestAgentKeys

    try:
        return GuestAgentKeys(endpoint)
    except (OSError, ValueError) as exc:
        where = endpoint or os.environ.get("DSTACK_SIMULATOR_ENDPOINT") or "/var/run/dstack.sock"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unusable"
        if isinstance(exc, FileNotFoundError):
            reason = "no such socket"
        _fail(
            f"cannot reach the guest agent at {where} ({reason}): `fn serve` runs inside a CVM, where the "
            "agent serves /var/run/dstack.sock; elsewhere give --dstack-sock with the socket of "
            "`teecloud agent simulate`",
            2,
        )
    raise AssertionError


def _trust(pem: str | None) -> ssl.SSLContext | None:
    """The system's roots plus the given CA certificates; None (the system's roots) when none given."""
    if not pem or not pem.strip():
        return None
    ctx = ssl.create_default_context()
    try:
        ctx.load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        _fail(f"TEECLOUD_FN_TRUST_PEM / --trust-pem is not a PEM certificate bundle ({exc})", 2)
    return ctx


@app.command("serve")
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8090,
    dstack_sock: Annotated[str | None, typer.Option(help="guest agent socket")] = None,
    check_registry: Annotated[bool, typer.Option(help="run only code its FunctionRegistry allows")] = True,
    oracle: Annotated[
        str | None,
        typer.Option(envvar="TEECLOUD_FN_ORACLE", help="answer this FunctionOracle's requests"),
    ] = None,
    poll_s: Annotated[float, typer.Option(min=0.2, max=60, help="oracle polling interval")] = 2.0,
    trust_pem: Annotated[
        str | None,
        typer.Option(
            envvar="TEECLOUD_FN_TRUST_PEM",
            help="extra CA certificates (PEM text) `fetch` trusts beside the system's roots",
        ),
    ] = None,
    allow_private_addresses: Annotated[
        bool,
        typer.Option(
            envvar="TEECLOUD_FN_ALLOW_PRIVATE_ADDRESSES",
            help="development only: let `fetch` read answers from loopback/private addresses",
        ),
    ] = False,
) -> None:
    """Run the function runtime (what the runtime app's container runs), keys from the guest agent."""
    from teecloud._fs import data_home
    from teecloud.chain.functions import FunctionRegistry
    from teecloud.functions import FetchPolicy, FunctionKeys, FunctionRuntime
    from teecloud.functions.http import FunctionServer

    policy = FetchPolicy(trust=_trust(trust_pem), allow_private_addresses=allow_private_addresses)
    keys = _guest_agent_keys(dstack_sock)
    check = None
    chain = None
    if check_registry:
        chain = reader = chain_client(ctx)

        def check(function_id: bytes, function_hash: bytes, app_id: bytes) -> tuple[bool, str]:
            return FunctionRegistry(reader, function_id).is_allowed(function_hash, app_id)

    rt = FunctionRuntime(data_home(), FunctionKeys(keys), fetch_policy=policy, registry_check=check)
    stop = threading.Event()
    relayer = None
    if oracle:
        from eth_account import Account

        from teecloud.chain.functions import FunctionOracle
        from teecloud.functions.oncall import OracleWatcher, relayer_key

        if chain is None:
            chain = chain_client(ctx)
        key = relayer_key(rt)
        relayer = Account.from_key(key).address
        watcher = OracleWatcher(
            rt, FunctionOracle(chain.with_signer(key), oracle), from_block=chain.block_number()
        )

        def loop() -> None:
            while not stop.wait(poll_s):
                try:
                    watcher.poll()
                except Error as exc:  # the chain went away for a while: keep polling
                    typer.echo(f"oracle poll failed: {exc.diagnostics()}", err=True)

        threading.Thread(target=loop, name="fn-oracle", daemon=True).start()
        typer.echo(f"answering FunctionOracle {oracle} as relayer {relayer} (fund it)")
    server = FunctionServer(rt, host=host, port=port, relayer=relayer)
    typer.echo(f"functions runtime listening on http://{host}:{port}")
    try:
        server.serve_forever()
    finally:
        stop.set()
        rt.close()
        if chain is not None:
            chain.close()


@app.command("deploy")
@friendly
def deploy(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="the function: .wasm, or WebAssembly text")],
    secret: Annotated[
        list[str] | None, typer.Option("--secret", help="NAME=VALUE, sealed to the function")
    ] = None,
    allow_host: Annotated[
        list[str] | None, typer.Option("--allow-host", help="host[:port] it may fetch")
    ] = None,
    limit: Annotated[
        list[str] | None, typer.Option("--limit", help="NAME=N, lowering a runtime limit")
    ] = None,
    register: Annotated[
        str | None,
        typer.Option("--register", help="deploy its FunctionRegistry on chain for this runtime app"),
    ] = None,
    function_id: Annotated[
        str | None, typer.Option("--function-id", help="an existing FunctionRegistry")
    ] = None,
    url: UrlOpt = None,
    kms_root: RootOpt = None,
) -> None:
    """Deploy a function to the runtime (and, with --register, its registry on chain)."""
    from teecloud.chain.functions import deploy_function_registry
    from teecloud.functions.client import FunctionsClient
    from teecloud.functions.service import function_hash_of, normalize_hosts

    wasm = _module(file)
    limits: dict[str, int] = {}
    for k, v in _pairs(limit or [], "--limit").items():
        if not v.isdigit():
            _fail(f"--limit {k} must be a positive integer", 2)
        limits[k] = int(v)
    secrets = _pairs(secret or [], "--secret")
    hosts = normalize_hosts(list(allow_host or []))
    fid = _hex(function_id, "--function-id", 20) if function_id else None
    if register:
        if fid is not None:
            _fail("--register and --function-id exclude each other", 2)
        with chain_client(ctx) as chain:
            owner = chain.address
            if owner is None:
                _fail("registering needs a signer (--key-file or $TEECLOUD_CHAIN_KEY)", 2)
            fh = function_hash_of(wasm, hosts, limits)
            reg = deploy_function_registry(chain, str(owner), file.stem[:64], register, fh)
            fid = bytes.fromhex(reg.address[2:])
    root = _kms_root(ctx, kms_root) if secrets else None
    try:
        rec = FunctionsClient(_url(url)).deploy(
            wasm,
            allowed_hosts=hosts,
            limits=limits,
            secrets=secrets,
            kms_root_public_key=root,
            function_id=fid,
        )
    except Error as exc:
        _fail(exc.diagnostics())
    _print(rec)


@app.command("call")
def call(
    ref: Annotated[str, typer.Argument(help="function hash or function id")],
    input: Annotated[
        str | None, typer.Option("--input", help="the input (JSON or text), sent as UTF-8")
    ] = None,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="32-byte hex (random if absent)")
    ] = None,
    ttl: Annotated[int, typer.Option("--ttl", min=1, max=3600, help="seconds the result stays valid")] = 300,
    url: UrlOpt = None,
) -> None:
    """Run a function once; print its signed result, output and report."""
    from teecloud.functions.client import FunctionsClient

    rid = _hex(request_id, "--request-id", 32) if request_id else None
    try:
        _, body = FunctionsClient(_url(url)).call(ref, input or "", request_id=rid, ttl_s=ttl)
    except httpx.InvalidURL:  # a ref with characters no URL can carry
        _fail(f"{ref[:80]!r} is not a function hash or function id")
        raise
    except Error as exc:
        _fail(exc.diagnostics())
        raise
    _print(body)


@app.command("logs")
def logs(
    ref: Annotated[str, typer.Argument(help="function hash or function id")],
    limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
    url: UrlOpt = None,
) -> None:
    """The function's last calls: status, error, report, log lines."""
    from teecloud.functions.client import FunctionsClient

    try:
        entries = FunctionsClient(_url(url)).logs(ref, limit=limit)
    except httpx.InvalidURL:  # a ref with characters no URL can carry
        _fail(f"{ref[:80]!r} is not a function hash or function id")
        raise
    except Error as exc:
        _fail(exc.diagnostics())
        raise
    for e in entries:
        typer.echo(json.dumps(e, sort_keys=True))


@app.command("verify")
def verify(
    ctx: typer.Context,
    result: Annotated[Path, typer.Argument(help="a signed result (JSON; `fn call` output or its `result`)")],
    kms_root: RootOpt = None,
    function_hash: Annotated[
        str | None, typer.Option("--function-hash", help="the function it must be")
    ] = None,
    at: Annotated[int | None, typer.Option("--at", help="unix time to check expiry at (default now)")] = None,
) -> None:
    """Offline check of a signed result: signature, GetKey chain up to the KMS root, expiry. Exit 0 if valid,
    1 if rejected, 2 on a usage error."""
    from teecloud.functions import FunctionError, SignedResult, verify_result

    data = _read(result)
    try:
        doc = json.loads(data)
    except ValueError:
        _fail(f"{result} is not JSON", 2)
    if isinstance(doc, dict) and isinstance(doc.get("result"), dict):
        doc = doc["result"]
    root = _kms_root(ctx, kms_root)
    fh = _hex(function_hash, "--function-hash", 32) if function_hash else None
    try:
        r = SignedResult.from_json(doc)
        verify_result(
            r, kms_root_public_key=root, now=at if at is not None else int(time.time()), function_hash=fh
        )
    except FunctionError as exc:
        typer.echo(f"REJECTED: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"valid: function 0x{r.function_hash.hex()} on runtime app 0x{r.runtime_app_id.hex()}, "
        f"request 0x{r.request_id.hex()}, expires {r.expiry}"
    )


@app.command("upgrade")
@friendly
def upgrade(
    ctx: typer.Context,
    function_id: Annotated[str, typer.Argument(help="the function's FunctionRegistry address")],
    old: Annotated[str, typer.Argument(help="the code hash to retire")],
    new: Annotated[str, typer.Argument(help="the code hash to allow")],
) -> None:
    """Replace a version by another, the way the registry's owner requires (direct, multisig, timelock)."""
    from teecloud.chain.functions import FunctionRegistry

    with chain_client(ctx) as chain:
        action = FunctionRegistry(chain, function_id).propose_upgrade(
            _hex(old, "OLD", 32), _hex(new, "NEW", 32)
        )
    typer.echo(f"{action.kind}: {action.ident or action.tx} (decided by {action.governance})")
