"""Threshold mode, signatures as the KMS: five KMS nodes (each its own KmsService, RA-TLS listener, data
directory and sealed shares), a CVM booted through ThresholdKeyProvider, and the guest agent's GetKey, whose
chain ends in a signature made by 3 nodes jointly that verifies under the group's signing key only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import coincurve
import pytest

from teecloud.agent import api as agent_api
from teecloud.agent.service import AgentService, ClientError
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.sigchain import verify_key_signature_chain
from teecloud.kms import api
from teecloud.kms.bootstrap import boot_kms_tee
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold import ThresholdEvaluator, local_joint_feldman
from teecloud.kms.threshold_client import ThresholdGroup
from teecloud.kms.threshold_sign import ThresholdSigner, open_signer, save_signing_share
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import SigningMaterial, World, post_with_cert, stop_servers
from tests.kms.test_quote_oracle import GetQuoteOracle, attacker_cert
from tests.kms.test_threshold_nodes import Cluster, N, T, boot_hello, start_node

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(teecloud_home: Path, world: World, signing_material: SigningMaterial) -> Iterator[Cluster]:
    shares = local_joint_feldman(T, N, epoch=1)
    keys = signing_material.keys  # dealt once per session; the nodes, homes and pools are this test's
    nodes = {}
    try:
        for s in shares:
            node = start_node(teecloud_home, world.chain, s)
            home = teecloud_home / f"kms-node-{s.index}"
            tee = SimulatedTdx(teecloud_home)
            identity = boot_kms_tee(tee)
            save_signing_share(keys[s.index - 1], tee, identity, home)
            signer = open_signer(tee, identity, home)
            assert signer is not None
            node.kms.service.threshold = ThresholdEvaluator(s, signer=signer)
            nodes[s.index] = node
        for batch in signing_material.presigs:  # presigning rounds (here in one process: see docs/kms.md)
            for i, p in batch.items():
                _signer(nodes[i]).pool.add([p])
        group = ThresholdGroup(
            epoch=1,
            t=T,
            commitments=shares[0].commitments,
            nodes={i: n.server.url for i, n in nodes.items()},
            signing_key=keys[0].group_public_key,
        )
        yield Cluster(nodes, group, SimulatedTdx(teecloud_home), shares)
    finally:
        stop_servers(n.server for n in nodes.values())


def _signer(node: object) -> ThresholdSigner:
    ev = node.kms.service.threshold  # type: ignore[attr-defined]
    assert ev is not None and ev.signer is not None
    return ev.signer  # type: ignore[no-any-return]


def _get_key(state: object, path: str = "wallet/eth", purpose: str = "ethereum") -> tuple[bytes, list[bytes]]:
    body = json.loads(AgentService(state).get_key(agent_api.GetKeyRequest(path=path, purpose=purpose)))  # type: ignore[arg-type]
    return bytes.fromhex(body["key"]), [bytes.fromhex(s) for s in body["signature_chain"]]


def test_getkey_works_in_threshold_mode_and_verifies_under_the_group_key(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    provider = cluster.provider()
    app_id, state = boot_hello(teecloud_home, world, provider)
    assert provider.faults == {}
    assert state.keys.kms_k256_pubkey == cluster.group.signing_key
    key, chain = _get_key(state)
    pub = coincurve.PrivateKey(key).public_key.format(compressed=True)
    app_pub = verify_key_signature_chain(
        app_id=app_id,
        public_key=pub,
        purpose="ethereum",
        signature_chain=chain,
        kms_root_public_key=cluster.group.signing_key,
    )
    assert app_pub == coincurve.PrivateKey(state.keys.k256_key).public_key.format(compressed=True)
    # the KMS signature is an ordinary one: libsecp256k1 recovers the group key from it
    from teecloud.keys.sigchain import kms_issued_digest

    recovered = coincurve.PublicKey.from_signature_and_message(
        chain[1], kms_issued_digest(app_id, app_pub), hasher=None
    )
    assert recovered.format(compressed=True) == cluster.group.signing_key
    # each node that signed judged the request itself and audited it
    signed = [
        i
        for i, n in cluster.nodes.items()
        if any(r.endpoint == api.PATH_THRESHOLD_SIGN for r in n.kms.audit.read())
    ]
    assert len(signed) == T
    # a second boot of the same app: same app key, the signature the nodes kept from the first boot (issue
    # 19: one round per repeat boot; tests/kms/test_threshold_kept_signatures.py), same chain root
    unused = sum(len(_signer(n).pool.unused()) for n in cluster.nodes.values())
    _, again = boot_hello(teecloud_home, world, cluster.provider(), app_id=app_id)
    assert again.keys.k256_key == state.keys.k256_key
    assert again.keys.k256_signature == state.keys.k256_signature
    assert sum(len(_signer(n).pool.unused()) for n in cluster.nodes.values()) == unused
    assert _get_key(again)[0] == key


def test_a_lying_signer_is_named_and_two_dead_nodes_do_not_stop_getkey(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    liar = _signer(cluster.nodes[2])
    real_sign = liar.pool.sign

    def bad_sign(session: bytes, digest: bytes) -> te.SignatureShare:
        s = real_sign(session, digest)
        return te.SignatureShare(s.index, (s.s + 1) % te.ORDER)

    liar.pool.sign = bad_sign  # type: ignore[method-assign]
    provider = cluster.provider()
    app_id, state = boot_hello(teecloud_home, world, provider)
    assert set(provider.faults) == {2} and "signature share does not verify" in provider.faults[2]
    key, chain = _get_key(state)
    verify_key_signature_chain(
        app_id=app_id,
        public_key=coincurve.PrivateKey(key).public_key.format(compressed=True),
        purpose="ethereum",
        signature_chain=chain,
        kms_root_public_key=cluster.group.signing_key,
    )
    liar.pool.sign = real_sign  # type: ignore[method-assign]
    cluster.nodes[1].server.stop()
    cluster.nodes[4].server.stop()
    provider = cluster.provider()
    _, third = boot_hello(teecloud_home, world, provider, app_id=app_id)
    assert set(provider.faults) == {1, 4}
    assert third.keys.k256_key == state.keys.k256_key and len(third.keys.k256_signature) == 65
    assert _get_key(third)[0] == key


def test_the_sign_route_refuses_the_quote_oracle_and_t_minus_1_cannot_sign(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    provider = cluster.provider()
    app_id, state = boot_hello(teecloud_home, world, provider)
    oracle = GetQuoteOracle(AgentService(state))
    vm = json.dumps(state.vm_config) if state.vm_config else ""
    session = _signer(cluster.nodes[1]).pool.unused()[0]
    for i, node in cluster.nodes.items():
        k, der = attacker_cert(node.kms, oracle, state.app_id)
        status, body = post_with_cert(
            node.server.url,
            api.PATH_THRESHOLD_SIGN,
            k,
            der,
            {"vm_config": vm, "app_public_key": "02" + "11" * 32, "session": session.hex()},
        )
        assert status == 403 and body["step"] == "boot_time" and "s" not in body, (i, body)
    assert session in _signer(cluster.nodes[1]).pool.unused()  # nothing was bound by a refused request
    for i in (1, 2, 5):
        cluster.nodes[i].server.stop()
    with pytest.raises(KmsClientError):
        boot_hello(teecloud_home, world, cluster.provider(), app_id=app_id)


def test_getkey_without_a_signing_key_is_a_clear_error(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    import dataclasses

    cluster.group = dataclasses.replace(cluster.group, signing_key=b"")
    _, state = boot_hello(teecloud_home, world, cluster.provider())
    with pytest.raises(ClientError, match="KMS signature of this app's key") as refused:
        _get_key(state)
    assert refused.value.status == 400  # configuration: this group does not sign


def test_an_exhausted_pool_does_not_stop_the_boot(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """Every presignature used (for other messages): the app still boots with its keys; GetKey refuses with
    the reason instead of a chain; no presignature signed a second message."""
    for node in cluster.nodes.values():
        pool = _signer(node).pool
        for k, session in enumerate(pool.unused()):
            pool.sign(session, k.to_bytes(32, "big"))
    provider = cluster.provider()
    _, state = boot_hello(teecloud_home, world, provider)
    assert provider.signature_error.startswith("no presignatures, refill in progress")
    assert "no presignature is held by 3" in provider.signature_error
    assert state.keys.k256_signature == b"" and len(state.keys.k256_key) == 32
    # a clear 503 at once (no wait for a refill): the signature is made at boot only, a restart gets it
    with pytest.raises(
        ClientError, match=r"not obtained at boot \(no presignatures, refill in progress"
    ) as e:
        _get_key(state)
    assert e.value.status == 503
