"""The function runtime as a deployed teecloud app, end to end on the local cloud (docs/functions.md).

examples/functions is built (teecloud/fn-runtime) and deployed with `deploy` unchanged: an attested CVM whose
compose hash is on chain, keys only from its guest agent. A function that fetches a price from an HTTPS
server under a test CA (the CA is declared in the runtime's compose file, so measured) is called over HTTP —
directly and through the gateway — and on chain (request event -> the runtime's oracle watcher -> fulfil ->
the consumer's callback). The consumer accepts the signed result and refuses forged, expired, replayed and
other-function results; an upgrade through a 2-of-3 multisig retires the old hash's results.

The CVM's containers sit on their own Docker bridge; host services bind loopback. The test's HTTPS server and
a TCP relay to the chain's JSON-RPC bind the Docker host bridge's address (reachable from the host and its
containers only), which the runtime's compose names."""

from __future__ import annotations

import datetime as dt
import fcntl
import importlib.util
import ipaddress
import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from eth_utils.crypto import keccak

from tests.e2e.conftest import ROOT, _docker_ok, _fail_or_skip, wait_serving
from tests.functions import wat

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FUNCTIONS = ROOT / "examples" / "functions"
DEPOSIT = 10**16


@pytest.fixture(scope="module")
def fn_image(hello_image: str) -> str:
    if not _docker_ok():
        _fail_or_skip("no Docker engine reachable (start one with `bash scripts/dockerd.sh`)")
    spec = importlib.util.spec_from_file_location("fn_build_image", FUNCTIONS / "build_image.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.build())


def _bridge_ip() -> str:
    """The host's address on Docker's default bridge. IPAM names it when the engine was configured with one;
    an engine started with defaults may list only the subnet, and then the bridge interface's own IPv4
    address is the gateway its containers use."""
    fmt = '{{(index .IPAM.Config 0).Gateway}}|{{index .Options "com.docker.network.bridge.name"}}'
    out = subprocess.run(
        ["docker", "network", "inspect", "bridge", "--format", fmt],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    gateway, _, ifname = out.partition("|")
    if gateway:
        return str(ipaddress.IPv4Address(gateway))
    # SIOCGIFADDR (linux/sockios.h): the interface's IPv4 address, from a struct ifreq
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("256s", (ifname or "docker0").encode()[:15])
        answer = fcntl.ioctl(s.fileno(), 0x8915, ifreq)
    return str(ipaddress.IPv4Address(answer[20:24]))


class _Relay:
    """TCP relay listen_ip:<free port> -> target (bounded: 32 connections at a time, idle 30 s)."""

    def __init__(self, listen_ip: str, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server((listen_ip, 0))
        self.port = int(self.sock.getsockname()[1])
        self._slots = threading.BoundedSemaphore(32)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._pair, args=(conn,), daemon=True).start()

    def _pair(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            self._slots.release()
            return
        done = threading.Event()

        def pipe(a: socket.socket, b: socket.socket) -> None:
            a.settimeout(30)
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                done.set()

        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
        pipe(conn, up)
        done.wait(30)
        for s in (conn, up):
            s.close()
        self._slots.release()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    ip: str | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=ip is None, path_length=None), critical=True)
    )
    if ip is not None:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return b.sign(signer, hashes.SHA256())


