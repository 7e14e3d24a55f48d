"""cloud.verify (what `teecloud verify --app` and the explorer show): each step can fail, with its reason."""

from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from teecloud.appcompose import compose_hash, normalize_app_compose
from teecloud.cloud.verify import verify_attestation
from teecloud.keys.ratls import event_log_json
from teecloud.node.api import Attestation, attest_report_data
from teecloud.tee.simulated import SimulatedTdx

COMPOSE = {
    "manifest_version": 2,
    "name": "x",
    "runner": "docker-compose",
    "docker_compose_file": "services: {}",
}
APP_ID = bytes(range(20))


def booted(home: Path) -> SimulatedTdx:
    tee = SimulatedTdx(home)
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", APP_ID),
        ("compose-hash", compose_hash(COMPOSE)),
        ("instance-id", bytes(20)),
        ("boot-mr-done", b""),
        ("os-image-hash", tee.os_image_hash),
        ("key-provider", b'{"name":"kms","id":""}'),
        ("system-ready", b""),
    ]:
        tee.emit_event(name, payload)
    return tee


def attestation(tee: SimulatedTdx, nonce: bytes, **over: Any) -> Attestation:
    att = Attestation(
        instance_id="00" * 20,
        app_id=APP_ID.hex(),
        compose_hash=compose_hash(COMPOSE).hex(),
        quote=tee.quote(attest_report_data(nonce)).hex(),
        event_log=event_log_json(tee.event_log()),
        report_data=attest_report_data(nonce).hex(),
        vm_config="{}",
        app_compose=normalize_app_compose(COMPOSE),
    )
    return dataclasses.replace(att, **over) if dataclasses.is_dataclass(att) else att.model_copy(update=over)


class FakeChain:
    def __init__(self, compose_ok: bool = True, app_ok: bool = True) -> None:
        self.compose_ok, self.app_ok = compose_ok, app_ok

    def is_compose_hash_allowed(self, app_id: bytes, chash: bytes) -> bool:
        return self.compose_ok

    def is_app_allowed(self, boot_info: Any) -> tuple[bool, str]:
        return self.app_ok, "" if self.app_ok else "instance retired"


def run(tee: SimulatedTdx, att: Attestation, nonce: bytes, chain: Any = None, dev: bool = True) -> Any:
    return verify_attestation(
        att,
        nonce,
        collateral=tee.collateral(),
        dev_root_der=tee.dev_root_der() if dev else None,
        chain=chain,
        now=int(time.time()),
    )


@pytest.fixture
def tee(teecloud_home: Path) -> SimulatedTdx:
    return booted(teecloud_home)


def test_a_genuine_attestation_passes_every_step(tee: SimulatedTdx) -> None:
    nonce = secrets.token_bytes(32)
    v = run(tee, attestation(tee, nonce), nonce, FakeChain())
    assert v.ok, v.to_json()
    assert [s.name for s in v.steps] == ["quote", "event_log", "nonce", "compose", "chain"]
    assert v.compose_hash == compose_hash(COMPOSE).hex() and v.simulated


def test_served_compose_that_is_not_the_measured_one_fails(tee: SimulatedTdx) -> None:
    nonce = secrets.token_bytes(32)
    other = normalize_app_compose({**COMPOSE, "name": "y"})
    v = run(tee, attestation(tee, nonce, app_compose=other), nonce, FakeChain())
    assert not v.ok and v.steps[-1].name == "compose" and "not the measured one" in v.reason


def test_a_replayed_quote_fails_the_nonce(tee: SimulatedTdx) -> None:
    v = run(tee, attestation(tee, b"old nonce"), b"fresh nonce", FakeChain())
    assert not v.ok and v.steps[-1].name == "nonce"


def test_simulated_evidence_without_the_dev_root_fails(tee: SimulatedTdx) -> None:
    nonce = b"n"
    v = run(tee, attestation(tee, nonce), nonce, FakeChain(), dev=False)
    assert not v.ok and not any(s.ok for s in v.steps)


def test_chain_refusals_are_reported(tee: SimulatedTdx) -> None:
    nonce = b"n"
    v = run(tee, attestation(tee, nonce), nonce, FakeChain(compose_ok=False))
    assert not v.ok and v.steps[-1].name == "chain" and "not allowed" in v.reason
    v = run(tee, attestation(tee, nonce), nonce, FakeChain(app_ok=False))
    assert not v.ok and "instance retired" in v.reason


def test_a_quote_that_is_not_hex_is_a_clear_failure(tee: SimulatedTdx) -> None:
    v = run(tee, attestation(tee, b"n", quote="zz"), b"n")
    assert not v.ok and v.steps[-1].name == "quote" and "not hex" in v.reason


@pytest.mark.parametrize(
    "status,body,words",
    [
        (404, {"error": "no CVM 'nosuchapp' on this node"}, "no app 'nosuchapp' on this node"),
        (404, {}, "no app 'nosuchapp' on this node"),  # a node that says nothing: still a sentence
        (409, {"error": "CVM abc is stopped, not running: no attestation"}, "not running"),
        (503, {"error": ""}, "cannot fetch a fresh quote of app 'nosuchapp'"),
    ],
)
def test_an_app_the_node_cannot_attest_is_named(status: int, body: dict[str, str], words: str) -> None:
    """`verify --app nosuchapp`: the fetch step names the app and what to do, never an empty reason."""
    import httpx

    from teecloud.cloud.verify import verify_app
    from teecloud.node.api import NodeClient

    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=body))
    with NodeClient("http://node.invalid", transport=transport) as client:
        verdict = verify_app(client, "nosuchapp", platform=None, chain=None)
    assert not verdict.ok and [s.name for s in verdict.steps] == ["fetch"]
    assert words in verdict.reason and "{" not in verdict.reason
    assert verdict.to_json()["reason"] == verdict.reason
