"""KMS test harness: a simulated KMS TEE, app CVMs booted the dstack way, RA-TLS client certs."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.chain.api import BootInfo
from teecloud.keys.ratls import make_ratls_cert
from teecloud.kms.audit import AuditLog
from teecloud.kms.bootstrap import boot_kms_tee, kms_dir, start_kms_state
from teecloud.kms.service import KmsConfig, KmsService, StaticCollateral, simulated_os_image_mrtd
from teecloud.tee.simulated import SimulatedTdx


def boot_app(tee: SimulatedTdx, app_id: bytes, compose_hash: bytes, instance_id: bytes) -> None:
    """dstack's boot events (reference/dstack.md §4), as the agent measures them."""
    tee.emit_event("system-preparing", b"")
    tee.emit_event("app-id", app_id)
    tee.emit_event("compose-hash", compose_hash)
    tee.emit_event("instance-id", instance_id)
    tee.emit_event("boot-mr-done", b"")
    tee.emit_event("os-image-hash", tee.os_image_hash)
    tee.emit_event("key-provider", json.dumps({"name": "kms", "id": ""}).encode())
    tee.emit_event("system-ready", b"")


@dataclass
class FakeChain:
    """Stands in for KmsAuth until the chain client is wired: allowlists + an 'unreachable' switch."""

    apps: dict[bytes, set[bytes]] = field(default_factory=dict)
    os_images: set[bytes] = field(default_factory=set)
    kms_mrs: set[bytes] = field(default_factory=set)
    unreachable: bool = False
    calls: int = 0

    def _check(self) -> None:
        self.calls += 1
        if self.unreachable:
            from teecloud.chain.errors import ChainUnreachable

            raise ChainUnreachable("connection refused")

    def is_app_allowed(self, bi: BootInfo) -> tuple[bool, str]:
        self._check()
        if bi.app_id not in self.apps:
            return False, "app not registered"
        if bi.os_image_hash not in self.os_images:
            return False, "OS image not allowed"
        if bi.compose_hash not in self.apps[bi.app_id]:
            return False, "compose hash not allowed"
        return True, ""

    def is_kms_allowed(self, bi: BootInfo) -> tuple[bool, str]:
        self._check()
        if bi.tcb_status != "UpToDate":
            return False, "TCB not up to date"
        if bi.os_image_hash not in self.os_images:
            return False, "OS image not allowed"
        if bi.mr_aggregated not in self.kms_mrs:
            return False, "KMS aggregated MR not allowed"
        return True, ""


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
    dev: bool = True,
    build: str | None = None,
    clock: Callable[[], float] = time.time,
    generate: bool = True,
    block_number: Callable[[], int] | None = None,
) -> Kms:
    tee = SimulatedTdx(home)
    identity = boot_kms_tee(tee, build=build)
    state, _ = start_kms_state(tee, identity, now=int(clock()), generate=generate, home=home)
    service = KmsService(
        state=state,
        identity=identity,
        tee=tee,
        chain=chain,
        collateral=StaticCollateral(tee.collateral),
        audit=AuditLog(kms_dir(home) / "audit.jsonl"),
        config=KmsConfig(dev_mode=dev),
        dev_root_der=tee.dev_root_der() if dev else None,
        block_number=block_number,
        os_image_mrtd=simulated_os_image_mrtd,
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


APP_ID = bytes.fromhex("11" * 20)
COMPOSE_V1 = hashlib.sha256(b"compose v1").digest()
COMPOSE_V2 = hashlib.sha256(b"compose v2").digest()


@pytest.fixture
def fake_chain(teecloud_home: Path) -> FakeChain:
    from teecloud.tee.simulated import os_image_hash_for

    return FakeChain(apps={APP_ID: {COMPOSE_V1}}, os_images={os_image_hash_for("teecloud-sim-os-0.1")})
