"""Kept so existing imports work: the agent's server is split into teecloud.agent.service (the API's logic),
teecloud.agent.http (dstack and tappd routes) and teecloud.agent.runner (hosting). New code imports those."""

from teecloud.agent.boot import AgentState, boot
from teecloud.agent.http import make_agent_app, make_public_app, make_tappd_app
from teecloud.agent.runner import AgentRunner, serve_agent
from teecloud.agent.service import AgentService, ClientError

__all__ = [
    "AgentRunner",
    "AgentService",
    "AgentState",
    "ClientError",
    "boot",
    "make_agent_app",
    "make_public_app",
    "make_tappd_app",
    "serve_agent",
]
