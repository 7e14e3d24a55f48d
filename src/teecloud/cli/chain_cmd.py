"""`teecloud chain|app|node|escrow ...`: on-chain governance and the node marketplace from the command line.

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
node_app = typer.Typer(
    help="Worker-node marketplace, operator and challenger side: register, stake, claim, slash.",
    no_args_is_help=True,
)
escrow_app = typer.Typer(
    help="Worker-node marketplace, user side: deployment escrows and usage records.", no_args_is_help=True
)

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


@escrow_app.callback()
def _escrow_cb(ctx: typer.Context, rpc_url: str | None = RpcOpt, key_file: Path | None = KeyOpt) -> None:
    _options(ctx, rpc_url, key_file)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def friendly(fn: F) -> F:
    """Clear message and exit 1 for every expected failure; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from eth_abi.exceptions import EncodingError

        from teecloud.chain import ChainError, InsufficientFunds

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except InsufficientFunds as exc:
            _fail(_insufficient(exc, [*args, *kwargs.values()]))
        except ChainError as exc:
            _fail(exc.diagnostics())
        except EncodingError:  # a value the contract's ABI cannot carry (e.g. a number above 2**256)
            _fail("a number is out of range for the contract (at most 2**256 - 1)")
        except (ValueError, OSError) as exc:
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _insufficient(exc: Exception, args: list[Any]) -> str:
    """'insufficient funds' with the signer's address and balance (never its key)."""
    # the command's context (Typer hands over its click context class, so match it by shape)
    obj: dict[str, Any] = next((a.obj for a in args if isinstance(getattr(a, "obj", None), dict)), {})
    client = obj.get("client")
    if client is not None and client.address:
        try:
            balance = client.balance(client.address)
        except Exception:  # the chain went away while reporting: the plain message is enough
            balance = None
        have = f" (balance {_fmt_wei(balance)})" if balance is not None else ""
        return f"insufficient funds: {client.address}{have} cannot pay for the gas and the value sent"
    return f"insufficient funds: {exc}"


def _client(ctx: typer.Context) -> Any:
    """The chain the command talks to. The public dev key is the default signer on the embedded chain of
    data_home() only (in-process or its recorded RPC URL); any other --rpc-url needs --key-file or
    $TEECLOUD_CHAIN_KEY for a command that sends a transaction."""
    from teecloud._fs import data_home
    from teecloud.chain import ChainClient, load_signer_key
    from teecloud.chain.client import running_rpc_url

    obj = ctx.find_root().obj or {}
    for c in (ctx, ctx.parent):
        if c is not None and isinstance(c.obj, dict):
            obj = c.obj
    key = load_signer_key(obj.get("key_file"))
    url = obj.get("rpc_url")
    embedded_url = running_rpc_url(data_home())
    if url and (embedded_url is None or url.rstrip("/") != embedded_url.rstrip("/")):
        client = ChainClient.rpc(url, key)
    else:
        client = ChainClient.embedded(None, key)
    if isinstance(ctx.obj, dict):
        ctx.obj["client"] = client  # for error reports (balance on insufficient funds)
    return client


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
    if value >= 2**256:
        raise ValueError(f"{text!r} is more than an EVM amount can hold (2**256 wei)")
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
    dev_time_travel: bool = typer.Option(
        False,
        "--dev-time-travel",
        help="serve evm_increaseTime/evm_mine (development only: any local process can then skip delays)",
    ),
) -> None:
    """Run the embedded chain (py-evm) and serve it over JSON-RPC until interrupted."""
    from teecloud._fs import data_home
    from teecloud.chain import DEV_KEYS, ChainClient, ChainRpcServer, EmbeddedChain
    from teecloud.chain.client import LocalTransport, running_rpc_url

    running = running_rpc_url(data_home())
    if running is not None:
        raise ValueError(
            f"the embedded chain of {data_home()} is already running at {running} "
            "(only one `teecloud chain up` per TEECLOUD_HOME; connect with --rpc-url)"
        )
    chain = EmbeddedChain(data_home() / "chain")  # takes the chain's file lock (or fails clearly)
    try:
        server = ChainRpcServer(chain, host, port, time_travel=dev_time_travel)
    except OSError as exc:
        chain.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/yellow] the chain's JSON-RPC is reachable beyond this machine ({host})")
    if dev_time_travel:
        err.print(
            "[yellow]warning:[/yellow] time travel is on: any process that reaches the RPC can skip delays"
        )
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


