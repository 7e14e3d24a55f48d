"""`teecloud kms`: run a key management service, onboard a replica, read public keys and the audit log."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from teecloud._fs import atomic_write_json, data_home
from teecloud.cli._peers import finality_depth_option

if TYPE_CHECKING:
    from teecloud.kms.threshold_net import AdminEndpoint

__all__ = ["app"]

app = typer.Typer(
    name="kms",
    help="Key management: keys only for attested, on-chain-authorized code.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ENDPOINT_FILE = "endpoint.json"


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _kms_dir(home: Path | None = None) -> Path:
    from teecloud.kms.bootstrap import kms_dir

    return kms_dir(home)


def _tee(dev: bool) -> Any:
    from teecloud.tee import TeeError, detect
    from teecloud.tee.simulated import SimulatedTdx

    if dev:
        return SimulatedTdx()
    try:
        tee = detect()
    except TeeError as exc:
        _fail(f"{exc}\n(no hardware TEE here: use --dev to run on the simulated platform)")
    if str(tee.kind).endswith("-simulated"):
        _fail("production mode refuses the simulated TEE; use --dev for development")
    return tee


def _chain(rpc_url: str | None, key_file: Path | None) -> Any:
    from teecloud.chain import ChainClient, ChainError, load_signer_key

    try:
        if rpc_url:
            return ChainClient.rpc(rpc_url, load_signer_key(key_file))
        key = load_signer_key(key_file)
        return ChainClient.embedded(signer_key=key)
    except (ChainError, ValueError) as exc:  # ValueError: a malformed --rpc-url
        _fail(f"chain: {exc}")


def _recorded_gateway_app_id(chain: Any) -> str:
    """KmsAuth's gateway_app_id ("" when none is recorded), so that every node of a group, and a node
    restarted without the flag, hands CVMs the same one."""
    from teecloud.chain import ChainError

    try:
        recorded = str(chain.kms.info().gateway_app_id)
    except ChainError as exc:
        _fail(f"chain: cannot read KmsAuth's gateway_app_id: {exc}")
    return recorded if int(recorded, 16) else ""


def _collateral(tee: Any, dev: bool, pccs_url: str | None) -> Any:
    from teecloud.peer import PccsCollateral, StaticCollateral

    if dev:
        return StaticCollateral(tee.collateral)
    if not pccs_url:
        _fail("production mode needs --pccs-url (a PCCS serving Intel collateral)")
    from teecloud.cli._peers import pccs_client

    return PccsCollateral(pccs_client(pccs_url))


@app.command("up")
def up(
    dev: Annotated[
        bool, typer.Option("--dev", help="Simulated TEE; trust this installation's dev root.")
    ] = False,
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="EVM JSON-RPC URL (default: embedded chain).")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="Chain signer key (publishes KMS info).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Public (RA-TLS) port.")] = 8043,
    admin_port: Annotated[int, typer.Option("--admin-port", help="Admin port (status, audit).")] = 8044,
    pccs_url: Annotated[
        str | None, typer.Option("--pccs-url", help="PCCS for collateral (production).")
    ] = None,
    gateway_app_id: Annotated[
        str,
        typer.Option(
            "--gateway-app-id",
            help="Gateway app id handed to CVMs (default: KmsAuth's gateway_app_id on chain at start).",
        ),
    ] = "",
    threshold_node: Annotated[
        int,
        typer.Option(
            "--threshold-node",
            help="Serve share INDEX of the threshold group (data in data_home()/kms-nodes/INDEX).",
        ),
    ] = 0,
    dealer: Annotated[
        bool,
        typer.Option(
            "--dealer", help="With --threshold-node: a share-less DKG dealer (kms-nodes/dealer-INDEX)."
        ),
    ] = False,
    join_dkg: Annotated[
        Path | None,
        typer.Option("--join-dkg", help="With --threshold-node: join this DKG round (plan JSON) at boot."),
    ] = None,
    require_app_compose: Annotated[
        bool,
        typer.Option(
            "--require-app-compose",
            help="Refuse app key requests that do not send the CVM's measured app-compose (so a guest that "
            "hides a compose's GPU requirement gets nothing; every teecloud guest sends it).",
        ),
    ] = False,
    join_reshare: Annotated[
        Path | None,
        typer.Option(
            "--join-reshare",
            help="With --threshold-node: join this reshare round (plan from `kms reshare-open`) at boot.",
        ),
    ] = None,
    node_dir_opt: Annotated[
        Path | None,
        typer.Option(
            "--node-dir",
            help="With --threshold-node: this node's data directory (default data_home()/kms-nodes/INDEX); "
            "a new committee's nodes on the same machine need their own.",
        ),
    ] = None,
    finality_depth: Annotated[
        int,
        finality_depth_option(
            "An on-chain permission counts only once it is this many blocks deep (removals count at "
            "once). 0 (default, local chains): the head decides."
        ),
    ] = 0,
    os_images: Annotated[
        Path | None,
        typer.Option(
            "--os-images",
            help="Real OS images' reference measurements: DIR/<os_image_hash>/{sha256sum.txt,"
            "measurement.tdx.cbor} (teecloud image measure --out). Without it (and without --dev) no app "
            "gets keys.",
        ),
    ] = None,
) -> None:
    """Start the KMS: boot its TEE, unseal (or create) its root keys, serve RA-TLS and the admin API."""
    from teecloud.kms.bootstrap import publish_kms_info
    from teecloud.kms.errors import KmsError
    from teecloud.kms.launcher import KmsLaunch, launch_kms

    if os_images is not None and not os_images.is_dir():
        _fail(f"--os-images {os_images}: no such directory")
    tee = _tee(dev)
    chain = _chain(rpc_url, key_file)
    node_dir: Path | None = None
    join: Any = None
    join_carried: Any = None
    if (dealer or join_dkg or join_reshare or node_dir_opt) and not threshold_node:
        _fail("--dealer, --join-dkg, --join-reshare and --node-dir need --threshold-node INDEX")
    if join_dkg is not None and join_reshare is not None:
        _fail("a node joins one round: --join-dkg or --join-reshare")
    if threshold_node:
        from teecloud.kms.errors import SealingError
        from teecloud.kms.threshold import dealer_home, node_home

        try:
            node_dir = dealer_home(threshold_node) if dealer else node_home(threshold_node)
        except SealingError as exc:
            _fail(str(exc))
        if node_dir_opt is not None:
            node_dir = node_dir_opt
        if join_dkg is not None:
            join = _round_joiner(join_dkg, "dkg", threshold_node, tee, dev, pccs_url, chain, home=node_dir)
        if join_reshare is not None:
            from teecloud.kms.threshold_carry import CarriedShares

            join_carried = CarriedShares()  # what the dealers carry besides the root share, sealed at boot
            join = _round_joiner(
                join_reshare,
                "reshare",
                threshold_node,
                tee,
                dev,
                pccs_url,
                chain,
                carried=join_carried,
                finality_depth=finality_depth,
            )

    def publish(keys: Any, _identity: Any, created: bool) -> str:
        if not created:
            return ""
        err.print("[green]generated new root keys inside the TEE and sealed them[/]")
        return publish_kms_info(chain, keys, tee)

    reference: Any = None
    if os_images is not None:
        from teecloud.kms.os_images import MeasuredOsImages

        reference = MeasuredOsImages(os_images)
    elif dev:
        from teecloud.tee.simulated import simulated_os_image_reference

        reference = simulated_os_image_reference
    gateway_app_id = gateway_app_id or _recorded_gateway_app_id(chain)
    try:
        running = launch_kms(
            KmsLaunch(
                tee=tee,
                chain=chain,
                collateral=_collateral(tee, dev, pccs_url),
                dev=dev,
                os_image_reference=reference,
                host=host,
                port=port,
                admin_port=admin_port,
                gateway_app_id=gateway_app_id,
                on_keys=publish,
                home=node_dir,
                threshold=bool(threshold_node) and not dealer,
                threshold_dealer=dealer,
                join=join,
                join_carried=join_carried,
                require_app_compose=require_app_compose,
                finality_depth=finality_depth,
            )
        )
    except KmsError as exc:
        _fail(exc.diagnostics())
    except (OSError, RuntimeError) as exc:
        _fail(str(exc))
    if running.published:
        err.print(f"published KMS info to KmsAuth (quote hash {running.published})")
    if running.publish_error:
        err.print(f"[yellow]warning:[/] could not publish KMS info to KmsAuth: {running.publish_error}")
    if running.join_error.startswith("RoundPending: "):
        err.print(
            f"[yellow]{running.join_error.removeprefix('RoundPending: ')}[/]; serving the epochs it holds"
        )
    elif running.join_error:
        err.print(
            f"[red]the round was not joined[/] ({running.join_error}); serving the epochs this node holds"
        )
    server, keys, identity = running.server, running.keys, running.identity
    endpoint = _kms_dir(node_dir) / ENDPOINT_FILE
    atomic_write_json(endpoint, endpoint_doc(running, tee, dev=dev, threshold_node=threshold_node))
    if running.service.threshold is not None:
        ev = running.service.threshold
        out.print(
            f"threshold node {ev.index} (epoch {ev.epoch}, group key {ev.group_public_key.hex()[:16]}…)"
        )
    out.print(f"KMS listening on {server.url} (RA-TLS), admin on {server.admin_url}")
    out.print(f"root CA public key {keys.ca_public_key_der.hex()}")
    out.print(f"k256 public key    {keys.k256_public_key.hex()}")
    out.print(
        f"mr_aggregated      {identity.mr_aggregated.hex()}" + ("  [yellow](dev mode)[/]" if dev else "")
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set():
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        endpoint.unlink(missing_ok=True)


def endpoint_doc(running: Any, tee: Any, *, dev: bool, threshold_node: int) -> dict[str, Any]:
    """What `kms up` writes to its endpoint file once it serves (a kms.launcher.RunningKms)."""
    evaluator = running.service.threshold
    held = evaluator.epochs if evaluator is not None else ()
    shares = {e: evaluator.share_of(e) for e in held}
    return {
        "url": running.server.url,
        "admin_url": running.server.admin_url,
        "dev": dev,
        "threshold_node": threshold_node,
        "server_ca_pubkey": running.keys.ca_public_key_der.hex(),
        "mr_aggregated": running.identity.mr_aggregated.hex(),
        "device_id": bytes(tee.device_id).hex(),
        # a threshold node's root epochs (epoch -> group key), their Feldman commitments (a DKG's are the
        # sums over QUAL: what `teecloud up` records) and a rotation round it failed to join: what
        # `kms rotate-finish` checks before it records an epoch's committee
        "epochs": {str(e): s.group_public_key.hex() for e, s in shares.items() if s is not None},
        "commitments": {str(e): [c.hex() for c in s.commitments] for e, s in shares.items() if s is not None},
        "join_error": running.join_error,
    }


def _round_joiner(
    plan_file: Path,
    kind: str,
    index: int,
    tee: Any,
    dev: bool,
    pccs_url: str | None,
    chain: Any,
    *,
    carried: Any = None,
    finality_depth: int = 0,
    home: Path | None = None,
) -> Any:
    """The join step of `kms up --join-dkg / --join-reshare`: the plan names the round and its dealers (URL
    and server CA key each); each dealer is checked as a KMS (RA-TLS + KmsAuth.isKmsAllowed) before anything
    is sent. A reshare plan also states the commitments the new committee must end with. A reshare's join
    fills `carried` (a kms.threshold_carry.CarriedShares) with the other sharings the dealers carried, once
    their signing and CA keys are the ones KmsGroup records for the epoch `finality_depth` blocks deep; the
    launcher seals them with the root share. A rotation plan with a complaint phase is a *rolling* round
    (its nodes restart one at a time): the first boot posts this member's statement and seals what the
    second needs in `home` (the join then fails with RoundPending: the node serves its older epochs); the
    next boot on the same plan decides QUAL and returns the share (kms.threshold_client.post_dkg_statement,
    finish_dkg)."""
    from teecloud.kms.bootstrap import KMS_APP_ID
    from teecloud.kms.client import connect_kms
    from teecloud.kms.errors import KmsClientError, SealingError
    from teecloud.kms.threshold import DkgPlan, ResharePlan
    from teecloud.kms.threshold_client import (
        PendingDkg,
        RoundPending,
        finish_dkg,
        join_dkg,
        join_reshare,
        post_dkg_statement,
    )

    try:
        doc = json.loads(plan_file.read_text())
        dealers = {int(i): d for i, d in doc["dealers"].items()}
        plan: DkgPlan | ResharePlan
        if kind == "dkg":
            plan = DkgPlan(
                bytes.fromhex(doc["session"]),
                int(doc["epoch"]),
                tuple(sorted(dealers)),
                int(doc["t"]),
                int(doc["n"]),
                complaint_round=doc.get("complaint_round", False) is True,
            )
            expected: tuple[bytes, ...] | None = None
            member_token: bytes | None = None
            rolling = doc.get("kind") == "rotate" and plan.complaint_round
            if doc.get("kind") == "rotate" and not rolling:  # the new group's commitments (no one left out)
                expected = tuple(bytes.fromhex(c) for c in doc["commitments"])
            if doc.get("kind") == "rotate" or "member_tokens" in doc:  # `up`'s plans: this member's token
                member_token = bytes.fromhex(doc["member_tokens"][str(index)])
        else:
            if doc.get("kind") != "reshare":
                raise ValueError("not a reshare plan (kind)")
            plan = ResharePlan(
                bytes.fromhex(doc["session"]),
                int(doc["epoch"]),
                tuple(bytes.fromhex(c) for c in doc["old_commitments"]),
                tuple(sorted(dealers)),
                int(doc["t"]),
                int(doc["n"]),
            )
            expected = tuple(bytes.fromhex(c) for c in doc["new_commitments"])
            member_token = bytes.fromhex(doc["member_tokens"][str(index)])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SealingError) as exc:
        _fail(f"{'DKG' if kind == 'dkg' else 'reshare'} plan {plan_file}: {exc}")
    collateral = _collateral(tee, dev, pccs_url)

    def check_against_chain() -> None:
        """The plan must be about the group the chain records (KmsGroup): a reshare moves the shares of the
        committee serving its epoch, a DKG makes the key of an epoch that has none. An edited plan naming
        another group's dealers and commitments is refused before anything is asked of them."""
        from teecloud.chain import ChainError

        try:
            kms_group = chain.kms_group
            if isinstance(plan, DkgPlan):
                if kms_group.group_key(plan.epoch) is not None:
                    raise KmsClientError(
                        f"KmsGroup already records a group key for epoch {plan.epoch}: a DKG makes a new one"
                    )
                return
            served = kms_group.active(plan.epoch)
        except ChainError as exc:
            raise KmsClientError(f"cannot read the serving committee from KmsGroup: {exc}") from exc
        if served is None or served.commitments != plan.old_commitments:
            raise KmsClientError(
                f"the reshare plan is not for the committee KmsGroup records as serving epoch {plan.epoch}; "
                "refusing to join"
            )

    def rolling_join(plan: DkgPlan, tee_: Any, identity: Any, clients: dict[int, Any]) -> Any:
        from teecloud.kms.threshold import erase_pending_round, load_pending_round, save_pending_round

        held = load_pending_round(tee_, identity, home)
        pending = PendingDkg.from_json_bytes(held) if held is not None else None
        if pending is None or (pending.session, pending.index) != (plan.session, index):
            # (first pass): this member's statement on every board, then serve the older epochs
            pending = post_dkg_statement(
                plan, index, tee_, clients, app_id=KMS_APP_ID, member_token=member_token
            )
            save_pending_round(pending.to_json_bytes(), tee_, identity, home)
            raise RoundPending(
                f"statement posted in rotation round {plan.session.hex()[:8]} (complaints against dealers "
                f"{list(pending.complaints) or 'none'}); restart this node on the same plan once every "
                "member has posted, to finish the round"
            )
        # (second pass): QUAL from every member's statement and the answers; the pending state goes either
        # way (a failed round is re-run with `kms rotate`)
        try:
            return finish_dkg(plan, index, tee_, clients, pending, app_id=KMS_APP_ID)
        finally:
            erase_pending_round(home)

    def join(tee_: Any, _identity: Any) -> Any:
        check_against_chain()
        clients = {
            i: connect_kms(
                str(d["url"]),
                collateral_for=lambda q, now: collateral.collateral_for(q, now=now),
                dev_root_der=tee_.dev_root_der() if dev else None,
                chain=chain,
                expected_ca_pubkey_der=bytes.fromhex(str(d["server_ca_pubkey"])),
            )
            for i, d in dealers.items()
        }
        if isinstance(plan, DkgPlan) and rolling:
            share = rolling_join(plan, tee_, _identity, clients)
        elif isinstance(plan, DkgPlan):
            share = join_dkg(plan, index, tee_, clients, app_id=KMS_APP_ID, member_token=member_token)
        else:
            from teecloud.chain import ChainError

            try:
                kms_group = chain.kms_group
            except ChainError as exc:
                raise KmsClientError(f"cannot read KmsGroup: {exc}") from exc
            share = join_reshare(
                plan,
                index,
                tee_,
                clients,
                app_id=KMS_APP_ID,
                member_token=member_token,
                carried_out=carried,
                kms_group=kms_group,
                finality_depth=finality_depth,
            )
        if expected is not None and share.commitments != expected:
            raise KmsClientError("the round ended with other commitments than its plan states")
        return share

    return join


