"""Errors of the KMS package.

    KmsError                      base; the CLI catches only this
    ├── KmsUsageError (ValueError)  the caller's mistake: bad arguments, bad configuration
    ├── AccessDenied              a request was refused; `.reason` says why, `.step` which check failed
    ├── SealingError              sealed root keys cannot be read: wrong TEE, tampered file, wrong format
    ├── BootstrapError            the KMS cannot start: no root keys, chain refuses its info
    ├── OnboardError              replication from another KMS failed (the source or this KMS refused)
    └── KmsClientError            a KMS client call failed (network, TLS, unexpected answer)
        └── KmsDenied             the KMS answered with a denial (carries its reason)

An `AccessDenied` never carries key material; its reason is safe to show to the caller and to audit.
"""

from __future__ import annotations

from typing import Any

from teecloud.errors import Error

__all__ = [
    "AccessDenied",
    "BootstrapError",
    "KmsClientError",
    "KmsDenied",
    "KmsError",
    "KmsUsageError",
    "OnboardError",
    "SealingError",
]


class KmsError(Error):
    """Base class of every error this package raises on purpose."""

    def diagnostics(self) -> str:
        return f"{type(self).__name__}: {self}"


class KmsUsageError(KmsError, ValueError):
    """The caller (or the operator's configuration) made a mistake."""


class AccessDenied(KmsError):
    """The KMS refused a request. `step` names the check that failed (e.g. "quote_verified", "chain");
    `boot_info` (JSON form), when set, is the verified caller's boot_info, for the audit record."""

    def __init__(self, reason: str, *, step: str = "authorization") -> None:
        super().__init__(reason)
        self.reason = reason
        self.step = step
        self.boot_info: dict[str, Any] | None = None


class SealingError(KmsError):
    """Sealed state cannot be unsealed (another TEE or measurement, tampering) or written."""


class BootstrapError(KmsError):
    """The KMS cannot establish its root keys."""


class OnboardError(KmsError):
    """Onboarding from another KMS failed."""


class KmsClientError(KmsError):
    """A call to a KMS failed."""


class KmsDenied(KmsClientError):
    """The KMS denied the request; `reason` and `step` are the KMS's."""

    def __init__(self, reason: str, *, step: str = "") -> None:
        super().__init__(f"KMS denied the request: {reason}" + (f" (step {step})" if step else ""))
        self.reason = reason
        self.step = step
