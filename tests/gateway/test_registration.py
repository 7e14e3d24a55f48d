"""Registration over mutual RA-TLS, end to end: a CVM booted the dstack way (simulated TDX) makes its
registration certificate at boot, registers with a running gateway (real HAProxy), and is reachable at
https://<app_id>-<port>.<base>; every other path registers nothing and moves no traffic."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydantic
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.agent.boot import boot
from teecloud.agent.keyprovider import LocalDevKeyProvider
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.chain import ChainClient
from teecloud.gateway import api
from teecloud.gateway.client import RegisteringAtBoot, Registrar, register, registration_cert
from teecloud.gateway.errors import RegistrationRefused
from teecloud.gateway.server import GatewayServer
from teecloud.peer import ChainGate, PeerPolicy, PeerVerifier, StaticCollateral
from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for
from tests.gateway.conftest import BASE, Backend
from tests.kms.conftest import SIM_OS
from tests.kms.test_quote_oracle import GetQuoteOracle

TOKEN = "gateway-admin-token-for-tests"


def hello(name: str) -> dict[str, object]:
    return {
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": "services:\n  web:\n    image: hello\n",
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChainClient]:
    c = ChainClient.embedded(tmp_path_factory.mktemp("gw-chain"))
    c.deploy()
    c.add_os_image(os_image_hash_for(SIM_OS))
    yield c
    c.close()


def _make_gateway(
    home: Path, chain: ChainClient, token: str, *, name: str = "gateway", **kw: object
) -> GatewayServer:
    tee = SimulatedTdx(home)  # the development root of this installation (TEECLOUD_HOME)
    peers = PeerVerifier(
        PeerPolicy.dev(tee.dev_root_der(), max_cert_lifetime_s=31 * 24 * 3600),
        StaticCollateral(tee.collateral),
    )
    gate = ChainGate(chain, block_number=chain.block_number)
    return GatewayServer(home / name, base_domain=BASE, peers=peers, chain=gate, admin_token=token, **kw)  # type: ignore[arg-type]


def make_gateway(home: Path, chain: ChainClient, **kw: object) -> GatewayServer:
    return _make_gateway(home, chain, TOKEN, **kw)  # type: ignore[arg-type]


@pytest.fixture
def gateway(teecloud_home: Path, chain: ChainClient) -> Iterator[GatewayServer]:
    with make_gateway(teecloud_home, chain, ttl_s=4.0) as gw:
        yield gw


@dataclass
class Cvm:
    app_id: str
    instance_id: str
    provider: RegisteringAtBoot
    agent: AgentService
    tee: SimulatedTdx

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        assert self.provider.key is not None
        return self.provider.key

    @property
    def cert_der(self) -> bytes:
        assert self.provider.cert_der is not None
        return self.provider.cert_der


def boot_cvm(home: Path, chain: ChainClient, name: str = "hello", *, instance_id: bytes | None = None) -> Cvm:
    """The whole dstack boot (agent.boot) with the registration certificate made at the key request."""
    compose = hello(name)
    app_id = bytes.fromhex(chain.register_app(None, compose_hash(compose))[2:])
    tee = SimulatedTdx(home)
    provider = RegisteringAtBoot(LocalDevKeyProvider(home))
    state = boot(
        tee,
        json.dumps(compose),
        app_id,
        instance_id,
        provider,
        extra_events=[("os-image-hash", tee.os_image_hash)],
    )
    return Cvm(app_id.hex(), state.instance_id.hex(), provider, AgentService(state), tee)


def endpoint(backend: Backend, port: int = 8080) -> api.Endpoint:
    return api.Endpoint(port=port, host="127.0.0.1", host_port=backend.port)


def get(gw: GatewayServer, host: str) -> httpx.Response:
    with httpx.Client(verify=str(gw.ca_file), timeout=10) as c:
        return c.get(
            f"https://127.0.0.1:{gw.public_port}/", headers={"Host": host}, extensions={"sni_hostname": host}
        )


def test_a_booted_cvm_registers_and_is_served(
    teecloud_home: Path, chain: ChainClient, gateway: GatewayServer
) -> None:
    cvm = boot_cvm(teecloud_home, chain)
    backend = Backend("app")
    try:
        # the body may not name the app: its identity is the attested certificate's
        with pytest.raises(pydantic.ValidationError):
            api.RegisterCvmRequest.model_validate({"app_id": "ff" * 20, "endpoints": []})
        answer = register(
            gateway.registration_url, cvm.key, cvm.cert_der, [endpoint(backend)], ca_pem=gateway.ca.cert_pem
        )
        assert answer.app_id == cvm.app_id and answer.instance_id == cvm.instance_id
        assert answer.urls == [f"https://{cvm.app_id}-8080.{BASE}:{gateway.public_port}/"]
        r = get(gateway, f"{cvm.app_id}-8080.{BASE}")
        assert r.status_code == 200 and r.text.startswith("app /")
        assert get(gateway, f"{cvm.instance_id}-8080.{BASE}").status_code == 200
        # admin: token required; routes and metrics
        assert httpx.get(gateway.admin_url + "/admin/routes").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        routes = httpx.get(gateway.admin_url + "/admin/routes", headers=auth).json()
        assert [(x["app_id"], x["port"]) for x in routes] == [(cvm.app_id, 8080)]
        metrics = httpx.get(gateway.admin_url + "/metrics", headers=auth).text
        assert "teecloud_gateway_registrations_accepted_total 1" in metrics
        assert "haproxy_backend_http_responses_total" in metrics
        assert f'app_id="{cvm.app_id}"' in metrics  # slot backends carry the app they serve
        # drain the node (its backend address): no new traffic; undrain: back
        assert httpx.post(
            gateway.admin_url + "/admin/drain", headers=auth, json={"host": "127.0.0.1"}
        ).json()["draining"] == ["127.0.0.1"]
        assert get(gateway, f"{cvm.app_id}-8080.{BASE}").status_code == 421
        httpx.post(gateway.admin_url + "/admin/undrain", headers=auth, json={"host": "127.0.0.1"})
        assert get(gateway, f"{cvm.app_id}-8080.{BASE}").status_code == 200
        assert (
            httpx.post(gateway.admin_url + "/admin/drain", headers=auth, json={"hostx": 1}).status_code == 400
        )
        # it stops re-registering: the route goes within the registration lifetime (4 s) + 1 s tick
        deadline = time.monotonic() + 4.0 + 3.0
        while get(gateway, f"{cvm.app_id}-8080.{BASE}").status_code == 200:
            assert time.monotonic() < deadline, "the route outlived its registration"
            time.sleep(0.25)
        assert get(gateway, f"{cvm.app_id}-8080.{BASE}").status_code == 421
    finally:
        backend.stop()


def test_quote_oracle_registers_nothing(
    teecloud_home: Path, chain: ChainClient, gateway: GatewayServer
) -> None:
    """The security rule's attack against the gateway: after a normal boot, an attacker key K, a quote over
    sha512("ratls-cert:" ‖ SPKI(K)) from GetQuote, a registration certificate for K. Refused at boot_time;
    no route; no traffic moves to the attacker's address."""
    cvm = boot_cvm(teecloud_home, chain)
    attacker = Backend("attacker")
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = registration_cert(GetQuoteOracle(cvm.agent), key, now=int(time.time()))
        with pytest.raises(RegistrationRefused) as exc:
            register(gateway.registration_url, key, cert, [endpoint(attacker)], ca_pem=gateway.ca.cert_pem)
        assert exc.value.step == "boot_time"
        assert gateway.registry.registrations() == []
        assert get(gateway, f"{cvm.app_id}-8080.{BASE}").status_code == 421
        assert attacker.requests == 0
    finally:
        attacker.stop()


