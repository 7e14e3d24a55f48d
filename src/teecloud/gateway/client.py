"""The CVM side of registration: the boot-time registration certificate and the RegisterCvm call.

    registration_cert(tee, key, now=...)   an RA-TLS certificate for `key` with a quote taken NOW: call it
                                           while the CVM boots (RTMR3 at the boot grammar's value, before
                                           `key-provider` is measured), keep the key in the CVM, and use the
                                           certificate for every later (re-)registration
    register(url, key, cert_der, endpoints, ca_pem=..., app_compose=...)  one mutual-TLS RegisterCvm call
                                           (app_compose: the CVM's app-compose.json, for its port policy)

The certificate is issued under a public, fixed "registration temp CA" (`temp_ca()`): its key is derived
from a published constant, so it proves nothing but lets a standard TLS stack accept the client
certificate; what proves who registers is the RA-TLS evidence inside it (the KMS uses a public temp CA the
same way).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.gateway import api
from teecloud.gateway.errors import GatewayError, RegistrationRefused
from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem
from teecloud.keys.ratls import QuoteSource, make_ratls_cert

__all__ = [
    "REGISTRATION_USAGE",
    "RegisteringAtBoot",
    "Registrar",
    "register",
    "registration_cert",
    "temp_ca",
]

log = logging.getLogger("teecloud.gateway")

REGISTRATION_USAGE = "gateway:register"
REGISTRATION_CERT_LIFETIME_S = 30 * 24 * 3600
_TEMP_CA_SEED = b"teecloud gateway registration temp CA v1 (public; proves nothing)"


@cache
def temp_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The public registration temp CA: the same key and certificate everywhere."""
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 group order
    secret = int.from_bytes(hashlib.sha256(_TEMP_CA_SEED).digest(), "big") % (n - 1) + 1
    key = ec.derive_private_key(secret, ec.SECP256R1())
    cert = issue_cert(
        key.public_key(),
        issuer_key=key,
        issuer_name=None,
        subject_cn="teecloud gateway registration temp CA (public key)",
        not_before=1_577_836_800,  # 2020-01-01
        not_after=4_102_444_800,  # 2100-01-01
        ca=True,
        serial=1,
    )
    return key, cert


def registration_cert(
    tee: QuoteSource,
    key: ec.EllipticCurvePrivateKey,
    *,
    now: int,
    lifetime_s: int = REGISTRATION_CERT_LIFETIME_S,
) -> bytes:
    """The CVM's registration certificate (DER), its quote taken now: only useful when now is boot time."""
    ca_key, ca_cert = temp_ca()
    cert = make_ratls_cert(
        tee,
        key,
        issuer_key=ca_key,
        issuer_cert=ca_cert,
        subject="teecloud CVM",
        usage=REGISTRATION_USAGE,
        not_before=now - 60,
        not_after=now - 60 + lifetime_s,
        server_auth=False,
        client_auth=True,
    )
    return cert.public_bytes(serialization.Encoding.DER)