@app.command("threshold-init")
def threshold_init(
    nodes: Annotated[int, typer.Option("--nodes", help="n: how many KMS nodes hold a share.")] = 5,
    threshold: Annotated[int, typer.Option("--threshold", help="t: how many nodes answer a release.")] = 3,
    dev: Annotated[
        bool, typer.Option("--dev", help="Development ceremony on the simulated TEE (required).")
    ] = False,
) -> None:
    """Development key ceremony for a t-of-n threshold KMS: a Joint-Feldman DKG run in this one process
    (which sees every share: development only), each share sealed into data_home()/kms-nodes/<i>."""
    from teecloud.kms.bootstrap import boot_kms_tee
    from teecloud.kms.errors import KmsError
    from teecloud.kms.threshold import dev_ceremony, nodes_dir

    if not dev:
        _fail("only the development ceremony exists (--dev); the networked DKG among nodes is not built")
    if not 1 <= threshold <= nodes <= 16:
        _fail("need 1 <= --threshold <= --nodes <= 16")
    tee = _tee(dev)
    try:
        group, created = dev_ceremony(tee, boot_kms_tee(tee), threshold, nodes)
    except KmsError as exc:
        _fail(exc.diagnostics())
    verb = "created" if created else "already exists:"
    out.print(
        f"{verb} {group.t}-of-{group.n} group (epoch {group.epoch}) in {nodes_dir()}; "
        f"group key {group.commitments[0].hex()}"
        + (f"; signing key {group.signing_key.hex()}" if group.signing_key else "")
    )
    err.print("[yellow]development ceremony: this process saw every share[/]")


