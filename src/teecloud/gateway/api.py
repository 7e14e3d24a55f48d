"""The gateway's contract: its HTTP paths and request/response models (all that clients import from it).

    POST /prpc/Gateway.RegisterCvm   RegisterCvmRequest -> RegisterCvmResponse   mutual RA-TLS, a booted CVM
    GET  /admin/status               GatewayStatus                               admin listener, bearer token
    GET  /admin/routes               list[RouteView]                             admin listener
    GET  /admin/domains?limit=&after=  CustomDomainList                          admin listener
    POST /admin/drain                DrainRequest -> GatewayStatus               admin listener
    GET  /metrics                    Prometheus text                             admin listener

A registration names where the CVM's ports are reachable, the launching node's signed statement of the
same (`node_vouch`), and may carry its app-compose.json (its port policy, read only once its hash matches
the attested compose hash). Who registers (app_id, instance_id) comes
from the attested client certificate and the chain, never from this body.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from teecloud.appcompose import MAX_APP_COMPOSE_BYTES

__all__ = [
    "DOMAINS_PAGE_DEFAULT",
    "DOMAINS_PAGE_MAX",
    "MAX_ENDPOINTS",
    "PATH_REGISTER",
    "CustomDomainList",
    "CustomDomainView",
    "DrainRequest",
    "Endpoint",
    "GatewayStatus",
    "NodeVouch",
    "RegisterCvmRequest",
    "RegisterCvmResponse",
    "RouteView",
]

PATH_REGISTER = "/prpc/Gateway.RegisterCvm"
MAX_ENDPOINTS = 16  # ports one CVM may publish
DOMAINS_PAGE_DEFAULT = 100  # pinned custom domains per /admin/domains page, unless `limit` says
DOMAINS_PAGE_MAX = 1000


class Endpoint(BaseModel):
    """One app port and the address (IP literal, port) where the gateway reaches it."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(ge=1, le=65535, description="the app's port, as in <app_id>-<port>.<base>")
    host: str = Field(min_length=2, max_length=45, description="an IPv4 or IPv6 literal")
    host_port: int = Field(ge=1, le=65535)


_HEX40 = r"^[0-9a-f]{40}$"


class NodeVouch(BaseModel):
    """The launching node's signed statement of where an instance is reachable (teecloud.node.vouch)."""

    model_config = ConfigDict(extra="forbid")

    purpose: str = Field(max_length=64)
    node_id: int = Field(ge=0, le=2**63)
    operator: str = Field(pattern=r"^0x[0-9a-f]{40}$")
    app_id: str = Field(pattern=_HEX40)
    instance_id: str = Field(pattern=_HEX40)
    launch_nonce: str = Field(pattern=r"^[0-9a-f]{64}$")
    endpoints: list[Endpoint] = Field(min_length=1, max_length=MAX_ENDPOINTS)
    issued_at: int = Field(ge=0, le=2**40)
    expires_at: int = Field(ge=0, le=2**40)
    signature: str = Field(pattern=r"^[0-9a-f]{130}$", description="EIP-191, the node operator's key")


class RegisterCvmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[Endpoint] = Field(min_length=1, max_length=MAX_ENDPOINTS)
    node_vouch: NodeVouch | None = Field(
        default=None,
        description="the launching node's signed statement of these endpoints; a gateway that checks nodes "
        "routes only endpoints it lists",
    )
    app_compose: str | None = Field(
        default=None,
        max_length=MAX_APP_COMPOSE_BYTES,
        description="the CVM's app-compose.json; the gateway checks sha256(normalized) against the attested "
        "compose hash, then applies its port_policy (restrict_mode: only listed ports are routed)",
    )


class RegisterCvmResponse(BaseModel):
    app_id: str
    instance_id: str
    expires_in_s: int
    urls: list[str]


class RouteView(BaseModel):
    app_id: str
    instance_id: str
    port: int
    address: str
    expires_in_s: int
    draining: bool = False
    proxy_protocol: bool = False  # PROXY v2 toward the CVM (its port_policy marks the port `pp`)
    h2c: bool = False  # plain names speak HTTP/2 cleartext to the CVM (its port_policy marks the port `h2c`)


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=2, max_length=45, description="backend host whose instances stop routing")


class GatewayStatus(BaseModel):
    base_domain: str
    public_port: int
    passthrough_port: int = 0  # `s` names and custom domains on a port of their own (0: the public port)
    instances: int
    routes: int
    draining: list[str]
    haproxy_pid: int | None
    ca_cert_sha256: str
    wildcard_not_after: int


class CustomDomainView(BaseModel):
    """A custom domain the gateway has pinned to an app's passthrough port (docs/gateway.md)."""

    domain: str
    app_id: str
    port: int
    source: str = Field(
        description="the TXT name that answered: _dstack-app-address.<domain>, the legacy "
        "_tapp-address.<domain>, or _dstack-app-address-wildcard.<parent>"
    )
    expires_in_s: int = Field(description="seconds until the cached TXT answer ends and the pin goes")


class CustomDomainList(BaseModel):
    """One page of the pinned custom domains, sorted by name; `next_after` (if any) asks for the next page."""

    enabled: bool  # False: this gateway serves no custom domains (no DNS server was given)
    total: int  # pinned now, all pages
    domains: list[CustomDomainView]
    next_after: str | None = None
