"""The gateway process: dev CA, HAProxy (supervised), the registration listener (mutual RA-TLS) and the admin
listener (bearer token), with the listener limits of teecloud._serve, and a 1 s tick that expires
registrations, restarts a dead HAProxy and moves routes.

    GatewayServer(home, base_domain=..., peers=..., chain=..., admin_token=...).start()
        home/ca.pem        the dev CA certificate (public): curl --cacert home/ca.pem https://<name>:<port>/
        home/run/          HAProxy's configuration, maps, admin socket and the wildcard's key (0700 / 0600)
        home/acme/         with `acme=`: the ACME account key and the certificate (key + chain), 0600

With `keys=` (teecloud.gateway.kmskeys) every TLS key is derived from the KMS's keys for the gateway app: a
restart keeps the CA (home/ca.pem reused) and the keys; without, they are born here, new per process.
The public certificate is the dev CA's wildcard, or with `acme=` (teecloud.gateway.acme) the ACME CA's,
renewed by the tick within its renewal window (HAProxy reloads only then). With `tee=` every certificate
key it serves with gets a quote binding it, published at CERT_KEYS_PATH (teecloud.gateway.certkeys) on the
registration listener and on the public port (`https://<base domain>:<public port>` + CERT_KEYS_PATH: HAProxy
routes that path on the apex to the gateway's own loopback listener).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from teecloud._fs import atomic_write
from teecloud._serve import LimitedH11Protocol, LimitedServer, ServeLimits, limited_config
from teecloud.gateway import api
from teecloud.gateway.accesslog import AccessLog
from teecloud.gateway.acme import AcmeCertificates, StoredCert
from teecloud.gateway.certkeys import CERT_KEYS_PATH, CertKeyPublisher
from teecloud.gateway.client import temp_ca
from teecloud.gateway.customdomain import CustomDomains
from teecloud.gateway.devca import DevCa
from teecloud.gateway.driver import HaproxyDriver
from teecloud.gateway.errors import DataPlaneError, GatewayUsageError
from teecloud.gateway.haproxy import CustomDomainHook, merge_metrics
from teecloud.gateway.http import (
    PEER_CERT_STATE_KEY,
    fetch_unix_http,
    make_admin_app,
    make_cert_keys_app,
    make_custom_domain_app,
    make_registration_app,
)
from teecloud.gateway.kmskeys import DEV_CA, PUBLIC, REGISTRATION, GatewayKeys, key_origin
from teecloud.gateway.registry import Registry
from teecloud.gateway.routing import DataPlaneLimits, check_base_domain
from teecloud.gateway.service import GatewayService
from teecloud.gateway.vouch import NodeDirectory, VouchChecker
from teecloud.keys.certs import cert_to_pem
from teecloud.keys.ratls import QuoteSource
from teecloud.peer import ChainGate, PeerVerifier

__all__ = ["GATEWAY_ADMIN", "GATEWAY_REGISTER", "GatewayServer", "free_port"]

log = logging.getLogger("teecloud.gateway")

GATEWAY_REGISTER = ServeLimits(max_connections=256, backlog=1024)
GATEWAY_ADMIN = ServeLimits(max_connections=16, backlog=16)
GATEWAY_HOOK = ServeLimits(max_connections=256, backlog=1024)  # HAProxy's Lua asks once per connection
GATEWAY_CERT_KEYS = ServeLimits(max_connections=64, backlog=256)  # HAProxy's be_gateway_self (maxconn 64)
# OpenSSL X509_V_FLAG_NO_CHECK_TIME: certificate dates are checked by the peer verifier, with a reason.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now (HAProxy binds by number; a race with another process is reported at start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _RegistrationProtocol(LimitedH11Protocol):
    """Hands the TLS client certificate (DER) of the connection to the app through the lifespan state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        self.app_state = {**self.app_state, PEER_CERT_STATE_KEY: der}