@app.command("onboard")
def onboard(
    source: Annotated[str, typer.Option("--from", help="URL of a running, authorized KMS.")],
    dev: Annotated[
        bool, typer.Option("--dev", help="Simulated TEE; trust this installation's dev root.")
    ] = False,
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="EVM JSON-RPC URL (default: embedded chain).")
    ] = None,
    pccs_url: Annotated[
        str | None, typer.Option("--pccs-url", help="PCCS for collateral (production).")
    ] = None,
) -> None:
    """Copy the root keys from another KMS over mutual RA-TLS (both sides check KmsAuth.isKmsAllowed)."""
    from teecloud.kms.bootstrap import boot_kms_tee, load_state
    from teecloud.kms.errors import KmsError
    from teecloud.kms.onboard import onboard_from

    tee = _tee(dev)
    chain = _chain(rpc_url, None)
    collateral = _collateral(tee, dev, pccs_url)
    try:
        identity = boot_kms_tee(tee, finish=False)  # onboarding needs boot-time evidence
        if load_state(tee, identity) is not None:
            _fail(f"this KMS already has root keys in {_kms_dir()}; refusing to overwrite them")
        keys = onboard_from(
            source,
            tee=tee,
            identity=identity,
            chain=chain,
            collateral_for=lambda quote, now: collateral.collateral_for(quote, now=now),
            dev_root_der=tee.dev_root_der() if dev else None,
        )
    except KmsError as exc:
        _fail(exc.diagnostics())
    out.print(f"[green]onboarded[/] from {source}: root CA key {keys.ca_public_key_der.hex()[:32]}…, sealed")


def _local_client(
    url: str | None, dev: bool, pccs_url: str | None, insecure: bool, rpc_url: str | None = None
) -> Any:
    from teecloud.kms.client import KmsClient, UnsafeNoServerCheck, connect_kms

    if url is None:
        path = _kms_dir() / ENDPOINT_FILE
        try:
            url = str(json.loads(path.read_text())["url"])
        except (OSError, ValueError, KeyError, TypeError):
            from teecloud.cloud.endpoints import read_endpoints

            cloud = read_endpoints()  # the KMS of a running `teecloud up` for this data directory
            if cloud is None:
                _fail("no --url given and no local KMS running (`teecloud up` or `teecloud kms up`)")
            url = cloud.kms
            if not (dev or pccs_url or insecure):
                dev = True  # `teecloud up` runs on the simulated TEE of this installation
                err.print(
                    f"[dim]KMS of the local cloud ({url}), verified against this installation's dev root[/]"
                )
    if insecure:
        return KmsClient(url, server_check=UnsafeNoServerCheck())
    # The KMS must be one KmsAuth allows (isKmsAllowed on its attested boot info), not just any CVM.
    if dev:
        from teecloud.tee.simulated import SimulatedTdx

        sim = SimulatedTdx()
        return connect_kms(
            url,
            collateral_for=lambda q, now: sim.collateral(),
            dev_root_der=sim.dev_root_der(),
            chain=_chain(rpc_url, None),
        )
    if pccs_url:
        tee_col = _collateral(None, False, pccs_url)
        return connect_kms(
            url,
            collateral_for=lambda q, now: tee_col.collateral_for(q, now=now),
            dev_root_der=None,
            chain=_chain(rpc_url, None),
        )
    _fail("say how to verify the KMS: --dev (simulated, local dev root), --pccs-url URL, or --insecure")


