"""The one RA-TLS peer verifier: certificate → quote → event log → boot_info → a typed `AttestedPeer`.

The KMS server (its callers), the KMS client (the KMS itself), the local cloud's attestation check and the
gateway all decide "who is on the other end" here, under one `PeerPolicy` (`production()` or `dev(root)`):
simulated evidence only where a development root is trusted, never a debug TEE, a TCB floor, fresh
certificates. Untrusted bytes in, verified objects out; the only I/O is the injected collateral source.

    ChainGate (peer/_chain.py)             KmsAuth.isAppAllowed / isKmsAllowed, read at most one block old
    PeerRejected (teecloud.errors.Error)   `.step` names the failing check, `.reason` says why
"""

from teecloud.peer._chain import AuthChain, ChainGate, FreshBlockNumber
from teecloud.peer._collateral import CollateralSource, PccsCollateral, StaticCollateral
from teecloud.peer._verifier import (
    AttestedPeer,
    PeerPolicy,
    PeerRejected,
    PeerVerifier,
    build_boot_info,
    require_boot_time,
)

__all__ = [
    "AttestedPeer",
    "AuthChain",
    "ChainGate",
    "CollateralSource",
    "FreshBlockNumber",
    "PccsCollateral",
    "PeerPolicy",
    "PeerRejected",
    "PeerVerifier",
    "StaticCollateral",
    "build_boot_info",
    "require_boot_time",
]
