"""The gateway options `teecloud up` and `teecloud gateway up` share: one declaration each (typer `Annotated`
aliases) and one parser (teecloud.gateway.acme.AcmeSettings.parse), so the two command lines cannot drift."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "AcmeCaFileOpt",
    "AcmeDirectoryOpt",
    "AcmeDnsOpt",
    "AcmeDnsServerOpt",
    "AcmeEmailOpt",
    "AcmeTsigKeyFileOpt",
    "GatewayDnsOpt",
    "PassthroughPortOpt",
]

PassthroughPortOpt = Annotated[
    int,
    typer.Option(
        "--passthrough-port",
        help="The gateway serves `s` (passthrough) names and custom domains on this second public port (SNI "
        "routing); its public port then terminates TLS itself (no hop; faster). 0: both on the public port.",
    ),
]

GatewayDnsOpt = Annotated[
    str | None,
    typer.Option(
        "--gateway-dns",
        help="HOST:PORT of a DNS server (a validating resolver you trust): the gateway then serves "
        "custom domains whose _dstack-app-address TXT record names a registered app port "
        "(TLS passthrough).",
    ),
]
AcmeDirectoryOpt = Annotated[
    str | None,
    typer.Option(
        "--acme-directory",
        help="https URL of an ACME directory: the gateway gets its base domain's wildcard certificate "
        "from that CA by DNS-01 (renewed before expiry) instead of the dev CA.",
    ),
]
AcmeDnsOpt = Annotated[
    str,
    typer.Option(
        "--acme-dns",
        help="With --acme-directory: where the DNS-01 TXT records go. IP:PORT: the gateway serves them "
        "itself there (point the CA's resolver there; a local CA). `rfc2136`: TSIG-signed DNS UPDATE to "
        "--acme-dns-server with --acme-tsig-key-file (BIND, PowerDNS, Knot, DNS hosts).",
    ),
]
AcmeCaFileOpt = Annotated[
    Path | None,
    typer.Option("--acme-ca-file", help="With --acme-directory: PEM bundle to trust for the CA's TLS."),
]
AcmeEmailOpt = Annotated[
    str | None, typer.Option("--acme-email", help="With --acme-directory: the ACME account's contact.")
]
AcmeDnsServerOpt = Annotated[
    str | None,
    typer.Option(
        "--acme-dns-server",
        help="With --acme-dns rfc2136: IP[:PORT] of the primary (authoritative) DNS server that takes the "
        "updates for the zone holding _acme-challenge.<base domain>.",
    ),
]
AcmeTsigKeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--acme-tsig-key-file",
        help='With --acme-dns rfc2136: the TSIG key in BIND\'s format (tsig-keygen: key "<name>" { algorithm '
        'hmac-sha256; secret "<base64>"; };).',
    ),
]