@app.command("pubkey")
def pubkey(
    app_id: Annotated[str, typer.Argument(help="App id (0x + 40 hex digits).")],
    url: Annotated[str | None, typer.Option(help="KMS URL (default: the local `kms up`).")] = None,
    dev: Annotated[bool, typer.Option("--dev", help="Verify the KMS against the local dev root.")] = False,
    pccs_url: Annotated[str | None, typer.Option("--pccs-url")] = None,
    rpc_url: Annotated[
        str | None,
        typer.Option("--rpc-url", help="Chain whose KmsAuth must allow the KMS (default: embedded chain)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Do not verify the KMS (NOT for real use).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The app's env-encryption X25519 public key, with the KMS (and its signature) checked."""
    from teecloud.ids import HexError, parse_app_id
    from teecloud.kms.errors import KmsError

    try:
        app_bytes = parse_app_id(app_id)
    except HexError as exc:
        _fail(str(exc))
    raw = app_bytes.hex()
    client = _local_client(url, dev, pccs_url, insecure, rpc_url)
    try:
        pub, resp = client.get_env_encrypt_pubkey(app_bytes)
        meta = client.meta()
    except KmsError as exc:
        _fail(exc.diagnostics())
    doc = {**resp.model_dump(), "app_id": "0x" + raw, "kms_k256_pubkey": meta.k256_pubkey}
    if as_json:
        out.print_json(json.dumps(doc))
        return
    out.print(f"app_id        0x{raw}")
    out.print(f"public_key    {pub.hex()}")
    out.print(f"timestamp     {resp.timestamp}")
    out.print(f"signature_v1  {resp.signature_v1}")
    out.print(f"signed by     {meta.k256_pubkey} (KMS root k256, verified)")


def _index_list(text: str, what: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        _fail(f"{what}: a comma-separated list of share indices, e.g. 1,2,3")
    if not out or any(not 1 <= i <= 64 for i in out):
        _fail(f"{what}: share indices are 1..64")
    return out


def _node_endpoint(home: Path) -> dict[str, Any]:
    """The endpoint file a running `kms up` writes in its data directory `home`."""
    ep_file = _kms_dir(home) / ENDPOINT_FILE
    try:
        ep = json.loads(ep_file.read_text())
        if not isinstance(ep, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        _fail(f"the KMS node in {home} is not reachable (is it running?): {exc}")
    return ep


def _running_node(home: Path) -> tuple[dict[str, Any], AdminEndpoint]:
    """A running threshold node of this installation, by its data directory `home`: its endpoint file and
    (teecloud.kms.threshold_net.AdminEndpoint) its admin listener with the bearer token from its
    admin-token file (the operator's own nodes). Fails with a clear error when either is missing."""
    from teecloud.kms.launcher import load_admin_token
    from teecloud.kms.threshold_net import AdminEndpoint

    ep = _node_endpoint(home)
    try:
        return ep, AdminEndpoint(str(ep["admin_url"]), load_admin_token(home), str(ep["url"]))
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"the KMS node in {home} is not reachable (is it running?): {exc}")


def _admin_post(node: AdminEndpoint, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """POST to a running node's admin listener (`node`: an AdminEndpoint from _running_node)."""
    import httpx

    try:
        auth = {"authorization": f"Bearer {node.token}"}
        r = httpx.post(f"{node.admin_url}{path}", headers=auth, json=body, timeout=30)
    except httpx.HTTPError as exc:
        _fail(f"the KMS node at {node.admin_url} is not reachable (is it running?): {exc}")
    if r.status_code != 200:
        _fail(f"the KMS node at {node.admin_url} refused {path}: {r.status_code} {r.text[:300]}")
    return dict(r.json())


def _record_peer_keys(kms_group: Any, committee_id: int) -> None:
    """A just-recorded committee's current peer keys (one live process per share index); a node that does
    not answer is a warning — its index is then admitted on the membership proof alone until
    `teecloud kms peer-keys` records it."""
    from teecloud.kms.errors import KmsError
    from teecloud.kms.peering import record_current_peer_keys

    try:
        record_current_peer_keys(kms_group, kms_group.committee(committee_id))
    except KmsError as exc:
        err.print(f"[yellow]warning:[/] peer keys not recorded: {exc}; run `teecloud kms peer-keys`")


@app.command("reshare-open")
def reshare_open(
    dealers_text: Annotated[
        str, typer.Option("--dealers", help="t old share indices that deal, e.g. 1,2,3 (running nodes).")
    ],
    threshold: Annotated[int, typer.Option("--threshold", min=1, max=64, help="The new committee's t.")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=64, help="The new committee's n.")],
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the round's plan (JSON).")],
) -> None:
    """Open a reshare round on t running nodes of this installation's group: the same group key to a new
    committee (new t, n, members; e.g. a KMS code upgrade). New nodes then boot with
    `kms up --threshold-node J --node-dir DIR --join-reshare PLAN`; `kms reshare-finish` records them."""
    import hashlib
    import secrets

    from teecloud.keys import threshold as th
    from teecloud.kms.errors import KmsError
    from teecloud.kms.threshold import node_home, read_group

    dealers = _index_list(dealers_text, "--dealers")
    if threshold > nodes:
        _fail("need --threshold <= --nodes")
    try:
        group = read_group()
    except KmsError as exc:
        _fail(exc.diagnostics())
    if group is None:
        _fail(f"no threshold group in {data_home()} (kms-nodes/group.json): nothing to reshare")
    if len(dealers) != group.t:
        _fail(f"a reshare of this {group.t}-of-{group.n} group needs exactly {group.t} dealers")
    session = secrets.token_bytes(16)
    # one one-time token per new member: a dealer hands share j's sub-share only to the boot presenting
    # token j, not to whichever allowed KMS asks first (give new node j its token only)
    tokens = {j: secrets.token_bytes(32) for j in range(1, nodes + 1)}
    body = {
        "session": session.hex(),
        "epoch": group.epoch,
        "old_commitments": [c.hex() for c in group.commitments],
        "dealers": dealers,
        "t_new": threshold,
        "n_new": nodes,
        "member_token_hashes": {str(j): hashlib.sha256(tok).hexdigest() for j, tok in tokens.items()},
    }
    plan_dealers: dict[str, Any] = {}
    dealings = []
    for i in dealers:
        ep, admin = _running_node(node_home(i))
        answer = _admin_post(admin, "/reshare/open", body)
        commitments = tuple(bytes.fromhex(c) for c in answer["commitments"])
        dealings.append(th.Dealing(int(answer["dealer"]), commitments, {}))
        plan_dealers[str(i)] = {
            "url": ep["url"],
            "server_ca_pubkey": ep["server_ca_pubkey"],
            "commitments": answer["commitments"],
        }
    try:
        new_commitments = th.reshare_commitments(dealings)
    except th.ThresholdError as exc:
        _fail(f"the dealers' commitments do not combine: {exc}")
    if new_commitments[0] != group.commitments[0]:
        _fail("the dealings would change the group key: refusing the round (a dealer is faulty)")
    plan = {
        "kind": "reshare",
        "session": session.hex(),
        "epoch": group.epoch,
        "old_commitments": body["old_commitments"],
        "t": threshold,
        "n": nodes,
        "dealers": plan_dealers,
        "new_commitments": [c.hex() for c in new_commitments],
        "member_tokens": {str(j): tok.hex() for j, tok in tokens.items()},
    }
    atomic_write_json(out_file, plan, mode=0o600)  # holds every member's token
    out.print(
        f"reshare round {session.hex()[:8]}… open on dealers {dealers} for {threshold}-of-{nodes} "
        f"(10 minutes); plan written to {out_file}"
    )


@app.command("reshare-finish")
def reshare_finish(
    plan_file: Annotated[Path, typer.Option("--plan", help="The round's plan (from `kms reshare-open`).")],
    new_nodes_dir: Annotated[
        Path,
        typer.Option("--new-nodes-dir", help="Holds the new nodes' data directories, one per index (1..n)."),
    ],
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="EVM JSON-RPC URL (default: embedded chain).")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="KmsGroup owner's key (records the committee).")
    ] = None,
    retire: Annotated[
        bool, typer.Option("--retire", help="Then erase the old committee's shares (POST /threshold/retire).")
    ] = False,
) -> None:
    """Record the new committee on chain (KmsGroup) once its n nodes serve, make it the serving one, and
    optionally retire the old committee's shares."""
    from teecloud.chain import ChainError
    from teecloud.chain.kmsgroup import CommitteeMember
    from teecloud.kms.threshold import node_home, read_group

    try:
        plan = json.loads(plan_file.read_text())
        if plan.get("kind") != "reshare":
            raise ValueError("not a reshare plan")
        epoch, t, n = int(plan["epoch"]), int(plan["t"]), int(plan["n"])
        commitments = tuple(bytes.fromhex(c) for c in plan["new_commitments"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        _fail(f"reshare plan {plan_file}: {exc}")
    members = []
    for j in range(1, n + 1):
        ep_file = _kms_dir(new_nodes_dir / str(j)) / ENDPOINT_FILE
        try:
            ep = json.loads(ep_file.read_text())
            members.append(
                CommitteeMember(
                    j, bytes.fromhex(ep["mr_aggregated"]), bytes.fromhex(ep["device_id"]), str(ep["url"])
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _fail(f"new node {j} is not serving yet ({ep_file}: {exc}); start every new node first")
    chain = _chain(rpc_url, key_file)
    try:
        served = chain.kms_group.active(epoch)
        old_commitments = tuple(bytes.fromhex(c) for c in plan["old_commitments"])
        if served is None or served.commitments != old_commitments:
            _fail(f"the plan is not a reshare of the committee KmsGroup records as serving epoch {epoch}")
        if commitments[0] != served.group_public_key:
            _fail("the plan's new committee has another group key: a reshare keeps the key")
        cid = chain.kms_group.record_committee(epoch, t, commitments, members)
        chain.kms_group.activate(cid)
        _record_peer_keys(chain.kms_group, cid)
    except (ChainError, ValueError, KeyError, TypeError) as exc:
        _fail(f"chain: {exc}")
    finally:
        chain.close()
    old = read_group()
    out.print(f"committee {cid} ({t}-of-{n}, epoch {epoch}) recorded and serving")
    if retire and old is not None:
        for i in range(1, old.n + 1):
            home = node_home(i)
            if (_kms_dir(home) / ENDPOINT_FILE).exists():
                _admin_post(_running_node(home)[1], "/threshold/retire", None)
                out.print(f"old node {i}: share erased")


@app.command("rotate")
def rotate(
    dealers_text: Annotated[
        str,
        typer.Option(
            "--dealers",
            help="Share-less dealers that deal the new epoch's key, e.g. 1,2,3 (running `kms up "
            "--threshold-node I --dealer` processes; all n is the usual choice).",
        ),
    ],
    threshold: Annotated[int, typer.Option("--threshold", min=1, max=64, help="The new epoch's t.")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=64, help="The new epoch's n.")],
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the round's plan (JSON, 0600).")],
    epoch: Annotated[
        int, typer.Option("--epoch", min=0, help="The new root epoch (default: the newest on chain + 1).")
    ] = 0,
    dealers_dir: Annotated[
        Path | None,
        typer.Option(
            "--dealers-dir", help="Holds dealer I's data directory as dealer-I (default kms-nodes)."
        ),
    ] = None,
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="EVM JSON-RPC URL (default: embedded chain).")
    ] = None,
) -> None:
    """Rotate the root: open a DKG round for a NEW root epoch (a new group key; the old epochs stay) on
    running share-less dealers (admin listener, bearer token from each dealer's data dir), with GJKR's
    complaint phase as a rolling round. Each committee node then restarts with `kms up --threshold-node J
    --join-dkg PLAN` twice, one node at a time (first pass: its statement; second pass, after every node's
    first: QUAL and its share), keeping its old epochs' shares and serving them throughout;
    `kms rotate-finish` records the epoch on chain once every node holds the same group. Only apps whose
    app-compose opts in change keys."""
    from teecloud.chain import ChainError
    from teecloud.kms.errors import KmsError
    from teecloud.kms.rotation import open_rotation, serving_groups
    from teecloud.kms.threshold import dealer_home

    dealers = _index_list(dealers_text, "--dealers")
    if threshold > nodes:
        _fail("need --threshold <= --nodes")

    def home_of(i: int) -> Path:
        return (dealers_dir / f"dealer-{i}") if dealers_dir is not None else dealer_home(i)

    running = {i: _running_node(home_of(i)) for i in dealers}
    endpoints = {i: ep for i, (ep, _) in running.items()}
    chain = _chain(rpc_url, None)
    try:
        kms_group = chain.kms_group
        if not epoch:
            served = serving_groups(kms_group)
            if not served:
                _fail("KmsGroup records no serving committee: run the first DKG (`teecloud up --kms-nodes`)")
            epoch = max(served) + 1
        plan = open_rotation(
            epoch,
            threshold,
            nodes,
            endpoints,
            lambda i, path, body: _admin_post(running[i][1], path, body),
            group_key_on_chain=kms_group.group_key,
        )
    except ChainError as exc:
        _fail(f"chain: {exc}")
    except KmsError as exc:
        _fail(exc.diagnostics())
    finally:
        chain.close()
    atomic_write_json(out_file, plan.to_json(), mode=0o600)  # holds every member's token
    out.print(
        f"rotation to root epoch {plan.epoch} ({threshold}-of-{nodes}, group key "
        f"{plan.commitments[0].hex()[:16]}…) open on dealers {dealers} for 10 minutes; plan in {out_file}"
    )
    out.print(
        f"next: restart each node J, one at a time, with `teecloud kms up --threshold-node J --join-dkg "
        f"{out_file}` (it keeps serving its older epochs and posts its GJKR statement); once all {nodes} "
        "have, restart each one again the same way (it decides QUAL and seals the new epoch); then "
        f"`teecloud kms rotate-finish --plan {out_file}` — all within 10 minutes of this opening"
    )


@app.command("rotate-finish")
def rotate_finish(
    plan_file: Annotated[Path, typer.Option("--plan", help="The round's plan (from `kms rotate`).")],
    nodes_dir_opt: Annotated[
        Path | None,
        typer.Option("--nodes-dir", help="Holds node J's data directory as J (default kms-nodes)."),
    ] = None,
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="EVM JSON-RPC URL (default: embedded chain).")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="KmsGroup owner's key (records the committee).")
    ] = None,
) -> None:
    """Record the new root epoch's committee on chain (KmsGroup) and make it serve that epoch, once every one
    of its n nodes serves the epoch with the plan's group key; otherwise refuse (the old epochs keep serving
    and nothing is recorded: re-run `kms rotate`)."""
    from teecloud.chain import ChainError
    from teecloud.chain.kmsgroup import CommitteeMember
    from teecloud.kms.errors import KmsError
    from teecloud.kms.rotation import RotationPlan, refresh_committees, rotation_commitments
    from teecloud.kms.threshold import node_home

    try:
        plan = RotationPlan.from_json(json.loads(plan_file.read_text()))
    except (OSError, ValueError) as exc:
        _fail(f"rotation plan {plan_file}: {exc}")
    except KmsError as exc:
        _fail(exc.diagnostics())
    missing: list[str] = []
    endpoints: dict[int, dict[str, Any]] = {}
    for j in range(1, plan.n + 1):
        home = (nodes_dir_opt / str(j)) if nodes_dir_opt is not None else node_home(j)
        ep_file = _kms_dir(home) / ENDPOINT_FILE
        try:
            endpoints[j] = dict(json.loads(ep_file.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            missing.append(f"node {j}: not serving ({ep_file}: {exc})")
    # every node holds the epoch, all with the same commitments (a rolling round's: the sums over QUAL)
    commitments, disagree = rotation_commitments(plan, endpoints)
    missing += [m for m in disagree if not m.endswith(": not serving")]  # those are in `missing` already
    members = []
    if not missing:
        for j, ep in sorted(endpoints.items()):
            try:
                members.append(
                    CommitteeMember(
                        j, bytes.fromhex(ep["mr_aggregated"]), bytes.fromhex(ep["device_id"]), str(ep["url"])
                    )
                )
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                missing.append(f"node {j}: its endpoint file is malformed ({exc!r})")
    if missing:
        _fail(
            f"the rotation to epoch {plan.epoch} is not complete; nothing was recorded and the old epochs "
            "keep serving (re-run `teecloud kms rotate`, then restart the nodes again): " + "; ".join(missing)
        )
    chain = _chain(rpc_url, key_file)
    try:
        kms_group = chain.kms_group
        if kms_group.group_key(plan.epoch) is not None:
            _fail(f"KmsGroup already records epoch {plan.epoch}")
        assert commitments is not None
        cid = kms_group.record_committee(plan.epoch, plan.t, commitments, members)
        kms_group.activate(cid)
        _record_peer_keys(kms_group, cid)
        # the older epochs' committees: the same nodes, restarted (at new addresses when ports are dynamic)
        moved = [e for e, c in refresh_committees(kms_group, endpoints).items() if c.committee_id > cid]
    except (ChainError, ValueError) as exc:
        _fail(f"chain: {exc}")
    finally:
        chain.close()
    if commitments != plan.commitments:
        out.print("the round disqualified dealers (GJKR): the group is the sum over the qualified ones")
    out.print(
        f"root epoch {plan.epoch}: committee {cid} ({plan.t}-of-{plan.n}) recorded and serving; apps opt in "
        'with "kms_key_epoch" in their app-compose (docs/kms.md, "Rotation")'
    )
    for e in moved:
        out.print(f"root epoch {e}: the same committee recorded at its nodes' new addresses")


def _check_root_cert(path: Path, group_ca: Any, epoch: int) -> str:
    """`kms group --root-cert`: the given root is the one KmsGroup records for the epoch, else exit 1."""
    from cryptography import x509

    from teecloud.keys import threshold_certs as tc
    from teecloud.keys.errors import KeysError

    if group_ca is None:
        _fail(f"{path}: KmsGroup records no group CA for epoch {epoch}: this root is not on chain")
    try:
        if path.stat().st_size > 65536:
            raise ValueError("above 64 KiB")
        root = x509.load_pem_x509_certificate(path.read_bytes())
        tc.check_group_root(root, group_ca.ca_key, group_ca.root_cert_hash)
    except (OSError, ValueError, x509.InvalidVersion, KeysError) as exc:
        _fail(f"{path}: not the group root CA KmsGroup records for epoch {epoch}: {exc}")
    return "matches the chain's record"


@app.command("group")
def group(
    epoch: Annotated[int, typer.Option(min=0, help="Root epoch.")] = 1,
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="EVM JSON-RPC URL (default: embedded chain).")
    ] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Print the membership log (every DKG, reshare, activation).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    finality_depth: Annotated[
        int,
        typer.Option(
            "--finality-depth", min=0, max=1024, help="Read the record this many blocks below the head."
        ),
    ] = 0,
    root_cert: Annotated[
        Path | None,
        typer.Option(
            "--root-cert",
            help="A group root CA certificate (PEM) to check against the chain's record of EPOCH "
            "(its CA key and the sha256 of the root's DER); exits 1 when it is not the recorded root.",
        ),
    ] = None,
) -> None:
    """The threshold KMS committee serving EPOCH, as the chain (KmsGroup) records it (with its signing key:
    what a verifier of a GetKey signature chain pins, and its group CA: what an app CA chains to)."""
    from teecloud.chain import ChainError

    chain = _chain(rpc_url, None)
    try:
        kms_group = chain.kms_group
        at = kms_group.final_block(finality_depth)
        committee = kms_group.active(epoch, at=at)
        signing_key = kms_group.signing_key(epoch, at=at) if committee is not None else None
        group_ca = kms_group.group_ca(epoch, at=at) if committee is not None else None
        log = kms_group.history() if history else []
    except ChainError as exc:
        _fail(f"chain: {exc}")
    finally:
        chain.close()
    if committee is None:
        _fail(
            f"no KMS committee serves epoch {epoch} on this chain at block {at.number} (a single-node KMS "
            "records none)"
        )
    root_check = ""
    if root_cert is not None:
        root_check = _check_root_cert(root_cert, group_ca, epoch)
    doc = {
        "committee_id": committee.committee_id,
        "epoch": committee.epoch,
        "t": committee.t,
        "n": committee.n,
        "group_public_key": committee.group_public_key.hex(),
        "signing_key": signing_key.hex() if signing_key else None,
        "ca_key": group_ca.ca_key.hex() if group_ca else None,
        "ca_root_sha256": group_ca.root_cert_hash.hex() if group_ca else None,
        "commitments": [c.hex() for c in committee.commitments],
        "recorded_at_block": committee.recorded_at_block,
        "members": [
            {
                "index": m.index,
                "url": m.url,
                "mr_aggregated": m.mr_aggregated.hex(),
                "device_id": m.device_id.hex(),
            }
            for m in committee.members
        ],
    }
    if history:
        doc["history"] = [
            {"block": e["block"], "event": e["event"], **{k: _plain(v) for k, v in e["args"].items()}}
            for e in log
        ]
    if root_check:
        doc["root_cert"] = root_check
    if as_json:
        out.print_json(json.dumps(doc))
        return
    out.print(
        f"epoch {committee.epoch}: committee {committee.committee_id}, {committee.t} of {committee.n}, "
        f"recorded at block {committee.recorded_at_block}"
    )
    out.print(f"group public key  {doc['group_public_key']}")
    out.print(f"signing key       {doc['signing_key'] or 'none recorded (this epoch does not sign)'}")
    out.print(f"group CA key      {doc['ca_key'] or 'none recorded (app CAs are self-signed)'}")
    if group_ca:
        out.print(f"root CA sha256    {doc['ca_root_sha256']}")
    if root_check:
        out.print(f"root certificate  {root_check}")
    for m in committee.members:
        out.print(
            f"  node {m.index:>2}  {m.url}  mr {m.mr_aggregated.hex()[:16]}…  dev {m.device_id.hex()[:16]}…"
        )
    for e in doc.get("history", []):
        out.print(
            f"  block {e['block']}: {e['event']} "
            + ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("block", "event"))
        )