@chain_app.command("repair")
@friendly
def chain_repair() -> None:
    """Start the embedded chain even if its journal does not replay: entries that do not replay are set
    aside in journal.rejected.jsonl (kept, with the reason) and everything else is kept."""
    from teecloud._fs import data_home
    from teecloud.chain import EmbeddedChain

    chain = EmbeddedChain(
        data_home() / "chain", repair=True
    )  # takes the chain's file lock (or fails clearly)
    try:
        if chain.torn_tail:
            out.print(f"cut off a torn last entry ({len(chain.torn_tail)} bytes)")
        for r in chain.rejected:
            out.print(f"set aside line {r['line']}: {r['reason']}", highlight=False)
        if chain.rejected:
            err.print(
                f"[yellow]warning:[/yellow] {len(chain.rejected)} journal entries set aside in "
                f"{chain.rejected_path}: what they did on chain is undone (check apps, hashes, owners)",
                highlight=False,
            )
        out.print(
            f"journal replays: {chain.replayed} entries, block {int(chain.request('eth_blockNumber'), 16)}"
        )
    finally:
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
        _print_proposal(res)


def _print_proposal(res: dict[str, Any]) -> None:
    if res["kind"] == "direct":
        out.print("applied directly (the app is owned by this signer)")
    elif res["kind"] == "timelock":
        out.print(
            f"queued in timelock {res['governance']}: call id {res['id']}, executable from unix time "
            f"{res['eta']}",
            highlight=False,
        )
    else:
        out.print(f"proposal {res['id']} in multisig {res['governance']} ({res['kind']})", highlight=False)


@app_app.command("retire-instance")
@friendly
def app_retire_instance(ctx: typer.Context, app_id: str, instance_id: str) -> None:
    """Retire an instance for good (what `teecloud rm` does on chain): the KMS never releases its keys
    again. Directly when the signer owns the app, else as a multisig proposal or a timelocked call."""
    from eth_utils.address import is_address, to_checksum_address

    if not is_address(instance_id):
        raise ValueError("INSTANCE_ID must be 20 bytes of hex (40 hex digits)")
    instance_id = to_checksum_address(instance_id)
    with _client(ctx) as c:
        if c.is_instance_retired(app_id, instance_id):
            out.print(f"instance {instance_id} is already retired", highlight=False)
            return
        res = c.propose_app_change(app_id, "retire_instance", instance_id)
        _print_proposal(res)
        if res["kind"] == "direct":
            out.print(
                f"instance retired: {instance_id}; the KMS refuses its keys from now on", highlight=False
            )
        else:
            out.print("the instance keeps getting its keys until this change is executed on chain")


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
        if st.retired_instances:
            out.print("retired instances (the KMS refuses their keys):")
            for i in st.retired_instances:
                out.print(f"  {i}", highlight=False)
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


# --- node (operators, challengers) -----------------------------------------------------------------------

