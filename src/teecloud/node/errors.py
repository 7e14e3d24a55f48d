"""Errors of the worker node.

NodeError                      base; the CLI and the HTTP API catch only this
├── ComposeRejected(ValueError) the app's compose file asks for something a CVM cannot give (client error)
├── BadRequest(ValueError)     any other client mistake (HTTP 400)
├── TooManyStreams             a cap on concurrent log streams is reached (HTTP 429)
├── InstanceNotFound           no CVM with that id or name
├── InstanceStateError         the request does not fit the CVM's state (e.g. upgrade of a removed CVM)
├── RuntimeUnavailable         Docker engine / Compose missing or unreachable (operator must fix)
├── RuntimeFailed              docker / docker compose returned an error
└── BootFailed(phase)          the boot sequence stopped; `phase` names where
    └── KeysDenied             the KMS refused the keys (code not allowed on chain, bad attestation...)

A failure of the encrypted disk (gocryptfs / FUSE) is the guest's: teecloud.agent.errors.StorageError; a boot
reports it as BootFailed("storage").
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = [
    "BadRequest",
    "BootFailed",
    "ComposeRejected",
    "InstanceNotFound",
    "InstanceStateError",
    "KeysDenied",
    "NodeError",
    "RuntimeFailed",
    "RuntimeUnavailable",
    "TooManyStreams",
]


class NodeError(Error):
    """Base class of every error the node reports; `str(err)` is a message a user can act on."""


class ComposeRejected(NodeError, ValueError):
    pass


class BadRequest(NodeError, ValueError):
    pass


class TooManyStreams(NodeError):
    pass


class InstanceNotFound(NodeError, LookupError):
    pass


class InstanceStateError(NodeError):
    pass


class RuntimeUnavailable(NodeError):
    pass


class RuntimeFailed(NodeError):
    pass


class BootFailed(NodeError):
    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"boot stopped at {phase}: {reason}")
        self.phase = phase
        self.reason = reason


class KeysDenied(BootFailed):
    def __init__(self, reason: str) -> None:
        super().__init__("keys", reason)