MAX_APP_KEY_INPUT = 64 * 1024  # a GetKey response or a PEM chain: far below this


class _AppKeyUsage(Exception):
    """`kms verify-app-key`: an input that cannot be read or parsed (exit 2)."""


def _read_small(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_APP_KEY_INPUT:
            raise _AppKeyUsage(f"{what} {path} is larger than {MAX_APP_KEY_INPUT} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise _AppKeyUsage(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _hex_field(value: Any, what: str, sizes: tuple[int, ...]) -> bytes:
    if not isinstance(value, str):
        raise _AppKeyUsage(f"{what} is not a hex string")
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise _AppKeyUsage(f"{what} is not hex") from None
    if len(raw) not in sizes:
        allowed = " or ".join(map(str, sizes)) if len(sizes) < 3 else f"{min(sizes)}..{max(sizes)}"
        raise _AppKeyUsage(f"{what} is {len(raw)} bytes, not {allowed}")
    return raw


def _get_key_input(path: Path, algorithm: str) -> tuple[bytes, list[bytes]]:
    """A GetKey response (dstack's `{"key", "signature_chain"}`; `public_key` instead of, or beside, the
    private `key`) -> (the derived public key, the signature chain). Strict: no other field."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from teecloud.keys.errors import KeysError
    from teecloud.keys.sigchain import k256_public_key

    try:
        doc = json.loads(_read_small(path, "--get-key"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _AppKeyUsage(f"--get-key {path}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _AppKeyUsage(f"--get-key {path}: not a JSON object")
    extra = sorted(set(doc) - {"key", "public_key", "signature_chain"})
    if extra:
        raise _AppKeyUsage(f"--get-key {path}: unknown fields {extra} (key, public_key, signature_chain)")
    chain = doc.get("signature_chain")
    if not isinstance(chain, list) or len(chain) != 2:
        raise _AppKeyUsage(f"--get-key {path}: signature_chain is a list of 2 hex signatures")
    sigs = [_hex_field(s, f"signature_chain[{n}]", (65,)) for n, s in enumerate(chain)]
    public = None
    if "public_key" in doc:
        sizes = (32,) if algorithm == "ed25519" else (33, 65)
        public = _hex_field(doc["public_key"], "public_key", sizes)
    if "key" in doc:
        secret = _hex_field(doc["key"], "key", (32,))
        try:
            derived = (
                Ed25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()
                if algorithm == "ed25519"
                else k256_public_key(secret)
            )
        except (KeysError, ValueError) as exc:
            raise _AppKeyUsage(f"--get-key {path}: key is not a {algorithm} private key: {exc}") from None
        if public is not None and public != derived:
            raise _AppKeyUsage(f"--get-key {path}: public_key is not the public key of key")
        public = derived
    if public is None:
        raise _AppKeyUsage(f"--get-key {path}: needs key or public_key")
    return public, sigs


def _pem_chain(path: Path, what: str) -> list[Any]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(_read_small(path, what))
    except ValueError as exc:
        raise _AppKeyUsage(f"{what} {path}: not PEM certificates ({exc})") from None
    if not 1 <= len(certs) <= 8:
        raise _AppKeyUsage(f"{what} {path}: 1..8 certificates, not {len(certs)}")
    return certs


def _check_get_key(
    recorded: Any, app_id: bytes, public: bytes, sigs: list[bytes], purpose: str, epoch: int
) -> str:
    """(2) The GetKey chain verifies under the signing key KmsGroup records for the epoch."""
    from teecloud.keys.errors import KeysError
    from teecloud.keys.sigchain import verify_key_signature_chain

    if recorded is None:
        raise ValueError(f"KmsGroup records no signing key for epoch {epoch}: no app key is signed by it")
    try:
        app_key = verify_key_signature_chain(
            app_id=app_id,
            public_key=public,
            purpose=purpose,
            signature_chain=sigs,
            kms_root_public_key=recorded,
        )
    except KeysError as exc:
        raise ValueError(f"{exc} (the group's signing key of epoch {epoch} is {recorded.hex()})") from None
    return f"app key {app_key.hex()} signed by the group's signing key {recorded.hex()}"


def _check_app_ca(group_ca: Any, root: Any, certs: list[Any], app_id: bytes, epoch: int, now: int) -> str:
    """(3) The root is the one KmsGroup records (its CA key, the sha256 of its DER, self-signed); the last
    certificate is exactly the app CA the group signs for `app_id` and that key under it (its TBS as every
    node builds it, its signature under the root); each earlier one is issued by the next; all valid now."""
    import datetime as dt
    import itertools

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    from teecloud.keys import threshold_certs as tc
    from teecloud.keys.errors import KeysError

    if group_ca is None:
        raise ValueError(f"KmsGroup records no group CA for epoch {epoch}: no app CA is signed under it")
    try:
        tc.check_group_root(root, group_ca.ca_key, group_ca.root_cert_hash)
        app_ca = certs[-1]
        key = app_ca.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("the app CA's key is not a P-256 key")
        root_key = root.public_key()
        tc.canonical_certificate(tc.app_ca_to_sign(root, app_id, key), app_ca, root_key)
    except KeysError as exc:
        raise ValueError(f"the app CA is not the group's for app {app_id.hex()}: {exc}") from None
    for n, (cert, issuer) in enumerate(itertools.pairwise(certs)):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"certificate {n} is not issued by certificate {n + 1}: {exc}") from None
        except InvalidSignature:
            raise ValueError(f"certificate {n}'s signature does not verify under the next one") from None
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    for n, cert in enumerate([*certs, root]):
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            which = "the root" if cert is root else f"certificate {n}"
            raise ValueError(
                f"{which} is not valid at {at:%Y-%m-%dT%H:%M:%SZ} "
                f"({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})"
            )
    return f"app CA {app_ca.subject.rfc4514_string()} signed under the group root recorded for epoch {epoch}"


@app.command("verify-app-key")
def verify_app_key(
    app_id_hex: Annotated[str, typer.Option("--app-id", help="The app's id (hex).")],
    get_key: Annotated[
        Path | None,
        typer.Option(
            "--get-key",
            help='A GetKey response (JSON {"key" or "public_key", "signature_chain"}): its signature chain '
            "must end in the signing key KmsGroup records for EPOCH.",
        ),
    ] = None,
    purpose: Annotated[str, typer.Option("--purpose", help="The GetKey request's purpose.")] = "",
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="The GetKey request's algorithm: secp256k1 or ed25519.")
    ] = "secp256k1",
    app_ca: Annotated[
        Path | None,
        typer.Option(
            "--app-ca",
            help="The app's certificate chain (PEM; leaf first, its app CA last), e.g. its RA-TLS chain: "
            "the app CA must be the group-signed one for --app-id under --root-cert.",
        ),
    ] = None,
    root_cert: Annotated[
        Path | None,
        typer.Option(
            "--root-cert",
            help="The group root CA certificate (PEM): checked against KmsGroup's record (CA key, sha256).",
        ),
    ] = None,
    epoch: Annotated[int, typer.Option(min=0, help="Root epoch.")] = 1,
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="EVM JSON-RPC URL (default: embedded chain).")
    ] = None,
    finality_depth: Annotated[
        int,
        typer.Option(
            "--finality-depth", min=0, max=1024, help="Read the record this many blocks below the head."
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Verify an app's key material under the threshold group KmsGroup records for EPOCH: a GetKey
    signature chain (dstack's; what dstack-sdk checks) under the group's signing key, and an app CA (its
    chain) under the group's root CA. Exit 0 valid, 1 rejected, 2 usage error or unreadable input/chain."""
    from cryptography import x509

    from teecloud.chain import ChainClient, ChainError

    def usage(message: str) -> NoReturn:
        if as_json:
            typer.echo(json.dumps({"is_valid": False, "error": message}))
        _fail(message, 2)

    # (1) inputs, parsed strictly before the chain is asked
    try:
        app_id = _hex_field(app_id_hex, "--app-id", tuple(range(1, 65)))
        if get_key is None and app_ca is None:
            raise _AppKeyUsage("give --get-key FILE and/or --app-ca FILE (with --root-cert FILE)")
        if algorithm not in ("secp256k1", "ed25519"):
            raise _AppKeyUsage(f"--algorithm is secp256k1 or ed25519, not {algorithm!r}")
        if (app_ca is None) != (root_cert is None):
            raise _AppKeyUsage(
                "--app-ca and --root-cert go together (the chain records only the root's hash)"
            )
        key_input = _get_key_input(get_key, algorithm) if get_key is not None else None
        certs = _pem_chain(app_ca, "--app-ca") if app_ca is not None else []
        roots: list[x509.Certificate] = _pem_chain(root_cert, "--root-cert") if root_cert is not None else []
        if len(roots) > 1:
            raise _AppKeyUsage(f"--root-cert {root_cert}: one certificate, not {len(roots)}")
    except _AppKeyUsage as exc:
        usage(str(exc))
    # (2) the group's record at the finality depth
    try:
        chain = ChainClient.rpc(rpc_url) if rpc_url else ChainClient.embedded()
        try:
            kms_group = chain.kms_group
            at = kms_group.final_block(finality_depth)
            committee = kms_group.active(epoch, at=at)
            signing_key = kms_group.signing_key(epoch, at=at) if committee is not None else None
            group_ca = kms_group.group_ca(epoch, at=at) if committee is not None else None
        finally:
            chain.close()
    except (ChainError, ValueError) as exc:  # ValueError: a malformed --rpc-url
        usage(f"chain: {exc}")
    checks: list[dict[str, Any]] = []
    if committee is None:
        checks.append(
            {"name": "group", "ok": False, "reason": f"KmsGroup names no committee serving epoch {epoch}"}
        )
    else:
        # (3) each piece of key material under the group's record
        if key_input is not None:
            try:
                why = _check_get_key(signing_key, app_id, key_input[0], key_input[1], purpose, epoch)
                checks.append({"name": "get_key_signature_chain", "ok": True, "reason": why})
            except ValueError as exc:
                checks.append({"name": "get_key_signature_chain", "ok": False, "reason": str(exc)})
        if certs:
            try:
                why = _check_app_ca(group_ca, roots[0], certs, app_id, epoch, int(time.time()))
                checks.append({"name": "app_ca", "ok": True, "reason": why})
            except ValueError as exc:
                checks.append({"name": "app_ca", "ok": False, "reason": str(exc)})
    valid = all(c["ok"] for c in checks)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "is_valid": valid,
                    "epoch": epoch,
                    "block": at.number,
                    "signing_key": signing_key.hex() if signing_key else None,
                    "ca_key": group_ca.ca_key.hex() if group_ca else None,
                    "checks": checks,
                }
            )
        )
    else:
        verdict = "[bold green]VALID[/]" if valid else "[bold red]REJECTED[/]"
        out.print(f"{verdict}  epoch {epoch} as KmsGroup records it at block {at.number}", highlight=False)
        for c in checks:
            out.print(
                f"  {'[green]✓[/]' if c['ok'] else '[red]✗[/]'} {c['name']}: {c['reason']}", highlight=False
            )
    if not valid:
        raise typer.Exit(1)


