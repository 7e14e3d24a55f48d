"""`teecloud chain ...`, `teecloud app ...`, `teecloud node ...`: on-chain governance from the command line.

Global options of each group: --rpc-url (default: the embedded chain of data_home(), through the JSON-RPC URL
that `teecloud chain up` records, else opened in-process) and --key-file (else $TEECLOUD_CHAIN_KEY; on the
embedded chain, dev account 0). Keys are never printed.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["register"]

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

chain_app = typer.Typer(
    help="Run or deploy the teecloud chain (KmsAuth, app factory, NodeRegistry).", no_args_is_help=True
)
app_app = typer.Typer(help="Register apps and govern their allowed compose hashes.", no_args_is_help=True)
node_app = typer.Typer(help="Worker-node marketplace: stake, unstake, claim.", no_args_is_help=True)

RpcOpt = typer.Option(
    None, "--rpc-url", envvar="TEECLOUD_RPC_URL", help="Ethereum JSON-RPC URL (default: embedded)"
)
KeyOpt = typer.Option(None, "--key-file", help="signer key file (hex or keystore); else $TEECLOUD_CHAIN_KEY")


def _options(ctx: typer.Context, rpc_url: str | None, key_file: Path | None) -> None:
    ctx.ensure_object(dict)
    ctx.obj["rpc_url"] = rpc_url
    ctx.obj["key_file"] = key_file


@chain_app.callback()
def _chain_cb(ctx: typer.Context, rpc_url: str | None = RpcOpt, key_file: Path | None = KeyOpt) -> None:
    _options(ctx, rpc_url, key_file)


@app_app.callback()
def _app_cb(ctx: typer.Context, rpc_url: str | None = RpcOpt, key_file: Path | None = KeyOpt) -> None:
    _options(ctx, rpc_url, key_file)


@node_app.callback()
def _node_cb(ctx: typer.Context, rpc_url: str | None = RpcOpt, key_file: Path | None = KeyOpt) -> None:
    _options(ctx, rpc_url, key_file)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def friendly(fn: F) -> F:
    """Clear message and exit 1 for every expected failure; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from teecloud.chain import ChainError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ChainError as exc:
            _fail(exc.diagnostics())
        except (ValueError, OSError) as exc:
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _client(ctx: typer.Context) -> Any:
    from teecloud.chain import ChainClient, load_signer_key

    obj = ctx.find_root().obj or {}
    for c in (ctx, ctx.parent):
        if c is not None and isinstance(c.obj, dict):
            obj = c.obj
    key = load_signer_key(obj.get("key_file"))
    if obj.get("rpc_url"):
        return ChainClient.rpc(obj["rpc_url"], key)
    return ChainClient.embedded(None, key)


def _hash(text: str, what: str = "hash") -> bytes:
    t = text.strip().removeprefix("0x")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", t):
        raise ValueError(f"{what} must be 32 bytes of hex (64 hex digits)")
    return bytes.fromhex(t)


_UNITS = {"wei": 1, "gwei": 10**9, "eth": 10**18, "ether": 10**18}


def _amount(text: str) -> int:
    """'1000' (wei), '1.5eth', '20gwei'."""
    from decimal import Decimal, InvalidOperation

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in ({""} | set(_UNITS)):
        raise ValueError(f"not an amount: {text!r} (e.g. 1000, 20gwei, 0.5eth)")
    try:
        value = Decimal(m.group(1)) * _UNITS.get(m.group(2).lower() or "wei", 1)
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of wei")
    return int(value)


def _print_json(obj: Any) -> None:
    def conv(v: Any) -> Any:
        if isinstance(v, bytes):
            return "0x" + v.hex()
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if hasattr(v, "__dataclass_fields__"):
            import dataclasses

            return conv(dataclasses.asdict(v))
        return v

    sys.stdout.write(json.dumps(conv(obj), indent=2) + "\n")


# --- chain -------------------------------------------------------------------------------------------------


