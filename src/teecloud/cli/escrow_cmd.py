"""`teecloud escrow ...`: the worker-node marketplace, user side (NodeRegistry's deployment escrows): open,
fund, show and list escrows, sign usage records, close and withdraw."""

from __future__ import annotations

import typer

from ._chain_common import (
    DepId,
    JsonOpt,
    NodeId,
    client,
    deployments_lines,
    err,
    fmt_wei,
    friendly,
    group,
    out,
    parse_amount,
    print_json,
    when,
)

__all__ = ["escrow_app"]

escrow_app = group("Worker-node marketplace, user side: deployment escrows and usage records.")


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
    amount = parse_amount(deposit)
    with client(ctx) as c:
        c.registry.require_node(node_id)
        dep = c.escrow.open(node_id, amount, usage_signer)
        d = c.escrow.deployment(dep)
        hours = f"{amount / d.price_per_hour:.2f} CVM-hours" if d.price_per_hour else "unlimited time"
        out.print(f"deployment_id: {dep}", highlight=False)
        out.print(
            f"node {node_id} at {d.price_per_hour} wei/hour; escrow {d.balance} wei covers {hours}; "
            f"usage signer {d.usage_signer}",
            highlight=False,
        )


@escrow_app.command("fund")
@friendly
def escrow_fund(ctx: typer.Context, deployment_id: int = DepId, amount: str = typer.Argument(...)) -> None:
    """Top up a deployment's escrow (anyone may pay)."""
    value = parse_amount(amount)
    with client(ctx) as c:
        c.escrow.require_deployment(deployment_id)
        c.escrow.fund(deployment_id, value)
        out.print(f"escrow: {c.escrow.deployment(deployment_id).balance} wei")


@escrow_app.command("show")
@friendly
def escrow_show(ctx: typer.Context, deployment_id: int = DepId, as_json: bool = JsonOpt) -> None:
    """A deployment's escrow: node, price, balance, time served and paid, close state."""
    with client(ctx) as c:
        d = c.escrow.require_deployment(deployment_id)
        if as_json:
            print_json(d)
            return
        now = c.timestamp()
        out.print(f"deployment {deployment_id} on node {d.node_id}", highlight=False)
        out.print(f"  user: {d.user}  usage signer: {d.usage_signer}", highlight=False)
        out.print(f"  price: {fmt_wei(d.price_per_hour)} per hour", highlight=False)
        out.print(f"  escrow: {fmt_wei(d.balance)}", highlight=False)
        out.print(f"  served: {d.served_seconds} s claimed, paid {fmt_wei(d.paid)}", highlight=False)
        out.print(
            "  close: not requested"
            if d.close_ready_at == 0
            else f"  close: escrow withdrawable from {when(d.close_ready_at, now)}",
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
    with client(ctx) as c:
        rows = c.escrow.deployments(node_id=node, party=c.address if mine else user)
        if as_json:
            print_json(rows)
            return
        deployments_lines(rows, c.timestamp())


@escrow_app.command("sign-usage")
@friendly
def escrow_sign_usage(
    ctx: typer.Context,
    deployment_id: int = DepId,
    served_seconds: int = typer.Argument(..., min=1, help="total seconds served since the deployment opened"),
) -> None:
    """Usage signer: sign a cumulative usage record; give the printed signature to the node (`node claim`)."""
    with client(ctx) as c:
        d = c.escrow.require_deployment(deployment_id)
        if c.address != d.usage_signer:
            err.print(
                f"[yellow]warning:[/yellow] the signer {c.address} is not this deployment's usage signer "
                f"({d.usage_signer}): the node cannot claim with this record",
                highlight=False,
            )
        owed = served_seconds * d.price_per_hour // 3600 - d.paid
        out.print("0x" + c.escrow.sign_usage(deployment_id, served_seconds).hex(), highlight=False)
        err.print(f"this record lets the node claim up to {max(owed, 0)} wei more", highlight=False)


@escrow_app.command("close")
@friendly
def escrow_close(ctx: typer.Context, deployment_id: int = DepId) -> None:
    """User: request closing; the node may still claim until the close delay has passed."""
    with client(ctx) as c:
        c.escrow.request_close(deployment_id)
        d = c.escrow.deployment(deployment_id)
        ready = when(d.close_ready_at, c.timestamp())
        out.print(
            f"closing: escrow ({d.balance} wei) withdrawable from {ready}"
            f" with `teecloud escrow withdraw {deployment_id}`",
            highlight=False,
        )


@escrow_app.command("withdraw")
@friendly
def escrow_withdraw(ctx: typer.Context, deployment_id: int = DepId) -> None:
    """User: after the close delay, take back what is left in the escrow."""
    from teecloud.chain import ContractReverted

    with client(ctx) as c:
        try:
            refund = c.escrow.withdraw_escrow(deployment_id)
        except ContractReverted as exc:
            if exc.reason == "claim window not over":
                ready = c.escrow.deployment(deployment_id).close_ready_at
                raise ContractReverted(
                    f"{exc.reason}: withdrawable from {when(ready, c.timestamp())}"
                ) from None
            if exc.reason == "close not requested":
                raise ContractReverted(
                    f"{exc.reason}: run `teecloud escrow close {deployment_id}` first"
                ) from None
            raise
        paid = c.escrow.withdraw()
        out.print(f"escrow refunded: {refund} wei; withdrawn: {paid} wei", highlight=False)