@dataclass
class Outside:
    host: str  # "<bridge ip>:<port>", as the function's allowlist names it
    ca_pem: str
    routes: dict[str, bytes]
    hits: list[str]

    @property
    def price_input(self) -> bytes:
        return f"https://{self.host}/price".encode()


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    ip = _bridge_ip()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "teecloud e2e functions CA")])
    ca = _cert("teecloud e2e functions CA", ca_key, ca_name, ca_key, None)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert(ip, key, ca.subject, ca_key, ip)
    pem = tmp_path_factory.mktemp("outside") / "server.pem"
    pem.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pem))
    routes = {"/price": b"4242", "/slow": b"7"}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        timeout = 5

        def do_GET(self) -> None:
            hits.append(self.path)
            if self.path == "/slow":  # an answer that takes a while: the runtime is restarted meanwhile
                time.sleep(4)
            body = routes.get(self.path)
            try:
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")
            except OSError:  # the runtime went away mid-answer (the restart test)
                self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((ip, 0), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield Outside(
            f"{ip}:{server.server_address[1]}",
            ca.public_bytes(serialization.Encoding.PEM).decode(),
            routes,
            hits,
        )
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class FnApp:
    deployed: Any  # DeployResult of the runtime app
    url: str  # the runtime's HTTP API on the node's loopback port
    client: Any  # FunctionsClient(url)
    kms_root: bytes
    verifier: Any
    oracle: Any
    registry: Any
    feed: Any
    function_hash: bytes
    relayer: str


def _runtime_compose(tmp: Path, env: dict[str, str]) -> Path:
    doc = yaml.safe_load((FUNCTIONS / "docker-compose.yml").read_text())
    doc["services"]["runtime"]["environment"] = env
    d = tmp / "fn-runtime"
    d.mkdir(exist_ok=True)
    p = d / "docker-compose.yml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def fnapp(
    fn_image: str, cloud: Any, session: Any, outside: Outside, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FnApp]:
    from urllib.parse import urlsplit

    from teecloud.chain.functions import (
        FunctionOracle,
        FunctionPriceFeed,
        FunctionResultVerifier,
        deploy_function_registry,
    )
    from teecloud.cloud.deploy import deploy
    from teecloud.functions import function_hash_of
    from teecloud.functions.client import FunctionsClient

    chain = session.chain
    rpc = urlsplit(session.endpoints.chain_rpc)
    relay = _Relay(outside.host.split(":")[0], (rpc.hostname or "127.0.0.1", int(rpc.port or 80)))
    verifier = FunctionResultVerifier.deploy(chain, chain.kms_auth)
    oracle = FunctionOracle.deploy(chain, verifier.address)
    env = {
        "TEECLOUD_RPC_URL": f"http://{outside.host.split(':')[0]}:{relay.port}",
        "TEECLOUD_FN_ORACLE": oracle.address,
        "TEECLOUD_FN_TRUST_PEM": outside.ca_pem,
        # the test's server is on the Docker bridge (a private address): development setting, measured
        "TEECLOUD_FN_ALLOW_PRIVATE_ADDRESSES": "1",
    }
    compose = _runtime_compose(tmp_path_factory.mktemp("fn"), env)
    r = deploy(session, compose, name="fn-runtime")
    assert r.status == "running", r.error
    url = r.urls[0].rstrip("/")
    try:
        wait_serving(url + "/info", timeout=60)
        client = FunctionsClient(url, timeout=60)
        info = client.info()
        relayer = info["relayer"]
        chain.send(relayer, b"", value=10**18)  # the relayer pays fulfil's gas up front
        kms_root = bytes(chain.kms.info().k256_pubkey)
        fh = function_hash_of(wat.PRICE, [outside.host], {})
        registry = deploy_function_registry(chain, chain.address, "price", "0x" + r.app_id, fh)
        client.deploy(
            wat.PRICE, allowed_hosts=[outside.host], function_id=bytes.fromhex(registry.address[2:])
        )
        feed = FunctionPriceFeed.deploy(
            chain, verifier.address, registry.address, keccak(outside.price_input), oracle=oracle.address
        )
        yield FnApp(r, url, client, kms_root, verifier, oracle, registry, feed, fh, relayer)
        client.close()
    finally:
        try:
            session.node.remove(r.instance_id)
        finally:
            relay.close()


