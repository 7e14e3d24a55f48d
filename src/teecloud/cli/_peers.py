"""The RA-TLS peer verifier a client command builds from its flags (`ai proxy`, `gateway check-cert`), the
one PCCS client (one collateral cache folder) for every command, and the chain gate's `--finality-depth`
option (`kms up`, `gateway up`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from teecloud._fs import data_home

if TYPE_CHECKING:
    from teecloud.collateral import PccsClient
    from teecloud.peer import PeerVerifier

MISSING = "give --pccs-url (real TDX) or --trust-dev-root (the simulated TEE)"
# the chain gate's bound (teecloud.peer._chain.MAX_FINALITY_DEPTH; not imported: the CLI starts without peer)
MAX_FINALITY_DEPTH = 256


def finality_depth_option(help: str) -> Any:
    """`--finality-depth`, 0..MAX_FINALITY_DEPTH blocks (typer refuses others with a usage error), with the
    command's own help; the default goes on the parameter."""
    return typer.Option("--finality-depth", min=0, max=MAX_FINALITY_DEPTH, help=help)


def pccs_client(pccs_url: str) -> PccsClient:
    """The client of a PCCS, caching its collateral in the one cache folder every command shares."""
    from teecloud.collateral import PccsClient

    return PccsClient(pccs_url, data_home() / "pccs-cache")


def verifier_from_flags(
    trust_dev_root: bool, pccs_url: str | None, warn: Console, *, max_cert_lifetime_s: int | None = None
) -> PeerVerifier | None:
    """`--trust-dev-root`: this installation's simulated TEE (a warning goes to `warn`); `--pccs-url`: real
    TDX with Intel collateral through that PCCS (cached in the data directory). None when neither is given
    (the caller fails with MISSING). `max_cert_lifetime_s`: the policy's bound on an RA-TLS certificate's
    lifetime (the policy's default when None)."""
    from teecloud.peer import PccsCollateral, PeerPolicy, PeerVerifier, StaticCollateral

    kw = {"max_cert_lifetime_s": max_cert_lifetime_s} if max_cert_lifetime_s is not None else {}

    if trust_dev_root:
        from teecloud.tee.simulated import SimulatedTdx

        tee = SimulatedTdx()
        warn.print("[yellow]warning:[/] trusting this installation's simulated TEE: development only")
        return PeerVerifier(PeerPolicy.dev(tee.dev_root_der(), **kw), StaticCollateral(tee.collateral))
    if pccs_url:
        collateral = PccsCollateral(pccs_client(pccs_url))
        return PeerVerifier(PeerPolicy.production(**kw), collateral)
    return None
