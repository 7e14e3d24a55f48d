"""Errors raised by teecloud.chain.

ChainError                      base: the CLI catches only this
├── ChainUnreachable            no answer from the JSON-RPC endpoint (fails fast, short timeouts)
├── WrongChainId                the endpoint serves another chain than expected
├── InsufficientFunds           the signer cannot pay for gas + value
├── ContractReverted(reason)    a call or transaction reverted; `reason` is the contract's message
├── NotDeployed                 no teecloud contracts recorded for this chain
└── ChainStateError             the embedded chain's files are unusable (locked, corrupt journal)
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = [
    "ChainError",
    "ChainStateError",
    "ChainUnreachable",
    "ContractReverted",
    "InsufficientFunds",
    "NotDeployed",
    "WrongChainId",
]


class ChainError(Error):
    """Base class of every error raised by teecloud.chain."""

    def diagnostics(self) -> str:
        return str(self)


class ChainUnreachable(ChainError):
    pass


class WrongChainId(ChainError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"wrong chain id: expected {expected}, the endpoint serves {actual}")
        self.expected = expected
        self.actual = actual


class InsufficientFunds(ChainError):
    pass


class ContractReverted(ChainError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"contract reverted: {reason}" if reason else "contract reverted (no reason given)")
        self.reason = reason


class NotDeployed(ChainError):
    pass


class ChainStateError(ChainError):
    pass
