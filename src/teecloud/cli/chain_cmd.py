"""`teecloud chain ...`: run, repair, deploy and inspect the teecloud chain; `register` adds every chain group
(`chain`, `app`, `node`, `escrow`) to the CLI. Shared options and helpers: cli/_chain_common.py."""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
from typing import Any

import typer

from ._chain_common import client, err, friendly, group, out, parse_hash

__all__ = ["chain_app", "register"]

chain_app = group("Run or deploy the teecloud chain (KmsAuth, app factory, NodeRegistry).")


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
    from teecloud.chain.client import running_rpc_url
    from teecloud.chain.transport import LocalTransport

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
    # SIGINT too, explicitly: a shell starts a background job with SIGINT ignored, and Python then keeps it
    # ignored (no KeyboardInterrupt), so `chain up &` could not be interrupted
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # SIGUSR1 prints every thread's stack to stderr (an operator's, or a test's, view of a chain that hangs)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
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
    with client(ctx) as c:
        d = c.deploy()
        for name, addr in d.items():
            out.print(f"{name}: {addr}", highlight=False)


@chain_app.command("status")
@friendly
def chain_status(ctx: typer.Context) -> None:
    """Chain id, head block and teecloud's contract addresses."""
    with client(ctx) as c:
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
    with client(ctx) as c:
        h = parse_hash(os_image_hash, "OS image hash")
        c.kms.add_os_image(h)
        out.print(f"OS image allowed: 0x{h.hex()}")


MAX_ADVANCE = 10 * 365 * 86400


@chain_app.command("advance-time")
@friendly
def chain_advance_time(
    ctx: typer.Context,
    seconds: int = typer.Argument(..., min=1, max=MAX_ADVANCE, help="seconds to move the chain's clock"),
) -> None:
    """Development chains only (`teecloud up --dev-time-travel` or `chain up --dev-time-travel`): move the
    chain's clock forward and mine a block, e.g. past a timelock's delay."""
    from teecloud.chain import ChainError

    with client(ctx) as c:
        before = c.timestamp()
        try:
            c.increase_time(seconds)
        except ChainError as exc:
            if "disabled" in str(exc) or "not supported" in str(exc).lower() or "-32601" in str(exc):
                raise ValueError(
                    "this chain does not allow time travel: start the local cloud with "
                    "`teecloud up --dev-time-travel` (development only)"
                ) from None
            raise
        after = c.timestamp()
        out.print(f"chain time {before} -> {after} (+{after - before} s), block {c.block_number()}")


def register(app: typer.Typer) -> None:
    from .app_cmd import app_app
    from .escrow_cmd import escrow_app
    from .node_cmd import node_app

    app.add_typer(chain_app, name="chain")
    app.add_typer(app_app, name="app")
    app.add_typer(node_app, name="node")
    app.add_typer(escrow_app, name="escrow")