NodeId = typer.Argument(..., min=0, help="node id (from `node register`)")
DepId = typer.Argument(..., min=0, help="deployment id (from `escrow open`)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _fmt_wei(wei: int) -> str:
    from decimal import Decimal

    if wei == 0:
        return "0 wei"
    eth = format((Decimal(wei) / Decimal(10**18)).normalize(), "f")
    return f"{wei} wei ({eth} ETH)"


def _when(ts: int, now: int) -> str:
    if ts <= now:
        return f"unix time {ts} (passed)"
    return f"unix time {ts} (in {ts - now} s)"


def _node_view(c: Any, node_id: int) -> dict[str, Any]:
    count = int(c.call("NodeRegistry", c.node_registry, "node_count"))
    if node_id >= count:
        raise ValueError(f"no such node: {node_id} (this registry has {count})")
    return {"node_id": node_id, **c.node(node_id)}


def _deployment_view(c: Any, dep_id: int) -> dict[str, Any]:
    count = int(c.call("NodeRegistry", c.node_registry, "deployment_count"))
    if dep_id >= count:
        raise ValueError(f"no such deployment: {dep_id} (this registry has {count})")
    return {"deployment_id": dep_id, **c.deployment_escrow(dep_id)}


def _deployments(c: Any, *, node_id: int | None = None, user: str | None = None) -> list[dict[str, Any]]:
    from teecloud.chain.client import _addr

    who = _addr(user) if user else None
    count = int(c.call("NodeRegistry", c.node_registry, "deployment_count"))
    rows = []
    for i in range(count):
        d = {"deployment_id": i, **c.deployment_escrow(i)}
        if node_id is not None and d["node_id"] != node_id:
            continue
        if who is not None and who not in (d["user"], d["usage_signer"]):
            continue
        rows.append(d)
    return rows


def _deployment_state(d: dict[str, Any], now: int) -> str:
    ready = d["close_ready_at"]
    if ready == 0:
        return "open"
    if d["balance"] == 0:
        return "closed"
    return "closable" if ready <= now else f"closing (in {ready - now} s)"


def _deployments_lines(rows: list[dict[str, Any]], now: int) -> None:
    # plain lines, not a table: addresses must stay whole so they can be copied
    if not rows:
        out.print("no deployments")
    for d in rows:
        out.print(
            f"deployment {d['deployment_id']}  node {d['node_id']}  {_deployment_state(d, now)}  "
            f"escrow {d['balance']} wei  price {d['price_per_hour']} wei/h  served {d['served_seconds']} s  "
            f"paid {d['paid']} wei  user {d['user']}",
            highlight=False,
        )


@node_app.command("register")
@friendly
def node_register(
    ctx: typer.Context,
    tee: str = typer.Option("tdx", "--tee", help="TEE kind (tdx, sev-snp, nitro, ...)"),
    device_id: str = typer.Option(..., "--device-id", help="32-byte hex device id"),
    attestation_hash: str = typer.Option(..., "--attestation-hash", help="hash of the node's attestation"),
    capacity: int = typer.Option(..., "--capacity", min=1, help="CVMs the node can run"),
    price: str = typer.Option(..., "--price", help="price per CVM-hour (wei, gwei, eth)"),
    stake: str = typer.Option(..., "--stake", help="stake to lock (wei, gwei, eth)"),
) -> None:
    """Register a worker node with a stake (the signer becomes its operator)."""
    if len(tee.encode()) > 16:
        raise ValueError("--tee is at most 16 bytes")
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


@node_app.command("show")
@friendly
def node_show(ctx: typer.Context, node_id: int = NodeId, as_json: bool = JsonOpt) -> None:
    """A node's operator, hardware, price, stake, pending unstake and slashes."""
    with _client(ctx) as c:
        n = _node_view(c, node_id)
        if as_json:
            _print_json(n)
            return
        now = c.timestamp()
        out.print(f"node {node_id}: {'active' if n['active'] else 'INACTIVE'}", highlight=False)
        out.print(f"  operator: {n['operator']}", highlight=False)
        out.print(f"  tee: {n['tee_kind']}  capacity: {n['capacity']} CVMs", highlight=False)
        out.print(f"  device id: 0x{bytes(n['device_id']).hex()}", highlight=False)
        out.print(f"  attestation hash: 0x{bytes(n['attestation_hash']).hex()}", highlight=False)
        out.print(f"  price: {_fmt_wei(n['price_per_hour'])} per CVM-hour", highlight=False)
        out.print(f"  stake: {_fmt_wei(n['stake'])}", highlight=False)
        if n["unstaking"]:
            out.print(
                f"  pending unstake: {_fmt_wei(n['unstaking'])}, withdrawable from "
                f"{_when(n['unstake_ready_at'], now)}",
                highlight=False,
            )
        else:
            out.print("  pending unstake: none")
        out.print(f"  slashed in total: {_fmt_wei(n['slashed_total'])}", highlight=False)


@node_app.command("list")
@friendly
def node_list(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Every registered node."""
    with _client(ctx) as c:
        count = int(c.call("NodeRegistry", c.node_registry, "node_count"))
        nodes = [{"node_id": i, **c.node(i)} for i in range(count)]
        if as_json:
            _print_json(nodes)
            return
        if not nodes:
            out.print("no nodes")
        for n in nodes:
            out.print(
                f"node {n['node_id']}  {'active' if n['active'] else 'inactive'}  {n['tee_kind']}  "
                f"capacity {n['capacity']}  price {n['price_per_hour']} wei/h  stake {n['stake']} wei  "
                f"unstaking {n['unstaking']} wei  operator {n['operator']}",
                highlight=False,
            )


@node_app.command("deployments")
@friendly
def node_deployments(ctx: typer.Context, node_id: int = NodeId, as_json: bool = JsonOpt) -> None:
    """The deployments (escrows) opened on a node: what is left to claim."""
    with _client(ctx) as c:
        _node_view(c, node_id)
        rows = _deployments(c, node_id=node_id)
        if as_json:
            _print_json(rows)
            return
        _deployments_lines(rows, c.timestamp())


@node_app.command("stake")
@friendly
def node_stake(ctx: typer.Context, node_id: int = NodeId, amount: str = typer.Argument(...)) -> None:
    """Operator: add stake to a node."""
    with _client(ctx) as c:
        c.stake(node_id, _amount(amount))
        out.print(f"stake: {c.node(node_id)['stake']} wei")


@node_app.command("unstake")
@friendly
def node_unstake(
    ctx: typer.Context,
    node_id: int = NodeId,
    amount: str | None = typer.Argument(None),
    withdraw: bool = typer.Option(False, "--withdraw", help="collect stake whose delay has passed"),
) -> None:
    """Operator: start unstaking AMOUNT (then wait the delay), or --withdraw what is due."""
    from teecloud.chain import ContractReverted

    with _client(ctx) as c:
        if withdraw:
            try:
                c.withdraw_unstaked(node_id)
            except ContractReverted as exc:
                if exc.reason == "unstake delay not over":
                    n = c.node(node_id)
                    raise ContractReverted(
                        f"{exc.reason}: withdrawable from {_when(n['unstake_ready_at'], c.timestamp())}"
                    ) from None
                raise
            paid = c.withdraw()
            out.print(f"withdrawn: {paid} wei")
            return
        if amount is None:
            raise ValueError("give an AMOUNT, or --withdraw")
        c.request_unstake(node_id, _amount(amount))
        n = c.node(node_id)
        out.print(f"unstaking {n['unstaking']} wei, withdrawable from unix time {n['unstake_ready_at']}")


def _signature(text: str) -> bytes:
    if not re.fullmatch(r"(0x)?[0-9a-fA-F]{130}", text.strip()):
        raise ValueError("signature must be 65 bytes of hex (from `teecloud escrow sign-usage`)")
    return bytes.fromhex(text.strip().removeprefix("0x"))


@node_app.command("claim")
@friendly
def node_claim(
    ctx: typer.Context,
    deployment_id: int = DepId,
    served_seconds: int = typer.Argument(..., min=1, help="cumulative seconds served, as signed"),
    signature: str = typer.Argument(..., help="usage record signature (0x hex, 65 bytes)"),
) -> None:
    """Operator: claim payment for served time with a usage record signed by the deployment's usage signer."""
    sig = _signature(signature)
    with _client(ctx) as c:
        paid = c.claim(deployment_id, served_seconds, sig)
        d = c.deployment_escrow(deployment_id)
        out.print(
            f"paid: {paid} wei (withdraw with `teecloud node withdraw`); escrow left: {d['balance']} wei",
            highlight=False,
        )


@node_app.command("withdraw")
@friendly
def node_withdraw(ctx: typer.Context) -> None:
    """Withdraw everything credited to the signer (rewards, unstaked stake, slash rewards, refunds)."""
    with _client(ctx) as c:
        out.print(f"withdrawn: {c.withdraw()} wei")


@node_app.command("balance")
@friendly
def node_balance(
    ctx: typer.Context, account: str | None = typer.Argument(None, help="address (default: the signer)")
) -> None:
    """What an account can collect with `withdraw` (the registry's pull-payment balance)."""
    with _client(ctx) as c:
        who = account or c.address
        if not who:
            raise ValueError("give an ACCOUNT, or a signer key")
        out.print(f"withdrawable: {c.withdrawable(who)} wei", highlight=False)


@node_app.command("slash")
@friendly
def node_slash(
    ctx: typer.Context,
    node_id: int = NodeId,
    amount: str = typer.Argument(..., help="amount to slash (wei, gwei, eth)"),
    evidence: str = typer.Option(..., "--evidence", help="32-byte hex hash of the published evidence"),
) -> None:
    """Challenger: slash a node whose attestation failed (the reward is credited to the signer)."""
    ev = _hash(evidence, "evidence hash")
    with _client(ctx) as c:
        r = c.slash(node_id, _amount(amount), ev)
        e = c.event_of(r, "NodeRegistry", "Slashed")
        out.print(
            f"slashed node {node_id}: {e['amount']} wei; reward {e['reward']} wei to {e['challenger']} "
            "(withdraw with `teecloud node withdraw`); the node is inactive",
            highlight=False,
        )


@node_app.command("set-challenger")
@friendly
def node_set_challenger(
    ctx: typer.Context,
    address: str,
    revoke: bool = typer.Option(False, "--revoke", help="remove the challenger role"),
) -> None:
    """Registry owner: grant (or --revoke) the challenger role."""
    with _client(ctx) as c:
        c.set_challenger(address, not revoke)
        out.print(f"challenger {'revoked' if revoke else 'allowed'}: {address}", highlight=False)


@node_app.command("sign-usage", hidden=True)
@friendly
def node_sign_usage(
    ctx: typer.Context, deployment_id: int = DepId, served_seconds: int = typer.Argument(..., min=1)
) -> None:
    """Deprecated spelling of `teecloud escrow sign-usage`."""
    with _client(ctx) as c:
        out.print("0x" + c.sign_usage(deployment_id, served_seconds).hex(), highlight=False)


# --- escrow (users) ----------------------------------------------------------------------------------------


@escrow_app.command("open")
@friendly
def escrow_open(
    ctx: typer.Context,
    node_id: int = NodeId,
    deposit: str = typer.Option(..., "--deposit", help="escrow to lock (wei, gwei, eth)"),
    usage_signer: str | None = typer.Option(
        None, "--usage-signer", help="address that signs usage records (default: the signer)"
    ),
) -> None:
    """Open a deployment escrow on NODE_ID at the node's current price (fixed for the deployment's life)."""
    amount = _amount(deposit)
    with _client(ctx) as c:
        _node_view(c, node_id)
        dep = c.open_deployment(node_id, amount, usage_signer)
        d = c.deployment_escrow(dep)
        hours = f"{amount / d['price_per_hour']:.2f} CVM-hours" if d["price_per_hour"] else "unlimited time"
        out.print(f"deployment_id: {dep}", highlight=False)
        out.print(
            f"node {node_id} at {d['price_per_hour']} wei/hour; escrow {d['balance']} wei covers {hours}; "
            f"usage signer {d['usage_signer']}",
            highlight=False,
        )


@escrow_app.command("fund")
@friendly
def escrow_fund(ctx: typer.Context, deployment_id: int = DepId, amount: str = typer.Argument(...)) -> None:
    """Top up a deployment's escrow (anyone may pay)."""
    value = _amount(amount)
    with _client(ctx) as c:
        _deployment_view(c, deployment_id)
        c.fund_deployment(deployment_id, value)
        out.print(f"escrow: {c.deployment_escrow(deployment_id)['balance']} wei")


@escrow_app.command("show")
@friendly
def escrow_show(ctx: typer.Context, deployment_id: int = DepId, as_json: bool = JsonOpt) -> None:
    """A deployment's escrow: node, price, balance, time served and paid, close state."""
    with _client(ctx) as c:
        d = _deployment_view(c, deployment_id)
        if as_json:
            _print_json(d)
            return
        now = c.timestamp()
        out.print(f"deployment {deployment_id} on node {d['node_id']}", highlight=False)
        out.print(f"  user: {d['user']}  usage signer: {d['usage_signer']}", highlight=False)
        out.print(f"  price: {_fmt_wei(d['price_per_hour'])} per hour", highlight=False)
        out.print(f"  escrow: {_fmt_wei(d['balance'])}", highlight=False)
        out.print(f"  served: {d['served_seconds']} s claimed, paid {_fmt_wei(d['paid'])}", highlight=False)
        ready = d["close_ready_at"]
        out.print(
            "  close: not requested"
            if ready == 0
            else f"  close: escrow withdrawable from {_when(ready, now)}",
            highlight=False,
        )


@escrow_app.command("list")
@friendly
def escrow_list(
    ctx: typer.Context,
    node: int | None = typer.Option(None, "--node", min=0, help="only deployments on this node"),
    user: str | None = typer.Option(None, "--user", help="only this user's (or usage signer's)"),
    mine: bool = typer.Option(False, "--mine", help="only the signer's"),
    as_json: bool = JsonOpt,
) -> None:
    """Deployment escrows, optionally filtered."""
    if mine and user:
        raise ValueError("--mine excludes --user")
    with _client(ctx) as c:
        rows = _deployments(c, node_id=node, user=c.address if mine else user)
        if as_json:
            _print_json(rows)
            return
        _deployments_lines(rows, c.timestamp())


@escrow_app.command("sign-usage")
@friendly
def escrow_sign_usage(
    ctx: typer.Context,
    deployment_id: int = DepId,
    served_seconds: int = typer.Argument(..., min=1, help="total seconds served since the deployment opened"),
) -> None:
    """Usage signer: sign a cumulative usage record; give the printed signature to the node (`node claim`)."""
    with _client(ctx) as c:
        d = _deployment_view(c, deployment_id)
        if c.address != d["usage_signer"]:
            err.print(
                f"[yellow]warning:[/yellow] the signer {c.address} is not this deployment's usage signer "
                f"({d['usage_signer']}): the node cannot claim with this record",
                highlight=False,
            )
        owed = served_seconds * d["price_per_hour"] // 3600 - d["paid"]
        out.print("0x" + c.sign_usage(deployment_id, served_seconds).hex(), highlight=False)
        err.print(f"this record lets the node claim up to {max(owed, 0)} wei more", highlight=False)


@escrow_app.command("close")
@friendly
def escrow_close(ctx: typer.Context, deployment_id: int = DepId) -> None:
    """User: request closing; the node may still claim until the close delay has passed."""
    with _client(ctx) as c:
        c.request_close(deployment_id)
        d = c.deployment_escrow(deployment_id)
        when = _when(d["close_ready_at"], c.timestamp())
        out.print(
            f"closing: escrow ({d['balance']} wei) withdrawable from {when}"
            f" with `teecloud escrow withdraw {deployment_id}`",
            highlight=False,
        )


@escrow_app.command("withdraw")
@friendly
def escrow_withdraw(ctx: typer.Context, deployment_id: int = DepId) -> None:
    """User: after the close delay, take back what is left in the escrow."""
    from teecloud.chain import ContractReverted

    with _client(ctx) as c:
        try:
            r = c.withdraw_escrow(deployment_id)
        except ContractReverted as exc:
            if exc.reason == "claim window not over":
                ready = c.deployment_escrow(deployment_id)["close_ready_at"]
                raise ContractReverted(
                    f"{exc.reason}: withdrawable from {_when(ready, c.timestamp())}"
                ) from None
            if exc.reason == "close not requested":
                raise ContractReverted(
                    f"{exc.reason}: run `teecloud escrow close {deployment_id}` first"
                ) from None
            raise
        refund = c.event_of(r, "NodeRegistry", "EscrowWithdrawn")["amount"]
        paid = c.withdraw()
        out.print(f"escrow refunded: {refund} wei; withdrawn: {paid} wei", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(chain_app, name="chain")
    app.add_typer(app_app, name="app")
    app.add_typer(node_app, name="node")
    app.add_typer(escrow_app, name="escrow")
