"""The node vouches for its CVMs' endpoint addresses (teecloud.node.vouch, teecloud.gateway.vouch).

The gateway routes only to addresses both the attested CVM and the node that launched it stand behind.
Refused, with nothing routed: no statement, a CVM naming another instance's address, a node vouching for
an instance it did not launch (a registered node or not), an expired, future or over-long statement, a
replayed older one, a forged or relabelled signature, and generated mutations of every signed field."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from teecloud.agent.boot import boot
from teecloud.agent.keyprovider import LocalDevKeyProvider
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.chain import ChainClient
from teecloud.chain.embedded import DEV_KEYS
from teecloud.gateway import api
from teecloud.gateway.client import RegisteringAtBoot, Registrar, register
from teecloud.gateway.errors import RegistrationRefused
from teecloud.gateway.local import NodeRegistrar
from teecloud.gateway.server import GatewayServer
from teecloud.gateway.vouch import ChainNodes, StaticNodes, VouchChecker
from teecloud.node.instance import instance_id_for
from teecloud.node.vouch import NodeVoucher, launch_seed, new_launch_nonce, vouch_digest
from teecloud.tee.simulated import SimulatedTdx
from tests.gateway.conftest import BASE, Backend
from tests.gateway.test_registration import Cvm, chain, get, hello, make_gateway  # noqa: F401 (fixture)

NOW = 1_800_000_000
APP = bytes.fromhex("11" * 20)


class Node:
    """One node: its operator key (a chain account), its id, and the CVMs it launched (id -> nonce)."""

    def __init__(self, node_id: int, key: str, *, clock: Any = lambda: NOW) -> None:
        self.account = Account.from_key(key)
        self.node_id = node_id
        self.launched: dict[str, tuple[bytes, bytes]] = {}
        self.voucher = NodeVoucher(
            node_id=node_id,
            operator=self.account.address.lower(),
            sign=lambda d: bytes(self.account.sign_message(encode_defunct(primitive=d)).signature),
            launch=self.launch_record,
            clock=clock,
        )

    @property
    def operator(self) -> str:
        return str(self.account.address).lower()

    def launch_record(self, instance: str) -> tuple[bytes, bytes]:
        if instance not in self.launched:
            raise ValueError("not launched here")
        return self.launched[instance]

    def launch(self, app_id: bytes = APP) -> bytes:
        nonce = new_launch_nonce()
        instance_id = instance_id_for(launch_seed(self.operator, nonce), app_id)
        self.launched[instance_id.hex()] = (app_id, nonce)
        return instance_id


def ep(port: int, host: str, host_port: int) -> api.Endpoint:
    return api.Endpoint(port=port, host=host, host_port=host_port)


def resign(stmt: dict[str, Any], key: str) -> dict[str, Any]:
    body = {k: v for k, v in stmt.items() if k != "signature"}
    sig = Account.from_key(key).sign_message(encode_defunct(primitive=vouch_digest(body))).signature
    return {**body, "signature": bytes(sig).hex()}


def register_node(chain: ChainClient, key: str, device: int) -> int:  # noqa: F811
    """Register a node in NodeRegistry under the operator `key` (device_id bytes `device`, attestation hash
    bytes `device + 1`, the smallest offer): its node_id."""
    return chain.with_signer(key).register_node(
        tee_kind="tdx",
        device_id=bytes([device]) * 32,
        attestation_hash=bytes([device + 1]) * 32,
        capacity=1,
        price_per_hour=1,
        stake=10**17,
    )


@pytest.fixture
def nodes() -> tuple[Node, Node, VouchChecker]:
    a, b = Node(0, DEV_KEYS[1]), Node(1, DEV_KEYS[2])
    return a, b, VouchChecker(StaticNodes({0: a.operator, 1: b.operator}), clock=lambda: NOW)


def check(
    checker: VouchChecker, stmt: dict[str, Any] | None, instance_id: bytes, eps: list[api.Endpoint]
) -> None:
    vouch = api.NodeVouch.model_validate(stmt) if stmt is not None else None
    checker.check(vouch, app_id=APP, instance_id=instance_id, endpoints=eps)


def refused(checker: VouchChecker, stmt: dict[str, Any] | None, iid: bytes, eps: list[api.Endpoint]) -> str:
    with pytest.raises(RegistrationRefused) as exc:
        check(checker, stmt, iid, eps)
    assert exc.value.step == "vouch"
    return exc.value.reason


def test_a_statement_from_the_launching_node_is_taken(nodes: tuple[Node, Node, VouchChecker]) -> None:
    a, _b, checker = nodes
    iid = a.launch()
    stmt = a.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 40001), (9000, "127.0.0.1", 40002)])
    check(checker, stmt, iid, [ep(8080, "127.0.0.1", 40001)])  # a subset of what the node vouches for
    check(checker, stmt, iid, [ep(8080, "127.0.0.1", 40001), ep(9000, "127.0.0.1", 40002)])
    # the digest is sha256 of the canonical JSON, recomputed here from its definition
    body = {k: v for k, v in stmt.items() if k != "signature"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    signer = Account.recover_message(
        encode_defunct(primitive=hashlib.sha256(canon).digest()), signature=bytes.fromhex(stmt["signature"])
    )
    assert signer.lower() == a.operator


def test_the_attackers_steps_are_refused(nodes: tuple[Node, Node, VouchChecker]) -> None:
    a, b, checker = nodes
    victim, attacker = a.launch(), a.launch()
    eps = [ep(8080, "127.0.0.1", 40001)]
    # no statement at all
    assert "no statement" in refused(checker, None, attacker, eps)
    # a CVM naming another instance's address: its own node vouches only for its own port
    own = a.voucher.vouch(attacker.hex(), [(8080, "127.0.0.1", 40002)])
    assert "does not vouch" in refused(checker, own, attacker, eps)
    # ... or carrying the victim's statement: it is for another instance
    victims = a.voucher.vouch(victim.hex(), [(8080, "127.0.0.1", 40001)])
    assert "another instance" in refused(checker, victims, attacker, eps)
    # another registered node vouching for an instance it did not launch
    b.launched[attacker.hex()] = (APP, new_launch_nonce())  # b claims it, with a nonce of its own
    with pytest.raises(ValueError):  # b's own voucher refuses to sign it...
        b.voucher.vouch(attacker.hex(), [(8080, "127.0.0.1", 40001)])
    stmt = dict(a.voucher.vouch(attacker.hex(), [(8080, "127.0.0.1", 40001)]))
    stmt.update(node_id=1, operator=b.operator, launch_nonce=b.launched[attacker.hex()][1].hex())
    assert "did not launch" in refused(checker, resign(stmt, DEV_KEYS[2]), attacker, eps)  # ...or by hand
    # b reusing a's launch nonce under its own operator: the seed differs, so does the instance_id
    stmt = dict(a.voucher.vouch(attacker.hex(), [(8080, "127.0.0.1", 40001)]))
    stmt.update(node_id=1, operator=b.operator)
    assert "did not launch" in refused(checker, resign(stmt, DEV_KEYS[2]), attacker, eps)
    # b signing while naming node 0 (a): the signer is not node 0's operator
    stmt = dict(a.voucher.vouch(attacker.hex(), [(8080, "127.0.0.1", 40001)]))
    assert "not signed by the operator" in refused(checker, resign(stmt, DEV_KEYS[2]), attacker, eps)
    stmt["operator"] = b.operator
    assert "not node 0's operator" in refused(checker, resign(stmt, DEV_KEYS[2]), attacker, eps)
    # an unregistered node (key 3, node 7)
    stranger = Node(7, DEV_KEYS[3])
    iid = stranger.launch()
    assert "not an active registered node" in refused(
        checker, stranger.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 40001)]), iid, eps
    )


def test_expired_future_long_and_replayed_statements(nodes: tuple[Node, Node, VouchChecker]) -> None:
    a, _b, _ = nodes
    t = [NOW]
    checker = VouchChecker(StaticNodes({0: a.operator}), clock=lambda: t[0])
    a.voucher.clock = lambda: t[0]
    iid = a.launch()
    eps = [ep(8080, "127.0.0.1", 40001)]
    old = a.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 40001)])
    check(checker, old, iid, eps)
    checker.accept(api.NodeVouch.model_validate(old))
    t[0] = NOW + 60  # the node moved the CVM to another port: a newer statement is taken
    new = a.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 40009)])
    check(checker, new, iid, [ep(8080, "127.0.0.1", 40009)])
    checker.accept(api.NodeVouch.model_validate(new))
    assert checker.newest(iid.hex()) == NOW + 60
    check(checker, new, iid, [ep(8080, "127.0.0.1", 40009)])  # the same one again: a re-registration
    # the old statement, still unexpired, replayed to bring the old port back
    assert "replayed" in refused(checker, old, iid, eps)
    # expired (lifetime 120 s, 30 s of skew)
    t[0] = NOW + 60 + 120 + 30
    assert "expired" in refused(checker, new, iid, [ep(8080, "127.0.0.1", 40009)])
    # issued in the future; valid for longer than the gateway's bound
    t[0] = NOW
    a.voucher.clock = lambda: NOW + 3600
    assert "future" in refused(checker, a.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 40001)]), iid, eps)
    a.voucher.clock, a.voucher.lifetime_s = (lambda: NOW), 3600
    assert "more than" in refused(checker, a.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 40001)]), iid, eps)


def test_generated_mutations_of_the_signed_statement_are_refused(
    nodes: tuple[Node, Node, VouchChecker],
) -> None:
    a, _b, checker = nodes
    iid = a.launch()
    eps = [ep(8080, "127.0.0.1", 40001)]
    stmt = a.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", 40001)])
    check(checker, stmt, iid, eps)
    rng = random.Random(18)
    for field in ("node_id", "operator", "app_id", "instance_id", "launch_nonce", "issued_at", "expires_at"):
        for _ in range(6):
            m = dict(stmt)
            v = m[field]
            if isinstance(v, int):
                m[field] = v ^ (1 << rng.randrange(8))
            else:
                i = rng.randrange(2 if field == "operator" else 0, len(v))
                m[field] = v[:i] + ("0" if v[i] != "0" else "1") + v[i + 1 :]
            with pytest.raises((RegistrationRefused, ValueError)):
                check(checker, m, iid, eps)
    for _ in range(20):  # the endpoints list, and the signature's bytes
        m = dict(stmt)
        m["endpoints"] = [{**stmt["endpoints"][0], "host_port": rng.randrange(1, 65536)}]
        if m["endpoints"] == stmt["endpoints"]:
            continue
        with pytest.raises(RegistrationRefused):
            check(checker, m, iid, [api.Endpoint(**m["endpoints"][0])])
        sig = bytearray(bytes.fromhex(stmt["signature"]))
        sig[rng.randrange(64)] ^= 1 << rng.randrange(8)
        with pytest.raises(RegistrationRefused):
            check(checker, {**stmt, "signature": sig.hex()}, iid, eps)
    # malformed fields never reach the checker (the model refuses them: a 400)
    for bad in ({"signature": "00"}, {"operator": "0xZZ"}, {"extra": 1}, {"endpoints": []}):
        with pytest.raises(ValueError):
            api.NodeVouch.model_validate({**stmt, **bad})


def test_chain_nodes_reads_node_registry(chain: ChainClient) -> None:  # noqa: F811
    node_id = register_node(chain, DEV_KEYS[4], 1)
    nodes = ChainNodes(chain)
    assert nodes.operator_of(node_id) == Account.from_key(DEV_KEYS[4]).address.lower()
    assert nodes.operator_of(node_id + 1000) is None


# --- through a running gateway (real HAProxy) ---------------------------------------------------------


def boot_launched(home: Path, chain: ChainClient, node: Node, name: str) -> Cvm:  # noqa: F811
    """boot_cvm's dstack boot, with the instance_id the node's launch gives."""
    compose = hello(name)
    app_id = bytes.fromhex(chain.register_app(None, compose_hash(compose))[2:])
    tee = SimulatedTdx(home)
    provider = RegisteringAtBoot(LocalDevKeyProvider(home))
    state = boot(
        tee,
        json.dumps(compose),
        app_id,
        node.launch(app_id),
        provider,
        extra_events=[("os-image-hash", tee.os_image_hash)],
    )
    return Cvm(app_id.hex(), state.instance_id.hex(), provider, AgentService(state), tee)


@pytest.fixture
def vouching_gateway(teecloud_home: Path, chain: ChainClient) -> Iterator[tuple[GatewayServer, int]]:  # noqa: F811
    node_id = register_node(chain, DEV_KEYS[5], 3)
    with make_gateway(teecloud_home, chain, ttl_s=30.0, nodes=ChainNodes(chain)) as gw:
        yield gw, node_id


def test_a_gateway_routes_only_what_the_node_vouches_for(
    teecloud_home: Path,
    chain: ChainClient,  # noqa: F811
    vouching_gateway: tuple[GatewayServer, int],
) -> None:
    gw, node_id = vouching_gateway
    node = Node(node_id, DEV_KEYS[5], clock=time.time)
    victim_backend, attacker_backend = Backend("victim"), Backend("attacker")
    try:
        # a CVM the node launched (its instance_id from the node's launch seed), booted the dstack way
        cvm = boot_launched(teecloud_home, chain, node, "vouched")
        iid = bytes.fromhex(cvm.instance_id)
        url, ca = gw.registration_url, gw.ca.cert_pem
        own = [ep(8080, "127.0.0.1", attacker_backend.port)]
        # with no statement: refused, nothing routed
        with pytest.raises(RegistrationRefused) as exc:
            register(url, cvm.key, cvm.cert_der, own, ca_pem=ca)
        assert exc.value.step == "vouch"
        # the CVM names another instance's address (the victim's port) with its node's statement of its own
        stmt = api.NodeVouch.model_validate(
            node.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", attacker_backend.port)])
        )
        with pytest.raises(RegistrationRefused) as exc:
            register(
                url,
                cvm.key,
                cvm.cert_der,
                [ep(8080, "127.0.0.1", victim_backend.port)],
                ca_pem=ca,
                node_vouch=stmt,
            )
        assert exc.value.step == "vouch"
        # an unregistered node's statement for it
        stranger = Node(node_id + 50, DEV_KEYS[6])
        stranger.launched[iid.hex()] = node.launched[iid.hex()]
        bad = dict(node.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", attacker_backend.port)]))
        bad.update(node_id=node_id + 50, operator=stranger.operator)
        with pytest.raises(RegistrationRefused) as exc:
            register(
                url,
                cvm.key,
                cvm.cert_der,
                own,
                ca_pem=ca,
                node_vouch=api.NodeVouch.model_validate(resign(bad, DEV_KEYS[6])),
            )
        assert exc.value.step == "vouch"
        assert gw.registry.registrations() == []
        assert get(gw, f"{cvm.app_id}-8080.{BASE}").status_code == 421
        assert victim_backend.requests == 0 and attacker_backend.requests == 0
        # the local runtime's NodeRegistrar (the node registering its docker CVMs): without the node's
        # statement nothing registers; with its NodeVoucher the route is served
        running = lambda: [(iid.hex(), [(8080, "127.0.0.1", attacker_backend.port)])]  # noqa: E731
        assert NodeRegistrar([url], ca, cvm.provider, running).register_all() == 0
        assert gw.registry.registrations() == []
        assert NodeRegistrar([url], ca, cvm.provider, running, vouch=node.voucher.vouch).register_all() == 1
        r = get(gw, f"{cvm.app_id}-8080.{BASE}")
        assert r.status_code == 200 and r.text.startswith("attacker /")  # the CVM's own backend here
        # the guest's Registrar sends its node's newest statement each round (the one made above is older
        # than NodeRegistrar's once a second has passed: the gateway would refuse it as a replay)
        newest = api.NodeVouch.model_validate(
            node.voucher.vouch(iid.hex(), [(8080, "127.0.0.1", own[0].host_port)])
        )
        registrar = Registrar([url], cvm.key, cvm.cert_der, own, ca_pem=ca, node_vouch=lambda: newest)
        registrar.register_all()
        assert isinstance(registrar.last[url], api.RegisterCvmResponse)
        assert victim_backend.requests == 0
    finally:
        victim_backend.stop()
        attacker_backend.stop()


def test_the_node_launches_with_a_seed_bound_to_its_operator(tmp_path: Path) -> None:
    from teecloud.node.instance import InstanceStore
    from teecloud.node.runtime.base import ResourceLimits

    store = InstanceStore(tmp_path)
    node = Node(0, DEV_KEYS[1])

    def create(launcher: str | None) -> Any:
        return store.create(
            app_compose=b"{}",
            app_id=APP,
            name=f"n{len(store.all())}",
            encrypted_env=None,
            user_config=None,
            sys_config={},
            limits=ResourceLimits(),
            launcher=launcher,
        )

    inst = create(node.operator)
    nonce = inst.launch_nonce()
    assert bytes.fromhex(inst.instance_id) == instance_id_for(launch_seed(node.operator, nonce), APP)
    voucher = NodeVoucher(
        node_id=0,
        operator=node.operator,
        sign=node.voucher.sign,
        launch=lambda i: (store.get(i).app_id, store.get(i).launch_nonce()),
        clock=lambda: NOW,
    )
    stmt = voucher.vouch(inst.instance_id, [(8080, "127.0.0.1", 40001)])
    checker = VouchChecker(StaticNodes({0: node.operator}), clock=lambda: NOW)
    check(checker, stmt, bytes.fromhex(inst.instance_id), [ep(8080, "127.0.0.1", 40001)])
    # an instance launched without the operator in its seed (random, as before): nothing to vouch for
    plain = create(None)
    with pytest.raises(ValueError):
        plain.launch_nonce()
    with pytest.raises(ValueError):
        voucher.vouch(plain.instance_id, [(8080, "127.0.0.1", 40001)])


def test_chain_nodes_trusts_an_operator_only_at_the_finality_depth(chain: ChainClient) -> None:  # noqa: F811
    depth = 3
    operator = Account.from_key(DEV_KEYS[5]).address.lower()
    node_id = register_node(chain, DEV_KEYS[5], 3)
    nodes = ChainNodes(chain, finality_depth=depth, cache_s=0.0)
    assert ChainNodes(chain, cache_s=0.0).operator_of(node_id) == operator  # at the head: registered
    for _ in range(depth):  # registered only in the last d blocks: not trusted yet (and not cached)
        with pytest.raises(RegistrationRefused) as err:
            nodes.operator_of(node_id)
        assert err.value.step == "vouch" and "blocks deep" in str(err.value)
        chain.increase_time(1)  # mines one block
    assert nodes.operator_of(node_id) == operator  # now d blocks sit on top of the registration
    assert nodes.gate.finality_depth == depth
    assert nodes.operator_of(node_id + 1000) is None


def test_chain_nodes_refuses_a_switched_chain(chain: ChainClient, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    node_id = register_node(chain, DEV_KEYS[6], 5)
    chain.increase_time(1)
    nodes = ChainNodes(chain, finality_depth=1, cache_s=0.0)
    assert nodes.operator_of(node_id) == Account.from_key(DEV_KEYS[6]).address.lower()
    monkeypatch.setattr(chain, "chain_id", chain.chain_id + 1)  # the endpoint now serves another chain
    with pytest.raises(RegistrationRefused) as err:
        nodes.operator_of(node_id)
    assert err.value.step == "vouch" and "WrongChainId" in str(err.value), str(err.value)


# --- `teecloud gateway up --require-vouch` ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "depth"),
    [([], None), (["--require-vouch"], 0), (["--require-vouch", "--finality-depth", "12"], 12)],
)
def test_gateway_up_require_vouch_is_parsed(
    flags: list[str], depth: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app as cli_app
    from teecloud.cli import gateway_cmd

    seen: dict[str, Any] = {}

    def start(stack: Any, **kw: Any) -> Any:
        seen.update(kw)
        raise ValueError("stopped by the test")  # before anything starts

    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    monkeypatch.setattr(gateway_cmd, "_start_gateway", start)
    result = CliRunner().invoke(cli_app, ["gateway", "up", "--trust-dev-root", *flags])
    assert result.exit_code == 1 and "stopped by the test" in result.output
    assert seen["vouch_depth"] == depth


def test_gateway_up_finality_depth_needs_require_vouch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app as cli_app

    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    result = CliRunner().invoke(cli_app, ["gateway", "up", "--trust-dev-root", "--finality-depth", "3"])
    assert result.exit_code == 2 and "--require-vouch" in result.output
    result = CliRunner().invoke(
        cli_app, ["gateway", "up", "--trust-dev-root", "--require-vouch", "--finality-depth", "999"]
    )
    assert result.exit_code == 2  # beyond the chain gate's bound: a usage error


def test_kms_up_and_gateway_up_bound_the_finality_depth_as_the_chain_gate_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import _peers
    from teecloud.cli import app as cli_app
    from teecloud.peer._chain import MAX_FINALITY_DEPTH

    assert _peers.MAX_FINALITY_DEPTH == MAX_FINALITY_DEPTH  # one declaration (cli._peers), the gate's bound
    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    for command in (["kms", "up", "--dev"], ["gateway", "up", "--trust-dev-root", "--require-vouch"]):
        for depth in ("-1", str(MAX_FINALITY_DEPTH + 1)):
            result = CliRunner().invoke(cli_app, [*command, "--finality-depth", depth])
            assert result.exit_code == 2 and "--finality-depth" in result.output, (command, result.output)