@chain_app.command("up")
@friendly
def chain_up(
    port: int = typer.Option(8545, "--port", help="port of the JSON-RPC endpoint (0 = any free port)"),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to bind (keep 127.0.0.1 unless you mean it)"
    ),
    deploy: bool = typer.Option(True, "--deploy/--no-deploy", help="deploy KmsAuth + factories if missing"),
) -> None:
    """Run the embedded chain (py-evm) and serve it over JSON-RPC until interrupted."""
    from teecloud._fs import data_home
    from teecloud.chain import DEV_KEYS, ChainClient, ChainRpcServer, EmbeddedChain
    from teecloud.chain.client import LocalTransport

    chain = EmbeddedChain(data_home() / "chain")
    try:
        server = ChainRpcServer(chain, host, port)
    except OSError as exc:
        chain.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/yellow] the chain's JSON-RPC is reachable beyond this machine ({host})")
    deployment: dict[str, Any] = {}
    if deploy:
        client = ChainClient(LocalTransport(chain), DEV_KEYS[0], label="embedded")
        deployment = client.deploy()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    out.print(
        f"chain: embedded py-evm, chain id {int(chain.request('eth_chainId'), 16)}, "
        f"{chain.replayed} journal entries replayed"
    )
    for name, addr in deployment.items():
        if name not in ("chain_id", "deployed_at_block"):
            out.print(f"  {name}: {addr}")
    out.print(f"RPC URL: {server.url}", highlight=False)
    sys.stdout.flush()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        chain.close()


@chain_app.command("deploy")
@friendly
def chain_deploy(ctx: typer.Context) -> None:
    """Deploy KmsAuth, the AppAuth factory and NodeRegistry (once; safe to re-run)."""
    with _client(ctx) as c:
        d = c.deploy()
        for name, addr in d.items():
            out.print(f"{name}: {addr}", highlight=False)


@chain_app.command("status")
@friendly
def chain_status(ctx: typer.Context) -> None:
    """Chain id, head block and teecloud's contract addresses."""
    with _client(ctx) as c:
        out.print(f"chain: {c.label}  id {c.chain_id}  block {c.block_number()}", highlight=False)
        d = c.deployment
        if not d:
            out.print("teecloud contracts: not deployed (run `teecloud chain deploy`)")
        for name, addr in d.items():
            out.print(f"  {name}: {addr}", highlight=False)


@chain_app.command("allow-os-image")
@friendly
def chain_allow_os_image(ctx: typer.Context, os_image_hash: str) -> None:
    """KmsAuth owner: allow an OS image hash."""
    with _client(ctx) as c:
        c.add_os_image(_hash(os_image_hash, "OS image hash"))
        out.print(f"OS image allowed: 0x{_hash(os_image_hash).hex()}")


# --- app ---------------------------------------------------------------------------------------------------


