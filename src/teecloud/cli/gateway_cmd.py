"""`teecloud gateway up`: a stand-alone gateway (docs/gateway.md, "Stand-alone gateway"), with the gateway
options of `teecloud up` (cli/_gateway_options.py: one declaration, one parser).

`teecloud gateway check-cert HOST[:PORT]`: is the key this server presents held in a TEE?

Fetches the leaf certificate the server presents on the wire (SNI `--server-name`, default HOST) and the
gateway's published quotes: by default from the same HOST:PORT, `GET https://<base domain>/.well-known/
teecloud/cert-keys` (SNI and Host `--base-domain`, default the server name: the gateway answers it on its
base domain's apex), or from `--keys URL` (e.g. the registration listener). Then it checks, with
`teecloud.gateway.certkeys.check_cert_key`, that a quote verified under the chosen trust (real TDX
collateral from a PCCS, or this installation's simulated TEE, labelled) binds exactly that key. `--app-id`
(the KMS's `gateway_app_id`) also requires the key to be held by that app.

`teecloud gateway check-keys HOST[:PORT] (--kms-root-key HEX | --rpc-url URL) [--app-id] [--domain]`: is the
key this server presents vouched for by the gateway app's KMS-derived key, whose GetKey signature chain leads
to the KMS root (`teecloud.gateway.certkeys.check_cert_key_signature`)? No TEE evidence is involved and the
gateway is not trusted: the KMS root (given, or read from KmsAuth with `--rpc-url`, which also pins KmsAuth's
gateway_app_id unless `--app-id` is given) decides.

Exit codes: 0 = the key is vouched for, 1 = refused (the reason and step are printed), 2 = usage error.

`teecloud gateway domains [--admin-url URL --token-file PATH] [--limit N] [--after DOMAIN] [--all] [--json]`:
the custom domains the gateway has pinned (domain, app_id, port, the TXT name that answered, seconds until
the cached answer ends), from its admin API (`GET /admin/domains`). Without `--admin-url` it asks the gateway
of the running `teecloud up` (endpoints.json). Exit codes: 0 = listed, 1 = the gateway refused or did not
answer, 2 = usage error.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from teecloud.cli._gateway_options import (
    AcmeCaFileOpt,
    AcmeDirectoryOpt,
    AcmeDnsOpt,
    AcmeDnsServerOpt,
    AcmeEmailOpt,
    AcmeTsigKeyFileOpt,
    GatewayDnsOpt,
    PassthroughPortOpt,
)
from teecloud.cli._peers import finality_depth_option

__all__ = ["app"]

app = typer.Typer(
    help="The gateway: run one stand-alone, check its certificates' keys.", no_args_is_help=True
)
_out = Console(highlight=False, soft_wrap=True)  # hashes on one line
_err = Console(stderr=True, highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    _err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:
        return value.strip("[]"), 443
    if not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"bad port in {value!r}", 2)
    return host.strip("[]"), int(port)


@app.command("up")
def up(
    rpc_url: Annotated[
        str | None,
        typer.Option(
            "--rpc-url",
            envvar="TEECLOUD_RPC_URL",
            help="The chain's JSON-RPC URL (KmsAuth: which apps may get routes). Default: this data "
            "directory's embedded chain.",
        ),
    ] = None,
    base_domain: Annotated[
        str, typer.Option("--base-domain", help="Routes are <app_id>[-<port>][s|g].<base domain>.")
    ] = "teecloud.localhost",
    host: Annotated[str, typer.Option("--host", help="Address of the public and registration ports.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="Public TLS port (0: a free one).")] = 0,
    registration_port: Annotated[
        int, typer.Option("--registration-port", help="Registration port, mutual RA-TLS (0: a free one).")
    ] = 0,
    admin_port: Annotated[int, typer.Option("--admin-port", help="Admin port (0: a free one).")] = 0,
    backend_network: Annotated[
        list[str] | None,
        typer.Option("--backend-network", help="CIDR a CVM's endpoints may be in (repeatable; loopback)."),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="The gateway's data directory (default: <data home>/gateway-server)."
        ),
    ] = None,
    kms_url: Annotated[
        str | None,
        typer.Option(
            "--kms-url",
            help="Boot the gateway's TEE as KmsAuth's gateway_app_id through this KMS: its TLS keys are then "
            "derived from the app keys the KMS releases (the same CA and keys after a restart) and quoted. "
            "Simulated TEE only (with --trust-dev-root).",
        ),
    ] = None,
    trust_dev_root: Annotated[
        bool,
        typer.Option(
            "--trust-dev-root", help="Register CVMs of this installation's simulated TEE (development)."
        ),
    ] = False,
    pccs_url: Annotated[
        str | None, typer.Option("--pccs-url", help="PCCS for real TDX collateral (registrations).")
    ] = None,
    no_passthrough: Annotated[
        bool,
        typer.Option(
            "--no-passthrough",
            help="Serve no `s` (passthrough) names: TLS is then terminated on the public port itself (no "
            "ClientHello reader, no hop; faster). Not with --gateway-dns.",
        ),
    ] = False,
    passthrough_port: PassthroughPortOpt = 0,
    haproxy_processes: Annotated[
        int,
        typer.Option(
            "--haproxy-processes",
            help="HAProxy processes of one thread each on the same ports (as nginx runs workers; faster "
            "than threads of one process: docs/benchmarks.md); connection caps are split between them. "
            "0 (default): one per CPU core. 1: one process with a thread per core.",
        ),
    ] = 0,
    require_vouch: Annotated[
        bool,
        typer.Option(
            "--require-vouch",
            help="Route only to endpoints the launching node also vouches for: a statement signed by an "
            "active NodeRegistry node's operator (registrations without one are refused).",
        ),
    ] = False,
    finality_depth: Annotated[
        int,
        finality_depth_option(
            "With --require-vouch: trust a NodeRegistry node only once its registration is this many "
            "blocks deep (read through the chain gate, chain id checked)."
        ),
    ] = 0,
    gateway_dns: GatewayDnsOpt = None,
    acme_directory: AcmeDirectoryOpt = None,
    acme_dns: AcmeDnsOpt = "127.0.0.1:53",
    acme_dns_server: AcmeDnsServerOpt = None,
    acme_tsig_key_file: AcmeTsigKeyFileOpt = None,
    acme_ca_file: AcmeCaFileOpt = None,
    acme_email: AcmeEmailOpt = None,
) -> None:
    """Run a gateway (HAProxy, registration and admin listeners) until Ctrl-C / SIGTERM."""
    from teecloud.cli._peers import MISSING, verifier_from_flags
    from teecloud.errors import Error
    from teecloud.gateway.acme import AcmeSettings, parse_dns_server
    from teecloud.gateway.errors import GatewayUsageError

    # every option checked before anything starts (the same parser as `teecloud up`)
    try:
        acme = (
            AcmeSettings.parse(
                acme_directory,
                acme_dns,
                acme_ca_file,
                acme_email,
                dns_server=acme_dns_server,
                tsig_key_file=acme_tsig_key_file,
            )
            if acme_directory
            else None
        )
        dns = parse_dns_server(gateway_dns, "gateway DNS server") if gateway_dns else None
    except GatewayUsageError as exc:
        _fail(str(exc), 1)
    if no_passthrough and dns is not None:
        _fail("--gateway-dns serves custom domains in passthrough: not with --no-passthrough", 2)
    if passthrough_port and no_passthrough:
        _fail("--passthrough-port serves `s` names: not with --no-passthrough", 2)
    if not 0 <= passthrough_port <= 65535 or (passthrough_port and passthrough_port == port):
        _fail("--passthrough-port must be a port in 1..65535 other than --port", 2)
    if not 0 <= haproxy_processes <= 64:
        _fail("--haproxy-processes must be in 0..64 (0: one per CPU core)", 2)
    haproxy_processes = haproxy_processes or max(1, min(64, os.cpu_count() or 1))
    if finality_depth and not require_vouch:
        _fail("--finality-depth applies to NodeRegistry reads: it needs --require-vouch", 2)
    if kms_url is not None and not trust_dev_root:
        _fail(
            "--kms-url boots the simulated TEE: it needs --trust-dev-root (real hardware: not wired yet)", 2
        )
    # registration certificates live 30 days (teecloud.gateway.client)
    peers = verifier_from_flags(trust_dev_root, pccs_url, _err, max_cert_lifetime_s=31 * 24 * 3600)
    if peers is None:
        _fail(MISSING, 2)
    stop = threading.Event()
    # before anything starts: a signal during start-up stops the gateway once it is up (and cleans up)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with ExitStack() as stack:
        try:
            gateway = _start_gateway(
                stack,
                peers=peers,
                rpc_url=rpc_url,
                base_domain=base_domain,
                host=host,
                ports=(port, registration_port, admin_port),
                backend_networks=tuple(backend_network or ("127.0.0.0/8", "::1/128")),
                home=home,
                kms_url=kms_url,
                dns=dns,
                acme=acme,
                passthrough=not no_passthrough,
                passthrough_port=passthrough_port,
                haproxy_processes=haproxy_processes,
                vouch_depth=finality_depth if require_vouch else None,
            )
        except Error as exc:
            _fail(exc.diagnostics(), 1)
        except (OSError, ValueError) as exc:
            _fail(str(exc)[:500], 1)
        table = Table(title="teecloud gateway", show_header=False)
        table.add_row(
            "public (HTTPS)", f"https://<app_id>-<port>.{gateway.base_domain}:{gateway.public_port}/"
        )
        if not no_passthrough:
            table.add_row("passthrough (s names, custom domains)", gateway.passthrough_url)
        table.add_row("certificate", f"ACME ({acme.directory_url})" if acme else f"dev CA {gateway.ca_file}")
        table.add_row(
            "keys", "derived from the KMS (gateway app)" if gateway.keys else "born in this process"
        )
        table.add_row("registration", gateway.registration_url)
        if require_vouch:
            table.add_row("node vouching", f"on (NodeRegistry, finality depth {finality_depth})")
        table.add_row("admin", f"{gateway.admin_url} (token: {gateway.home / 'admin-token'})")
        if gateway.cert_keys is not None:
            table.add_row("cert-keys", gateway.cert_keys_url)
        _out.print(table)
        while not stop.wait(0.5):
            pass
    _out.print("gateway stopped")


def _start_gateway(
    stack: ExitStack,
    *,
    peers: Any,
    rpc_url: str | None,
    base_domain: str,
    host: str,
    ports: tuple[int, int, int],
    backend_networks: tuple[str, ...],
    home: Path | None,
    kms_url: str | None,
    dns: tuple[str, int] | None,
    acme: Any,
    passthrough: bool = True,
    passthrough_port: int = 0,
    haproxy_processes: int = 1,
    vouch_depth: int | None = None,
) -> Any:
    """The GatewayServer of `gateway up`, started; everything it started is stopped by `stack`. With
    `vouch_depth` (blocks) it routes only to endpoints the launching node vouches for (NodeRegistry)."""
    import secrets

    from teecloud._fs import atomic_write, data_home
    from teecloud.chain import ChainClient
    from teecloud.gateway.customdomain import CustomDomains, DnslibResolver
    from teecloud.gateway.routing import DataPlaneLimits
    from teecloud.gateway.server import GatewayServer
    from teecloud.gateway.vouch import ChainNodes
    from teecloud.peer import ChainGate

    gw_home = home if home is not None else data_home() / "gateway-server"
    gw_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    token_file = gw_home / "admin-token"
    if not token_file.exists():
        atomic_write(token_file, secrets.token_urlsafe(32).encode(), mode=0o600)
    chain = ChainClient.rpc(rpc_url) if rpc_url else ChainClient.embedded()
    stack.callback(chain.close)
    keys = tee = None
    if kms_url is not None:
        keys, tee = _boot_as_gateway_app(chain, kms_url)
    certs = None
    if acme is not None:
        certs, challenge_dns = acme.open(gw_home, base_domain=base_domain, keys=keys)
        stack.callback(challenge_dns.stop)
    gateway = GatewayServer(
        gw_home,
        base_domain=base_domain,
        peers=peers,
        chain=ChainGate(chain, block_number=getattr(chain, "checked_head", chain.block_number)),
        admin_token=token_file.read_text().strip(),
        host=host,
        public_port=ports[0],
        registration_port=ports[1],
        admin_port=ports[2],
        backend_networks=backend_networks,
        limits=DataPlaneLimits(
            passthrough=passthrough, passthrough_port=passthrough_port, processes=haproxy_processes
        ),
        custom_domains=CustomDomains(DnslibResolver(*dns), base_domain=base_domain) if dns else None,
        acme=certs,
        tee=tee,
        keys=keys,
        nodes=ChainNodes(chain, finality_depth=vouch_depth) if vouch_depth is not None else None,
    ).start()
    stack.callback(gateway.stop)
    return gateway


def _boot_as_gateway_app(chain: Any, kms_url: str) -> tuple[Any, Any]:
    """The gateway's simulated TEE booted as KmsAuth's gateway_app_id through the KMS at `kms_url`, and the
    keys derived from what the KMS released (teecloud.gateway.kmskeys)."""
    from teecloud.gateway.errors import GatewayUsageError
    from teecloud.gateway.identity import boot_gateway
    from teecloud.gateway.kmskeys import GatewayKeys
    from teecloud.kms.client import connect_kms
    from teecloud.tee.simulated import SimulatedTdx

    app_id = str(chain.kms.info().gateway_app_id)
    if int(app_id, 16) == 0:
        raise GatewayUsageError("KmsAuth records no gateway_app_id: no gateway app to boot as")
    tee = SimulatedTdx()
    provider = connect_kms(
        kms_url,
        collateral_for=lambda _quote, _now: tee.collateral(),
        dev_root_der=tee.dev_root_der(),
        chain=chain,
    )
    state = boot_gateway(tee, app_id, provider)
    return GatewayKeys.from_app_keys(state.keys, app_id=bytes.fromhex(app_id.removeprefix("0x"))), tee


def _hex_option(value: str, name: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) != size:
        _fail(f"{name} must be {size} bytes of hex", 2)
    return raw


def _keys_url(
    host: str, port: int, keys_url: str | None, base_domain: str | None, server_name: str | None
) -> tuple[str, str | None]:
    """Where the cert-keys document is, and the TLS server name / Host to ask with (the gateway's own public
    port answers it on its base domain's apex)."""
    from teecloud.gateway.certkeys import CERT_KEYS_PATH

    if keys_url is not None:
        if not keys_url.startswith(("https://", "http://")):
            _fail("--keys must be an http(s):// URL", 2)
        return keys_url, None
    doc_name = (base_domain or server_name or host).strip().rstrip(".").lower()
    if not doc_name or len(doc_name) > 253 or not all(c.isalnum() or c in ".-" for c in doc_name):
        _fail(f"bad base domain {doc_name[:80]!r}", 2)
    netloc = f"[{host}]" if ":" in host else host
    return f"https://{netloc}:{port}{CERT_KEYS_PATH}", doc_name


@app.command("check-cert")
def check_cert(
    target: Annotated[str, typer.Argument(help="HOST or HOST:PORT of the gateway's public TLS port.")],
    keys_url: Annotated[
        str | None,
        typer.Option(
            "--keys",
            help="URL of the gateway's published cert-keys document (default: HOST:PORT itself, "
            "asking for the base domain's /.well-known/teecloud/cert-keys).",
        ),
    ] = None,
    base_domain: Annotated[
        str | None,
        typer.Option(
            "--base-domain",
            help="Without --keys: the gateway's base domain (SNI and Host of the document request; "
            "default the server name).",
        ),
    ] = None,
    server_name: Annotated[
        str | None, typer.Option("--server-name", help="SNI to send (default HOST).")
    ] = None,
    app_id: Annotated[str | None, typer.Option("--app-id", help="Require this app (hex, 20 bytes).")] = None,
    trust_dev_root: Annotated[
        bool, typer.Option("--trust-dev-root", help="Trust this installation's simulated TEE (development).")
    ] = False,
    pccs_url: Annotated[str | None, typer.Option("--pccs-url", help="PCCS for real TDX collateral.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Check that the certificate key HOST presents is bound by a verified quote the gateway publishes."""
    from teecloud.cli._peers import MISSING, verifier_from_flags
    from teecloud.gateway.certkeys import CertKeyRefused, check_cert_key, fetch_document, presented_cert

    host, port = _host_port(target)
    expected = _hex_option(app_id, "--app-id", 20) if app_id is not None else None
    verifier = verifier_from_flags(trust_dev_root, pccs_url, _err)
    if verifier is None:
        _fail(MISSING, 2)
    keys_url, doc_name = _keys_url(host, port, keys_url, base_domain, server_name)
    try:
        cert = presented_cert(host, port, server_name=server_name)
        document = fetch_document(keys_url, server_name=doc_name)
        verdict = check_cert_key(cert, document, verifier, expected_app_id=expected)
    except CertKeyRefused as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "step": exc.step, "reason": exc.reason}))
        else:
            _err.print(f"[red]refused[/] at step {exc.step}: {exc.reason}")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps({"ok": True, **verdict.to_json()}))
        return
    label = " [yellow](SIMULATED TEE)[/]" if verdict.simulated else ""
    _out.print(f"[green]ok[/]: the {verdict.role} certificate key of {host}:{port} is held in a TEE{label}")
    _out.print(f"  key spki sha256  {verdict.spki_sha256}")
    _out.print(f"  tee / tcb        {verdict.tee} / {verdict.tcb_status}")
    _out.print(f"  app_id           {verdict.app_id or '(none measured: not a teecloud app)'}")
    if verdict.compose_hash:
        _out.print(f"  compose_hash     {verdict.compose_hash}")
    origin = verdict.key_origin or "(not stated)"
    _out.print(f"  key origin       {origin} (the measured code's statement, covered by the quote)")