@app.command("peer-keys")
def peer_keys(
    epoch: Annotated[int, typer.Option(min=0, help="Root epoch whose serving committee to update.")] = 1,
    rpc_url: Annotated[
        str | None, typer.Option("--rpc-url", help="EVM JSON-RPC URL (default: embedded chain).")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="KmsGroup owner's key (records the keys).")
    ] = None,
) -> None:
    """Record on chain the boot-time peer key each member of EPOCH's serving committee serves now (after a
    node was restarted or replaced by hand): members admit member i under its recorded key only, one live
    process per share index (`teecloud up` does this at every start)."""
    from teecloud.chain import ChainError
    from teecloud.kms.errors import KmsError
    from teecloud.kms.peering import record_current_peer_keys

    chain = _chain(rpc_url, key_file)
    try:
        kms_group = chain.kms_group
        committee = kms_group.active(epoch)
        if committee is None:
            _fail(f"no KMS committee serves epoch {epoch} on this chain")
        before = dict(committee.peer_keys)
        keys = record_current_peer_keys(kms_group, committee)
    except ChainError as exc:
        _fail(f"chain: {exc}")
    except KmsError as exc:
        _fail(exc.diagnostics())
    finally:
        chain.close()
    for i, k in sorted(keys.items()):
        what = "unchanged" if before.get(i) == k else "recorded"
        out.print(f"node {i:>2}  peer key {k.hex()[:16]}…  {what}")


