"""Errors of the control plane's flows (deploy, upgrade, governance), one tree:

teecloud.errors.Error
└── CloudError               a message a user can act on (the CLI prints it; the REST API will map it)
    ├── InvalidOption        a bad name, env var, flag combination: refused before anything is sent
    └── DeployError          the cloud refused or failed a step (also a node.NodeError, for callers of
                             the node's clients that catch that)
"""

from __future__ import annotations

from teecloud.errors import Error
from teecloud.node.errors import NodeError

__all__ = ["CloudError", "ComposeRefused", "DeployError", "InvalidOption"]


class CloudError(Error):
    """Base class of the control plane's errors; `str(err)` is a sentence a user can act on."""

    def diagnostics(self) -> str:
        return str(self)


class InvalidOption(CloudError, ValueError):
    """A deploy/upgrade option is malformed (refused before the chain or a node is contacted)."""


class DeployError(CloudError, NodeError):
    """The cloud refused or failed a deploy/upgrade step."""


class ComposeRefused(InvalidOption, DeployError):
    """The compose file cannot be read or fails the compose policy (node/compose.py)."""
