"""Errors of the guest agent's boot (the API's own refusals are `ClientError`, HTTP 400/404).

AgentError(teecloud.errors.Error)
├── GuestBootFailed(phase, reason)   the guest half of boot stopped at `phase` (measuring, keys, env, storage,
│                                    agent); nothing decrypted is left behind
└── StorageError                     gocryptfs / FUSE failure of the encrypted disk
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = ["AgentError", "GuestBootFailed", "StorageError"]


class AgentError(Error):
    """Base class of the agent's errors; `str(err)` is a message a user can act on."""


class GuestBootFailed(AgentError):
    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"boot stopped at {phase}: {reason}")
        self.phase = phase
        self.reason = reason


class StorageError(AgentError):
    pass
