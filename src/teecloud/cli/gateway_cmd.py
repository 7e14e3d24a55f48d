"""`teecloud gateway check-cert HOST[:PORT]`: is the key this server presents held in a TEE?

Fetches the leaf certificate the server presents on the wire (SNI `--server-name`, default HOST) and the
gateway's published quotes: by default from the same HOST:PORT, `GET https://<base domain>/.well-known/
teecloud/cert-keys` (SNI and Host `--base-domain`, default the server name: the gateway answers it on its
base domain's apex), or from `--keys URL` (e.g. the registration listener). Then it checks, with
`teecloud.gateway.certkeys.check_cert_key`, that a quote verified under the chosen trust (real TDX
collateral from a PCCS, or this installation's simulated TEE, labelled) binds exactly that key. `--app-id`
(the KMS's `gateway_app_id`) also requires the key to be held by that app.

Exit codes: 0 = the key is vouched for, 1 = refused (the reason and step are printed), 2 = usage error.
"""

from __future__ import annotations

import json
from typing import Annotated, NoReturn

import typer
from rich.console import Console

__all__ = ["app"]

app = typer.Typer(help="The gateway: check its certificates' keys.", no_args_is_help=True)
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
    from teecloud.gateway.certkeys import (
        CERT_KEYS_PATH,
        CertKeyRefused,
        check_cert_key,
        fetch_document,
        presented_cert,
    )

    host, port = _host_port(target)
    expected: bytes | None = None
    if app_id is not None:
        try:
            expected = bytes.fromhex(app_id.removeprefix("0x"))
        except ValueError:
            expected = b""
        if len(expected) != 20:
            _fail("--app-id must be 20 bytes of hex", 2)
    verifier = verifier_from_flags(trust_dev_root, pccs_url, _err)
    if verifier is None:
        _fail(MISSING, 2)
    doc_name: str | None = None
    if keys_url is None:  # the gateway's own public port, its base domain's apex
        doc_name = (base_domain or server_name or host).strip().rstrip(".").lower()
        if not doc_name or len(doc_name) > 253 or not all(c.isalnum() or c in ".-" for c in doc_name):
            _fail(f"bad base domain {doc_name[:80]!r}", 2)
        netloc = f"[{host}]" if ":" in host else host
        keys_url = f"https://{netloc}:{port}{CERT_KEYS_PATH}"
    elif not keys_url.startswith(("https://", "http://")):
        _fail("--keys must be an http(s):// URL", 2)
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