@app.command("check-keys")
def check_keys(
    target: Annotated[str, typer.Argument(help="HOST or HOST:PORT of the gateway's public TLS port.")],
    kms_root_key: Annotated[
        str | None,
        typer.Option(
            "--kms-root-key",
            help="The KMS's k256 root (or threshold group) public key, hex (33-byte compressed or 65-byte "
            "uncompressed SEC1): what the chain must lead to.",
        ),
    ] = None,
    rpc_url: Annotated[
        str | None,
        typer.Option(
            "--rpc-url",
            help="Instead of --kms-root-key: read the KMS root key (and, without --app-id, the "
            "gateway_app_id to require) from KmsAuth on this chain.",
        ),
    ] = None,
    keys_url: Annotated[
        str | None,
        typer.Option("--keys", help="URL of the gateway's cert-keys document (default: HOST:PORT itself)."),
    ] = None,
    base_domain: Annotated[
        str | None,
        typer.Option("--base-domain", help="Without --keys: SNI and Host of the document request."),
    ] = None,
    server_name: Annotated[
        str | None, typer.Option("--server-name", help="SNI to send (default HOST).")
    ] = None,
    app_id: Annotated[
        str | None, typer.Option("--app-id", help="Require this app's chain (the KMS's gateway_app_id).")
    ] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="Require the key to be vouched for this base domain.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Check the KMS signature chain over the certificate key HOST presents (no TEE evidence involved: the
    KMS root decides)."""
    from teecloud.gateway.certkeys import (
        CertKeyRefused,
        check_cert_key_signature,
        fetch_document,
        presented_cert,
    )

    host, port = _host_port(target)
    expected = _hex_option(app_id, "--app-id", 20) if app_id is not None else None
    if (kms_root_key is None) == (rpc_url is None):
        _fail("give one of --kms-root-key HEX or --rpc-url URL", 2)
    if kms_root_key is not None:
        root = bytes.fromhex(kms_root_key.removeprefix("0x")) if _is_hex(kms_root_key) else b""
        if len(root) not in (33, 65):
            _fail("--kms-root-key must be a 33- or 65-byte SEC1 public key in hex", 2)
    else:
        root, expected = _kms_from_chain(str(rpc_url), expected)
    keys_url, doc_name = _keys_url(host, port, keys_url, base_domain, server_name)
    try:
        cert = presented_cert(host, port, server_name=server_name)
        document = fetch_document(keys_url, server_name=doc_name)
        verdict = check_cert_key_signature(
            cert, document, kms_root_public_key=root, expected_app_id=expected, expected_domain=domain
        )
    except CertKeyRefused as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "step": exc.step, "reason": exc.reason}))
        else:
            _err.print(f"[red]refused[/] at step {exc.step}: {exc.reason}")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps({"ok": True, **verdict.to_json()}))
        return
    _out.print(
        f"[green]ok[/]: the {verdict.role} certificate key of {host}:{port} is vouched for by the KMS chain"
    )
    _out.print(f"  key spki sha256  {verdict.spki_sha256}")
    _out.print(
        f"  domain           {verdict.domain} (until {verdict.not_after}, the certificate's not_after)"
    )
    _out.print(
        f"  app_id           {verdict.app_id} (its app key {verdict.app_public_key}, issued by the KMS root)"
    )


def _kms_from_chain(rpc_url: str, expected: bytes | None) -> tuple[bytes, bytes | None]:
    from teecloud.chain import ChainClient
    from teecloud.errors import Error

    try:
        chain = ChainClient.rpc(rpc_url)
        try:
            info = chain.kms.info()
        finally:
            chain.close()
    except (Error, OSError, ValueError) as exc:
        _fail(f"cannot read KmsAuth at {rpc_url[:200]}: {exc}", 1)
    if len(info.k256_pubkey) not in (33, 65):
        _fail("KmsAuth records no KMS k256 root key", 1)
    if expected is None and int(info.gateway_app_id or "0", 16) != 0:
        expected = bytes.fromhex(info.gateway_app_id.removeprefix("0x"))
    return info.k256_pubkey, expected


def _is_hex(value: str) -> bool:
    v = value.removeprefix("0x")
    return len(v) <= 200 and len(v) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in v)


_DOMAIN_PAGES_MAX = 64  # --all follows at most this many pages (64 x 1000 > any gateway's pin bound)


@app.command("domains")
def domains(
    admin_url: Annotated[
        str | None,
        typer.Option("--admin-url", help="The gateway's admin URL (default: the running `teecloud up`'s)."),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="File holding the admin token (default: the running cloud's)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Domains per page (1..1000).")] = 100,
    after: Annotated[
        str, typer.Option("--after", help="Start after this domain (the previous page's last).")
    ] = "",
    all_pages: Annotated[bool, typer.Option("--all", help="Follow every page.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the listing as JSON.")] = False,
) -> None:
    """List the custom domains the gateway has pinned (domain -> app_id, port, TXT source, expiry)."""
    import httpx

    from teecloud.gateway import api as gw_api

    if not 1 <= limit <= gw_api.DOMAINS_PAGE_MAX:
        _fail(f"--limit must be 1..{gw_api.DOMAINS_PAGE_MAX}", 2)
    if len(after) > 253:
        _fail("--after is longer than a DNS name (253)", 2)
    url, token = _gateway_admin(admin_url, token_file)
    listed: list[gw_api.CustomDomainView] = []
    page: gw_api.CustomDomainList | None = None
    for _ in range(_DOMAIN_PAGES_MAX if all_pages else 1):
        try:
            resp = httpx.get(
                url.rstrip("/") + "/admin/domains",
                params={"limit": limit, "after": after},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
        except httpx.HTTPError as exc:
            _fail(f"the gateway's admin API at {url} did not answer: {exc}"[:500], 1)
        if resp.status_code != 200:
            try:
                reason = str(resp.json().get("reason", ""))
            except ValueError:
                reason = resp.text
            _fail(f"the gateway answered {resp.status_code}: {reason[:300]}", 1)
        try:
            page = gw_api.CustomDomainList.model_validate_json(resp.content)
        except ValueError as exc:
            _fail(f"the gateway's answer is not a domain listing: {str(exc)[:200]}", 1)
        listed.extend(page.domains)
        if page.next_after is None:
            break
        after = page.next_after
    assert page is not None
    next_after = page.next_after
    if as_json:
        out = gw_api.CustomDomainList(
            enabled=page.enabled, total=page.total, domains=listed, next_after=next_after
        )
        typer.echo(out.model_dump_json())
        return
    if not page.enabled:
        _out.print("this gateway serves no custom domains (started without a DNS server)")
        return
    table = Table(title=f"custom domains pinned ({page.total})")
    for col in ("domain", "app_id", "port", "source (TXT)", "expires in"):
        table.add_column(col, overflow="fold")  # never cut: app ids are copied from here
    for d in listed:
        table.add_row(d.domain, d.app_id, str(d.port), d.source, f"{d.expires_in_s} s")
    _out.print(table)
    if next_after is not None:
        _out.print(f"more: --after {next_after}")


def _gateway_admin(admin_url: str | None, token_file: Path | None) -> tuple[str, str]:
    """The admin URL and token: as given, or the running local cloud's gateway (endpoints.json)."""
    from teecloud.cloud.endpoints import read_endpoints

    if admin_url is None or token_file is None:
        running = read_endpoints()
        gateway = running.gateway if running is not None else {}
        if admin_url is None:
            admin_url = gateway.get("admin") if isinstance(gateway.get("admin"), str) else None
        if token_file is None and isinstance(gateway.get("admin_token_file"), str):
            token_file = Path(gateway["admin_token_file"])
    if admin_url is None or token_file is None:
        _fail("no gateway found: give --admin-url and --token-file (or run `teecloud up`)", 2)
    if not admin_url.startswith(("http://", "https://")):
        _fail(f"--admin-url {admin_url[:80]!r} is not an http(s) URL", 2)
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        _fail(f"cannot read the admin token: {exc}", 2)
    if not token or len(token) > 4096:
        _fail(f"{token_file} holds no admin token", 2)
    return admin_url, token