def _plain(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else value


@app.command("audit")
def audit(
    limit: Annotated[int, typer.Option(help="Show the last N records.")] = 50,
    denied: Annotated[bool, typer.Option("--denied", help="Only denials.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
    path: Annotated[
        Path | None, typer.Option(help="Audit file (default data_home()/kms/audit.jsonl).")
    ] = None,
) -> None:
    """Show the KMS audit log: every request, its boot_info, decision and reason (never keys)."""
    from teecloud.kms.audit import AuditLog

    log = AuditLog(path or _kms_dir() / "audit.jsonl")
    try:
        if log.path.is_dir():
            raise IsADirectoryError(21, "is a directory, not an audit file")
        read = list(log.read()) if limit else []
    except OSError as exc:
        err.print(
            f"[red]error:[/] cannot read the audit log {log.path}: {exc.strerror or exc}", highlight=False
        )
        raise typer.Exit(1) from None
    records = [r for r in read if not denied or r.decision == "denied"][-max(limit, 0) :] if limit else []
    if as_json:
        for r in records:
            typer.echo(json.dumps(r.model_dump(), sort_keys=True))
        return
    if not records:
        out.print("no audit records" + (f" in {log.path}" if not log.path.exists() else ""))
        return
    table = Table(title=f"KMS audit ({log.path})")
    for col in ("time", "endpoint", "decision", "app_id", "compose_hash", "reason"):
        table.add_column(col, overflow="fold")
    for r in records:
        bi = r.boot_info or {}
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.ts)),
            r.endpoint.rsplit(".", 1)[-1],
            "[green]allowed[/]" if r.decision == "allowed" else "[red]denied[/]",
            ("0x" + str(bi["app_id"])) if "app_id" in bi else "",
            str(bi.get("compose_hash", ""))[:16],
            r.reason + (f" [dim]({r.step})[/]" if r.decision == "denied" and r.step else ""),
        )
    out.print(table)


