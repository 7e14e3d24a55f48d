"""Errors of the gateway package.

GatewayError (teecloud.errors.Error)   base; the CLI catches only this
├── GatewayUsageError (ValueError)     the caller's mistake: bad configuration, bad arguments
├── RegistrationRefused                a CVM's registration was refused; `.step` names the check
├── BadHostName                        a host name / SNI that is not a route name of this gateway
├── CapacityExceeded                   the data plane has no free backend or server slot
└── DataPlaneError                     HAProxy could not be started, checked or driven
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = [
    "BadHostName",
    "CapacityExceeded",
    "DataPlaneError",
    "GatewayError",
    "GatewayUsageError",
    "RegistrationRefused",
]


class GatewayError(Error):
    """Base class of the gateway's errors."""


class GatewayUsageError(GatewayError, ValueError):
    """The caller's mistake: bad configuration or arguments."""


class RegistrationRefused(GatewayError):
    """A registration was refused. `reason` is safe to show to the caller; `step` names the failing check."""

    def __init__(self, reason: str, *, step: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.step = step


class BadHostName(GatewayError):
    """Not a route name under this gateway's base domain."""


class CapacityExceeded(GatewayError):
    """The data plane's pre-allocated backend or server slots are all in use."""


class DataPlaneError(GatewayError):
    """HAProxy failed: its configuration does not check, it did not start, or its runtime API refused."""