def test_the_runtime_is_an_attested_app_whose_compose_hash_is_on_chain(session: Any, fnapp: FnApp) -> None:
    r = fnapp.deployed
    assert r.verdict is not None and r.verdict.ok, r.verdict.to_json()
    assert r.verdict.compose_hash == r.compose_hash
    assert session.chain.is_compose_hash_allowed(r.app_id, r.compose_hash)
    info = fnapp.client.info()
    # the runtime's identity as its guest agent reports it = what was deployed and measured
    assert info["app_id"] == "0x" + r.app_id and info["compose_hash"] == "0x" + r.compose_hash
    # the test CA is declared in the compose file: part of the measured hash
    compose = json.loads(session.node.get(r.instance_id).app_compose)
    assert "TEECLOUD_FN_TRUST_PEM" in compose["docker_compose_file"]


def test_a_call_over_http_fetches_and_its_result_verifies_up_to_the_kms_root(
    session: Any, outside: Outside, fnapp: FnApp
) -> None:
    from teecloud.functions import verify_result

    before = len(outside.hits)
    res, out = fnapp.client.call(fnapp.registry.address, outside.price_input.decode())
    assert int.from_bytes(res.output, "big") == 4242
    assert outside.hits[before:] == ["/price"]  # fetched over HTTPS from the test server, once
    assert out["report"]["http_requests"] == 1
    assert res.function_hash == fnapp.function_hash and res.runtime_app_id.hex() == fnapp.deployed.app_id
    assert res.runtime_compose_hash.hex() == fnapp.deployed.compose_hash
    verify_result(
        res, kms_root_public_key=fnapp.kms_root, now=int(time.time()), function_hash=fnapp.function_hash
    )
    fnapp.feed.submit(res.to_abi())
    assert fnapp.feed.price() == 4242
    # its key certified once: later results skip the key's chain on chain (docs/functions.md, gas)
    fnapp.verifier.certify_key(res.to_abi())
    again, _ = fnapp.client.call(fnapp.registry.address, outside.price_input.decode())
    assert fnapp.verifier.is_certified(again.to_abi())
    fnapp.feed.submit(again.to_abi())
    logs = fnapp.client.logs(fnapp.registry.address)
    assert logs and logs[-1]["logs"] == ["fetched"]


def test_a_call_through_the_gateway(session: Any, outside: Outside, fnapp: FnApp) -> None:
    gw = session.endpoints.gateway
    if not gw:
        _fail_or_skip("`teecloud up` started no gateway here (HAProxy missing)")
    from teecloud.functions import SignedResult

    urls = fnapp.deployed.gateway_urls
    assert urls, "the runtime got no gateway URL"
    host = urls[0].split("//", 1)[1].split(":", 1)[0]
    with httpx.Client(verify=str(gw["ca_file"]), timeout=60, trust_env=False) as http:
        resp = http.post(
            f"https://127.0.0.1:{gw['public_port']}/functions/{fnapp.registry.address}/invoke",
            json={"input": outside.price_input.decode()},
            headers={"Host": host},
            extensions={"sni_hostname": host},
        )
    assert resp.status_code == 200, resp.text
    res = SignedResult.from_json(resp.json()["result"])
    assert int.from_bytes(res.output, "big") == 4242 and res.function_hash == fnapp.function_hash
    assert fnapp.verifier.check(res.to_abi()) == res.output