@app_app.command("register")
@friendly
def app_register(
    ctx: typer.Context,
    app_compose: Path = typer.Argument(..., help="app-compose.json"),
    owner: str | None = typer.Option(None, "--owner", help="owner address (default: the signer)"),
    multisig: str | None = typer.Option(None, "--multisig", help="comma-separated owner addresses"),
    threshold: int | None = typer.Option(None, "--threshold", help="approvals needed (with --multisig)"),
    timelock: int | None = typer.Option(None, "--timelock", help="minimum delay in seconds before a change"),
    device: list[str] = typer.Option([], "--device", help="allowed device id (repeatable); default: any"),
    require_tcb: bool = typer.Option(False, "--require-tcb-up-to-date"),
    disable_upgrades: bool = typer.Option(
        False, "--disable-upgrades", help="freeze this compose hash forever"
    ),
) -> None:
    """Deploy an AppAuth for APP_COMPOSE and register it; prints the app_id."""
    from teecloud.chain import compose_hash

    try:
        compose = json.loads(app_compose.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{app_compose} is not valid JSON: {exc}") from None
    h = compose_hash(compose)
    if owner and (multisig or timelock is not None):
        raise ValueError("--owner excludes --multisig/--timelock")
    if (multisig is None) != (threshold is None):
        raise ValueError("--multisig and --threshold go together")
    with _client(ctx) as c:
        final_owner = owner or c.address
        if multisig:
            owners = [a.strip() for a in multisig.split(",") if a.strip()]
            final_owner = c.deploy_multisig(owners, threshold)
            out.print(f"multisig ({threshold}-of-{len(owners)}): {final_owner}", highlight=False)
        if timelock is not None:
            final_owner = c.deploy_timelock(final_owner, timelock)
            out.print(f"timelock ({timelock} s): {final_owner}", highlight=False)
        app_id = c.register_app(
            final_owner,
            h,
            allow_any_device=not device,
            device_id=_hash(device[0], "device id") if device else None,
            require_tcb_up_to_date=require_tcb,
            disable_upgrades=disable_upgrades,
        )
        for d in device[1:]:
            c.propose_app_change(app_id, "add_device", _hash(d, "device id"))
        out.print(f"compose hash: 0x{h.hex()}", highlight=False)
        out.print(f"app_id: {app_id}", highlight=False)


@app_app.command("allow-hash")
@friendly
def app_allow_hash(ctx: typer.Context, app_id: str, compose_hash: str) -> None:
    """Allow a compose hash (owner = this signer; otherwise use `app upgrade propose`)."""
    with _client(ctx) as c:
        _direct_or_hint(c, app_id, "add_compose_hash", _hash(compose_hash, "compose hash"))


@app_app.command("remove-hash")
@friendly
def app_remove_hash(ctx: typer.Context, app_id: str, compose_hash: str) -> None:
    """Remove an allowed compose hash (owner = this signer)."""
    with _client(ctx) as c:
        _direct_or_hint(c, app_id, "remove_compose_hash", _hash(compose_hash, "compose hash"))


def _direct_or_hint(c: Any, app_id: str, fn: str, arg: bytes) -> None:
    kind = c.governance_kind(c.app_owner(app_id))
    if kind != "account":
        raise ValueError(f"app {app_id} is governed by a {kind}: use `teecloud app upgrade propose`")
    c.propose_app_change(app_id, fn, arg)
    out.print(f"{fn.replace('_', ' ')}: 0x{arg.hex()}")


upgrade_app = typer.Typer(help="Governed changes: propose, approve, execute.", no_args_is_help=True)
app_app.add_typer(upgrade_app, name="upgrade")


@upgrade_app.command("propose")
@friendly
def upgrade_propose(
    ctx: typer.Context,
    app_id: str,
    compose_hash: str | None = typer.Argument(None, help="new compose hash (or --compose FILE)"),
    compose: Path | None = typer.Option(None, "--compose", help="app-compose.json to hash"),
    remove: bool = typer.Option(False, "--remove", help="propose removing the hash instead"),
) -> None:
    """Propose allowing (or removing) a compose hash, the way the app's owner requires."""
    from teecloud.chain import compose_hash as hash_of

    if (compose_hash is None) == (compose is None):
        raise ValueError("give either a COMPOSE_HASH or --compose FILE")
    h = _hash(compose_hash, "compose hash") if compose_hash else hash_of(json.loads(compose.read_text()))  # type: ignore[union-attr]
    with _client(ctx) as c:
        res = c.propose_app_change(app_id, "remove_compose_hash" if remove else "add_compose_hash", h)
        out.print(f"compose hash: 0x{h.hex()}", highlight=False)
        if res["kind"] == "direct":
            out.print("applied directly (the app is owned by this signer)")
        elif res["kind"] == "timelock":
            out.print(
                f"queued in timelock {res['governance']}: call id {res['id']}, executable from unix time "
                f"{res['eta']}",
                highlight=False,
            )
        else:
            out.print(
                f"proposal {res['id']} in multisig {res['governance']} ({res['kind']})", highlight=False
            )


def _governance_for(c: Any, app_id: str, ident: str) -> tuple[str, str]:
    owner = c.app_owner(app_id)
    kind = c.governance_kind(owner)
    if ident.startswith("0x"):
        if kind != "timelock":
            raise ValueError(f"app {app_id} is not owned by a timelock")
        return "timelock", owner
    if kind == "multisig":
        return "multisig", owner
    if kind == "timelock":
        admin = c.call("Timelock", owner, "admin")
        if c.governance_kind(admin) == "multisig":
            return "multisig", admin
    raise ValueError(f"app {app_id} has no multisig ({kind} owner)")


@upgrade_app.command("approve")
@friendly
def upgrade_approve(ctx: typer.Context, app_id: str, proposal_id: int) -> None:
    """Approve a multisig proposal."""
    with _client(ctx) as c:
        _, ms = _governance_for(c, app_id, str(proposal_id))
        c.multisig_approve(ms, proposal_id)
        p = c.multisig_proposal(ms, proposal_id)
        out.print(f"approved: {p['approvals']}/{p['threshold']}")


@upgrade_app.command("execute")
@friendly
def upgrade_execute(
    ctx: typer.Context, app_id: str, ident: str = typer.Argument(..., help="proposal id or 0x call id")
) -> None:
    """Execute a multisig proposal (enough approvals) or a timelock call (delay passed)."""
    with _client(ctx) as c:
        kind, gov = _governance_for(c, app_id, ident)
        if kind == "timelock":
            c.timelock_execute(gov, ident)
        else:
            c.multisig_execute(gov, int(ident))
        out.print(f"executed {ident} in {kind} {gov}", highlight=False)


@upgrade_app.command("cancel")
@friendly
def upgrade_cancel(ctx: typer.Context, app_id: str, ident: str) -> None:
    """Cancel a timelock call (admin) or a multisig proposal (its proposer)."""
    with _client(ctx) as c:
        kind, gov = _governance_for(c, app_id, ident)
        if kind == "timelock":
            c.timelock_cancel(gov, ident)
        else:
            c.transact("Multisig", gov, "cancel", int(ident))
        out.print(f"cancelled {ident}")


@app_app.command("show")
@friendly
def app_show(ctx: typer.Context, app_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Allowed hashes, owners, pending upgrades and history (from contract events)."""
    with _client(ctx) as c:
        st = c.app_state(app_id)
        if as_json:
            _print_json(st)
            return
        out.print(f"app_id: {st.app_id}  registered: {st.registered}", highlight=False)
        out.print(f"owner: {st.owner} ({st.owner_kind})", highlight=False)
        if "multisig" in st.governance:
            ms = st.governance["multisig"]
            out.print(
                f"  multisig {ms['address']}: {ms['threshold']}-of-{len(ms['owners'])} "
                f"{', '.join(ms['owners'])}",
                highlight=False,
            )
        if "timelock" in st.governance:
            tl = st.governance["timelock"]
            out.print(
                f"  timelock {tl['address']}: delay {tl['min_delay']} s, admin {tl['admin']}", highlight=False
            )
        out.print(
            f"upgrades disabled: {st.upgrades_disabled}  any device: {st.allow_any_device}  "
            f"require TCB UpToDate: {st.require_tcb_up_to_date}"
        )
        out.print("allowed compose hashes:")
        for h in st.allowed_compose_hashes:
            out.print(f"  {h}", highlight=False)
        for d in st.allowed_device_ids:
            out.print(f"  device {d}", highlight=False)
        # plain lines, not a table: ids must stay whole so they can be copied into `upgrade approve|execute`
        out.print("pending upgrades:" if st.pending else "pending upgrades: none")
        for p in st.pending:
            args = ", ".join("0x" + a.hex() if isinstance(a, bytes) else str(a) for a in p.args)
            when = (
                f"executable from unix time {p.eta}"
                if p.eta is not None
                else f"approvals {p.approvals}/{p.threshold}"
            )
            out.print(f"  {p.kind} {p.ident}: {p.function}({args}) on {p.target}; {when}", highlight=False)
        t = Table(title="history")
        for col in ("block", "source", "event", "details"):
            t.add_column(col, overflow="fold")
        for e in st.history:
            details = ", ".join(
                f"{k}={'0x' + v.hex() if isinstance(v, bytes) else v}"
                for k, v in e["args"].items()
                if k != "data"
            )
            t.add_row(str(e["block"]), e["source"], e["event"], details)
        out.print(t)


# --- node --------------------------------------------------------------------------------------------------


@node_app.command("register")
@friendly
def node_register(
    ctx: typer.Context,
    tee: str = typer.Option("tdx", "--tee", help="TEE kind (tdx, sev-snp, nitro, ...)"),
    device_id: str = typer.Option(..., "--device-id", help="32-byte hex device id"),
    attestation_hash: str = typer.Option(..., "--attestation-hash", help="hash of the node's attestation"),
    capacity: int = typer.Option(..., "--capacity", help="CVMs the node can run"),
    price: str = typer.Option(..., "--price", help="price per CVM-hour (wei, gwei, eth)"),
    stake: str = typer.Option(..., "--stake", help="stake to lock (wei, gwei, eth)"),
) -> None:
    """Register a worker node with a stake."""
    with _client(ctx) as c:
        nid = c.register_node(
            tee_kind=tee,
            device_id=_hash(device_id, "device id"),
            attestation_hash=_hash(attestation_hash, "attestation hash"),
            capacity=capacity,
            price_per_hour=_amount(price),
            stake=_amount(stake),
        )
        out.print(f"node_id: {nid}")


@node_app.command("stake")
@friendly
def node_stake(ctx: typer.Context, node_id: int, amount: str) -> None:
    """Add stake to a node."""
    with _client(ctx) as c:
        c.stake(node_id, _amount(amount))
        out.print(f"stake: {c.node(node_id)['stake']} wei")


@node_app.command("unstake")
@friendly
def node_unstake(
    ctx: typer.Context,
    node_id: int,
    amount: str | None = typer.Argument(None),
    withdraw: bool = typer.Option(False, "--withdraw", help="collect stake whose delay has passed"),
) -> None:
    """Start unstaking AMOUNT (then wait the delay), or --withdraw what is due."""
    with _client(ctx) as c:
        if withdraw:
            c.withdraw_unstaked(node_id)
            paid = c.withdraw()
            out.print(f"withdrawn: {paid} wei")
            return
        if amount is None:
            raise ValueError("give an AMOUNT, or --withdraw")
        c.request_unstake(node_id, _amount(amount))
        n = c.node(node_id)
        out.print(f"unstaking {n['unstaking']} wei, withdrawable from unix time {n['unstake_ready_at']}")


@node_app.command("claim")
@friendly
def node_claim(
    ctx: typer.Context,
    deployment_id: int,
    served_seconds: int,
    signature: str = typer.Argument(..., help="usage record signature (0x hex, 65 bytes)"),
) -> None:
    """Claim payment for served time with a usage record signed by the deployment's usage signer."""
    sig = (
        bytes.fromhex(signature.removeprefix("0x"))
        if re.fullmatch(r"(0x)?[0-9a-fA-F]{130}", signature)
        else None
    )
    if sig is None:
        raise ValueError("signature must be 65 bytes of hex")
    with _client(ctx) as c:
        paid = c.claim(deployment_id, served_seconds, sig)
        out.print(f"paid: {paid} wei (withdraw with `teecloud node withdraw`)")


@node_app.command("sign-usage")
@friendly
def node_sign_usage(ctx: typer.Context, deployment_id: int, served_seconds: int) -> None:
    """As a deployment's usage signer: sign a cumulative usage record for the node."""
    with _client(ctx) as c:
        out.print("0x" + c.sign_usage(deployment_id, served_seconds).hex(), highlight=False)


@node_app.command("withdraw")
@friendly
def node_withdraw(ctx: typer.Context) -> None:
    """Withdraw everything credited to the signer (rewards, unstaked stake, refunds)."""
    with _client(ctx) as c:
        out.print(f"withdrawn: {c.withdraw()} wei")


@node_app.command("show")
@friendly
def node_show(ctx: typer.Context, node_id: int) -> None:
    with _client(ctx) as c:
        _print_json(c.node(node_id))


def register(app: typer.Typer) -> None:
    app.add_typer(chain_app, name="chain")
    app.add_typer(app_app, name="app")
    app.add_typer(node_app, name="node")
