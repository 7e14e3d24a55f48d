"""Threshold mode: the group a CVM's key provider trusts comes from the chain (KmsGroup), signing key
included, read at a finality depth; a local group.json that disagrees with the chain is refused."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path

import coincurve
import pytest

from teecloud.agent import api as agent_api
from teecloud.agent.service import AgentService
from teecloud.chain import ChainClient
from teecloud.chain.kmsgroup import CommitteeMember
from teecloud.keys.sigchain import kms_issued_digest, verify_key_signature_chain
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold import GroupRecord
from teecloud.kms.threshold_client import ThresholdKeyProvider, group_from_chain
from tests.kms.conftest import World
from tests.kms.test_threshold_getkey import cluster  # noqa: F401 (fixture: five signing nodes)
from tests.kms.test_threshold_nodes import Cluster, boot_hello

pytestmark = pytest.mark.slow


@pytest.fixture
def group_chain(tmp_path: Path) -> Iterator[ChainClient]:
    """A chain of its own for KmsGroup (the module's shared chain authorizes; recording a committee there
    would supersede other tests' committees of epoch 1)."""
    chain = ChainClient.embedded(tmp_path / "group-chain")
    chain.deploy()
    yield chain
    chain.close()


def _record(chain: ChainClient, nodes: Cluster, *, signing_key: bytes | None) -> None:
    members = [
        CommitteeMember(i, bytes([i]) * 32, bytes(32), url) for i, url in sorted(nodes.group.nodes.items())
    ]
    kms_group = chain.kms_group
    kms_group.activate(kms_group.record_committee(1, nodes.group.t, nodes.group.commitments, members))
    if signing_key is not None:
        kms_group.record_signing_key(1, signing_key)


def _local(nodes: Cluster, **changes: object) -> GroupRecord:
    g = nodes.group
    rec = GroupRecord(g.epoch, g.t, len(g.nodes), tuple(g.commitments), g.signing_key)
    return dataclasses.replace(rec, **changes)  # type: ignore[arg-type]


def test_getkey_verifies_under_the_signing_key_on_chain(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811
    group_chain: ChainClient,
) -> None:
    _record(group_chain, cluster, signing_key=cluster.group.signing_key)
    on_chain = group_chain.kms_group.signing_key(1)
    assert on_chain is not None
    trusted = group_from_chain(group_chain.kms_group, 1, local=_local(cluster))
    assert trusted.signing_key == on_chain
    assert (trusted.t, trusted.commitments, dict(trusted.nodes)) == (
        cluster.group.t,
        cluster.group.commitments,
        dict(cluster.group.nodes),
    )
    clients = cluster.provider()._clients
    provider = ThresholdKeyProvider(trusted, clients, hedge_s=60.0)
    app_id, state = boot_hello(teecloud_home, world, provider)
    assert provider.signature_error == "" and state.keys.kms_k256_pubkey == on_chain
    body = json.loads(AgentService(state).get_key(agent_api.GetKeyRequest(path="p", purpose="x")))
    key = bytes.fromhex(body["key"])
    chain_sigs = [bytes.fromhex(s) for s in body["signature_chain"]]
    app_pub = verify_key_signature_chain(
        app_id=app_id,
        public_key=coincurve.PrivateKey(key).public_key.format(compressed=True),
        purpose="x",
        signature_chain=chain_sigs,
        kms_root_public_key=on_chain,
    )
    recovered = coincurve.PublicKey.from_signature_and_message(
        chain_sigs[1], kms_issued_digest(app_id, app_pub), hasher=None
    )
    assert recovered.format(compressed=True) == on_chain  # libsecp256k1 as the referee


def test_a_group_json_that_disagrees_with_the_chain_is_refused(
    cluster: Cluster,  # noqa: F811
    group_chain: ChainClient,
) -> None:
    _record(group_chain, cluster, signing_key=cluster.group.signing_key)
    kms_group = group_chain.kms_group
    other_key = coincurve.PrivateKey().public_key.format(compressed=True)
    with pytest.raises(KmsClientError, match=r"group\.json disagrees with the chain: its signing key"):
        group_from_chain(kms_group, 1, local=_local(cluster, signing_key=other_key))
    other_group = (bytes(31) + b"\x01", *cluster.group.commitments[1:])
    with pytest.raises(KmsClientError, match=r"group\.json disagrees with the chain: its group key"):
        group_from_chain(kms_group, 1, local=_local(cluster, commitments=other_group))
    # a file of another epoch says nothing about this one; no file: the chain alone
    assert group_from_chain(kms_group, 1, local=_local(cluster, epoch=2, signing_key=other_key))
    assert group_from_chain(kms_group, 1).signing_key == cluster.group.signing_key
    with pytest.raises(KmsClientError, match="no committee serving root epoch 2"):
        group_from_chain(kms_group, 2)


def test_a_signing_key_not_recorded_on_chain_is_refused_and_depth_counts(
    cluster: Cluster,  # noqa: F811
    group_chain: ChainClient,
) -> None:
    _record(group_chain, cluster, signing_key=None)
    kms_group = group_chain.kms_group
    with pytest.raises(KmsClientError, match=r"its signing key .* \(none\); refusing it"):
        group_from_chain(kms_group, 1, local=_local(cluster))
    assert group_from_chain(kms_group, 1).signing_key == b""  # the chain says: this group does not sign
    kms_group.record_signing_key(1, cluster.group.signing_key)
    # one block deep: at finality depth 1 the key is not recorded yet, so the file's key is refused
    with pytest.raises(KmsClientError, match=r"\(none\); refusing it"):
        group_from_chain(kms_group, 1, finality_depth=1, local=_local(cluster))
    assert group_from_chain(kms_group, 1, finality_depth=0, local=_local(cluster)).signing_key
    with pytest.raises(KmsClientError, match="fewer than the finality depth"):
        group_from_chain(kms_group, 1, finality_depth=group_chain.head().number + 1)


def test_generated_mutations_of_the_files_keys_are_refused(
    cluster: Cluster,  # noqa: F811
    group_chain: ChainClient,
) -> None:
    """One-byte changes anywhere in group.json's signing key or group key: each refused."""
    _record(group_chain, cluster, signing_key=cluster.group.signing_key)
    kms_group = group_chain.kms_group
    rng = random.Random(19)
    for field, value in (
        ("signing_key", cluster.group.signing_key),
        ("group_key", cluster.group.commitments[0]),
    ):
        for pos in [0, len(value) - 1, *rng.sample(range(1, len(value) - 1), 4)]:
            mutated = bytearray(value)
            mutated[pos] ^= rng.randrange(1, 256)
            if field == "signing_key":
                local = _local(cluster, signing_key=bytes(mutated))
            else:
                local = _local(cluster, commitments=(bytes(mutated), *cluster.group.commitments[1:]))
            with pytest.raises(KmsClientError, match="disagrees with the chain"):
                group_from_chain(kms_group, 1, local=local)
