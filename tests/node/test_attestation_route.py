"""The node's public attestation route is no quote oracle (issue 10, F1): whatever the caller sends, the
quote's report_data is sha512("teecloud-attest:" ‖ nonce), never an RA-TLS binding of the caller's key."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from teecloud.agent.boot import AgentState, boot
from teecloud.agent.keyprovider import LocalDevKeyProvider
from teecloud.agent.service import AgentService, ClientError
from teecloud.agent.storage import EncryptedVolume
from teecloud.attestation.policy import Policy
from teecloud.attestation.verifier import verify_tdx_with_event_log
from teecloud.cloud.verify import verify_attestation
from teecloud.keys.ratls import ratls_report_data, spki_der
from teecloud.node import api
from teecloud.node.api import CreateCvmRequest, NodeApiError, NodeClient, attest_report_data
from teecloud.node.instance import Instance
from teecloud.node.runtime.docker_cvm import BootedCvm, _kms_mode_events
from teecloud.node.service import Node, make_node_app
from teecloud.tee.simulated import SimulatedTdx
from tests.node.fakes import FakeBoots, FakeRuntime, app_compose, make_node


class _RealAgentBoots(FakeBoots):
    """A boot that measures the app into a fresh simulated TEE and serves a real AgentService over it."""

    def __init__(self, home: Path) -> None:
        super().__init__()
        self.home = home
        self.states: list[AgentState] = []

    def boot(self, inst: Instance, **_: Any) -> BootedCvm:
        info = inst.info()
        tee = SimulatedTdx(self.home)
        state = boot(
            tee,
            inst.app_compose_bytes(),
            bytes.fromhex(info["app_id"]),
            bytes.fromhex(info["instance_id"]),
            LocalDevKeyProvider(self.home),
            extra_events=_kms_mode_events(tee),  # as the node's boot measures them (the verifier needs them)
        )
        self.states.append(state)
        _AGENTS[inst.instance_id] = AgentService(state)
        return BootedCvm(
            state=state,
            runner=SimpleNamespace(service=_AGENTS[inst.instance_id], stop=lambda: None),  # type: ignore[arg-type]
            volume=EncryptedVolume(inst.cipher_dir, inst.mount_point),
        )


_NODES: dict[str, Node] = {}  # the node behind each `running` client, by instance id
_AGENTS: dict[str, AgentService] = {}  # the guest agent of each booted CVM, by instance id


@pytest.fixture
def running(teecloud_home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, str]:
    node = make_node(teecloud_home, FakeRuntime(), _RealAgentBoots(teecloud_home), monkeypatch)
    st = node.create(CreateCvmRequest(name="hello", app_compose=app_compose(), app_id="11" * 20))
    node.wait_all(30)
    assert node.status(st.instance_id).status == "running", node.status(st.instance_id).error
    _NODES[st.instance_id] = node
    return TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False), st.instance_id


def test_the_attackers_ratls_binding_is_never_the_quoted_report_data(
    running: tuple[TestClient, str], teecloud_home: Path
) -> None:
    client, iid = running
    # (1) the attacker's key K and the report_data an RA-TLS certificate for K would need
    key = ec.generate_private_key(ec.SECP256R1())
    binding = ratls_report_data(spki_der(key.public_key()))
    # (2) asked for exactly that, unauthenticated, under the old and the new parameter name
    for param in ("report_data", "nonce"):
        r = client.get(f"/cvms/{iid}/attestation", params={param: binding.hex()})
        assert r.status_code == 200, r.text
        att = api.Attestation.model_validate(r.json())
        # the quote itself (not only the JSON field) binds the prefixed hash, not the binding
        tee = SimulatedTdx(teecloud_home)
        ev = verify_tdx_with_event_log(
            bytes.fromhex(att.quote),
            tee.collateral(),
            att.event_log,
            now=int(time.time()),
            dev_root_der=tee.dev_root_der(),
            policy=dataclasses.replace(Policy.default(), allow_simulated=True),
        )
        assert ev.report_data != binding
        assert ev.report_data == hashlib.sha512(b"teecloud-attest:" + binding).digest()
        assert att.report_data == ev.report_data.hex() and att.nonce == binding.hex()


def test_verify_checks_the_prefixed_nonce(running: tuple[TestClient, str], teecloud_home: Path) -> None:
    client, iid = running
    tee = SimulatedTdx(teecloud_home)
    nonce = b"n" * 32
    att = api.Attestation.model_validate(client.get(f"/cvms/{iid}/attestation?nonce={nonce.hex()}").json())
    kw: dict[str, Any] = {
        "collateral": tee.collateral(),
        "dev_root_der": tee.dev_root_der(),
        "chain": None,
        "now": int(time.time()),
    }
    assert verify_attestation(att, nonce, **kw).ok
    replayed = verify_attestation(att, b"m" * 32, **kw)
    assert not replayed.ok and "teecloud-attest" in replayed.reason
    # a raw quote over the nonce itself (what the route served before) no longer verifies as an attestation
    raw = att.model_copy(update={"quote": tee.quote(nonce.ljust(64, b"\0")).hex()})
    assert not verify_attestation(raw, nonce, **kw).ok


def test_the_client_computes_the_same_value(running: tuple[TestClient, str]) -> None:
    client, iid = running
    node = NodeClient("http://node", transport=client._transport)  # type: ignore[attr-defined]
    att = node.attestation(iid, b"\x01" * 64)
    assert att.report_data == attest_report_data(b"\x01" * 64).hex()
    r = client.get(f"/cvms/{iid}/attestation", params={"nonce": "00" * 65})
    assert r.status_code == 400 and "at most 64 bytes" in r.json()["error"]
    r = client.get(f"/cvms/{iid}/attestation", params={"nonce": "zz"})
    assert r.status_code == 400 and "hex" in r.json()["error"]
    with pytest.raises(ValueError):
        attest_report_data(b"\0" * 65)


def test_the_client_refuses_an_attestation_over_another_value() -> None:
    """A node (or a proxy) answering with a quote over the raw nonce is caught by the client itself."""
    nonce = b"\x02" * 32

    def handler(request: httpx.Request) -> httpx.Response:
        body = {
            "instance_id": "i",
            "app_id": "11" * 20,
            "compose_hash": "00" * 32,
            "quote": "",
            "event_log": "[]",
            "nonce": nonce.hex(),
            "report_data": nonce.ljust(64, b"\0").hex(),
            "vm_config": "{}",
            "app_compose": "{}",
        }
        return httpx.Response(200, json=body)

    node = NodeClient("http://node", transport=httpx.MockTransport(handler))
    with pytest.raises(NodeApiError, match="does not bind our nonce"):
        node.attestation("i", nonce)


# The stated bound of the attestation route's response: the agent's event-log bounds (1024 app events,
# 256 KiB of names and payloads, hex-doubled in JSON) + the quote + the app-compose (at most 512 KiB).
MAX_ATTESTATION_RESPONSE = 2 * 1024 * 1024


def test_the_attestation_response_stays_under_its_bound(running: tuple[TestClient, str]) -> None:
    from teecloud.agent.api import EmitEventRequest

    client, iid = running
    assert _NODES[iid]._cvm(iid).booted is not None
    svc = _AGENTS[iid]
    payload = "ab" * svc.limits.max_event_payload
    refused = 0
    for i in range(50):  # an app trying to bloat the shared node process (3.2 MiB asked for)
        try:
            svc.emit_event(EmitEventRequest(event=f"e{i}", payload=payload))
        except ClientError:
            refused += 1
    assert refused > 40
    r = client.get(f"/cvms/{iid}/attestation")
    assert r.status_code == 200 and len(r.content) < MAX_ATTESTATION_RESPONSE, len(r.content)
