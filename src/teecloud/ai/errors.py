"""Errors of `teecloud.ai`, one base, grouped by cause:

AiError (teecloud.errors.Error)
├── MalformedInput        bytes or JSON that do not parse as the format says (hostile or broken)
├── ReceiptInvalid        a receipt that does not verify (`.step` names the failing check)
├── KeySetInvalid         a key set whose chain or binding does not verify (`.step`)
├── EnvelopeRejected      an E2EE envelope that is malformed, stale, replayed or does not decrypt
└── UpstreamRejected      the verifying proxy refused an upstream (`.step` names the check)
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = [
    "AiError",
    "EnvelopeRejected",
    "KeySetInvalid",
    "MalformedInput",
    "ReceiptInvalid",
    "UpstreamRejected",
]


class AiError(Error):
    """Base of every error `teecloud.ai` raises on purpose."""


class MalformedInput(AiError):
    pass


class _Stepped(AiError):
    def __init__(self, reason: str, *, step: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class ReceiptInvalid(_Stepped):
    pass


class KeySetInvalid(_Stepped):
    pass


class EnvelopeRejected(AiError):
    def __init__(self, reason: str, *, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


class UpstreamRejected(_Stepped):
    pass
