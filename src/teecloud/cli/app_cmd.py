"""`teecloud app ...`: register apps and govern them (allowed compose hashes, devices, retired instances),
directly or through the app's multisig / timelock (`app upgrade propose|approve|execute|cancel`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from ._chain_common import client, friendly, group, out, parse_address, parse_hash, print_json

if TYPE_CHECKING:
    from teecloud.chain.api import GovernanceAction
    from teecloud.chain.appauth import AppAuth

__all__ = ["app_app"]

app_app = group("Register apps and govern their allowed compose hashes.")
upgrade_app = typer.Typer(help="Governed changes: propose, approve, execute.", no_args_is_help=True)
app_app.add_typer(upgrade_app, name="upgrade")


def _compose_hash_of(path: Path) -> bytes:
    from teecloud.chain import compose_hash

    try:
        compose = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return compose_hash(compose)


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
    h = _compose_hash_of(app_compose)
    if owner and (multisig or timelock is not None):
        raise ValueError("--owner excludes --multisig/--timelock")
    if (multisig is None) != (threshold is None):
        raise ValueError("--multisig and --threshold go together")
    devices = [parse_hash(d, "device id") for d in device]
    with client(ctx) as c:
        final_owner = owner or c.require_signer().address
        if multisig:
            owners = [a.strip() for a in multisig.split(",") if a.strip()]
            final_owner = c.deploy_multisig(owners, threshold or 0)
            out.print(f"multisig ({threshold}-of-{len(owners)}): {final_owner}", highlight=False)
        if timelock is not None:
            final_owner = c.deploy_timelock(final_owner, timelock)
            out.print(f"timelock ({timelock} s): {final_owner}", highlight=False)
        app_id = c.kms.register_app(
            final_owner,
            h,
            allow_any_device=not devices,
            device_id=devices[0] if devices else None,
            require_tcb_up_to_date=require_tcb,
            disable_upgrades=disable_upgrades,
        )
        for d in devices[1:]:
            c.app(app_id).propose_add_device(d)
        out.print(f"compose hash: 0x{h.hex()}", highlight=False)
        out.print(f"app_id: {app_id}", highlight=False)


@app_app.command("allow-hash")
@friendly
def app_allow_hash(ctx: typer.Context, app_id: str, compose_hash: str) -> None:
    """Allow a compose hash (owner = this signer; otherwise use `app upgrade propose`)."""
    h = parse_hash(compose_hash, "compose hash")
    with client(ctx) as c:
        _direct(c.app(app_id), lambda app: app.add_compose_hash(h), f"add compose hash: 0x{h.hex()}")


@app_app.command("remove-hash")
@friendly
def app_remove_hash(ctx: typer.Context, app_id: str, compose_hash: str) -> None:
    """Remove an allowed compose hash (owner = this signer)."""
    h = parse_hash(compose_hash, "compose hash")
    with client(ctx) as c:
        _direct(c.app(app_id), lambda app: app.remove_compose_hash(h), f"remove compose hash: 0x{h.hex()}")


def _direct(app: AppAuth, change: Callable[[AppAuth], Any], done: str) -> None:
    kind = app.owner_kind()
    if kind != "account":
        raise ValueError(f"app {app.address} is governed by a {kind}: use `teecloud app upgrade propose`")
    owner, me = app.owner(), app.conn.require_signer().address
    if owner != me:
        raise ValueError(f"app {app.address} is owned by {owner}, not by this signer ({me})")
    change(app)
    out.print(done, highlight=False)


def _print_action(action: GovernanceAction) -> None:
    if action.applied:
        out.print("applied directly (the app is owned by this signer)")
    elif action.kind == "timelock":
        out.print(
            f"queued in timelock {action.governance}: call id {action.ident}, executable from unix time "
            f"{action.eta}",
            highlight=False,
        )
    else:
        out.print(f"proposal {action.ident} in multisig {action.governance} ({action.kind})", highlight=False)


@app_app.command("retire-instance")
@friendly
def app_retire_instance(ctx: typer.Context, app_id: str, instance_id: str) -> None:
    """Retire an instance for good (what `teecloud rm` does on chain): the KMS never releases its keys
    again. Directly when the signer owns the app, else as a multisig proposal or a timelocked call."""
    instance = parse_address(instance_id, "INSTANCE_ID")
    with client(ctx) as c:
        app = c.app(app_id)
        if app.is_instance_retired(instance):
            out.print(f"instance {instance} is already retired", highlight=False)
            return
        action = app.propose_retire_instance(instance)
        _print_action(action)
        if action.applied:
            out.print(f"instance retired: {instance}; the KMS refuses its keys from now on", highlight=False)
        else:
            out.print("the instance keeps getting its keys until this change is executed on chain")


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
    if compose_hash is not None and compose is None:
        h = parse_hash(compose_hash, "compose hash")
    elif compose is not None and compose_hash is None:
        h = _compose_hash_of(compose)
    else:
        raise ValueError("give either a COMPOSE_HASH or --compose FILE")
    with client(ctx) as c:
        app = c.app(app_id)
        action = app.propose_remove_compose_hash(h) if remove else app.propose_add_compose_hash(h)
        out.print(f"compose hash: 0x{h.hex()}", highlight=False)
        _print_action(action)


@upgrade_app.command("approve")
@friendly
def upgrade_approve(ctx: typer.Context, app_id: str, proposal_id: int) -> None:
    """Approve a multisig proposal."""
    from teecloud.chain.governance import Multisig

    with client(ctx) as c:
        ms = c.app(app_id).governance_of(str(proposal_id))
        if not isinstance(ms, Multisig):
            raise ValueError(f"app {app_id} has no multisig: proposal ids are the multisig's")
        ms.approve(proposal_id)
        p = ms.proposal(proposal_id)
        out.print(f"approved: {p.approvals}/{p.threshold}")


@upgrade_app.command("execute")
@friendly
def upgrade_execute(
    ctx: typer.Context, app_id: str, ident: str = typer.Argument(..., help="proposal id or 0x call id")
) -> None:
    """Execute a multisig proposal (enough approvals) or a timelock call (delay passed)."""
    from teecloud.chain.governance import Timelock
    from teecloud.cloud.governance import PendingChange

    with client(ctx) as c:
        gov = c.app(app_id).governance_of(ident)
        now = c.timestamp()
        if isinstance(gov, Timelock):
            q = gov.queued(ident)
            if q.done or q.pending_eta == 0:
                raise ValueError(f"timelock: call not queued: {ident} is not pending (executed or cancelled)")
            if q.pending_eta > now:
                when = PendingChange("timelock", gov.address, ident, "", (), eta=q.pending_eta, now=now)
                raise ValueError(f"timelock: too early: call {ident} is {when.status_text()}")
            gov.execute(ident)
            kind = "timelock"
        else:
            try:
                pid = int(ident)
            except ValueError:
                raise ValueError(f"{ident!r} is neither a proposal id nor a 0x call id") from None
            p = gov.proposal(pid)
            if p.executed or p.cancelled:
                raise ValueError(f"proposal already {'executed' if p.executed else 'cancelled'}: {pid}")
            if p.approvals < p.threshold:
                raise ValueError(
                    f"not enough approvals: proposal {pid} has {p.approvals} of the {p.threshold} it needs; "
                    "other owners "
                    f"approve with `teecloud app upgrade approve {app_id} {pid}`"
                )
            gov.execute(pid)
            kind = "multisig"
        out.print(f"executed {ident} in {kind} {gov.address}", highlight=False)


@upgrade_app.command("cancel")
@friendly
def upgrade_cancel(ctx: typer.Context, app_id: str, ident: str) -> None:
    """Cancel a timelock call (admin) or a multisig proposal (its proposer)."""
    from teecloud.chain.governance import Timelock

    with client(ctx) as c:
        gov = c.app(app_id).governance_of(ident)
        if isinstance(gov, Timelock):
            gov.cancel(ident)
        else:
            gov.cancel(int(ident))
        out.print(f"cancelled {ident}")


def resolve_app(ref: str) -> tuple[str, str]:
    """-> (app_id, name to show). REF is an app_id (0x + 40 hex digits), or the name of a CVM on the local
    cloud's node (`teecloud up`)."""
    from eth_utils.address import is_address, to_checksum_address

    if is_address(ref.strip()):
        return str(to_checksum_address(ref.strip())), ref.strip()
    from teecloud.cloud.endpoints import read_endpoints

    if len(ref) > 64 or not ref.strip():
        raise ValueError(f"{ref[:64]!r} is not an address (app_id: 0x + 40 hex digits) nor an app name")
    if read_endpoints() is None:
        raise ValueError(
            f"{ref!r} is not an address (app_id: 0x + 40 hex digits); app names are looked up on the local "
            "cloud, which is not running (`teecloud up`)"
        )
    from teecloud.cloud.deploy import Session

    session = Session()
    try:
        cvms = session.node.list_cvms()
    finally:
        session.close()
    ids = sorted({c.app_id for c in cvms if c.name == ref or c.instance_id == ref})
    if not ids:
        names = ", ".join(sorted(c.name for c in cvms)) or "none"
        raise ValueError(f"no app named {ref!r} on the local cloud (apps: {names}); or give its app_id")
    return str(to_checksum_address("0x" + ids[0].removeprefix("0x"))), ref


