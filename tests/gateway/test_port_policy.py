"""The port policy from app-compose.json, through registration and real HAProxy: the gateway reads the policy
only from the app-compose.json whose normalized sha256 is the attested compose hash, and with restrict_mode an
unlisted port gets no route (421 at accept, the backend sees nothing)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from teecloud.agent.boot import boot
from teecloud.agent.keyprovider import LocalDevKeyProvider
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash, normalize_app_compose
from teecloud.chain import ChainClient
from teecloud.gateway import api
from teecloud.gateway.client import RegisteringAtBoot, register
from teecloud.gateway.errors import RegistrationRefused
from teecloud.gateway.local import NodeRegistrar
from teecloud.gateway.portpolicy import BadPortPolicy, ComposeHashMismatch, PortPolicy, port_policy_of
from teecloud.gateway.server import GatewayServer
from teecloud.tee.simulated import SimulatedTdx
from tests.gateway.conftest import BASE, Backend
from tests.gateway.test_registration import Cvm, chain, endpoint, gateway, get, hello

__all__ = ["chain", "gateway"]  # fixtures shared with test_registration


def restricted(name: str, ports: list[dict[str, Any]], *, restrict: bool = True) -> dict[str, Any]:
    return {**hello(name), "port_policy": {"restrict_mode": restrict, "ports": ports}}


def boot_with(home: Path, chain: ChainClient, compose: dict[str, Any]) -> Cvm:
    app_id = bytes.fromhex(chain.register_app(None, compose_hash(compose))[2:])
    tee = SimulatedTdx(home)
    provider = RegisteringAtBoot(LocalDevKeyProvider(home))
    state = boot(
        tee,
        normalize_app_compose(compose),
        app_id,
        None,
        provider,
        extra_events=[("os-image-hash", tee.os_image_hash)],
    )
    return Cvm(app_id.hex(), state.instance_id.hex(), provider, AgentService(state), tee)


def test_policy_parsing_is_strict() -> None:
    doc = restricted("p", [{"port": 8080, "pp": False}, {"port": 9000}])
    raw = normalize_app_compose(doc).encode()
    policy = port_policy_of(raw, compose_hash(doc))
    assert policy == PortPolicy(True, ((8080, False), (9000, False)))
    assert policy.allows(8080) and not policy.allows(8081)
    assert port_policy_of(normalize_app_compose(hello("x")).encode(), compose_hash(hello("x"))).allows(1)
    # another document (one byte of policy changed) does not hash to the attested value
    other = restricted("p", [{"port": 8081}])
    with pytest.raises(ComposeHashMismatch):
        port_policy_of(normalize_app_compose(other).encode(), compose_hash(doc))
    for bad in (
        {"restrict_mode": "yes", "ports": []},
        {"restrict_mode": True, "ports": [{"port": 0}]},
        {"restrict_mode": True, "ports": [{"port": 70000}]},
        {"restrict_mode": True, "ports": [{"port": True}]},
        {"restrict_mode": True, "ports": [{"port": 1}, {"port": 1}]},
        {"restrict_mode": True, "ports": [{"port": 1, "extra": 2}]},
        {"restrict_mode": True, "ports": [{"port": p} for p in range(1, 300)]},
        {"restrict_mode": True, "ports": "8080"},
        ["8080"],
    ):
        d = {**hello("b"), "port_policy": bad}
        with pytest.raises(BadPortPolicy):
            port_policy_of(normalize_app_compose(d).encode(), compose_hash(d))
    for junk in (b"", b"\xff\xfe", b"[1]", b"{" * 100_000, b"x" * 2_000_000):
        with pytest.raises(BadPortPolicy):
            port_policy_of(junk, compose_hash(doc))


def test_restrict_mode_routes_only_listed_ports(
    teecloud_home: Path, chain: ChainClient, gateway: GatewayServer
) -> None:
    compose = restricted("policy", [{"port": 8080, "pp": False}])
    cvm = boot_with(teecloud_home, chain, compose)
    listed, unlisted = Backend("listed"), Backend("unlisted")
    url, ca = gateway.registration_url, gateway.ca.cert_pem
    try:
        # a hash mismatch at registration: another document (e.g. one without the restriction) is refused,
        # and registers nothing
        loose = restricted("policy", [{"port": 8080}], restrict=False)
        with pytest.raises(RegistrationRefused) as exc:
            register(
                url,
                cvm.key,
                cvm.cert_der,
                [endpoint(listed), endpoint(unlisted, 9000)],
                ca_pem=ca,
                app_compose=json.dumps(loose),
            )
        assert exc.value.step == "compose"
        assert gateway.registry.registrations() == []
        # the booted document, even re-serialized with spaces: its normalized hash is the attested one
        answer = register(
            url,
            cvm.key,
            cvm.cert_der,
            [endpoint(listed), endpoint(unlisted, 9000)],
            ca_pem=ca,
            app_compose=json.dumps(compose, indent=2),
        )
        assert answer.urls == [f"https://{cvm.app_id}-8080.{BASE}:{gateway.public_port}/"]
        assert get(gateway, f"{cvm.app_id}-8080.{BASE}").text.startswith("listed /")
        for name in (f"{cvm.app_id}-9000.{BASE}", f"{cvm.instance_id}-9000.{BASE}"):
            assert get(gateway, name).status_code == 421
        assert unlisted.requests == 0
    finally:
        listed.stop()
        unlisted.stop()


def test_pp_port_registers_and_its_cvm_sees_the_client_address(
    teecloud_home: Path, chain: ChainClient, gateway: GatewayServer
) -> None:
    from tests.gateway.proxy_backend import ProxyV2Backend
    from tests.gateway.test_proxy_protocol import tls_get

    compose = restricted("pp", [{"port": 8080, "pp": True}, {"port": 9090}])
    cvm = boot_with(teecloud_home, chain, compose)
    pp_backend, plain = ProxyV2Backend(), Backend("plain")
    try:
        register(
            gateway.registration_url,
            cvm.key,
            cvm.cert_der,
            [api.Endpoint(port=8080, host="127.0.0.1", host_port=pp_backend.port), endpoint(plain, 9090)],
            ca_pem=gateway.ca.cert_pem,
            app_compose=normalize_app_compose(compose),
        )
        routes = {r.port: r.proxy_protocol for reg in gateway.registry.registrations() for r in reg.routes}
        assert routes == {8080: True, 9090: False}

        class Gw:  # what tls_get needs of a gateway
            port = gateway.public_port

            @staticmethod
            def client_context() -> ssl.SSLContext:
                return ssl.create_default_context(cadata=gateway.ca.cert_pem)

        local_port, answer = tls_get(Gw, f"{cvm.app_id}-8080.{BASE}")  # type: ignore[arg-type]
        assert answer.endswith(f"pp src=127.0.0.1:{local_port}".encode()), answer[-200:]
        assert get(gateway, f"{cvm.app_id}-9090.{BASE}").text.startswith("plain /")  # no header there
        assert pp_backend.bad == [] and len(pp_backend.headers) == 1
    finally:
        pp_backend.stop()
        plain.stop()


def test_the_local_node_registrar_sends_the_app_compose(
    teecloud_home: Path, chain: ChainClient, gateway: GatewayServer
) -> None:
    compose = restricted("local", [{"port": 8080}])
    cvm = boot_with(teecloud_home, chain, compose)
    listed, unlisted = Backend("listed"), Backend("unlisted")
    try:
        registrar = NodeRegistrar(
            [gateway.registration_url],
            gateway.ca.cert_pem,
            cvm.provider,
            lambda: [
                (cvm.instance_id, [(8080, "127.0.0.1", listed.port), (9000, "127.0.0.1", unlisted.port)])
            ],
            app_compose=lambda iid: normalize_app_compose(compose) if iid == cvm.instance_id else None,
        )
        assert registrar.register_all() == 1
        [reg] = gateway.registry.registrations()
        assert [r.port for r in reg.routes] == [8080]
        assert get(gateway, f"{cvm.app_id}-9000.{BASE}").status_code == 421 and unlisted.requests == 0
    finally:
        listed.stop()
        unlisted.stop()


def test_deploy_options_write_a_restricting_port_policy_into_the_measured_app_compose() -> None:
    from teecloud.cloud.deploy import build_app_compose
    from teecloud.cloud.errors import InvalidOption
    from teecloud.cloud.options import AppOptions

    opts = AppOptions.build(gateway_ports=["8080", "9000:pp"])
    assert opts.port_policy == PortPolicy(True, ((8080, False), (9000, True)))
    text = "services:\n  web:\n    image: nginx:1.27\n"
    app_compose, chash = build_app_compose(text, name="web", port_policy=opts.port_policy)
    # the gateway reads back exactly this policy from the bytes whose hash is measured
    assert port_policy_of(app_compose, chash) == opts.port_policy
    plain, plain_hash = build_app_compose(text, name="web")
    assert plain_hash != chash and b"port_policy" not in plain
    for bad in (["x"], ["0"], ["70000"], ["80:tls"], ["80", "80"], ["80:"]):
        with pytest.raises(InvalidOption):
            AppOptions.build(gateway_ports=bad)


def test_up_checks_the_gateway_dns_setting() -> None:
    from teecloud.devstack import _dns_server
    from teecloud.node.errors import NodeError

    assert _dns_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert _dns_server("127.0.0.1") == ("127.0.0.1", 53)
    assert _dns_server("[::1]:53") == ("::1", 53)
    assert _dns_server("::1") == ("::1", 53)
    for bad in ("dns.example:53", "127.0.0.1:0", "127.0.0.1:x", "127.0.0.1:99999", ""):
        with pytest.raises(NodeError):
            _dns_server(bad)


def test_an_upgrade_keeps_the_current_port_policy_unless_given(tmp_path: Path) -> None:
    from teecloud.cloud.errors import ComposeRefused
    from teecloud.cloud.options import AppOptions, plan_compose

    compose = tmp_path / "docker-compose.yml"
    compose.write_text("services:\n  web:\n    image: nginx:1.27\n")
    current = json.loads(plan_compose(compose, AppOptions.build(gateway_ports=["8080:pp"])).app_compose)
    kept = plan_compose(compose, AppOptions.build(), name="web", previous=current)
    assert json.loads(kept.app_compose)["port_policy"] == current["port_policy"]
    changed = plan_compose(compose, AppOptions.build(gateway_ports=["9000"]), name="web", previous=current)
    assert json.loads(changed.app_compose)["port_policy"]["ports"] == [{"port": 9000, "pp": False}]
    with pytest.raises(ComposeRefused):  # a current policy that is not one is not carried over silently
        plan_compose(compose, AppOptions.build(), name="web", previous={"port_policy": {"ports": "all"}})
