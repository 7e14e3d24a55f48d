"""`teecloud node ...`: the worker-node marketplace, operator and challenger side (NodeRegistry): register,
stake and unstake, claim usage, slash, withdraw."""

from __future__ import annotations

import typer

from ._chain_common import (
    DepId,
    JsonOpt,
    NodeId,
    client,
    deployments_lines,
    fmt_wei,
    friendly,
    group,
    out,
    parse_amount,
    parse_hash,
    print_json,
    when,
)

__all__ = ["node_app"]

node_app = group("Worker-node marketplace, operator and challenger side: register, stake, claim, slash.")


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
    with client(ctx) as c:
        nid = c.registry.register_node(
            tee_kind=tee,
            device_id=parse_hash(device_id, "device id"),
            attestation_hash=parse_hash(attestation_hash, "attestation hash"),
            capacity=capacity,
            price_per_hour=parse_amount(price),
            stake=parse_amount(stake),
        )
        out.print(f"node_id: {nid}")


@node_app.command("show")
@friendly
def node_show(ctx: typer.Context, node_id: int = NodeId, as_json: bool = JsonOpt) -> None:
    """A node's operator, hardware, price, stake, pending unstake and slashes."""
    with client(ctx) as c:
        n = c.registry.require_node(node_id)
        if as_json:
            print_json(n)
            return
        now = c.timestamp()
        out.print(f"node {node_id}: {'active' if n.active else 'INACTIVE'}", highlight=False)
        out.print(f"  operator: {n.operator}", highlight=False)
        out.print(f"  tee: {n.tee_kind}  capacity: {n.capacity} CVMs", highlight=False)
        out.print(f"  device id: 0x{n.device_id.hex()}", highlight=False)
        out.print(f"  attestation hash: 0x{n.attestation_hash.hex()}", highlight=False)
        out.print(f"  price: {fmt_wei(n.price_per_hour)} per CVM-hour", highlight=False)
        out.print(f"  stake: {fmt_wei(n.stake)}", highlight=False)
        if n.unstaking:
            ready = when(n.unstake_ready_at, now)
            out.print(
                f"  pending unstake: {fmt_wei(n.unstaking)}, withdrawable from {ready}", highlight=False
            )
        else:
            out.print("  pending unstake: none")
        out.print(f"  slashed in total: {fmt_wei(n.slashed_total)}", highlight=False)


@node_app.command("list")
@friendly
def node_list(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Every registered node."""
    with client(ctx) as c:
        nodes = c.registry.nodes()
        if as_json:
            print_json(nodes)
            return
        if not nodes:
            out.print("no nodes")
        for n in nodes:
            out.print(
                f"node {n.node_id}  {'active' if n.active else 'inactive'}  {n.tee_kind}  "
                f"capacity {n.capacity}  price {n.price_per_hour} wei/h  stake {n.stake} wei  "
                f"unstaking {n.unstaking} wei  operator {n.operator}",
                highlight=False,
            )


@node_app.command("deployments")
@friendly
def node_deployments(ctx: typer.Context, node_id: int = NodeId, as_json: bool = JsonOpt) -> None:
    """The deployments (escrows) opened on a node: what is left to claim."""
    with client(ctx) as c:
        c.registry.require_node(node_id)
        rows = c.escrow.deployments(node_id=node_id)
        if as_json:
            print_json(rows)
            return
        deployments_lines(rows, c.timestamp())


@node_app.command("stake")
@friendly
def node_stake(ctx: typer.Context, node_id: int = NodeId, amount: str = typer.Argument(...)) -> None:
    """Operator: add stake to a node."""
    with client(ctx) as c:
        c.registry.stake(node_id, parse_amount(amount))
        out.print(f"stake: {c.registry.node(node_id).stake} wei")


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

    with client(ctx) as c:
        registry = c.registry
        if withdraw:
            try:
                registry.withdraw_unstaked(node_id)
            except ContractReverted as exc:
                if exc.reason == "unstake delay not over":
                    ready = registry.node(node_id).unstake_ready_at
                    raise ContractReverted(
                        f"{exc.reason}: withdrawable from {when(ready, c.timestamp())}"
                    ) from None
                raise
            out.print(f"withdrawn: {registry.withdraw()} wei")
            return
        if amount is None:
            raise ValueError("give an AMOUNT, or --withdraw")
        registry.request_unstake(node_id, parse_amount(amount))
        n = registry.node(node_id)
        out.print(f"unstaking {n.unstaking} wei, withdrawable from unix time {n.unstake_ready_at}")


def _signature(text: str) -> bytes:
    from teecloud.ids import parse_hex

    return parse_hex(text, size=65, name="signature (from `teecloud escrow sign-usage`)")


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
    with client(ctx) as c:
        paid = c.registry.claim(deployment_id, served_seconds, sig)
        left = c.escrow.deployment(deployment_id).balance
        out.print(
            f"paid: {paid} wei (withdraw with `teecloud node withdraw`); escrow left: {left} wei",
            highlight=False,
        )


@node_app.command("withdraw")
@friendly
def node_withdraw(ctx: typer.Context) -> None:
    """Withdraw everything credited to the signer (rewards, unstaked stake, slash rewards, refunds)."""
    with client(ctx) as c:
        out.print(f"withdrawn: {c.registry.withdraw()} wei")


@node_app.command("balance")
@friendly
def node_balance(
    ctx: typer.Context, account: str | None = typer.Argument(None, help="address (default: the signer)")
) -> None:
    """What an account can collect with `withdraw` (the registry's pull-payment balance)."""
    with client(ctx) as c:
        who = account or c.address
        if not who:
            raise ValueError("give an ACCOUNT, or a signer key")
        out.print(f"withdrawable: {c.registry.withdrawable(who)} wei", highlight=False)


@node_app.command("slash")
@friendly
def node_slash(
    ctx: typer.Context,
    node_id: int = NodeId,
    amount: str = typer.Argument(..., help="amount to slash (wei, gwei, eth)"),
    evidence: str = typer.Option(..., "--evidence", help="32-byte hex hash of the published evidence"),
) -> None:
    """Challenger: slash a node whose attestation failed (the reward is credited to the signer)."""
    ev = parse_hash(evidence, "evidence hash")
    with client(ctx) as c:
        s = c.registry.slash(node_id, parse_amount(amount), ev)
        out.print(
            f"slashed node {node_id}: {s.amount} wei; reward {s.reward} wei to {s.challenger} "
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
    with client(ctx) as c:
        c.registry.set_challenger(address, not revoke)
        out.print(f"challenger {'revoked' if revoke else 'allowed'}: {address}", highlight=False)


@node_app.command("sign-usage", hidden=True)
@friendly
def node_sign_usage(
    ctx: typer.Context, deployment_id: int = DepId, served_seconds: int = typer.Argument(..., min=1)
) -> None:
    """Deprecated spelling of `teecloud escrow sign-usage`."""
    with client(ctx) as c:
        out.print("0x" + c.escrow.sign_usage(deployment_id, served_seconds).hex(), highlight=False)