def register(
    url: str,
    key: ec.EllipticCurvePrivateKey,
    cert_der: bytes,
    endpoints: Sequence[api.Endpoint],
    *,
    ca_pem: str,
    timeout: float = 10.0,
    app_compose: str | None = None,
    node_vouch: api.NodeVouch | None = None,
) -> api.RegisterCvmResponse:
    """POST RegisterCvm over mutual TLS. Raises RegistrationRefused on a refusal, GatewayError otherwise.
    `node_vouch`: the launching node's signed statement of these endpoints (teecloud.node.vouch)."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False  # the registration listener is addressed by IP; its CA is pinned
    with tempfile.TemporaryDirectory(prefix="teecloud-gw-client-") as tmp:
        p = Path(tmp) / "client.pem"
        p.touch(mode=0o600)
        pem = x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM).decode()
        p.write_text(pem + cert_to_pem(temp_ca()[1]) + key_to_pem(key))
        ctx.load_cert_chain(str(p))
    body = api.RegisterCvmRequest(
        endpoints=list(endpoints), app_compose=app_compose, node_vouch=node_vouch
    ).model_dump(exclude_none=True)
    try:
        with httpx.Client(verify=ctx, timeout=timeout) as http:
            r = http.post(url.rstrip("/") + api.PATH_REGISTER, json=body)
    except httpx.HTTPError as exc:
        raise GatewayError(f"cannot reach the gateway at {url}: {exc}") from exc
    try:
        data = r.json()
    except ValueError as exc:
        raise GatewayError(f"the gateway answered {r.status_code} without JSON") from exc
    if r.status_code != 200:
        raise RegistrationRefused(str(data.get("reason", r.text[:300])), step=str(data.get("step", "")))
    return api.RegisterCvmResponse.model_validate(data)


class RegisteringAtBoot:
    """A KeyProvider (teecloud.agent.keyprovider) wrapper: when the booting guest asks for its keys — RTMR3
    is then exactly the boot grammar's value — it first makes the CVM's registration key and certificate,
    then asks the wrapped provider. The key stays in this object (in the CVM); after boot no quote can make
    another such certificate, because `key-provider` is measured next."""

    MAX_ISSUED = 4096

    def __init__(self, inner: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.inner = inner
        self.clock = clock
        self.key: ec.EllipticCurvePrivateKey | None = None
        self.cert_der: bytes | None = None
        # per instance_id, for a provider shared by the boots of many CVMs (the local docker runtime)
        self.issued: dict[bytes, tuple[ec.EllipticCurvePrivateKey, bytes]] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.inner.name)

    def boot_nonce(self) -> bytes:
        return bytes(self.inner.boot_nonce())

    def bind_app_compose(self, app_compose: str) -> None:
        """Forwarded: the wrapped KMS client sends the compose for the KMS's GPU gate."""
        bind = getattr(self.inner, "bind_app_compose", None)
        if callable(bind):
            bind(app_compose)

    def bind_encrypted_env(self, blob: bytes | None) -> None:
        """Forwarded: a threshold KMS client asks for the env's partials with the keys."""
        bind = getattr(self.inner, "bind_encrypted_env", None)
        if callable(bind):
            bind(blob)

    @property
    def env_shared_secret(self) -> bytes | None:
        secret = getattr(self.inner, "env_shared_secret", None)
        return secret if isinstance(secret, bytes) else None

    def info(self) -> dict[str, Any]:
        return dict(self.inner.info())

    def get_app_keys(self, tee: Any, app_id: bytes, instance_id: bytes) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        cert_der = registration_cert(tee, key, now=int(self.clock()))
        with self._lock:
            self.key, self.cert_der = key, cert_der
            self.issued.pop(bytes(instance_id), None)
            self.issued[bytes(instance_id)] = (key, cert_der)
            while len(self.issued) > self.MAX_ISSUED:
                self.issued.pop(next(iter(self.issued)))
        return self.inner.get_app_keys(tee, app_id, instance_id)


class Registrar:
    """Keeps one CVM registered with every gateway in `urls`: registers now, then every `interval_s`
    (a third of the gateways' registration lifetime). A refusal or an unreachable gateway is logged and
    retried at the next interval; `last` holds each gateway's latest answer or error. `node_vouch()`, asked
    each round, gives the launching node's current signed statement of the endpoints (None: none sent)."""

    def __init__(
        self,
        urls: Sequence[str],
        key: ec.EllipticCurvePrivateKey,
        cert_der: bytes,
        endpoints: Sequence[api.Endpoint],
        *,
        ca_pem: str,
        interval_s: float = 30.0,
        app_compose: str | None = None,
        node_vouch: Callable[[], api.NodeVouch | None] | None = None,
    ) -> None:
        self.node_vouch = node_vouch
        self.app_compose = app_compose  # the CVM's app-compose.json: the gateway applies its port policy
        self.urls = list(urls)
        self.key = key
        self.cert_der = cert_der
        self.endpoints = list(endpoints)
        self.ca_pem = ca_pem
        self.interval_s = interval_s
        self.last: dict[str, api.RegisterCvmResponse | GatewayError] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register_all(self) -> None:
        try:
            vouch = self.node_vouch() if self.node_vouch is not None else None
        except (OSError, ValueError) as exc:  # the node's statement is unreadable now: sent without one
            log.warning("no node statement this round: %s", exc)
            vouch = None
        for url in self.urls:
            try:
                self.last[url] = register(
                    url,
                    self.key,
                    self.cert_der,
                    self.endpoints,
                    ca_pem=self.ca_pem,
                    app_compose=self.app_compose,
                    node_vouch=vouch,
                )
            except GatewayError as exc:
                log.warning("registration with %s failed: %s", url, exc)
                self.last[url] = exc

    def start(self) -> Registrar:
        self.register_all()
        self._thread = threading.Thread(target=self._loop, name="teecloud-registrar", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.register_all()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
