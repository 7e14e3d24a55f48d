"""teecloud.collateral: the I/O around the pure verifier -- PCCS collateral (client with an on-disk cache,
and a PCCS-compatible server over local files), AMD KDS CRLs (cached until their nextUpdate) and vendor
trust anchors (`teecloud trust fetch`)."""

from __future__ import annotations

from teecloud.collateral.amd import AMD_KDS_URL, AmdKdsClient, crl_next_update
from teecloud.collateral.errors import CollateralError, CollateralNotFound, InvalidCollateral, PccsUnavailable
from teecloud.collateral.pccs import (
    PccsClient,
    collateral_next_update,
    make_pccs_app,
    pccs_server,
    serve_collateral,
)
from teecloud.collateral.store import CollateralEntry, CollateralStore, describe_collateral
from teecloud.collateral.trust import (
    VENDOR_ROOT_URLS,
    FetchedAnchor,
    default_trust_dir,
    fetch_trust_anchors,
    load_trust_directory,
)

__all__ = [
    "AMD_KDS_URL",
    "VENDOR_ROOT_URLS",
    "AmdKdsClient",
    "CollateralEntry",
    "CollateralError",
    "CollateralNotFound",
    "CollateralStore",
    "FetchedAnchor",
    "InvalidCollateral",
    "PccsClient",
    "PccsUnavailable",
    "collateral_next_update",
    "crl_next_update",
    "default_trust_dir",
    "describe_collateral",
    "fetch_trust_anchors",
    "load_trust_directory",
    "make_pccs_app",
    "pccs_server",
    "serve_collateral",
]