class GatewayServer:
    def __init__(
        self,
        home: Path,
        *,
        base_domain: str,
        peers: PeerVerifier,
        chain: ChainGate,
        admin_token: str,
        host: str = "127.0.0.1",
        public_port: int = 0,
        registration_port: int = 0,
        admin_port: int = 0,
        limits: DataPlaneLimits = DataPlaneLimits(),
        ttl_s: float = 90.0,
        backend_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128"),
        clock: Callable[[], float] = time.time,
        custom_domains: CustomDomains | None = None,
        access_log: bool = True,
        acme: AcmeCertificates | None = None,
        tee: QuoteSource | None = None,
        keys: GatewayKeys | None = None,
        nodes: NodeDirectory | None = None,
    ) -> None:
        if not admin_token or len(admin_token) < 16:
            raise GatewayUsageError("the gateway's admin listener needs a token of at least 16 characters")
        if custom_domains is not None and not limits.passthrough:
            raise GatewayUsageError("custom domains are served in passthrough: they need passthrough names")
        self.home = Path(home)
        self.base_domain = check_base_domain(base_domain)
        self.host = host
        self.public_port = public_port or free_port(host)
        # `s` names and custom domains on a port of their own (the public port then has no hop); 0: none
        self.passthrough_port = limits.passthrough_port
        if self.passthrough_port == self.public_port:
            raise GatewayUsageError("the passthrough port must differ from the public port")
        self.clock = clock
        now = int(clock())
        # with `keys` (teecloud.gateway.kmskeys: derived from the KMS's keys for the gateway app) the same CA
        # and certificate keys after a restart, and `ca.pem` (public) reused; without: born here, per process
        self.keys = keys
        self.ca = DevCa(
            now=now,
            key=keys.p256(DEV_CA) if keys is not None else None,
            cert_pem=self._stored_ca() if keys is not None else None,
        )
        self.acme = acme
        self.public_names = (f"*.{self.base_domain}", self.base_domain)
        self._acme_cert: StoredCert | None = None
        # with KMS keys (and the gateway's app_id) each entry also carries the KMS signature chain
        signer = keys.signer if keys is not None else None
        self.cert_keys = (
            CertKeyPublisher(tee, signer=signer, domain=self.base_domain) if tee is not None else None
        )
        if acme is not None:
            if acme.base_domain != self.base_domain:
                raise GatewayUsageError("the ACME certificate is for another base domain")
            stored, _ = acme.ensure(now)
            self._acme_cert = stored
            self.wildcard, chain_pem = stored.issued, stored.chain_pem
        else:
            wildcard_key = keys.p256(PUBLIC) if keys is not None else None
            self.wildcard = self.ca.issue_wildcard(self.base_domain, now=now, key=wildcard_key)
            chain_pem = self.ca.cert_pem
        if self.cert_keys is not None:
            self.cert_keys.publish("dev-ca", self.ca.cert_pem, origin=self._origin(DEV_CA))
            self.cert_keys.publish(
                "public",
                self.wildcard.cert_pem,
                (f"*.{self.base_domain}", self.base_domain),
                origin=self._public_origin(),
            )
        self.custom_domains = custom_domains
        self.hook = (
            CustomDomainHook(free_port(host), secrets.token_hex(16)) if custom_domains is not None else None
        )
        # the cert-keys document on the public port: HAProxy -> this loopback listener (haproxy.render_config)
        self.cert_keys_port = free_port("127.0.0.1")
        self.driver = HaproxyDriver(
            self.home / "run",
            base_domain=self.base_domain,
            bind_host=host,
            port=self.public_port,
            cert=self.wildcard,
            chain_pem=chain_pem,
            limits=limits,
            custom_domains=self.hook,
            access_log=access_log,
            cert_keys_port=self.cert_keys_port,
        )
        # per-app latency histograms and counters from HAProxy's log lines (None: not logged)
        self.access_log = AccessLog(Path(self.driver.paths.access_log)) if access_log else None
        self.registry = Registry(ttl_s=ttl_s)
        self.service = GatewayService(
            peers,
            chain,
            self.registry,
            base_domain=self.base_domain,
            public_port=self.public_port,
            on_change=self.sync,
            clock=clock,
            backend_networks=backend_networks,
            # with `nodes` (NodeRegistry): routes only to addresses the launching node vouches for
            vouching=VouchChecker(nodes, clock=clock) if nodes is not None else None,
        )
        self.admin_token = admin_token
        self._reg_port = registration_port
        self._admin_port = admin_port
        self.registration_port = 0
        self.admin_port = 0
        self._applied: tuple[int, int] | None = None
        # custom domains resolved to a registered app port, pinned into passthrough.map until their TXT
        # TTL ends, so only a domain's first connections per TTL (until the next tick, <= 1 s) ask the
        # gateway (domain -> app, port, end, the TXT name that answered)
        self._pins: dict[str, tuple[str, int, float, str]] = {}
        self._pins_version = 0
        self._pins_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._renew_lock = threading.Lock()
        self._servers: list[LimitedServer] = []
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self.sync_errors = 0

    # ------------------------------------------------------------------------------------------ TLS

    def _stored_ca(self) -> str | None:
        try:
            return (self.home / "ca.pem").read_bytes()[:16384].decode("ascii", "replace")
        except OSError:
            return None

    def _origin(self, path: str) -> str:
        return key_origin(path if self.keys is not None else None)

    def _public_origin(self) -> str:
        if self.acme is None:
            return self._origin(PUBLIC)
        return self.acme.key_origin(self._acme_cert) if self._acme_cert is not None else "process"

    def _registration_ssl(self) -> ssl.SSLContext:
        """Server: a dev-CA certificate for the registration listener. Client: any certificate under the
        public registration temp CA (possession of its key only; the RA-TLS evidence decides)."""
        issued = self.ca.issue_server(
            "teecloud gateway registration",
            (self.host, "localhost"),
            now=int(self.clock()),
            key=self.keys.p256(REGISTRATION) if self.keys is not None else None,
        )
        if self.cert_keys is not None:
            self.cert_keys.publish(
                "registration", issued.cert_pem, (self.host, "localhost"), origin=self._origin(REGISTRATION)
            )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # OpenSSL loads a key from a file only: a 0600 file in the gateway's own 0700 run directory, removed
        # at once (the gateway's keys are never written outside its data directory)
        run_dir = self.driver.run_dir
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".registration-", suffix=".pem")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(issued.haproxy_pem(self.ca.cert_pem))
            ctx.load_cert_chain(tmp)
        finally:
            os.unlink(tmp)
        ctx.load_verify_locations(cadata=cert_to_pem(temp_ca()[1]))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
        return ctx

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def ca_file(self) -> Path:
        return self.home / "ca.pem"

    @property
    def registration_url(self) -> str:
        return f"https://{self.host}:{self.registration_port}"

    @property
    def cert_keys_url(self) -> str:
        """The cert-keys document on the public port (the base domain's apex)."""
        return f"https://{self.base_domain}:{self.public_port}{CERT_KEYS_PATH}"

    @property
    def passthrough_url(self) -> str:
        """Where `s` names and custom domains are served: the passthrough port, or the public port."""
        return f"https://<app_id>-<port>s.{self.base_domain}:{self.passthrough_port or self.public_port}/"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def status(self) -> api.GatewayStatus:
        return api.GatewayStatus(
            base_domain=self.base_domain,
            public_port=self.public_port,
            passthrough_port=self.passthrough_port,
            instances=len(self.registry.registrations()),
            routes=len(self.registry.routes(self.clock())),
            draining=self.registry.draining,
            haproxy_pid=self.driver.pid,
            ca_cert_sha256=self.ca.fingerprint,
            wildcard_not_after=self.wildcard.not_after,
        )

    def _haproxy_metrics(self) -> bytes:
        """HAProxy's exporter, each slot backend's series labelled with the route group it serves
        (`app_id` + `port`, or `instance_id` + `port`)."""
        own = self.custom_domains.metrics().encode() if self.custom_domains is not None else b""
        if self.access_log is not None:
            own = self.access_log.metrics().encode() + own
        try:
            text = own + merge_metrics(
                [fetch_unix_http(p.metrics_socket, "/metrics") for p in self.driver.process_paths]
            )
        except OSError:
            return own + b"# HAProxy's exporter did not answer\n"
        labels: dict[bytes, bytes] = {}
        for (_mode, (kind, ident, port)), backend in self.driver.plan.groups.items():
            key = "app_id" if kind == "app" else "instance_id"
            labels[f'proxy="{backend}"'.encode()] = (
                f'proxy="{backend}",{key}="{ident}",port="{port}"'.encode()
            )
        if not labels:
            return text
        pattern = re.compile(rb'proxy="b[htg]p?\d+"')
        return pattern.sub(lambda m: labels.get(m.group(0), m.group(0)), text)

    def resolve_custom_domain(self, sni: str) -> str | None:
        """The passthrough backend serving a custom domain: its TXT record's app must be registered here for
        that port (and not drained); None otherwise. BadHostName for a name that is not one."""
        if self.custom_domains is None:
            return None
        got = self.custom_domains.resolve(sni)
        if got.address is None or got.source is None:
            return None
        app_id, port = got.address
        backend = self.driver.plan.groups.get(("tcp", ("app", app_id, port)))
        if backend is not None and got.expires_at > self.custom_domains.clock():
            name = sni.lower().removesuffix(".")
            with self._pins_lock:
                if name not in self._pins and len(self._pins) < self.custom_domains.max_entries:
                    self._pins[name] = (app_id, port, got.expires_at, got.source)
                    self._pins_version += 1
            # the tick (within 1 s) moves it into passthrough.map: this connection is not delayed by it
        return backend

    def pinned_domains(self) -> list[api.CustomDomainView]:
        """The custom domains pinned now (not yet expired), sorted by name (the admin API's listing)."""
        if self.custom_domains is None:
            return []
        now = self.custom_domains.clock()
        with self._pins_lock:
            pins = sorted(self._pins.items())
        return [
            api.CustomDomainView(
                domain=d, app_id=a, port=p, source=src, expires_in_s=max(0, math.ceil(exp - now))
            )
            for d, (a, p, exp, src) in pins
            if exp > now
        ]

    def start(self, timeout: float = 20.0) -> GatewayServer:
        self.home.mkdir(parents=True, exist_ok=True)
        atomic_write(self.ca_file, self.ca.cert_pem.encode(), mode=0o644)
        if self.access_log is not None:
            (self.home / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
            self.access_log.start()  # before HAProxy, so its first lines are not lost
        try:
            self.driver.start()
        except BaseException:
            if self.access_log is not None:
                self.access_log.stop()
            raise
        reg_app = make_registration_app(
            self.service, cert_keys=self.cert_keys.document if self.cert_keys is not None else None
        )
        admin_app = make_admin_app(
            self.service,
            token=self.admin_token,
            status=self.status,
            haproxy_metrics=self._haproxy_metrics,
            custom_domains=self.pinned_domains if self.custom_domains is not None else None,
        )
        ctx = self._registration_ssl()
        reg = LimitedServer(
            limited_config(
                reg_app,
                GATEWAY_REGISTER,
                host=self.host,
                port=self._reg_port,
                http=_RegistrationProtocol,
                ssl_context_factory=lambda _c, _d: ctx,
            ),
            GATEWAY_REGISTER,
            name="gateway registration listener",
        )
        admin = LimitedServer(
            limited_config(admin_app, GATEWAY_ADMIN, host=self.host, port=self._admin_port),
            GATEWAY_ADMIN,
            name="gateway admin listener",
        )
        doc_app = make_cert_keys_app(self.cert_keys.document if self.cert_keys is not None else None)
        doc = LimitedServer(
            limited_config(doc_app, GATEWAY_CERT_KEYS, host="127.0.0.1", port=self.cert_keys_port),
            GATEWAY_CERT_KEYS,
            name="gateway cert-keys listener",
        )
        self._servers = [reg, admin, doc]
        if self.hook is not None:
            hook_app = make_custom_domain_app(self.resolve_custom_domain, token=self.hook.token)
            self._servers.append(
                LimitedServer(
                    limited_config(hook_app, GATEWAY_HOOK, host="127.0.0.1", port=self.hook.port),
                    GATEWAY_HOOK,
                    name="gateway custom domain hook",
                )
            )
        self._thread = threading.Thread(target=self._run, name="teecloud-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not all(s.started for s in self._servers):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.driver.stop()
                if self.access_log is not None:
                    self.access_log.stop()
                raise DataPlaneError("the gateway's listeners did not start (is a port in use?)")
            time.sleep(0.02)
        self.registration_port = reg.servers[0].sockets[0].getsockname()[1]
        self.admin_port = admin.servers[0].sockets[0].getsockname()[1]
        self.service.reserved_ports = {self.public_port, self.registration_port, self.admin_port}
        if self.passthrough_port:
            self.service.reserved_ports.add(self.passthrough_port)
        if self.hook is not None:
            self.service.reserved_ports.add(self.hook.port)
        self.service.reserved_ports.add(self.cert_keys_port)
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick_loop, name="teecloud-gateway-tick", daemon=True)
        self._ticker.start()
        return self

    def _run(self) -> None:
        async def serve() -> None:
            await asyncio.gather(*(s.serve() for s in self._servers))

        asyncio.run(serve())

    def _tick_loop(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def tick(self) -> None:
        """Once a second: expire registrations, supervise HAProxy, move routes."""
        try:
            self.registry.sweep(self.clock())
            self._expire_pins()
            self.renew_certificate()
            if self.driver.check():
                self._applied = None
            self.sync()
        except Exception:  # the loop must go on; the error is logged and counted
            self.sync_errors += 1
            log.exception("gateway tick failed")

    def renew_certificate(self) -> bool:
        """With ACME, within the renewal window: the certificate on disk (renewed by `ensure`, at most once
        per `retry_s`), if HAProxy does not serve it yet: its key's quote published beside the old one,
        HAProxy reloaded (the only reload), then the old key's entry retired. A failed reload is retried at
        the next tick. True when the served certificate changed."""
        if self.acme is None or not self.acme.due(self._acme_cert, self.clock()):
            return False
        with self._renew_lock:  # the tick thread and a direct call: one reload per new certificate
            return self._renew(self.acme)

    def _renew(self, acme: AcmeCertificates) -> bool:
        stored, _changed = acme.ensure(self.clock())
        if stored.issued.cert_pem == self.wildcard.cert_pem:
            return False
        entry = None
        if self.cert_keys is not None:
            entry = self.cert_keys.publish(
                "public",
                stored.issued.cert_pem,
                self.public_names,
                replace=False,
                origin=acme.key_origin(stored),
            )
        self.driver.reload_certs(stored.issued, stored.chain_pem)
        self._acme_cert, self.wildcard = stored, stored.issued
        if self.cert_keys is not None and entry is not None:
            self.cert_keys.retire("public", keep=entry)
        return True

    def sync(self) -> None:
        """Move HAProxy to the registry's routes (and pinned custom domains), if they changed since the last
        move."""
        with self._sync_lock:
            version = (self.registry.version, self._pins_version)
            if version == self._applied:
                return
            with self._pins_lock:
                pins = {d: (a, p) for d, (a, p, _exp, _src) in self._pins.items()}
            routes = self.registry.routes(self.clock())
            self.driver.apply(routes, pins)
            self._applied = version
            if self.access_log is not None:
                app_of = {("app", r.app_id, r.port): r.app_id for r in routes}
                app_of.update({("instance", r.instance_id, r.port): r.app_id for r in routes})
                self.access_log.set_backends(
                    {b: app_of[g] for (_mode, g), b in self.driver.plan.groups.items() if g in app_of}
                )

    def _expire_pins(self) -> None:
        if self.custom_domains is None:
            return
        now = self.custom_domains.clock()
        with self._pins_lock:
            dead = [d for d, (_a, _p, exp, _src) in self._pins.items() if exp <= now]
            for d in dead:
                del self._pins[d]
            if dead:
                self._pins_version += 1

    def stop(self) -> None:
        self._stop.set()
        for s in self._servers:
            s.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        self.driver.stop()
        if self.access_log is not None:
            self.access_log.stop()

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
