"""Functions fixtures: a booted simulated CVM whose guest agent serves the runtime's keys over its Unix
socket (the runtime uses the official dstack-sdk client, as in production), and a local HTTPS server on
127.0.0.1 under a test CA (the "outside world" a function fetches from)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from eth_utils.crypto import keccak

from teecloud.agent import AgentRunner, LocalDevKeyProvider, boot
from teecloud.chain import ChainClient, compose_hash
from teecloud.chain.functions import (
    FunctionOracle,
    FunctionPriceFeed,
    FunctionRegistry,
    FunctionResultVerifier,
    deploy_function_registry,
)
from teecloud.functions import FetchPolicy, FunctionKeys, FunctionRuntime, GuestAgentKeys, function_hash_of
from teecloud.tee.simulated import SimulatedTdx
from tests.chain.conftest import Anvil, anvil_keys

from . import wat

RUNTIME_COMPOSE = {
    "manifest_version": 2,
    "name": "teecloud-functions",
    "runner": "docker-compose",
    "docker_compose_file": "services:\n  runtime:\n    image: teecloud-functions:dev\n",
    "kms_enabled": True,
    "gateway_enabled": False,
    "public_logs": True,
    "public_sysinfo": True,
    "public_tcbinfo": True,
    "allowed_envs": [],
    "no_instance_id": False,
    "secure_time": False,
}
RUNTIME_APP_ID = bytes.fromhex("7e57" * 10)


@dataclass
class Guest:
    keys: GuestAgentKeys
    kms_root: bytes  # compressed KMS root k256 public key
    app_id: bytes
    compose_hash: bytes


def start_guest(home: Path, app_id: bytes, sockdir: Path) -> tuple[Guest, AgentRunner]:
    tee = SimulatedTdx(home)
    provider = LocalDevKeyProvider(home)
    state = boot(tee, json.dumps(RUNTIME_COMPOSE), app_id, None, provider)
    runner = AgentRunner(
        state, dstack_sock=sockdir / "dstack.sock", tappd_sock=sockdir / "tappd.sock", port=0
    )
    runner.start()
    guest = Guest(
        GuestAgentKeys(str(sockdir / "dstack.sock")),
        provider.root.k256_public_key,
        app_id,
        state.compose_hash,
    )
    return guest, runner


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tcf-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def guest(teecloud_home: Path, sockdir: Path) -> Iterator[Guest]:
    g, runner = start_guest(teecloud_home, RUNTIME_APP_ID, sockdir)
    yield g
    runner.stop()


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return b.sign(signer, hashes.SHA256())


@dataclass
class Outside:
    url: str  # https://127.0.0.1:<port> under the test CA
    untrusted_url: str  # https://127.0.0.1:<port> with a certificate of another CA
    trust: ssl.SSLContext  # trusts the test CA only
    hits: list[str]
    routes: dict[str, tuple[int, bytes, dict[str, str]]]
    ca_pem: str = ""  # the test CA's certificate


def _serve(
    tmp: Path, name: str, ca_name: str, outside_routes: dict, hits: list[str]
) -> tuple[ThreadingHTTPServer, bytes]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)]), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("127.0.0.1", key, ca.subject, ca_key, False)
    pem = tmp / f"{name}.pem"
    pem.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pem))

    class Handler(BaseHTTPRequestHandler):
        timeout = 5

        def do_GET(self) -> None:
            hits.append(self.path)
            status, body, headers = outside_routes.get(self.path, (404, b"not found", {}))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, ca.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Outside]:
    hits: list[str] = []
    routes: dict[str, tuple[int, bytes, dict[str, str]]] = {
        "/price": (200, b"4242", {}),
        "/big": (200, b"x" * 300_000, {}),
        "/redirect": (302, b"", {"Location": "https://example.invalid/"}),
        "/error": (500, b"boom", {}),
    }
    good, ca_pem = _serve(tmp_path, "good", "teecloud test CA", routes, hits)
    bad, _ = _serve(tmp_path, "bad", "some other CA", routes, hits)
    trust = ssl.create_default_context(cadata=ca_pem.decode())
    try:
        yield Outside(
            f"https://127.0.0.1:{good.server_address[1]}",
            f"https://127.0.0.1:{bad.server_address[1]}",
            trust,
            hits,
            routes,
            ca_pem.decode(),
        )
    finally:
        for s in (good, bad):
            s.shutdown()
            s.server_close()


@pytest.fixture
def runtime(teecloud_home: Path, guest: Guest, outside: Outside) -> Iterator[FunctionRuntime]:
    rt = FunctionRuntime(
        teecloud_home,
        FunctionKeys(guest.keys),
        fetch_policy=FetchPolicy(trust=outside.trust, allow_private_addresses=True),
    )
    yield rt
    rt.close()


@dataclass
class World:
    chain: ChainClient
    guest: Guest
    runtime: FunctionRuntime
    registry: FunctionRegistry
    verifier: FunctionResultVerifier
    oracle: FunctionOracle
    feed: FunctionPriceFeed
    function_hash: bytes
    price_input: bytes
    outside: Outside


def _registry_check(chain: ChainClient):  # type: ignore[no-untyped-def]
    def check(function_id: bytes, function_hash: bytes, app_id: bytes) -> tuple[bool, str]:
        return FunctionRegistry(chain, function_id).is_allowed(function_hash, app_id)

    return check


def _world(chain: ChainClient, teecloud_home: Path, sockdir: Path, outside: Outside) -> Iterator[World]:
    chain.deploy()
    owner = chain.address
    assert owner is not None
    app_id = chain.kms.register_app(owner, compose_hash(RUNTIME_COMPOSE))
    guest, runner = start_guest(teecloud_home, bytes.fromhex(app_id[2:]), sockdir)
    assert guest.compose_hash == compose_hash(RUNTIME_COMPOSE)
    chain.kms.set_info(guest.kms_root, b"dev-ca")
    host = outside.url.removeprefix("https://")
    fh = function_hash_of(wat.PRICE, [host], {})
    registry = deploy_function_registry(chain, owner, "price", app_id, fh)
    runtime = FunctionRuntime(
        teecloud_home,
        FunctionKeys(guest.keys),
        fetch_policy=FetchPolicy(trust=outside.trust, allow_private_addresses=True),
        registry_check=_registry_check(chain),
    )
    rec = runtime.deploy(wat.PRICE, allowed_hosts=[host], function_id=bytes.fromhex(registry.address[2:]))
    assert rec.function_hash == fh
    verifier = FunctionResultVerifier.deploy(chain, chain.kms_auth)
    oracle = FunctionOracle.deploy(chain, verifier.address)
    price_input = f"{outside.url}/price".encode()
    feed = FunctionPriceFeed.deploy(
        chain, verifier.address, registry.address, keccak(price_input), oracle=oracle.address
    )
    try:
        yield World(chain, guest, runtime, registry, verifier, oracle, feed, fh, price_input, outside)
    finally:
        runtime.close()
        runner.stop()
        chain.close()


@pytest.fixture
def world(teecloud_home: Path, sockdir: Path, outside: Outside) -> Iterator[World]:
    yield from _world(ChainClient.embedded(teecloud_home), teecloud_home, sockdir, outside)


@pytest.fixture(params=["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
def world_both(
    request: pytest.FixtureRequest, teecloud_home: Path, sockdir: Path, outside: Outside
) -> Iterator[World]:
    """The same world on the embedded EVM (py-evm) and on anvil (a second EVM)."""
    if request.param == "embedded":
        chain = ChainClient.embedded(teecloud_home)
    else:
        node = Anvil()
        request.addfinalizer(node.stop)
        chain = ChainClient.rpc(node.url, anvil_keys()[0], home=teecloud_home)
    yield from _world(chain, teecloud_home, sockdir, outside)
