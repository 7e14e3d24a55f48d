"""One boot, one RA-TLS credential, one kept-alive connection per node (issue 19, performance): a request
on a kept connection is judged by the node's whole key-release rule like the first one. Between two rounds
of one boot on one connection, the attacker-relevant changes — the instance retired on chain, the compose
hash removed, the boot challenge used up — refuse the next request; the connection is the same one (the
node's audit names one peer address), and nothing is released."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from teecloud.kms import api
from teecloud.kms.client import BootCredential, KmsClient, vm_config_json
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.threshold_client import ThresholdKeyProvider
from teecloud.tee.simulated import SimulatedTdx
from tests.kms import test_threshold_nodes
from tests.kms.conftest import COMPOSE_V1, World
from tests.kms.test_threshold_nodes import Cluster

pytestmark = pytest.mark.slow

cluster = test_threshold_nodes.cluster  # five nodes, 3-of-5 (the fixture of test_threshold_nodes)


def booting_cvm(home: Path, provider: ThresholdKeyProvider, app_id: bytes) -> tuple[SimulatedTdx, bytes]:
    """A CVM at boot time that measured the provider's boot-nonce (the boot sequence's events)."""
    tee = SimulatedTdx(home)
    iid = os.urandom(20)
    for name, payload in (
        ("system-preparing", b""),
        ("app-id", app_id),
        ("compose-hash", COMPOSE_V1),
        ("instance-id", iid),
        ("boot-nonce", provider.boot_nonce()),
        ("boot-mr-done", b""),
        ("os-image-hash", tee.os_image_hash),
    ):
        tee.emit_event(name, payload)
    return tee, iid


def evaluate(client: KmsClient, tee: SimulatedTdx, app_id: bytes) -> api.ThresholdEvaluateResponse:
    return client.attested_call(
        tee,
        api.PATH_THRESHOLD_EVALUATE,
        api.ThresholdEvaluateResponse,
        body=api.ThresholdEvaluateRequest(vm_config=vm_config_json(tee), epoch=1).model_dump(),
        usage="app:kms-client",
        app_id=app_id,
    )


def _retire(world: World, app_id: bytes, iid: bytes) -> None:
    world.chain.retire_instance("0x" + app_id.hex(), iid)


def _remove_compose(world: World, app_id: bytes, iid: bytes) -> None:
    world.chain.remove_compose_hash("0x" + app_id.hex(), COMPOSE_V1)


CHANGES: dict[str, tuple[Callable[[World, bytes, bytes], None], str]] = {
    "instance retired": (_retire, "instance retired"),
    "compose hash removed": (_remove_compose, ""),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_chain_change_between_rounds_refuses_the_next_request_on_the_kept_connection(
    teecloud_home: Path, world: World, cluster: Cluster, change: str
) -> None:
    provider = cluster.provider()
    app_id = world.register(COMPOSE_V1)
    tee, iid = booting_cvm(teecloud_home, provider, app_id)
    node = cluster.nodes[1]
    client = provider._clients[1]
    with provider._boot(tee, app_id):
        first = evaluate(client, tee, app_id)  # round 1: allowed
        assert first.index == 1 and len(first.partials) == 2
        apply, reason = CHANGES[change]
        apply(world, app_id, iid)
        with pytest.raises(KmsDenied) as denied:  # round 2, same boot, same connection
            evaluate(client, tee, app_id)
    assert denied.value.step == "chain", denied.value
    assert reason in str(denied.value)
    records = [r for r in node.kms.audit.read() if r.endpoint == api.PATH_THRESHOLD_EVALUATE]
    allowed, refused = records[-2], records[-1]
    assert (allowed.decision, refused.decision) == ("allowed", "denied")
    assert refused.step == "chain"
    # one connection (the same client address and port) and one certificate for both requests
    assert allowed.peer == refused.peer and allowed.peer
    assert allowed.cert_sha256 == refused.cert_sha256 and allowed.cert_sha256


def test_the_boot_challenge_counts_every_request_on_the_kept_connection(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """The boot challenge's use count is not per connection: its max_uses requests pass, the next one on
    the same connection is refused at step boot_nonce."""
    provider = cluster.provider()
    app_id = world.register(COMPOSE_V1)
    tee, _ = booting_cvm(teecloud_home, provider, app_id)
    node = cluster.nodes[2]
    uses = node.kms.service.challenges.max_uses
    with provider._boot(tee, app_id):
        for _ in range(uses):
            evaluate(provider._clients[2], tee, app_id)
        with pytest.raises(KmsDenied) as denied:
            evaluate(provider._clients[2], tee, app_id)
    assert denied.value.step == "boot_nonce", denied.value
    records = [r for r in node.kms.audit.read() if r.endpoint == api.PATH_THRESHOLD_EVALUATE][-(uses + 1) :]
    assert len({r.peer for r in records}) == 1  # all on one kept connection
    assert [r.decision for r in records] == ["allowed"] * uses + ["denied"]


def test_one_boot_is_one_quote_one_connection_per_node_and_ends_with_the_boot(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """A whole threshold release: each node that answered saw one client certificate and one connection
    for all of the boot's requests; the certificates of different nodes carry the same quote (one quote per
    boot); after the boot, a call for the same CVM makes a fresh credential and connection of its own."""
    provider = cluster.provider()
    app_id = world.register(COMPOSE_V1)
    tee, iid = booting_cvm(teecloud_home, provider, app_id)
    quotes: list[bytes] = []
    real_quote = tee.quote

    def counting_quote(report_data: bytes) -> bytes:
        quotes.append(report_data)
        return real_quote(report_data)

    tee.quote = counting_quote  # type: ignore[method-assign]
    before = {i: len(n.kms.audit.read()) for i, n in cluster.nodes.items()}
    keys = provider.get_app_keys(tee, app_id, iid)
    assert keys.disk_crypt_key and provider.faults == {}
    assert len(quotes) == 1  # one quote for the boot, whichever nodes it called
    asked = 0
    for i, n in cluster.nodes.items():
        records = n.kms.audit.read()[before[i] :]
        if records:
            asked += 1
            assert len({r.peer for r in records}) == 1 and len({r.cert_sha256 for r in records}) == 1
            assert all(r.decision == "allowed" for r in records)
    assert asked >= cluster.group.t
    # the boot is over: nothing of it is bound; a call for this CVM makes its own credential (a new quote)
    assert all(c._boot_of(tee, "app:kms-client", app_id) is None for c in provider._clients.values())
    evaluate(provider._clients[1], tee, app_id)
    assert len(quotes) == 2


def test_a_boot_credential_quotes_only_its_own_key(teecloud_home: Path) -> None:
    """The one quote of a boot binds the boot's key: the credential's quote source refuses to quote other
    report data (a second key could otherwise ride on the boot's evidence)."""
    tee = SimulatedTdx(teecloud_home)
    credential = BootCredential(tee, usage="app:kms-client", app_id=b"\x11" * 20)
    evidence = credential._evidence
    first = evidence.quote(b"\x01" * 64)
    assert evidence.quote(b"\x01" * 64) == first
    with pytest.raises(KmsClientError):
        evidence.quote(b"\x02" * 64)