@app_app.command("show")
@friendly
def app_show(
    ctx: typer.Context,
    app: str = typer.Argument(..., help="app_id, or the app's name on the local cloud"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Allowed hashes, owners, pending changes (decoded, with their ETA) and history (contract events)."""
    from teecloud.cloud.governance import pending_changes

    app_id, label = resolve_app(app)
    with client(ctx) as c:
        st = c.app(app_id).state()
        pending = pending_changes(c, app_id)
        if as_json:
            data = dataclasses.asdict(st)
            data["pending_changes"] = [p.to_json(label) for p in pending]  # decoded, with the ETA as a date
            print_json(data)
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
        for p, raw in zip(pending, st.pending, strict=True):
            args = ", ".join("0x" + a.hex() if isinstance(a, bytes) else str(a) for a in raw.args)
            when = (
                f"executable from unix time {raw.eta}"
                if raw.eta is not None
                else f"approvals {raw.approvals}/{raw.threshold}"
            )
            out.print(
                f"  {p.describe(label)}  [{raw.function}({args}) on {raw.target}; {when}]",
                highlight=False,
                markup=False,
            )
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


@app_app.command("transfer-ownership")
@friendly
def app_transfer_ownership(
    ctx: typer.Context,
    app: str = typer.Argument(..., help="app_id, or the app's name on the local cloud"),
    to: str | None = typer.Option(None, "--to", help="the new owner's address (it accepts itself)"),
    multisig: str | None = typer.Option(None, "--multisig", help="comma-separated owner addresses"),
    threshold: int | None = typer.Option(None, "--threshold", help="approvals needed (with --multisig)"),
    timelock: int | None = typer.Option(None, "--timelock", help="delay in seconds before any change"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Move an app this signer owns under a multisig and/or a timelock (or another owner). AppAuth takes two
    steps: the transfer, then the new owner's acceptance, which a timelock makes wait for its delay; run the
    same command again (without options) to execute the acceptance once it may run."""
    from teecloud.cloud.governance import GovernanceSpec, transfer_ownership

    spec = GovernanceSpec.build(multisig=multisig, threshold=threshold, timelock=timelock)
    if spec is not None and to is not None:
        raise ValueError("give either --to ADDRESS or --multisig/--timelock, not both")
    app_id, label = resolve_app(app)
    with client(ctx) as c:
        r = transfer_ownership(c, app_id, spec=spec, to=to)
    if as_json:
        print_json(
            {
                "app_id": app_id,
                "new_owner": r.new_owner,
                "accepted": r.accepted,
                "done": r.done,
                "pending": r.pending.to_json(label) if r.pending else None,
            }
        )
        return
    for line in r.done:
        out.print(line, highlight=False)
    if r.accepted:
        out.print(f"app {label} is now owned by {r.new_owner}", highlight=False)
    elif r.pending is not None:
        out.print(f"waiting for the new owner's acceptance: {r.pending.describe(label)}", highlight=False)
        out.print("run `teecloud app transfer-ownership " + app + "` again once it may run", highlight=False)
    else:
        out.print(f"the new owner {r.new_owner} must call accept_ownership() on the app", highlight=False)
