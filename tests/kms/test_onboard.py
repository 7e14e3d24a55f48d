"""Onboarding: root keys move only between attested KMS instances that KmsAuth allows, in both directions."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from teecloud.chain import ContractReverted
from teecloud.kms.bootstrap import boot_kms_tee, publish_kms_info
from teecloud.kms.errors import BootstrapError, OnboardError
from teecloud.kms.onboard import onboard_from
from teecloud.kms.server import KmsServer
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import (
    COMPOSE_V1,
    Kms,
    World,
    client_cert,
    make_app,
    make_kms,
    post_with_cert,
    vm_config,
)


def _onboard(
    home: Path, world: World, source: KmsServer, kms_home: Path, *, build: str | None = None
) -> None:
    tee = SimulatedTdx(home)
    identity = boot_kms_tee(tee, build=build, finish=False)
    onboard_from(
        source.url,
        tee=tee,
        identity=identity,
        chain=world.chain,
        collateral_for=lambda quote, now: tee.collateral(),
        dev_root_der=tee.dev_root_der(),
        home=kms_home,
    )


def _source(home: Path, world: World, *, build: str | None = None, allow: bool = True) -> Kms:
    a = make_kms(home, world.chain, kms_home=home / "kms-a", build=build)
    if allow:
        # KMS builds measure the same everywhere: maybe already in (serving and onboarding measurements)
        for mr in (a.service.identity.mr_aggregated, a.service.identity.boot_mr_aggregated):
            with contextlib.suppress(ContractReverted):
                world.chain.add_kms_mr(mr)
        world.chain.add_kms_device(a.tee.device_id)  # this test's simulated platform
    return a


def test_two_kms_serve_identical_keys(teecloud_home: Path, world: World) -> None:
    a = _source(teecloud_home, world)
    publish_kms_info(world.chain, a.service.keys, a.tee, teecloud_home / "kms-a")
    info = world.chain.kms_info()
    assert bytes(info["k256_pubkey"]) == a.service.keys.k256_public_key
    with pytest.raises(BootstrapError, match="onboard"):
        make_kms(teecloud_home, world.chain, kms_home=teecloud_home / "kms-b", generate=False)
    with KmsServer(a.service) as server_a:
        _onboard(teecloud_home, world, server_a, teecloud_home / "kms-b")
    # B restarts from its own sealed copy, without A.
    b = make_kms(teecloud_home, world.chain, kms_home=teecloud_home / "kms-b", generate=False)
    assert b.service.keys.ca_public_key_der == a.service.keys.ca_public_key_der
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    got = []
    for kms in (a, b):
        with KmsServer(kms.service) as server:
            key, der = client_cert(kms, app)
            status, body = post_with_cert(
                server.url, "/prpc/KMS.GetAppKey", key, der, {"vm_config": vm_config(app)}
            )
            assert status == 200, body
            got.append({k: body[k] for k in ("disk_crypt_key", "env_crypt_key", "k256_key", "ca_key")})
    assert got[0] == got[1]
    rec = a.audit.read()
    onboard_recs = [r for r in rec if r.endpoint.endswith("GetKmsKey")]
    assert onboard_recs and onboard_recs[0].decision == "allowed"
    assert "ca_key" not in (teecloud_home / "kms-a" / "kms" / "audit.jsonl").read_text()


def test_source_refuses_kms_with_disallowed_measurement(teecloud_home: Path, world: World) -> None:
    a = _source(teecloud_home, world)
    with KmsServer(a.service) as server_a, pytest.raises(OnboardError, match="source KMS refused") as info:
        _onboard(teecloud_home, world, server_a, teecloud_home / "kms-evil", build="evil-build")
    assert "measurement" in str(info.value).lower()
    assert not (teecloud_home / "kms-evil" / "kms" / "sealed-state.json").exists()
    rec = a.audit.read()[-1]
    assert rec.decision == "denied" and rec.step == "chain" and rec.endpoint.endswith("GetKmsKey")


def test_requester_refuses_unauthorized_source(teecloud_home: Path, world: World) -> None:
    rogue = _source(teecloud_home, world, build="rogue-source", allow=False)
    with KmsServer(rogue.service) as server, pytest.raises(OnboardError, match="not an authorized KMS"):
        _onboard(teecloud_home, world, server, teecloud_home / "kms-b")
    assert not (teecloud_home / "kms-b" / "kms" / "sealed-state.json").exists()
    # The rogue never even received a key request.
    assert not [r for r in rogue.audit.read() if r.endpoint.endswith("GetKmsKey")]


def test_an_app_cannot_onboard(teecloud_home: Path, world: World) -> None:
    """An allowed app CVM asking for the root keys is refused (it is not an allowed KMS)."""
    a = _source(teecloud_home, world)
    app_id = world.register(COMPOSE_V1)
    app = make_app(teecloud_home, app_id, COMPOSE_V1)
    key, der = client_cert(a, app)
    with KmsServer(a.service) as server:
        status, body = post_with_cert(server.url, "/prpc/KMS.GetKmsKey", key, der)
    assert status == 403 and "ca_key" not in body and "k256_key" not in body