def test_the_consumer_refuses_forged_expired_replayed_and_other_function_results(
    session: Any, outside: Outside, fnapp: FnApp
) -> None:
    from teecloud.chain import ContractReverted
    from teecloud.chain.functions import deploy_function_registry
    from teecloud.functions import function_hash_of

    chain, feed = session.chain, fnapp.feed

    def reverts(abi: tuple[Any, ...], match: str) -> None:
        with pytest.raises(ContractReverted, match=match):
            feed.submit(abi)

    res, _ = fnapp.client.call(fnapp.registry.address, outside.price_input.decode())
    base = list(res.to_abi())
    # forged: output, expiry or request id changed after signing
    for i, v in [(4, (9999).to_bytes(32, "big")), (5, res.expiry + 1), (0, b"\1" * 32)]:
        reverts((*base[:i], v, *base[i + 1 :]), "bad result signature")
    feed.submit(res.to_abi())
    reverts(res.to_abi(), "replay")  # replayed
    # expired
    short, _ = fnapp.client.call(fnapp.registry.address, outside.price_input.decode(), ttl_s=30)
    chain.increase_time(120)
    reverts(short.to_abi(), "expired")
    # another function on the same runtime (its own registry)
    other_fh = function_hash_of(wat.FETCH_ONCE, [outside.host], {})
    other = deploy_function_registry(chain, chain.address, "other", "0x" + fnapp.deployed.app_id, other_fh)
    fnapp.client.deploy(
        wat.FETCH_ONCE, allowed_hosts=[outside.host], function_id=bytes.fromhex(other.address[2:])
    )
    theirs, _ = fnapp.client.call(other.address, outside.price_input.decode())
    assert fnapp.verifier.check(theirs.to_abi())  # valid ... for its own function
    reverts(theirs.to_abi(), "result of another function")
    relabelled = list(theirs.to_abi())
    relabelled[1] = fnapp.registry.address
    reverts(tuple(relabelled), "code hash not allowed")


def test_an_on_chain_request_is_answered_by_the_runtime_through_the_callback(
    session: Any, outside: Outside, fnapp: FnApp
) -> None:
    from teecloud.chain import DEV_KEYS
    from teecloud.chain.functions import FunctionOracle

    chain = session.chain
    outside.routes["/price"] = b"5150"
    try:
        requester = FunctionOracle(chain.with_signer(DEV_KEYS[5]), fnapp.oracle.address)
        updates = fnapp.feed.updates()
        relayer_before = chain.balance(fnapp.relayer)
        rid = requester.request(
            fnapp.registry.address, outside.price_input, deposit=DEPOSIT, callback=fnapp.feed.address
        )
        deadline = time.monotonic() + 60
        while fnapp.oracle.get(rid).pending and time.monotonic() < deadline:
            time.sleep(0.5)
        assert fnapp.oracle.get(rid).state == 2, "the runtime did not answer the on-chain request in 60 s"
        assert fnapp.feed.price() == 5150 and fnapp.feed.updates() == updates + 1
        # paid from the deposit: the relayer is not out of pocket by more than rounding
        assert chain.balance(fnapp.relayer) > relayer_before - 10**15
        # an oracle request id is the oracle watcher's alone: over HTTP it is refused (issue 22)
        from teecloud.functions.client import RemoteError

        with pytest.raises(RemoteError) as exc:
            fnapp.client.call(fnapp.registry.address, outside.price_input.decode(), request_id=rid)
        assert exc.value.status == 409 and exc.value.body.get("error") == "ReservedRequestId"
    finally:
        outside.routes["/price"] = b"4242"


