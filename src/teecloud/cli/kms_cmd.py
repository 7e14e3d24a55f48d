"""`teecloud kms`: run a key management service, onboard a replica, read public keys and the audit log."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from teecloud._fs import atomic_write_json, data_home

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


def _kms_dir() -> Path:
    from teecloud.kms.bootstrap import kms_dir

    return kms_dir()


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
    except ChainError as exc:
        _fail(f"chain: {exc}")


def _collateral(tee: Any, dev: bool, pccs_url: str | None) -> Any:
    from teecloud.peer import PccsCollateral, StaticCollateral

    if dev:
        return StaticCollateral(tee.collateral)
    if not pccs_url:
        _fail("production mode needs --pccs-url (a PCCS serving Intel collateral)")
    try:
        from teecloud.collateral import PccsClient
    except ImportError:
        _fail("this build has no PCCS client (teecloud.collateral.PccsClient); cannot fetch collateral")
    return PccsCollateral(PccsClient(pccs_url, data_home() / "collateral-cache"))


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
        str, typer.Option("--gateway-app-id", help="Gateway app id handed to CVMs.")
    ] = "",
) -> None:
    """Start the KMS: boot its TEE, unseal (or create) its root keys, serve RA-TLS and the admin API."""
    from teecloud.kms.bootstrap import publish_kms_info
    from teecloud.kms.errors import KmsError
    from teecloud.kms.launcher import KmsLaunch, launch_kms

    tee = _tee(dev)
    chain = _chain(rpc_url, key_file)

    def publish(state: Any, _identity: Any, created: bool) -> str:
        if not created:
            return ""
        err.print("[green]generated new root keys inside the TEE and sealed them[/]")
        return publish_kms_info(chain, state, tee)

    reference = None
    if dev:
        from teecloud.tee.simulated import simulated_os_image_reference

        reference = simulated_os_image_reference
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
    server, state, identity = running.server, running.state, running.identity
    atomic_write_json(
        _kms_dir() / ENDPOINT_FILE, {"url": server.url, "admin_url": server.admin_url, "dev": dev}
    )
    out.print(f"KMS listening on {server.url} (RA-TLS), admin on {server.admin_url}")
    out.print(f"root CA public key {state.root.ca_public_key_der.hex()}")
    out.print(f"k256 public key    {state.root.k256_public_key.hex()}")
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
        (_kms_dir() / ENDPOINT_FILE).unlink(missing_ok=True)


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
        state = onboard_from(
            source,
            tee=tee,
            identity=identity,
            chain=chain,
            collateral_for=lambda quote, now: collateral.collateral_for(quote, now=now),
            dev_root_der=tee.dev_root_der() if dev else None,
        )
    except KmsError as exc:
        _fail(exc.diagnostics())
    out.print(
        f"[green]onboarded[/] from {source}: root CA key {state.root.ca_public_key_der.hex()[:32]}…, sealed"
    )


def _local_client(
    url: str | None, dev: bool, pccs_url: str | None, insecure: bool, rpc_url: str | None = None
) -> Any:
    from teecloud.kms.client import KmsClient, UnsafeNoServerCheck, ratls_server_check

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
        check = ratls_server_check(
            collateral_for=lambda q, now: sim.collateral(),
            dev_root_der=sim.dev_root_der(),
            chain=_chain(rpc_url, None),
        )
        return KmsClient(url, server_check=check)
    if pccs_url:
        tee_col = _collateral(None, False, pccs_url)
        check = ratls_server_check(
            collateral_for=lambda q, now: tee_col.collateral_for(q, now=now),
            dev_root_der=None,
            chain=_chain(rpc_url, None),
        )
        return KmsClient(url, server_check=check)
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
