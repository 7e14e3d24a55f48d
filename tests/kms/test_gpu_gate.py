"""The GPU gate at boot (dstack's): a compose with `"gpu_attestation": "required"` boots only after every
GPU's evidence, of this boot, verified under a trusted device root, and measured as `gpu-evidence` before
`boot-mr-done`; the KMS refuses keys to such a compose when the boot measurement has no gpu-evidence event.
Everything over the real KMS server (mutual RA-TLS) with a simulated TDX and a simulated GPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.agent.boot import BootError, GpuGate, GpuGateFailed, boot, gpu_evidence_digest, gpu_nonce
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash, normalize_app_compose
from teecloud.attestation.boottime import GPU_EVIDENCE_EVENT
from teecloud.keys.certs import spki_der
from teecloud.keys.ratls import event_log_json, ratls_report_data
from teecloud.kms.api import PATH_GET_APP_KEY
from teecloud.kms.client import ComposeBook, KmsClient, ratls_server_check, vm_config_json
from teecloud.kms.errors import AccessDenied, KmsClientError, KmsDenied
from teecloud.kms.server import KmsServer
from teecloud.tee.gpu import NvmlGpuSource, SimulatedGpu
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import Kms, World, assert_nothing_released, boot_app, make_kms, post_with_cert
from tests.kms.test_boot_rule import cert_with_log, oracle_evidence
from tests.kms.test_quote_oracle import HELLO, csr_pem
from tests.kms.test_threshold_nodes import Cluster, cluster  # noqa: F401  # the 5-node fixture

GPU_HELLO = {**HELLO, "gpu_attestation": "required"}
IID = bytes.fromhex("cd" * 20)


@pytest.fixture
def kms(teecloud_home: Path, world: World) -> Kms:
    return make_kms(teecloud_home, world.chain)


@pytest.fixture
def server(kms: Kms) -> Any:
    with KmsServer(kms.service) as s:
        yield s


@pytest.fixture
def gpu(tmp_path: Path) -> SimulatedGpu:
    return SimulatedGpu(tmp_path / "gpu-home")


def client(kms: Kms, server: KmsServer, compose: dict[str, Any] | None) -> KmsClient:
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    text = normalize_app_compose(compose) if compose is not None else ""
    return KmsClient(server.url, server_check=check, app_compose=text)


def rtmr3_events(tee: SimulatedTdx) -> list[tuple[str, bytes]]:
    return [(e.event, e.event_payload) for e in tee.event_log() if e.imr == 3]


class WrongNonce:
    """A GPU that answers another nonce (evidence replayed from another boot)."""

    def __init__(self, gpu: SimulatedGpu) -> None:
        self.gpu = gpu

    def collect(self, nonce: bytes) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.gpu.collect(hashlib.sha256(b"another boot" + nonce).digest())
        return items


class Tampered:
    """Evidence with one measurement byte flipped after the GPU signed it."""

    def __init__(self, gpu: SimulatedGpu) -> None:
        self.gpu = gpu

    def collect(self, nonce: bytes) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.gpu.collect(nonce)
        raw = bytearray(bytes.fromhex(items[0]["evidence"]))
        raw[60] ^= 0x01
        items[0]["evidence"] = raw.hex()
        return items


def gpu_boot(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World, gate: GpuGate | None
) -> tuple[bytes, SimulatedTdx, Any]:
    app_id = world.register(compose_hash(GPU_HELLO))
    tee = SimulatedTdx(teecloud_home)
    state = boot(
        tee,
        json.dumps(GPU_HELLO),
        app_id,
        IID,
        client(kms, server, None),  # boot() gives the client the measured compose (bind_app_compose)
        extra_events=[("os-image-hash", tee.os_image_hash)],
        gpu=gate,
    )
    return app_id, tee, state


def test_required_and_verified_gpu_evidence_gets_keys(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World, gpu: SimulatedGpu
) -> None:
    seen: list[list[dict[str, Any]]] = []

    class Recording:
        def collect(self, nonce: bytes) -> list[dict[str, Any]]:
            seen.append(gpu.collect(nonce))
            return seen[-1]

    kms.service.authz.require_app_compose = True  # so the compose boot() sends is what is read
    app_id, tee, state = gpu_boot(
        teecloud_home, kms, server, world, GpuGate(Recording(), trust_anchors=(gpu.root_der(),))
    )
    assert state.app_id == app_id and state.keys.disk_crypt_key
    assert kms.audit.read()[-1].decision == "allowed"
    names = [n for n, _ in rtmr3_events(tee)]
    i = names.index(GPU_EVIDENCE_EVENT)
    assert names[i - 1] == "boot-nonce" and names[i + 1] == "boot-mr-done"
    assert names.count(GPU_EVIDENCE_EVENT) == 1
    payload = dict(rtmr3_events(tee))[GPU_EVIDENCE_EVENT]
    assert payload == gpu_evidence_digest(seen[0])  # the evidence set that was verified, measured
    boot_nonce = dict(rtmr3_events(tee))["boot-nonce"]
    evidence = bytes.fromhex(seen[0][0]["evidence"])
    assert gpu_nonce(boot_nonce, app_id) == evidence[4:36]  # SPDM requester nonce: this boot's


def test_required_and_absent_is_denied_at_the_gpu_step(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World
) -> None:
    """A CVM measuring the GPU compose without the gate (a modified guest): no gpu-evidence, no keys."""
    app_id = world.register(compose_hash(GPU_HELLO))
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, compose_hash(GPU_HELLO), IID)
    with pytest.raises(KmsDenied) as err:
        client(kms, server, GPU_HELLO).get_app_keys(tee, app_id, IID)
    assert err.value.step == "gpu_evidence", err.value
    assert "requires GPU attestation" in err.value.reason
    assert kms.audit.read()[-1].decision == "denied"


def test_a_compose_that_is_not_the_measured_one_is_refused(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World
) -> None:
    """A CVM of the GPU compose sending one without the requirement (a lie; the honest client sends only a
    compose its CVM measured): its hash is not the measured compose-hash, so nothing is released."""
    app_id = world.register(compose_hash(GPU_HELLO))
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, compose_hash(GPU_HELLO), IID)
    key = ec.generate_private_key(ec.SECP256R1())
    quote = tee.quote(ratls_report_data(spki_der(key.public_key())))
    der = cert_with_log(kms, key, quote, event_log_json(tee.event_log()), app_id)
    vm = vm_config_json(tee)
    status, body = post_with_cert(
        server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm, "app_compose": normalize_app_compose(HELLO)}
    )
    assert status == 403 and body["step"] == "app_compose", body
    assert_nothing_released(body)
    # the same request with the measured compose reaches the GPU step
    status, body = post_with_cert(
        server.url,
        PATH_GET_APP_KEY,
        key,
        der,
        {"vm_config": vm, "app_compose": normalize_app_compose(GPU_HELLO)},
    )
    assert status == 403 and body["step"] == "gpu_evidence", body


def test_a_kms_requiring_the_compose_refuses_a_request_without_it(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World
) -> None:
    kms.service.authz.require_app_compose = True
    app_id = world.register(compose_hash(HELLO))
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, compose_hash(HELLO), IID)
    with pytest.raises(KmsDenied) as err:
        client(kms, server, None).get_app_keys(tee, app_id, IID)
    assert err.value.step == "app_compose", err.value
    # and with the (measured) compose it is served: no GPU is required by HELLO
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, compose_hash(HELLO), IID)
    assert client(kms, server, HELLO).get_app_keys(tee, app_id, IID) is not None


@pytest.mark.parametrize("fault", ["wrong-nonce", "other-root", "tampered", "no-source", "no-nvml"])
def test_bad_gpu_evidence_stops_the_boot_before_any_key_request(
    teecloud_home: Path,
    tmp_path: Path,
    kms: Kms,
    server: KmsServer,
    world: World,
    gpu: SimulatedGpu,
    fault: str,
) -> None:
    gate: GpuGate | None
    if fault == "wrong-nonce":
        gate = GpuGate(WrongNonce(gpu), trust_anchors=(gpu.root_der(),))
    elif fault == "other-root":
        gate = GpuGate(gpu, trust_anchors=(SimulatedGpu(tmp_path / "another-installation").root_der(),))
    elif fault == "tampered":
        gate = GpuGate(Tampered(gpu), trust_anchors=(gpu.root_der(),))
    elif fault == "no-nvml":  # this machine has no NVML and no GPU: a clear refusal, not a traceback
        gate = GpuGate(NvmlGpuSource(), trust_anchors=(gpu.root_der(),))
    else:
        gate = None
    records_before = len(kms.audit.read())
    app_id = world.register(compose_hash(GPU_HELLO))
    tee = SimulatedTdx(teecloud_home)
    with pytest.raises(GpuGateFailed) as err:
        boot(
            tee,
            json.dumps(GPU_HELLO),
            app_id,
            IID,
            client(kms, server, GPU_HELLO),
            extra_events=[("os-image-hash", tee.os_image_hash)],
            gpu=gate,
        )
    assert str(err.value).startswith("gpu: ")
    expected = {
        "wrong-nonce": "nonce",
        "other-root": "not a trusted anchor",
        "tampered": "signature",
        "no-source": "no GPU evidence source",
        "no-nvml": "NVML",
    }[fault]
    assert expected in str(err.value), err.value
    names = [n for n, _ in rtmr3_events(tee)]
    assert "boot-mr-done" not in names and GPU_EVIDENCE_EVENT not in names
    assert len(kms.audit.read()) == records_before  # no key request reached the KMS


def test_a_bad_gpu_attestation_value_is_a_boot_error_before_any_measurement(
    teecloud_home: Path, kms: Kms, server: KmsServer
) -> None:
    tee = SimulatedTdx(teecloud_home)
    with pytest.raises(BootError, match="gpu_attestation"):
        boot(tee, json.dumps({**HELLO, "gpu_attestation": "maybe"}), None, IID, client(kms, server, None))
    assert rtmr3_events(tee) == []


def test_the_quote_oracle_after_a_gpu_boot_releases_nothing(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World, gpu: SimulatedGpu
) -> None:
    """After a genuine GPU boot, a quote any app can get (GetQuote over its own key) carries the
    gpu-evidence event and the right compose, and still gets no key: RTMR3 goes past the boot measurement."""
    app_id, tee, state = gpu_boot(
        teecloud_home, kms, server, world, GpuGate(gpu, trust_anchors=(gpu.root_der(),))
    )
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(AgentService(state), key)
    der = cert_with_log(kms, key, quote, json.dumps(entries), app_id)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(
            der, vm_config=vm_config_json(tee), app_compose=normalize_app_compose(GPU_HELLO)
        )
    assert err.value.step == "boot_time", err.value


def test_sign_cert_applies_the_same_gate(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World
) -> None:
    """SignCert (an app certificate) releases too: the same compose without gpu-evidence, no certificate."""
    app_id = world.register(compose_hash(GPU_HELLO))
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, compose_hash(GPU_HELLO), IID)
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(KmsDenied) as err:
        client(kms, server, GPU_HELLO).sign_cert(tee, csr_pem(key), app_id=app_id)
    assert err.value.step == "gpu_evidence", err.value


def test_threshold_nodes_apply_the_gate(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811  # the fixture imported above
    gpu: SimulatedGpu,
) -> None:
    """Every threshold node reads the compose the provider forwards: a GPU boot through boot() gets its keys
    from nodes that require the compose; the same compose measured without gpu-evidence gets no node's
    partial."""
    for node in cluster.nodes.values():
        node.kms.service.authz.require_app_compose = True
    app_id = world.register(compose_hash(GPU_HELLO))
    tee = SimulatedTdx(teecloud_home)
    state = boot(
        tee,
        json.dumps(GPU_HELLO),
        app_id,
        IID,
        cluster.provider(),
        extra_events=[("os-image-hash", tee.os_image_hash)],
        gpu=GpuGate(gpu, trust_anchors=(gpu.root_der(),)),
    )
    assert state.keys.disk_crypt_key and GPU_EVIDENCE_EVENT in dict(rtmr3_events(tee))

    provider = cluster.provider()
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, app_id, compose_hash(GPU_HELLO), IID, boot_nonce=provider.boot_nonce())
    provider.bind_app_compose(normalize_app_compose(GPU_HELLO))
    with pytest.raises(KmsClientError) as err:
        provider.get_app_keys(tee, app_id, IID)
    assert provider.faults and all("gpu_evidence" in f for f in provider.faults.values()), provider.faults
    assert "gpu" in str(err.value)


def test_one_client_shared_by_two_boots_sends_each_cvm_its_own_compose(
    teecloud_home: Path, kms: Kms, server: KmsServer, world: World, gpu: SimulatedGpu
) -> None:
    """The local runtime shares one key provider between CVMs: each request carries the compose its CVM
    measured (found by compose-hash), so a GPU app's requirement is read and a plain app is not refused."""
    kms.service.authz.require_app_compose = True
    shared = client(kms, server, None)
    gpu_app = world.register(compose_hash(GPU_HELLO))
    plain_app = world.register(compose_hash(HELLO))
    gate = GpuGate(gpu, trust_anchors=(gpu.root_der(),))
    for compose, app_id in ((GPU_HELLO, gpu_app), (HELLO, plain_app), (GPU_HELLO, gpu_app)):
        tee = SimulatedTdx(teecloud_home)
        state = boot(
            tee,
            json.dumps(compose),
            app_id,
            IID,
            shared,
            extra_events=[("os-image-hash", tee.os_image_hash)],
            gpu=gate,
        )
        assert state.app_id == app_id
    # a GPU-app CVM measured without the gate, through the same shared client: its own compose is sent
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, gpu_app, compose_hash(GPU_HELLO), IID)
    with pytest.raises(KmsDenied) as err:
        shared.get_app_keys(tee, gpu_app, IID)
    assert err.value.step == "gpu_evidence", err.value


def test_the_compose_book_sends_only_a_measured_compose_that_fits(teecloud_home: Path) -> None:
    book = ComposeBook()
    small = normalize_app_compose(GPU_HELLO)
    big = normalize_app_compose({**GPU_HELLO, "docker_compose_file": "x" * (ComposeBook.MAX_SENT_BYTES + 1)})
    book.add(small)
    book.add(big)
    tee = SimulatedTdx(teecloud_home)
    assert book.for_tee(tee) == ""  # nothing measured yet
    tee.emit_event("compose-hash", compose_hash(GPU_HELLO))
    assert book.for_tee(tee) == small
    other = SimulatedTdx(teecloud_home)
    other.emit_event("compose-hash", hashlib.sha256(big.encode()).digest())
    assert book.for_tee(other) == ""  # above what the KMS accepts in a body: not sent
    for i in range(ComposeBook.MAX_ENTRIES + 1):
        book.add(normalize_app_compose({**HELLO, "name": f"app{i}"}))
    assert book.for_tee(tee) == ""  # bounded: the oldest entries go first