def test_the_runtime_restarting_mid_request_answers_it_at_most_once(
    session: Any, outside: Outside, fnapp: FnApp
) -> None:
    """A call in flight (its fetch takes 4 s) when the runtime's container restarts: the caller gets a clean
    error, not a hang and not a result; after the restart the same request id is refused (409): the request
    was answered at most once (its claim is on the encrypted volume, fsynced before the function ran)."""
    import os

    from teecloud.functions import FunctionError
    from teecloud.functions.client import FunctionsClient, RemoteError

    rid = os.urandom(32)
    slow = f"https://{outside.host}/slow"
    outcome: dict[str, object] = {}

    def call() -> None:
        t0 = time.monotonic()
        try:
            outcome["result"] = fnapp.client.call(fnapp.registry.address, slow, request_id=rid)
        except FunctionError as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - t0

    before = outside.hits.count("/slow")
    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while outside.hits.count("/slow") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outside.hits.count("/slow") == before + 1, "the function never fetched"
    project = f"tc-{fnapp.deployed.instance_id[:16]}"
    ids = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(ids) == 1
    subprocess.run(["docker", "restart", "-t", "1", ids[0]], capture_output=True, check=True, timeout=60)
    caller.join(90)
    assert not caller.is_alive()
    assert "result" not in outcome, "answered although the runtime restarted mid-call"
    assert isinstance(outcome["error"], FunctionError) and not isinstance(outcome["error"], RemoteError)
    # a restarted container gets a new loopback port on the node: follow it
    port = subprocess.run(
        ["docker", "port", ids[0], "8090/tcp"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    fnapp.url = f"http://{port}"
    fnapp.client.close()
    fnapp.client = FunctionsClient(fnapp.url, timeout=60)
    wait_serving(fnapp.url + "/info", timeout=60)
    with pytest.raises(RemoteError) as exc:
        fnapp.client.call(fnapp.registry.address, slow, request_id=rid)
    assert exc.value.status == 409 and "already taken" in str(exc.value)
    assert outside.hits.count("/slow") == before + 1  # never run a second time
    # the runtime still answers new requests after the restart
    fresh, _ = fnapp.client.call(fnapp.registry.address, outside.price_input.decode())
    assert int.from_bytes(fresh.output, "big") == 4242


def test_an_upgrade_through_a_multisig_retires_the_old_hash(
    session: Any, outside: Outside, fnapp: FnApp
) -> None:
    from teecloud.chain import DEV_KEYS, ContractReverted
    from teecloud.chain.connection import abi_of
    from teecloud.chain.functions import FunctionRegistry
    from teecloud.functions.client import RemoteError

    chain, reg = session.chain, fnapp.registry
    owners = [chain.with_signer(k) for k in DEV_KEYS[1:4]]
    ms = chain.deploy_multisig([o.address for o in owners], 2)
    chain.transact("FunctionRegistry", reg.address, "transfer_ownership", ms)
    pid = (
        owners[0]
        .multisig(ms)
        .propose(reg.address, abi_of("FunctionRegistry").encode_call("accept_ownership"))
    )
    owners[1].multisig(ms).approve(pid)
    owners[0].multisig(ms).execute(pid)
    assert reg.owner() == ms
    old, _ = fnapp.client.call(reg.address, outside.price_input.decode())
    # v2: the same module with a lower CPU budget, so another code hash
    v2 = fnapp.client.deploy(
        wat.PRICE,
        allowed_hosts=[outside.host],
        limits={"cpu_fuel": 10_000_000},
        function_id=bytes.fromhex(reg.address[2:]),
    )
    v2_hash = bytes.fromhex(v2["function_hash"][2:])
    action = FunctionRegistry(owners[0], reg.address).propose_upgrade(fnapp.function_hash, v2_hash)
    assert action.kind == "multisig" and reg.is_code_hash_allowed(fnapp.function_hash)
    owners[2].multisig(ms).approve(int(action.ident))
    owners[2].multisig(ms).execute(int(action.ident))
    assert not reg.is_code_hash_allowed(fnapp.function_hash) and reg.is_code_hash_allowed(v2_hash)
    # the old hash's result, signed before the upgrade and unexpired, is refused now ...
    with pytest.raises(ContractReverted, match="code hash not allowed"):
        fnapp.feed.submit(old.to_abi())
    # ... and the runtime (reading the registry through the chain) no longer runs the old code
    with pytest.raises(RemoteError) as exc:
        fnapp.client.call(fnapp.function_hash.hex(), outside.price_input.decode())
    assert exc.value.status == 403 and "code hash not allowed" in str(exc.value)
    new, _ = fnapp.client.call(reg.address, outside.price_input.decode())
    assert new.function_hash == v2_hash
    fnapp.feed.submit(new.to_abi())
    assert fnapp.feed.price() == 4242
