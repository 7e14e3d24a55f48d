"""Threshold mode, the group's CA on chain and the app CA cache (issue 19): KmsGroup records the group's
P-256 CA key and the sha256 of its root CA certificate; a client keeps a root only if the chain names exactly
it. Each node keeps the group-signed app CA certificate of an (epoch, app, app CA key) once a CVM assembled
it, so the next boot of the same app spends no presignature; another key or epoch does not hit it; a node
keeps only a certificate that is exactly what it would sign, under its root."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.chain import ChainClient
from teecloud.chain.kmsgroup import CommitteeMember
from teecloud.keys import threshold_certs as tc
from teecloud.keys.certs import cert_to_pem
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsClientError
from teecloud.kms.threshold import GroupRecord
from teecloud.kms.threshold_client import ThresholdKeyProvider, group_ca_record, group_from_chain
from teecloud.kms.threshold_sign import AppCaCache
from tests.kms.conftest import World
from tests.kms.test_threshold_app_ca import (
    _ca,
    _chain,
    _root,
    cluster,  # noqa: F401 (fixture: five nodes with a group CA)
)
from tests.kms.test_threshold_nodes import Cluster, boot_hello

pytestmark = pytest.mark.slow


@pytest.fixture
def group_chain(tmp_path: Path) -> Iterator[ChainClient]:
    """A chain of its own for KmsGroup (the shared one authorizes apps for every test)."""
    chain = ChainClient.embedded(tmp_path / "group-chain")
    chain.deploy()
    yield chain
    chain.close()


def _record(chain: ChainClient, cluster: Cluster, *, root_pem: str | None) -> None:  # noqa: F811
    members = [
        CommitteeMember(i, bytes([i]) * 32, bytes(32), url) for i, url in sorted(cluster.group.nodes.items())
    ]
    kms_group = chain.kms_group
    kms_group.activate(kms_group.record_committee(1, cluster.group.t, cluster.group.commitments, members))
    if root_pem is not None:
        kms_group.record_ca(1, *group_ca_record(root_pem))


def _local(cluster: Cluster, root_pem: str) -> GroupRecord:  # noqa: F811
    g = cluster.group
    return GroupRecord(g.epoch, g.t, len(g.nodes), tuple(g.commitments), b"", root_pem)


def _self_signed_root(key: ec.EllipticCurvePrivateKey, not_before: int) -> x509.Certificate:
    """A root of the same shape as the group's, self-signed by `key` (a whole key: the attacker's)."""
    pub = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    to_sign = tc.root_ca_to_sign(pub, not_before=not_before)
    der = key.sign(to_sign.tbs, ec.ECDSA(hashes.SHA256()))
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(der)
    return tc.assemble_certificate(to_sign, r.to_bytes(32, "big") + s.to_bytes(32, "big"), key.public_key())


def _presigs(cluster: Cluster) -> dict[int, int]:  # noqa: F811
    return {i: len(_ca(n).pool.unused()) for i, n in cluster.nodes.items()}


def _records(cluster: Cluster, endpoint: str) -> dict[int, list[str]]:  # noqa: F811
    return {
        i: [r.decision for r in n.kms.audit.read() if r.endpoint == endpoint]
        for i, n in cluster.nodes.items()
    }


def test_the_root_is_kept_only_when_the_chain_names_it(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811
    group_chain: ChainClient,
) -> None:
    genuine = cluster.group.ca_root_cert
    _record(group_chain, cluster, root_pem=genuine)
    recorded = group_chain.kms_group.group_ca(1)
    assert recorded is not None
    assert (
        recorded.root_cert_hash
        == hashlib.sha256(_root(cluster).public_bytes(serialization.Encoding.DER)).digest()
    )

    # the genuine root: kept, and a CVM booted on the chain's group gets its app CA under it
    trusted = group_from_chain(group_chain.kms_group, 1, local=_local(cluster, genuine))
    assert trusted.ca_root_cert == genuine
    provider = ThresholdKeyProvider(trusted, cluster.provider()._clients, hedge_s=60.0)
    _, state = boot_hello(teecloud_home, world, provider)
    assert provider.ca_error == ""
    _chain(state)[1].verify_directly_issued_by(_root(cluster))

    # another root: an attacker's own key, or the group's key with another validity (a genuine signature
    # is not needed to be refused: the chain names one DER) — refused by name, from group.json or given
    attacker = _self_signed_root(ec.generate_private_key(ec.SECP256R1()), int(time.time()) - 60)
    other_validity = _self_signed_root(ec.generate_private_key(ec.SECP256R1()), int(time.time()) - 3600)
    for bad in (cert_to_pem(attacker), cert_to_pem(other_validity)):
        with pytest.raises(KmsClientError, match="root CA certificate given disagrees with the chain"):
            group_from_chain(group_chain.kms_group, 1, local=_local(cluster, bad))
        with pytest.raises(KmsClientError, match="disagrees with the chain"):
            group_from_chain(group_chain.kms_group, 1, ca_root_cert=bad)
    # generated mutations of the genuine PEM's DER: none is kept
    der = bytearray(_root(cluster).public_bytes(serialization.Encoding.DER))
    for pos in range(0, len(der), max(1, len(der) // 24)):
        mutated = bytearray(der)
        mutated[pos] ^= 0x01
        try:
            pem = cert_to_pem(x509.load_der_x509_certificate(bytes(mutated)))
        except (ValueError, x509.InvalidVersion):
            continue  # does not parse: nothing to hand over
        with pytest.raises(KmsClientError, match="disagrees with the chain"):
            group_from_chain(group_chain.kms_group, 1, ca_root_cert=pem)


def test_a_root_the_chain_does_not_record_is_refused(
    cluster: Cluster,  # noqa: F811
    group_chain: ChainClient,
) -> None:
    _record(group_chain, cluster, root_pem=None)
    with pytest.raises(KmsClientError, match="KmsGroup records no group CA for epoch 1"):
        group_from_chain(group_chain.kms_group, 1, local=_local(cluster, cluster.group.ca_root_cert))
    # no root given: a group without one (app CAs self-signed), not an error
    assert group_from_chain(group_chain.kms_group, 1).ca_root_cert == ""


def test_a_reboot_of_the_same_app_reuses_its_app_ca_and_spends_no_presignature(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811
) -> None:
    first = cluster.provider()
    app_id, state = boot_hello(teecloud_home, world, first)
    assert first.ca_error == "" and first.faults == {}
    signed = _records(cluster, api.PATH_THRESHOLD_SIGN_APP_CA)
    assert sum(d.count("allowed") for d in signed.values()) == 3
    kept = _records(cluster, api.PATH_THRESHOLD_KEEP_SIGNATURES)
    assert all(d == ["allowed"] for i, d in kept.items() if i in first._challenged)
    before = _presigs(cluster)

    # the same app boots again: its app CA key is the same (same epoch), a node's kept certificate is used
    again = cluster.provider()
    _, state2 = boot_hello(teecloud_home, world, again, app_id=app_id)
    assert again.ca_error == "" and again.faults == {}
    assert state2.keys.ca_key_pem == state.keys.ca_key_pem
    assert state2.keys.ca_cert_pem == state.keys.ca_cert_pem  # the same signature, re-used
    assert _presigs(cluster) == before  # no presignature spent
    assert _records(cluster, api.PATH_THRESHOLD_SIGN_APP_CA) == signed  # no node was asked to sign
    leaf, app_ca = _chain(state2)
    app_ca.verify_directly_issued_by(_root(cluster))
    leaf.verify_directly_issued_by(app_ca)

    # another app (another app CA key): no hit, it is signed
    _, other = boot_hello(teecloud_home, world, cluster.provider())
    assert other.keys.ca_cert_pem != state.keys.ca_cert_pem
    assert sum(before.values()) - sum(_presigs(cluster).values()) == 3

    # nodes that serve something else from their cache: another app's certificate (a lie) is named and not
    # used; a non-canonical encoding of the genuine one (outer algorithm changed) is used only re-assembled
    genuine = x509.load_pem_x509_certificate(state.keys.ca_cert_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    outer = bytes.fromhex("300a06082a8648ce3d040302")
    at = genuine.rindex(outer)
    odd_pem = cert_to_pem(
        x509.load_der_x509_certificate(
            genuine[:at] + bytes.fromhex("300a06082a8648ce3d040303") + genuine[at + len(outer) :]
        )
    )
    # (kept certificates come in the nodes' evaluate answers: each node's answer is rewritten)
    ca_key = x509.load_pem_x509_certificate(state.keys.ca_cert_pem.encode()).public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    key33 = ca_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    served = {1: other.keys.ca_cert_pem, 2: odd_pem}
    for i in (1, 2, 3, 4, 5):

        def attach(
            answer: api.ThresholdEvaluateResponse, _app_id: bytes, text: str | None = served.get(i)
        ) -> None:
            answer.kept_app_ca = (
                api.KeptAppCa(app_ca_public_key=key33.hex(), certificate=text) if text else None
            )

        cluster.nodes[i].kms.service._attach_kept = attach  # type: ignore[method-assign]
    liar = cluster.provider()
    _, third = boot_hello(teecloud_home, world, liar, app_id=app_id)
    assert "kept app CA certificate refused" in liar.faults.get(1, ""), liar.faults
    assert third.keys.ca_cert_pem == state.keys.ca_cert_pem  # node 2's signature, canonically encoded
    _chain(third)[1].verify_directly_issued_by(_root(cluster))


def test_another_key_or_epoch_does_not_hit_and_a_node_keeps_only_what_it_would_sign(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811
) -> None:
    provider = cluster.provider()
    app_id, state = boot_hello(teecloud_home, world, provider)
    cert = x509.load_pem_x509_certificate(state.keys.ca_cert_pem.encode())
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub33 = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint).hex()
    node = cluster.nodes[provider._challenged[0]]
    service = node.kms.service

    def ask(**changes: object) -> api.AppCaCachedResponse:
        body = {"epoch": 1, "app_id": app_id.hex(), "app_ca_public_key": pub33, **changes}
        return service.app_ca_cached(api.AppCaCachedRequest(**body))  # type: ignore[arg-type]

    assert ask().certificate == state.keys.ca_cert_pem
    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    other33 = other_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    assert ask(app_ca_public_key=other33.hex()).certificate == ""  # another key: a miss
    assert ask(app_id="ab" * 20).certificate == ""  # another app: a miss
    # another epoch: a node serves only its epochs; the cache itself keys by epoch
    with pytest.raises(AccessDenied, match="serves no root epoch 2"):
        ask(epoch=2)
    cache = service.app_ca_cache
    assert cache is not None
    assert cache.get(2, app_id, bytes.fromhex(pub33)) is None
    assert cache.get(1, app_id, bytes.fromhex(pub33)) == state.keys.ca_cert_pem

    # what a node keeps: exactly the TBS it builds for (app, key) under its root, signed by the group
    url = node.server.url
    good = {"epoch": 1, "app_id": app_id.hex(), "app_ca_public_key": pub33}
    foreign_root = _self_signed_root(ec.generate_private_key(ec.SECP256R1()), int(time.time()) - 60)
    cases = {
        "another app": {**good, "app_id": "cd" * 20, "certificate": state.keys.ca_cert_pem},
        "another key": {**good, "app_ca_public_key": other33.hex(), "certificate": state.keys.ca_cert_pem},
        "not the group's signature": {**good, "certificate": cert_to_pem(foreign_root)},
        "not a certificate": {**good, "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n"},
    }
    for what, body in cases.items():
        r = httpx.post(url + api.PATH_THRESHOLD_APP_CA_STORE, json=body, verify=False, timeout=30)
        assert r.status_code == 403 and r.json()["step"] == "request", (what, r.text)
    # a tampered signature of the genuine certificate (same TBS)
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    try:
        tampered = cert_to_pem(x509.load_der_x509_certificate(bytes(der)))
    except (ValueError, x509.InvalidVersion):
        tampered = ""
    if tampered:
        r = httpx.post(
            url + api.PATH_THRESHOLD_APP_CA_STORE,
            json={**good, "certificate": tampered},
            verify=False,
            timeout=30,
        )
        assert r.status_code == 403, r.text
    # generated mutations of the genuine certificate's DER (one flipped bit each, across the whole
    # certificate): none that parses is kept
    genuine = cert.public_bytes(serialization.Encoding.DER)
    tried = 0
    for pos in range(0, len(genuine), max(1, len(genuine) // 40)):
        mutated = bytearray(genuine)
        mutated[pos] ^= 0x04
        try:
            pem = cert_to_pem(x509.load_der_x509_certificate(bytes(mutated)))
        except (ValueError, x509.InvalidVersion):
            continue
        tried += 1
        r = httpx.post(
            url + api.PATH_THRESHOLD_APP_CA_STORE, json={**good, "certificate": pem}, verify=False, timeout=30
        )
        # refused, or (a bit outside the TBS and the signature values) checked and not kept again
        assert r.status_code in (400, 403) or r.json() == {"certificate": "", "stored": False}, (pos, r.text)
    assert tried >= 10
    assert cache.get(1, app_id, bytes.fromhex(pub33)) == state.keys.ca_cert_pem  # the kept one is unchanged

    # found by that loop: a certificate whose TBS and signature values are genuine but whose OUTER
    # signatureAlgorithm says ecdsa-with-SHA384 checks as "t nodes signed this TBS"; kept as sent, every
    # later boot of the app would get a chain OpenSSL refuses. A node keeps (and serves) the canonical
    # encoding re-assembled from the TBS and signature, never the bytes it was sent; the CVM too
    outer = bytes.fromhex("300a06082a8648ce3d040302")
    at = genuine.rindex(outer)
    odd = genuine[:at] + bytes.fromhex("300a06082a8648ce3d040303") + genuine[at + len(outer) :]
    odd_pem = cert_to_pem(x509.load_der_x509_certificate(odd))
    assert odd_pem != state.keys.ca_cert_pem
    cache._path(1, app_id, bytes.fromhex(pub33)).unlink()  # as if this node had never kept it
    r = httpx.post(
        url + api.PATH_THRESHOLD_APP_CA_STORE, json={**good, "certificate": odd_pem}, verify=False, timeout=30
    )
    assert r.status_code == 200 and r.json()["stored"] is True, r.text
    assert cache.get(1, app_id, bytes.fromhex(pub33)) == state.keys.ca_cert_pem  # canonical = the genuine
    assert ask().certificate == state.keys.ca_cert_pem
    # strict fields: 400
    for body in (
        {**good, "epoch": "1"},
        {**good, "app_id": "XY"},
        {**good, "extra": 1},
        {**good, "certificate": "x" * 5000},
    ):
        r = httpx.post(url + api.PATH_THRESHOLD_APP_CA_STORE, json=body, verify=False, timeout=30)
        assert r.status_code == 400, (body, r.text)
    r = httpx.post(
        url + api.PATH_THRESHOLD_APP_CA_CACHED, json={**good, "certificate": "x"}, verify=False, timeout=30
    )
    assert r.status_code == 400
    # the genuine one, again: already kept (the first stays)
    r = httpx.post(
        url + api.PATH_THRESHOLD_APP_CA_STORE,
        json={**good, "certificate": state.keys.ca_cert_pem},
        verify=False,
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["stored"] is False


def test_the_cache_is_sealed_bounded_and_checks_what_it_reads(tmp_path: Path) -> None:
    key = bytes(range(32))

    def seal(data: bytes) -> bytes:
        return bytes(b ^ key[i % 32] for i, b in enumerate(data))  # a stand-in sealer (reversible)

    cache = AppCaCache(tmp_path / "c", seal, seal, max_entries=3)
    pems = {}
    for k in range(5):
        app = bytes([k]) * 20
        pems[k] = f"PEM-{k}"
        assert cache.put(1, app, b"\x02" + bytes([k]) * 32, pems[k]) is True
        time.sleep(0.01)  # distinct mtimes: the oldest goes first
    files = sorted((tmp_path / "c").glob("*.sealed"))
    assert len(files) == 3  # bounded
    assert all(b"PEM-" not in f.read_bytes() for f in files)  # sealed, not plaintext
    assert cache.get(1, bytes([0]) * 20, b"\x02" + bytes([0]) * 32) is None  # dropped (oldest)
    assert cache.get(1, bytes([4]) * 20, b"\x02" + bytes([4]) * 32) == "PEM-4"
    assert cache.get(2, bytes([4]) * 20, b"\x02" + bytes([4]) * 32) is None  # another epoch: a miss
    # the host renames one entry's file over another's name: the record names its own entry, so no hit
    a = cache._path(1, bytes([4]) * 20, b"\x02" + bytes([4]) * 32)
    b = cache._path(1, bytes([3]) * 20, b"\x02" + bytes([3]) * 32)
    b.write_bytes(a.read_bytes())
    assert cache.get(1, bytes([3]) * 20, b"\x02" + bytes([3]) * 32) is None
    b.write_bytes(b"garbage")
    assert cache.get(1, bytes([3]) * 20, b"\x02" + bytes([3]) * 32) is None
    assert not list((tmp_path / "c").glob("*.tmp"))  # atomic writes leave no temp files


def test_signcert_on_a_threshold_node_is_a_clear_refusal(
    teecloud_home: Path,
    world: World,
    cluster: Cluster,  # noqa: F811
) -> None:
    """dstack's SignCert (a KMS-issued leaf under the app CA) is not served: no node holds the app CA key; the
    guest agent issues leaves itself under its group-signed app CA (GetTlsKey), which verifies to the root."""
    from teecloud.kms.service import SIGNCERT_THRESHOLD_REFUSAL

    for node in cluster.nodes.values():
        r = httpx.post(
            node.server.url + api.PATH_SIGN_CERT,
            json={"csr": "-----BEGIN CERTIFICATE REQUEST-----\n", "vm_config": "{}"},
            verify=False,
            timeout=30,
        )
        assert r.status_code == 403, r.text
        assert (r.json()["reason"], r.json()["step"]) == (SIGNCERT_THRESHOLD_REFUSAL, "mode")
        assert "GetTlsKey" in r.json()["reason"]
    # what a threshold CVM does instead: its agent's leaf chains to the group root through its app CA
    _, state = boot_hello(teecloud_home, world, cluster.provider())
    leaf, app_ca = _chain(state)
    leaf.verify_directly_issued_by(app_ca)
    app_ca.verify_directly_issued_by(_root(cluster))
