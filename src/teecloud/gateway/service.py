"""Registration: from a CVM's client certificate to routes, failing closed.

`GatewayService.register(cert_der, request)`, for the certificate the TLS peer proved it holds the key of:
  (1) attest      teecloud.peer.PeerVerifier.verify_cert: quote, event log, policy, boot_info   `parsed`...
  (2) usage       the certificate was made for registration (`gateway:register`)                 `usage`
  (3) boot time   teecloud.peer.require_boot_time: the quoted RTMR3 is exactly the boot grammar's value,
                  so the quote was taken while the CVM booted; a quote taken later (any app can get one
                  over chosen bytes through GetQuote) never registers anything                   `boot_time`
  (4) identity    app_id and instance_id from the verified boot_info, never from the body; an instance
                  without an instance_id cannot be registered                                    `instance_id`
  (5) chain       teecloud.peer.ChainGate.app_allowed: KmsAuth.isAppAllowed (allowed compose hash, instance
                  not retired), read at most one block old; a refusal here also removes the instance's
                  current routes (its hash was removed or it was retired)                        `chain`
  (6) policy      if the body carries the app-compose.json: sha256(normalized) must equal the attested
                  compose hash (boot_info), then its port_policy applies: with restrict_mode only listed
                  ports get routes (others are not routed, so refused at accept); a `pp` port's route
                  sends PROXY v2 (the client's address) to the CVM                             `compose`
  (7) vouch       with a node directory (`vouching`): the launching node's signed statement
                  (teecloud.gateway.vouch): signed by an active NodeRegistry node's operator, whose launch
                  gave this instance_id, unexpired, not older than one already taken, listing every
                  endpoint of the body                                                          `vouch`
  (8) routes      the body's endpoints (bounded, IP literals inside `backend_networks` — an extra bound —
                  never one of the gateway's own listeners) become routes for this instance only `request`

Without `vouching` the CVM alone names its endpoint addresses (within `backend_networks` it could point its
own name at another service there): a gateway that knows the nodes should always be given it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from teecloud.gateway import api
from teecloud.gateway.errors import CapacityExceeded, GatewayUsageError, RegistrationRefused
from teecloud.gateway.portpolicy import UNRESTRICTED, BadPortPolicy, port_policy_of
from teecloud.gateway.registry import Registry
from teecloud.gateway.routing import Route, format_address, split_address
from teecloud.gateway.vouch import VouchChecker
from teecloud.peer import ChainGate, PeerRejected, PeerVerifier, require_boot_time

__all__ = ["GatewayService", "RegistrationCounters"]

log = logging.getLogger("teecloud.gateway")


@dataclass
class RegistrationCounters:
    accepted: int = 0
    refused: dict[str, int] | None = None

    def refuse(self, step: str) -> None:
        if self.refused is None:
            self.refused = {}
        if step in self.refused or len(self.refused) < 64:
            self.refused[step] = self.refused.get(step, 0) + 1


class GatewayService:
    def __init__(
        self,
        peers: PeerVerifier,
        chain: ChainGate,
        registry: Registry,
        *,
        base_domain: str,
        public_port: int,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        backend_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128"),
        reserved_ports: tuple[int, ...] = (),
        vouching: VouchChecker | None = None,
    ) -> None:
        self.vouching = vouching
        self.backend_networks = tuple(ipaddress.ip_network(n) for n in backend_networks)
        self.reserved_ports = set(reserved_ports)
        self.peers = peers
        self.chain = chain
        self.registry = registry
        self.base_domain = base_domain
        self.public_port = public_port
        self.on_change = on_change
        self.clock = clock
        self.counters = RegistrationCounters()
        self._lock = threading.Lock()

    def register(self, cert_der: bytes | None, request: api.RegisterCvmRequest) -> api.RegisterCvmResponse:
        try:
            return self._register(cert_der, request)
        except RegistrationRefused as exc:
            with self._lock:
                self.counters.refuse(exc.step)
            log.info("registration refused at step %s: %s", exc.step, exc.reason)
            raise

    def _register(self, cert_der: bytes | None, request: api.RegisterCvmRequest) -> api.RegisterCvmResponse:
        # (1)
        try:
            peer = self.peers.verify_cert(cert_der)
        except PeerRejected as exc:
            raise RegistrationRefused(exc.reason, step=exc.step) from exc
        # (2)
        if peer.usage != "gateway:register":
            raise RegistrationRefused(
                f"the certificate is for {peer.usage!r}, not for gateway registration", step="usage"
            )
        # (3)
        try:
            require_boot_time(peer)
        except PeerRejected as exc:
            raise RegistrationRefused(exc.reason, step=exc.step) from exc
        # (4)
        app_id = peer.app_id.hex()
        instance_id = peer.instance_id.hex()
        if not any(peer.instance_id):
            raise RegistrationRefused(
                "the CVM has no instance_id (no_instance_id apps cannot be routed)", step="instance_id"
            )
        # (5)
        try:
            self.chain.app_allowed(peer.boot_info)
        except PeerRejected as exc:
            if self.registry.remove(instance_id):
                self.on_change()
            raise RegistrationRefused(exc.reason, step=exc.step) from exc
        # (6)
        policy = UNRESTRICTED
        if request.app_compose is not None:
            try:
                policy = port_policy_of(
                    request.app_compose.encode("utf-8", "surrogatepass"), peer.compose_hash
                )
            except BadPortPolicy as exc:
                raise RegistrationRefused(str(exc), step="compose") from exc
        # (7)
        if self.vouching is not None:
            self.vouching.check(
                request.node_vouch,
                app_id=peer.app_id,
                instance_id=peer.instance_id,
                endpoints=request.endpoints,
            )
        # (8)
        routes: list[Route] = []
        ports: set[int] = set()
        for ep in request.endpoints:
            if ep.port in ports:
                raise RegistrationRefused(f"port {ep.port} is listed twice", step="request")
            ports.add(ep.port)
            if not policy.allows(ep.port):
                log.info("app %s: port %d is not in its port_policy; not routed", app_id[:12], ep.port)
                continue
            try:
                host, port = split_address(f"[{ep.host}]:{ep.host_port}")
                ip = ipaddress.ip_address(host)
                if not any(ip in net for net in self.backend_networks):
                    raise RegistrationRefused(
                        f"endpoint {host} is outside the gateway's backend networks", step="request"
                    )
                if port in self.reserved_ports:
                    raise RegistrationRefused(f"port {port} is one of the gateway's own", step="request")
                pp = policy.wants_proxy_protocol(ep.port)  # PROXY v2 toward the CVM on this port
                h2c = policy.wants_h2c(ep.port)  # its plain names speak h2c to the CVM
                routes.append(Route(app_id, instance_id, ep.port, format_address(host, port), pp, h2c))
            except GatewayUsageError as exc:
                raise RegistrationRefused(str(exc), step="request") from exc
        previous = next((r for r in self.registry.registrations() if r.instance_id == instance_id), None)
        reg = self.registry.register(app_id, instance_id, peer.compose_hash.hex(), routes, now=self.clock())
        try:
            self.on_change()
        except (
            CapacityExceeded
        ) as exc:  # no slot for it: the registration is undone, the data plane unchanged
            if previous is None:
                self.registry.remove(instance_id)
            else:
                self.registry.register(
                    app_id, instance_id, previous.compose_hash, previous.routes, now=self.clock()
                )
            raise RegistrationRefused(str(exc), step="capacity") from exc
        if self.vouching is not None and request.node_vouch is not None:
            self.vouching.accept(request.node_vouch)
        with self._lock:
            self.counters.accepted += 1
        suffix = "" if self.public_port == 443 else f":{self.public_port}"
        return api.RegisterCvmResponse(
            app_id=app_id,
            instance_id=instance_id,
            expires_in_s=int(reg.expires_at - self.clock()),
            urls=[f"https://{app_id}-{r.port}.{self.base_domain}{suffix}/" for r in reg.routes],
        )