def test_refusals_register_nothing(teecloud_home: Path, chain: ChainClient, gateway: GatewayServer) -> None:
    cvm = boot_cvm(teecloud_home, chain, "refusals")
    backend = Backend("app")
    url, ca = gateway.registration_url, gateway.ca.cert_pem
    try:
        # no client certificate
        with httpx.Client(verify=str(gateway.ca_file), timeout=10) as c:
            r = c.post(url + api.PATH_REGISTER, json={"endpoints": [endpoint(backend).model_dump()]})
        assert r.status_code == 403 and r.json()["step"] == "tls"
        # a body naming another app's id is not even a valid body; a bad address is a clear 400/403
        with pytest.raises(RegistrationRefused) as exc:
            register(
                url, cvm.key, cvm.cert_der, [api.Endpoint(port=80, host="example", host_port=1)], ca_pem=ca
            )
        assert exc.value.step == "request"
        for host, port in (("10.0.0.1", backend.port), ("127.0.0.1", gateway.admin_port)):
            with pytest.raises(RegistrationRefused) as exc:
                register(
                    url, cvm.key, cvm.cert_der, [api.Endpoint(port=80, host=host, host_port=port)], ca_pem=ca
                )
            assert exc.value.step == "request"
        # an unattested certificate (no quote): refused at parsing
        from cryptography.hazmat.primitives import serialization

        from teecloud.gateway.client import temp_ca
        from teecloud.keys.ratls import make_ratls_cert

        k = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        plain = make_ratls_cert(
            cvm.tee,
            k,
            issuer_key=temp_ca()[0],
            issuer_cert=temp_ca()[1],
            subject="x",
            usage="gateway:register",
            not_before=now - 60,
            not_after=now + 600,
            with_evidence=False,
            server_auth=False,
            client_auth=True,
        )
        with pytest.raises(RegistrationRefused) as exc:
            register(url, k, plain.public_bytes(serialization.Encoding.DER), [endpoint(backend)], ca_pem=ca)
        assert exc.value.step == "parsed"
        # an expired certificate (made at boot, long ago)
        fresh = SimulatedTdx(teecloud_home)
        prov = RegisteringAtBoot(
            LocalDevKeyProvider(teecloud_home), clock=lambda: time.time() - 40 * 24 * 3600
        )
        compose = hello("expired")
        app_id = bytes.fromhex(chain.register_app(None, compose_hash(compose))[2:])
        boot(
            fresh,
            json.dumps(compose),
            app_id,
            None,
            prov,
            extra_events=[("os-image-hash", fresh.os_image_hash)],
        )
        assert prov.key is not None and prov.cert_der is not None
        with pytest.raises(RegistrationRefused) as exc:
            register(url, prov.key, prov.cert_der, [endpoint(backend)], ca_pem=ca)
        assert exc.value.step == "cert_fresh"
        assert gateway.registry.registrations() == []
        # registered, then the compose hash is removed on chain: the next registration is refused and the
        # route goes at once
        register(url, cvm.key, cvm.cert_der, [endpoint(backend)], ca_pem=ca)
        assert get(gateway, f"{cvm.app_id}-8080.{BASE}").status_code == 200
        chain.remove_compose_hash(cvm.app_id, compose_hash(hello("refusals")))
        with pytest.raises(RegistrationRefused) as exc:
            register(url, cvm.key, cvm.cert_der, [endpoint(backend)], ca_pem=ca)
        assert exc.value.step == "chain"
        assert get(gateway, f"{cvm.app_id}-8080.{BASE}").status_code == 421
        # a retired instance likewise
        other = boot_cvm(teecloud_home, chain, "retired", instance_id=b"\x42" * 20)
        register(url, other.key, other.cert_der, [endpoint(backend)], ca_pem=ca)
        chain.retire_instance(other.app_id, other.instance_id)
        with pytest.raises(RegistrationRefused) as exc:
            register(url, other.key, other.cert_der, [endpoint(backend)], ca_pem=ca)
        assert exc.value.step == "chain"
        assert get(gateway, f"{other.app_id}-8080.{BASE}").status_code == 421
        metrics = httpx.get(gateway.admin_url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        assert 'teecloud_gateway_registrations_refused_total{step="chain"} 2' in metrics
    finally:
        backend.stop()


def test_the_admin_listener_needs_a_token(teecloud_home: Path, chain: ChainClient) -> None:
    from teecloud.gateway.errors import GatewayUsageError

    for token in ("", "short"):
        with pytest.raises(GatewayUsageError):
            _make_gateway(teecloud_home, chain, token)


def test_no_free_slot_is_a_clear_refusal(teecloud_home: Path, chain: ChainClient) -> None:
    from teecloud.gateway.routing import DataPlaneLimits

    tiny = DataPlaneLimits(http_backends=2, tcp_backends=2, servers_per_backend=1)
    backend = Backend("app")
    with make_gateway(teecloud_home, chain, limits=tiny) as gw:
        try:
            first, second = boot_cvm(teecloud_home, chain, "cap1"), boot_cvm(teecloud_home, chain, "cap2")
            register(
                gw.registration_url, first.key, first.cert_der, [endpoint(backend)], ca_pem=gw.ca.cert_pem
            )
            with pytest.raises(RegistrationRefused) as exc:
                register(
                    gw.registration_url,
                    second.key,
                    second.cert_der,
                    [endpoint(backend)],
                    ca_pem=gw.ca.cert_pem,
                )
            assert exc.value.step == "capacity"
            assert [r.instance_id for r in gw.registry.registrations()] == [first.instance_id]
            assert get(gw, f"{first.app_id}-8080.{BASE}").status_code == 200
            assert get(gw, f"{second.app_id}-8080.{BASE}").status_code == 421
        finally:
            backend.stop()


@pytest.mark.slow
def test_gateway_restart_and_a_second_gateway(teecloud_home: Path, chain: ChainClient) -> None:
    """Two gateways; the CVM registers with both (its Registrar). Killing one leaves the app served by the
    other; a restarted gateway serves it again within one re-registration interval."""
    cvm = boot_cvm(teecloud_home, chain, "twice")
    backend = Backend("app")
    gw1 = make_gateway(teecloud_home, chain, name="g1", ttl_s=6.0).start()
    gw2 = make_gateway(teecloud_home, chain, name="g2", ttl_s=6.0).start()
    registrar = None
    try:
        ca = gw1.ca.cert_pem + gw2.ca.cert_pem
        registrar = Registrar(
            [gw1.registration_url, gw2.registration_url],
            cvm.key,
            cvm.cert_der,
            [endpoint(backend)],
            ca_pem=ca,
            interval_s=2.0,
        ).start()
        host = f"{cvm.app_id}-8080.{BASE}"
        assert get(gw1, host).status_code == 200 and get(gw2, host).status_code == 200
        port1, reg1 = gw1.public_port, gw1.registration_port
        gw1.stop()
        assert get(gw2, host).status_code == 200
        gw1 = make_gateway(
            teecloud_home, chain, name="g1", ttl_s=6.0, public_port=port1, registration_port=reg1
        ).start()
        registrar.ca_pem = gw1.ca.cert_pem + gw2.ca.cert_pem  # a new gateway process has a new dev CA
        deadline = time.monotonic() + 2.0 + 3.0
        while get(gw1, host).status_code != 200:
            assert time.monotonic() < deadline, "not served again within the re-registration interval"
            time.sleep(0.25)
    finally:
        if registrar is not None:
            registrar.stop()
        gw1.stop()
        gw2.stop()
        backend.stop()
