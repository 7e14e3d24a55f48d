"""The one error base of teecloud. Every package's error tree derives from `Error`, so a caller (the CLI,
a service's HTTP layer) catches exactly what teecloud raises on purpose and nothing else:

    Error                          .diagnostics() -> a message a user can act on
    ├── attestation.AttestationError   ├── VerificationError (hostile or broken evidence) ...
    ├── collateral.CollateralError
    ├── tee.TeeError
    ├── keys.KeysError
    ├── chain.ChainError
    ├── peer.PeerRejected              an RA-TLS peer failed a check (`.step`, `.reason`)
    ├── kms.KmsError
    ├── agent.KeyProviderError
    └── node.NodeError

Third-party errors (eth_abi, httpx, yaml, ...) are mapped to one of these at the boundary where they arise
and re-raised `from` the original.
"""

from __future__ import annotations

__all__ = ["Error"]


class Error(Exception):
    """Base class of every error teecloud raises on purpose."""

    def diagnostics(self) -> str:
        return f"{type(self).__name__}: {self}"
