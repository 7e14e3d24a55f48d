"""teecloud.agent: the guest agent — the guest half of a CVM's boot (guest.py: measure, keys, env, encrypted
storage, agent start), the dstack-compatible API (service.py: logic; http.py: dstack and tappd routes;
runner.py: hosting on Unix sockets), key providers. Clients import request/response models from
`teecloud.agent.api`."""

from teecloud.agent.boot import AgentState, BootError, boot, compose_hash, normalize_app_compose
from teecloud.agent.http import make_agent_app, make_public_app, make_tappd_app
from teecloud.agent.keyprovider import DEV_PROVIDER_NAME, KeyProvider, KeyProviderError, LocalDevKeyProvider
from teecloud.agent.runner import AgentRunner, serve_agent
from teecloud.agent.service import AgentService

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
