"""KMS test harness: a simulated KMS TEE, app CVMs booted the dstack way, RA-TLS client certs."""

from __future__ import annotations

import hashlib
import json
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.chain import ChainClient
from teecloud.keys.ratls import make_ratls_cert
from teecloud.kms.api import AuditRecord
from teecloud.kms.audit import AuditLog
from teecloud.kms.bootstrap import boot_kms_tee, kms_dir, start_kms_state
from teecloud.kms.challenge import BootChallenges
from teecloud.kms.client import vm_config_json
from teecloud.kms.server import KmsServer
from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral
from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for, simulated_os_image_reference

# Every KMS this harness makes shares one challenge secret, so an app booted before its KMS was made (most
# tests make the app first) measures a challenge that KMS accepts. Tests of the one-boot binding make KMSs
# with other secrets and clocks (test_quote_oracle.py).
HARNESS_CHALLENGE_SECRET = b"teecloud-test-harness-challenges"


def harness_challenges(clock: Callable[[], float] = time.time, **kw: Any) -> BootChallenges:
    return BootChallenges(secret=HARNESS_CHALLENGE_SECRET, clock=clock, **kw)


def boot_app(
    tee: SimulatedTdx,
    app_id: bytes,
    compose_hash: bytes,
    instance_id: bytes,
    *,
    boot_nonce: bytes | None = None,
) -> None:
    """dstack's boot events up to the point where the guest asks the KMS for keys (reference/dstack.md §4),
    with a boot-nonce (a harness challenge unless given): the KMS releases keys only on an RTMR3 that is
    exactly this."""
    tee.emit_event("system-preparing", b"")
    tee.emit_event("app-id", app_id)
    tee.emit_event("compose-hash", compose_hash)
    tee.emit_event("instance-id", instance_id)
    tee.emit_event("boot-nonce", boot_nonce if boot_nonce is not None else harness_challenges().issue())
    tee.emit_event("boot-mr-done", b"")
    tee.emit_event("os-image-hash", tee.os_image_hash)


def finish_boot(tee: SimulatedTdx) -> None:
    """The rest of dstack's boot, after the keys: from here on the CVM's quotes get no keys."""
    tee.emit_event("key-provider", json.dumps({"name": "kms", "id": ""}).encode())
    tee.emit_event("system-ready", b"")


@dataclass
class Kms:
    service: KmsService
    tee: SimulatedTdx
    home: Path

    @property
    def audit(self) -> AuditLog:
        return self.service.audit


def make_kms(
    home: Path,
    chain: Any,
    *,
    kms_home: Path | None = None,
    dev: bool = True,
    build: str | None = None,
    clock: Callable[[], float] = time.time,
    generate: bool = True,
    block_number: Callable[[], int] | None = None,
) -> Kms:
    tee = SimulatedTdx(home)
    identity = boot_kms_tee(tee, build=build)
    state, _ = start_kms_state(tee, identity, now=int(clock()), generate=generate, home=kms_home or home)
    service = KmsService(
        state=state,
        identity=identity,
        tee=tee,
        chain=chain,
        collateral=StaticCollateral(tee.collateral),
        audit=AuditLog(kms_dir(kms_home or home) / "audit.jsonl"),
        config=KmsConfig(dev_mode=dev),
        dev_root_der=tee.dev_root_der() if dev else None,
        block_number=block_number if block_number is not None else getattr(chain, "block_number", None),
        os_image_reference=simulated_os_image_reference,
        challenges=harness_challenges(clock),
        clock=clock,
    )
    return Kms(service, tee, home)


@dataclass
class AppCvm:
    tee: SimulatedTdx
    app_id: bytes
    compose_hash: bytes
    instance_id: bytes


def make_app(
    home: Path, app_id: bytes, compose_hash: bytes, *, instance_id: bytes | None = None, **tee_kw: Any
) -> AppCvm:
    tee = SimulatedTdx(home, **tee_kw)
    iid = instance_id if instance_id is not None else hashlib.sha256(app_id + b"instance").digest()[:20]
    boot_app(tee, app_id, compose_hash, iid)
    return AppCvm(tee, app_id, compose_hash, iid)


def vm_config(app: AppCvm) -> str:
    """The app CVM's vm_config as KmsClient sends it (its TEE's VM shape and OS image)."""
    return vm_config_json(app.tee)


