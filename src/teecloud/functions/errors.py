"""Errors of teecloud.functions, grouped by cause:

FunctionError (teecloud.errors.Error)
├── BadFunction          a module or manifest that cannot be deployed (caller's mistake)
├── UnknownFunction      no such function on this runtime
├── NotAllowed           the registry / runtime refuses to run or sign this code
├── InvocationFailed     the function ran and failed (trap, non-zero exit); `report` says how far it got
│   └── LimitExceeded    stopped at one of its limits (`limit`: cpu, wall, memory, output)
├── SecretError          secrets that cannot be sealed or opened for this function
└── ResultInvalid        a signed result that does not verify (offline check)
"""

from __future__ import annotations

from typing import Any

from teecloud.errors import Error

__all__ = [
    "BadFunction",
    "FunctionError",
    "InvocationFailed",
    "LimitExceeded",
    "NotAllowed",
    "RegistryUnavailable",
    "ReservedRequestId",
    "ResultInvalid",
    "SecretError",
    "UnknownFunction",
]


class FunctionError(Error):
    """Base of every error of teecloud.functions."""


class BadFunction(FunctionError, ValueError):
    pass


class UnknownFunction(FunctionError, LookupError):
    pass


class NotAllowed(FunctionError):
    pass


class ReservedRequestId(NotAllowed):
    """A caller's request id in the oracles' id space (result.ORACLE_ID_TAG): only the runtime's oracle
    watcher runs those, for a request it read from the chain."""


class RegistryUnavailable(FunctionError):
    pass


class InvocationFailed(FunctionError):
    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class LimitExceeded(InvocationFailed):
    def __init__(self, limit: str, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message, report)
        self.limit = limit


class SecretError(FunctionError):
    pass


class ResultInvalid(FunctionError):
    pass
