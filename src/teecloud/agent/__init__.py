"""teecloud.agent: the guest agent — dstack-compatible API on a Unix socket, boot measurement, key
providers. Clients import request/response models from `teecloud.agent.api`."""

from teecloud.agent.boot import AgentState, BootError, boot, compose_hash, normalize_app_compose
from teecloud.agent.keyprovider import DEV_PROVIDER_NAME, KeyProvider, KeyProviderError, LocalDevKeyProvider
from teecloud.agent.server import (
    AgentRunner,
    AgentService,
    make_agent_app,
    make_public_app,
    make_tappd_app,
    serve_agent,
)

__all__ = [
    "DEV_PROVIDER_NAME",
    "AgentRunner",
    "AgentService",
    "AgentState",
    "BootError",
    "KeyProvider",
    "KeyProviderError",
    "LocalDevKeyProvider",
    "boot",
    "compose_hash",
    "make_agent_app",
    "make_public_app",
    "make_tappd_app",
    "normalize_app_compose",
    "serve_agent",
]
