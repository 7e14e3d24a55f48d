"""Errors of the attestation package.

    AttestationError                 base; the CLI catches only this
    ├── UsageError (ValueError)      the caller's mistake: bad arguments, unknown kind, unreadable policy
    └── VerificationError            the evidence is rejected; `.step` names the step that failed
        ├── MalformedEvidence        cannot be parsed: truncated, oversized, wrong kind, bad encoding
        ├── SignatureInvalid         a signature over the evidence or collateral does not verify
        ├── CertificateChainInvalid  a chain is broken, revoked, or uses a forbidden algorithm
        │   └── UntrustedRoot        the chain ends at a root that is not a trust anchor (names it)
        ├── Expired                  a certificate, CRL or collateral is outside its validity at `now`
        ├── CollateralMismatch       collateral for another platform (FMSPC) or kind
        ├── TcbNotAcceptable         TCB status or advisories below the policy floor
        ├── EventLogMismatch         the event log does not replay to the measured registers
        ├── NotBootTime              RTMR3 is not exactly a boot-time measurement (keys only at boot)
        └── PolicyViolation          genuine evidence that the policy does not accept

Hostile input only ever raises a VerificationError subclass with a reason a user can act on.
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = [
    "AttestationError",
    "CertificateChainInvalid",
    "CollateralMismatch",
    "EventLogMismatch",
    "Expired",
    "MalformedEvidence",
    "NotBootTime",
    "PolicyViolation",
    "SignatureInvalid",
    "TcbNotAcceptable",
    "UntrustedRoot",
    "UsageError",
    "VerificationError",
]


class AttestationError(Error):
    """Base class of every error this package raises on purpose."""

    def diagnostics(self) -> str:
        return f"{type(self).__name__}: {self}"


class UsageError(AttestationError, ValueError):
    """The caller made a mistake (not the evidence)."""


class VerificationError(AttestationError):
    """The evidence was rejected. `step` is the name of the verification step that failed."""

    default_step = "quote_verified"

    def __init__(self, reason: str, *, step: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.step = step or self.default_step


class MalformedEvidence(VerificationError):
    default_step = "parsed"


class SignatureInvalid(VerificationError):
    default_step = "quote_verified"


class CertificateChainInvalid(VerificationError):
    default_step = "cert_chain_verified"


class UntrustedRoot(CertificateChainInvalid):
    pass


class Expired(VerificationError):
    default_step = "collateral_ok"


class CollateralMismatch(VerificationError):
    default_step = "collateral_ok"


class TcbNotAcceptable(VerificationError):
    default_step = "tcb_ok"


class EventLogMismatch(VerificationError):
    default_step = "event_log_verified"


class PolicyViolation(VerificationError):
    default_step = "policy"


class NotBootTime(VerificationError):
    """Genuine evidence whose RTMR3 is not exactly the replay of the boot grammar: taken after boot (or with
    events the grammar does not have), so it may bind anyone's key and never releases one."""

    default_step = "boot_time"