def client_cert(
    kms: Kms,
    app: AppCvm,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: int | None = None,
    lifetime: int = 600,
    app_id_ext: bytes | None = None,
    quote_tee: Any = None,
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A client RA-TLS certificate issued by the KMS's public temporary CA, as KmsClient builds it."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    nb = int(time.time()) - 30 if not_before is None else not_before
    cert = make_ratls_cert(
        quote_tee or app.tee,
        key,
        issuer_key=kms.service.state.temp_ca_key,
        issuer_cert=kms.service.state.temp_ca_cert,
        subject="teecloud app",
        usage="app:kms-client",
        not_before=nb,
        not_after=nb + lifetime,
        app_id=app.app_id if app_id_ext is None else app_id_ext,
        server_auth=False,
        client_auth=True,
    )
    return key, cert.public_bytes(serialization.Encoding.DER)


def cert_of(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


COMPOSE_V1 = hashlib.sha256(b"compose v1").digest()
COMPOSE_V2 = hashlib.sha256(b"compose v2").digest()
SIM_OS = "teecloud-sim-os-0.1"


@dataclass
class World:
    """One embedded chain (KmsAuth deployed, the simulated OS image allowed) shared by the module's tests;
    each test registers its own apps."""

    chain: ChainClient
    chain_dir: Path

    def register(self, compose_hash: bytes = COMPOSE_V1, **kw: Any) -> bytes:
        return bytes.fromhex(self.chain.register_app(None, compose_hash, **kw)[2:])


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("kms-chain")
    chain = ChainClient.embedded(d)
    chain.deploy()
    chain.add_os_image(os_image_hash_for(SIM_OS))
    yield World(chain, d)
    chain.close()


@dataclass(frozen=True)
class CaMaterial:
    """A group P-256 CA key dealt in this process (dev: the networked rounds are test_threshold_net_ca), six
    presignatures for each of the five holders, and the group root CA signed by holders 1-3."""

    keys: list[Any]  # te.KeyShare, one per holder
    presigs: list[dict[int, Any]]  # te.presign_local batches: holder -> te.Presignature
    root: x509.Certificate


@pytest.fixture(scope="session")
def ca_material() -> CaMaterial:
    """Dealt once per session (each presign_local batch is ~1.7 s of elliptic-curve work): the fixtures that
    use it start fresh nodes, homes and pools every test and install these values into them; a presignature
    is an immutable value, spent only in the pool of the test's own node."""
    from teecloud.keys import threshold_certs as tc
    from teecloud.keys import threshold_ecdsa as te

    t, n = 3, 5
    keys = te.dkg_local(t, n, group=te.P256)
    batches = [te.presign_local(keys, list(range(1, n + 1))) for _ in range(6)]
    gpk = keys[0].group_public_key
    to_sign = tc.root_ca_to_sign(gpk, not_before=int(time.time()) - 60)
    presigs = te.presign_local(keys, list(range(1, n + 1)))
    root = tc.assemble_certificate(
        to_sign, te.sign_local(presigs, [1, 2, 3], to_sign.digest), tc.group_ca_public_key(gpk)
    )
    return CaMaterial(list(keys), batches, root)


@dataclass(frozen=True)
class SigningMaterial:
    """A group secp256k1 signing key dealt in this process (dev) and eight presignatures per holder."""

    keys: list[Any]  # te.KeyShare, one per holder
    presigs: list[dict[int, Any]]  # te.presign_local batches: holder -> te.Presignature


@pytest.fixture(scope="session")
def signing_material() -> SigningMaterial:
    """Dealt once per session, like ca_material: each test's own nodes get these values in their own pools."""
    from teecloud.keys import threshold_ecdsa as te

    keys = te.dkg_local(3, 5)
    return SigningMaterial(list(keys), [te.presign_local(keys, [1, 2, 3, 4, 5]) for _ in range(8)])


def denied_record(kms: Kms) -> AuditRecord:
    recs = kms.audit.read()
    assert recs, "nothing was audited"
    assert recs[-1].decision == "denied"
    return recs[-1]


KEY_FIELDS = ("ca_key", "disk_crypt_key", "env_crypt_key", "k256_key", "k256_signature", "temp_ca_key")


def post_with_cert(
    url: str, path: str, key: ec.EllipticCurvePrivateKey, cert_der: bytes, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """One mutual-TLS POST with the given client certificate (as an attacker or a CVM would send it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.pem"
        pem = x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)
        p.write_bytes(
            pem
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx.load_cert_chain(str(p))
    with httpx.Client(verify=ctx, timeout=30) as http:
        r = http.post(url + path, json=body or {})
    return r.status_code, r.json()


def assert_nothing_released(body: dict[str, Any]) -> None:
    assert body.get("error") == "denied", body
    for f in KEY_FIELDS:
        assert f not in body


class Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_servers(servers: Iterable[Stoppable]) -> None:
    """Stop several KMS servers at once: each stop waits out its listeners' shutdown ticks (about 0.2 s), so
    a committee stopped one by one spends a second doing nothing. Every stop runs (and its error, if any,
    is raised)."""
    servers = list(servers)
    if not servers:
        return
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        for done in [pool.submit(s.stop) for s in servers]:
            done.result()


@pytest.fixture
def kms(teecloud_home: Path, world: World) -> Kms:
    """A dev-mode KMS on the shared chain (the test modules' default)."""
    return make_kms(teecloud_home, world.chain)


@pytest.fixture
def server(kms: Kms) -> Iterator[KmsServer]:
    """That KMS's listeners (real TLS on 127.0.0.1)."""
    with KmsServer(kms.service) as s:
        yield s