@app.command("presign")
def presign(
    count: Annotated[
        int, typer.Option("--count", min=1, max=32, help="Presignatures to make in this round (one batch).")
    ] = 16,
    nodes_text: Annotated[
        str,
        typer.Option(
            "--nodes",
            help="Running share indices to choose from (>= 2t-1; the lowest 2t-1 take part); default: all n.",
        ),
    ] = "",
    ca: Annotated[
        bool, typer.Option("--ca", help="For the group's P-256 CA key (app CA certificates) instead.")
    ] = False,
) -> None:
    """Make presignatures for the group's threshold signing key (or, with --ca, its P-256 CA key) among
    running nodes of this installation (teecloud.kms.threshold_net: sub-shares move node to node over mutual
    RA-TLS; this command relays only public values through the nodes' admin listeners). Each boot of a CVM
    uses one of each per signing node."""
    from teecloud.kms.errors import KmsError
    from teecloud.kms.threshold import node_home, read_group
    from teecloud.kms.threshold_net import RoundFailed, run_presign_round

    try:
        group = read_group()
    except KmsError as exc:
        _fail(exc.diagnostics())
    if group is None or not (group.ca_root_cert if ca else group.signing_key):
        what = "a root CA (P-256 CA key)" if ca else "a signing key"
        _fail(f"no threshold group with {what} in {data_home()} (kms-nodes/group.json)")
    indices = _index_list(nodes_text, "--nodes") if nodes_text else list(range(1, group.n + 1))
    if len(indices) < 2 * group.t - 1 or any(i > group.n for i in indices):
        _fail(f"a presignature of this {group.t}-of-{group.n} group needs {2 * group.t - 1} of its nodes")
    indices = sorted(set(indices))[: 2 * group.t - 1]  # exactly 2t-1 (threshold_net.presign_participants)
    nodes = {i: _running_node(node_home(i))[1] for i in indices}
    started = time.monotonic()
    try:
        rs = run_presign_round(nodes, count, group.t, kind="ca-presign" if ca else "presign")
    except RoundFailed as exc:
        _fail(f"the presigning round failed: {exc}")
    what = "CA presignatures" if ca else "presignatures"
    out.print(f"{len(rs)} {what} made by nodes {indices} in {time.monotonic() - started:.1f} s")
