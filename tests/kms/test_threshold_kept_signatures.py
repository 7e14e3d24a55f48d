"""Threshold mode, one attested round per repeat boot (issue 19): each node keeps, per (epoch, app_id), the
group's signature of the app's k256 key (and the key it covers) and which app CA certificate it keeps, and
returns them inside its ThresholdEvaluate answer once its whole key-release rule said yes. The CVM uses a
kept signature or certificate only after checking it against the keys it derived from the combined partials
and the group's keys; a node that serves anything else is named and the boot signs instead."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.agent.boot import boot
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_certs as tc
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.certs import cert_to_pem
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest, recover_k256
from teecloud.kms import api
from teecloud.kms.bootstrap import boot_kms_tee
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold import ThresholdEvaluator, local_joint_feldman
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider
from teecloud.kms.threshold_sign import (
    CA_SHARE_FILE,
    AppSignatureCache,
    KeptSignatures,
    ThresholdSigner,
    app_key_signature_problem,
    open_ca_signer,
    open_signer,
    save_signing_share,
)
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World, post_with_cert, stop_servers
from tests.kms.test_quote_oracle import HELLO, GetQuoteOracle, attacker_cert
from tests.kms.test_threshold_nodes import Cluster, N, T, boot_hello, start_node

pytestmark = pytest.mark.slow

ORDER = te.SECP256K1.order


class _Keys:
    """The group's whole keys, dealt in this process (dev only), so that a test can make genuine group
    signatures over messages no node would sign: what an attacker who saw them could replay."""

    signing: list[te.KeyShare]
    ca: list[te.KeyShare]


@pytest.fixture
def keys() -> _Keys:
    k = _Keys()
    k.signing = te.dkg_local(T, N)
    k.ca = te.dkg_local(T, N, group=te.P256)
    return k


@pytest.fixture
def cluster(teecloud_home: Path, world: World, keys: _Keys) -> Iterator[Cluster]:
    """Five nodes with the group's signing key and CA key (and its root), presignatures for both."""
    shares = local_joint_feldman(T, N, epoch=1)
    nodes = {}
    try:
        for s in shares:
            node = start_node(teecloud_home, world.chain, s, name="kept-node")
            home = teecloud_home / f"kept-node-{s.index}"
            tee = SimulatedTdx(teecloud_home)
            identity = boot_kms_tee(tee)
            save_signing_share(keys.signing[s.index - 1], tee, identity, home)
            save_signing_share(keys.ca[s.index - 1], tee, identity, home, file=CA_SHARE_FILE)
            signer = open_signer(tee, identity, home)
            assert signer is not None
            node.kms.service.threshold = ThresholdEvaluator(s, signer=signer)
            node.kms.service.ca_signer = open_ca_signer(tee, identity, home)
            nodes[s.index] = node
        for _ in range(16):  # presigning rounds (here in one process: see docs/kms.md)
            for i, p in te.presign_local(keys.signing, list(range(1, N + 1))).items():
                _signer(nodes[i]).pool.add([p])
            for i, p in te.presign_local(keys.ca, list(range(1, N + 1))).items():
                _ca(nodes[i]).pool.add([p])
        gpk = keys.ca[0].group_public_key
        to_sign = tc.root_ca_to_sign(gpk, not_before=int(time.time()) - 60)
        root = tc.assemble_certificate(
            to_sign,
            te.sign_local(te.presign_local(keys.ca, list(range(1, N + 1))), [1, 2, 3], to_sign.digest),
            tc.group_ca_public_key(gpk),
        )
        for node in nodes.values():
            _ca(node).install_ca_root(root)
        group = ThresholdGroup(
            epoch=1,
            t=T,
            commitments=shares[0].commitments,
            nodes={i: n.server.url for i, n in nodes.items()},
            signing_key=keys.signing[0].group_public_key,
            ca_root_cert=cert_to_pem(root),
        )
        yield Cluster(nodes, group, SimulatedTdx(teecloud_home), shares)
    finally:
        stop_servers(n.server for n in nodes.values())


def _signer(node: object) -> ThresholdSigner:
    ev = node.kms.service.threshold  # type: ignore[attr-defined]
    assert ev is not None and ev.signer is not None
    return ev.signer  # type: ignore[no-any-return]


def _ca(node: object) -> ThresholdSigner:
    signer = node.kms.service.ca_signer  # type: ignore[attr-defined]
    assert signer is not None
    return signer  # type: ignore[no-any-return]


def _records(cluster: Cluster, endpoint: str) -> dict[int, list[str]]:
    return {
        i: [r.decision for r in n.kms.audit.read() if r.endpoint == endpoint]
        for i, n in cluster.nodes.items()
    }


def _spent(cluster: Cluster) -> int:
    return sum(len(_signer(n).pool.unused()) + len(_ca(n).pool.unused()) for n in cluster.nodes.values())


def _group_sign(keys: list[te.KeyShare], digest: bytes) -> bytes:
    return te.sign_local(te.presign_local(keys, list(range(1, N + 1))), [1, 2, 3], digest)


def _serve(cluster: Cluster, kept: Callable[[int, api.ThresholdEvaluateResponse], None]) -> None:
    """Every node's evaluate answer carries what `kept(index, answer)` sets (a node's cache rewritten)."""
    for i, node in cluster.nodes.items():

        def attach(answer: api.ThresholdEvaluateResponse, _app_id: bytes, i: int = i) -> None:
            answer.kept_app_key, answer.kept_app_ca = None, None
            kept(i, answer)

        node.kms.service._attach_kept = attach  # type: ignore[method-assign]


def _check_signature(cluster: Cluster, app_id: bytes, state: object) -> None:
    k = state.keys  # type: ignore[attr-defined]
    pub = k256_public_key(k.k256_key)
    assert recover_k256(kms_issued_digest(app_id, pub), k.k256_signature) == cluster.group.signing_key
    ca = x509.load_pem_x509_certificate(k.ca_cert_pem.encode())
    ca.verify_directly_issued_by(x509.load_pem_x509_certificate(cluster.group.ca_root_cert.encode()))


def test_a_repeat_boot_is_one_attested_round(teecloud_home: Path, world: World, cluster: Cluster) -> None:
    first = cluster.provider()
    app_id, state = boot_hello(teecloud_home, world, first)
    assert first.faults == {} and first.signature_error == "" and first.ca_error == ""
    _check_signature(cluster, app_id, state)
    # the first boot: one evaluation round, one signing round (both signatures), then every challenged node
    # is handed both to keep (attested, judged like an evaluation)
    assert sum(d.count("allowed") for d in _records(cluster, api.PATH_THRESHOLD_SIGN).values()) == T
    assert sum(d.count("allowed") for d in _records(cluster, api.PATH_THRESHOLD_SIGN_APP_CA).values()) == T
    kept = _records(cluster, api.PATH_THRESHOLD_KEEP_SIGNATURES)
    assert {i for i, d in kept.items() if d == ["allowed"]} == set(first._challenged)
    for i in first._challenged:
        got = cluster.nodes[i].kms.service.app_signatures.get(1, app_id)
        assert got is not None and got.signature == state.keys.k256_signature
    before = {p: _records(cluster, p) for p in (api.PATH_THRESHOLD_SIGN, api.PATH_THRESHOLD_SIGN_APP_CA)}
    evaluated = _records(cluster, api.PATH_THRESHOLD_EVALUATE)
    presigs = _spent(cluster)

    # a repeat boot of the same app (another instance): ThresholdEvaluate at t nodes, nothing else
    again = cluster.provider()
    _, state2 = boot_hello(teecloud_home, world, again, app_id=app_id)
    assert again.faults == {} and again.signature_error == "" and again.ca_error == ""
    assert state2.keys.k256_key == state.keys.k256_key
    assert state2.keys.k256_signature == state.keys.k256_signature
    assert state2.keys.ca_cert_pem == state.keys.ca_cert_pem
    _check_signature(cluster, app_id, state2)
    assert {p: _records(cluster, p) for p in before} == before  # no node was asked to sign
    assert _records(cluster, api.PATH_THRESHOLD_KEEP_SIGNATURES) == kept  # nor to keep
    assert _spent(cluster) == presigs  # no presignature spent
    now = _records(cluster, api.PATH_THRESHOLD_EVALUATE)
    assert sum(len(now[i]) - len(evaluated[i]) for i in now) == T  # one round, at t nodes

    # one node's kept copy is enough (the others lost theirs)
    for i in again._challenged[1:]:
        cluster.nodes[i].kms.service.app_signatures = None
    third = cluster.provider()
    _, state3 = boot_hello(teecloud_home, world, third, app_id=app_id)
    assert third.faults == {} and state3.keys.k256_signature == state.keys.k256_signature
    assert _spent(cluster) == presigs


def test_a_node_serving_a_wrong_kept_signature_is_named_and_the_boot_signs(
    teecloud_home: Path, world: World, cluster: Cluster, keys: _Keys
) -> None:
    app_id, state = boot_hello(teecloud_home, world, cluster.provider())
    _other_id, other = boot_hello(teecloud_home, world, cluster.provider())
    pub = k256_public_key(state.keys.k256_key)
    genuine = state.keys.k256_signature
    stranger = k256_public_key(bytes([7]) * 32)
    r, s, v = genuine[:32], int.from_bytes(genuine[32:64], "big"), genuine[64]
    flipped = bytearray(genuine)
    flipped[10] ^= 0x01
    lies = {
        "another app's key and signature": (k256_public_key(other.keys.k256_key), other.keys.k256_signature),
        "this key, another app's signature": (pub, other.keys.k256_signature),
        "a tampered signature": (pub, bytes(flipped)),
        "the same signature, high s (malleated)": (pub, r + (ORDER - s).to_bytes(32, "big") + bytes([v ^ 1])),
        # a genuine group signature for this app, but of another public key than the one the CVM derives:
        # what a kept signature of another epoch is (the epoch is an input of the app key's derivation)
        "a group signature of another key for this app (another epoch's)": (
            stranger,
            _group_sign(keys.signing, kms_issued_digest(app_id, stranger)),
        ),
        "a group signature of another key, claimed for this key": (
            pub,
            _group_sign(keys.signing, kms_issued_digest(app_id, stranger)),
        ),
        "a signature under another group's key": (
            pub,
            _group_sign(te.dkg_local(T, N), kms_issued_digest(app_id, pub)),
        ),
    }
    for what, (claimed, sig) in lies.items():
        signed = sum(d.count("allowed") for d in _records(cluster, api.PATH_THRESHOLD_SIGN).values())
        # node 1 lies, the other nodes keep nothing: the boot names node 1 and runs the signing round
        _serve(
            cluster,
            lambda i, a, c=claimed, g=sig: setattr(
                a,
                "kept_app_key",
                api.KeptAppKey(app_public_key=c.hex(), signature=g.hex()) if i == 1 else None,
            ),
        )
        liar = cluster.provider()
        _, got = boot_hello(teecloud_home, world, liar, app_id=app_id)
        assert "kept app-key signature refused" in liar.faults.get(1, ""), (what, liar.faults)
        assert set(liar.faults) == {1}, (what, liar.faults)
        _check_signature(cluster, app_id, got)
        after = sum(d.count("allowed") for d in _records(cluster, api.PATH_THRESHOLD_SIGN).values())
        assert after == signed + T, what  # it signed
        assert liar.signature_error == "", what

    # node 1 lies and node 2 keeps the genuine one: node 2's is used, node 1 named, nothing signed
    sign_records = _records(cluster, api.PATH_THRESHOLD_SIGN)
    _serve(
        cluster,
        lambda i, a: setattr(
            a,
            "kept_app_key",
            api.KeptAppKey(app_public_key=pub.hex(), signature=(genuine if i == 2 else bytes(flipped)).hex())
            if i in (1, 2)
            else None,
        ),
    )
    liar = cluster.provider()
    _, got = boot_hello(teecloud_home, world, liar, app_id=app_id)
    assert set(liar.faults) == {1} and got.keys.k256_signature == genuine
    assert _records(cluster, api.PATH_THRESHOLD_SIGN) == sign_records


def test_a_node_serving_a_wrong_kept_app_ca_is_named_and_the_boot_signs(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    app_id, state = boot_hello(teecloud_home, world, cluster.provider())
    _, other = boot_hello(teecloud_home, world, cluster.provider())

    def key33(pem: str) -> str:
        k = x509.load_pem_x509_certificate(pem.encode()).public_key()
        assert isinstance(k, ec.EllipticCurvePublicKey)
        return k.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint).hex()

    ours, theirs = key33(state.keys.ca_cert_pem), key33(other.keys.ca_cert_pem)
    der = bytearray(
        x509.load_pem_x509_certificate(state.keys.ca_cert_pem.encode()).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-3] ^= 0x01
    lies = {
        "another app's certificate and key": (theirs, other.keys.ca_cert_pem),
        "another app's certificate for this key": (ours, other.keys.ca_cert_pem),
        "this certificate, named for another key": (theirs, state.keys.ca_cert_pem),
        "a tampered signature": (ours, cert_to_pem(x509.load_der_x509_certificate(bytes(der)))),
    }
    for what, (claimed, pem) in lies.items():
        signed = sum(d.count("allowed") for d in _records(cluster, api.PATH_THRESHOLD_SIGN_APP_CA).values())
        _serve(
            cluster,
            lambda i, a, c=claimed, p=pem: setattr(
                a, "kept_app_ca", api.KeptAppCa(app_ca_public_key=c, certificate=p) if i == 1 else None
            ),
        )
        liar = cluster.provider()
        _, got = boot_hello(teecloud_home, world, liar, app_id=app_id)
        assert "kept app CA certificate refused" in liar.faults.get(1, ""), (what, liar.faults)
        _check_signature(cluster, app_id, got)
        after = sum(d.count("allowed") for d in _records(cluster, api.PATH_THRESHOLD_SIGN_APP_CA).values())
        assert after == signed + T, what


def _keep_with(provider: ThresholdKeyProvider, **changes: object) -> None:
    """The provider's hand-over after a signing round, with the named arguments replaced (a CVM whose
    measured agent is genuine but which sends what the test says)."""
    original = provider._keep

    def keep(tee, app_id, epoch, app_pub, signature, app_ca_key_pem, certificate):  # type: ignore[no-untyped-def]
        args = {
            "app_id": app_id,
            "epoch": epoch,
            "app_pub": app_pub,
            "signature": signature,
            "app_ca_key_pem": app_ca_key_pem,
            "certificate": certificate,
            **changes,
        }
        original(tee, **args)  # type: ignore[arg-type]

    provider._keep = keep  # type: ignore[method-assign]


def test_a_node_keeps_only_the_group_signature_of_exactly_this_app(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """The attacker here is an attested CVM of app B (or anyone with app A's public signature): it hands a
    node app A's signature, a signature of another key, a tampered one, or asks for another epoch."""
    _a_id, a = boot_hello(teecloud_home, world, cluster.provider())
    a_pub = k256_public_key(a.keys.k256_key)
    good = a.keys.k256_signature
    mutated = []
    for pos in (0, 17, 31, 40, 63, 64):  # r, s and v
        m = bytearray(good)
        m[pos] ^= 0x04
        mutated.append(bytes(m))
    cases: dict[str, dict[str, object]] = {
        "app A's key and signature": {"app_pub": a_pub, "signature": good, "certificate": ""},
        "app A's certificate": {"signature": b"", "certificate": a.keys.ca_cert_pem},
        "another epoch": {"epoch": 2},
        **{f"mutation {k}": {"signature": m, "certificate": ""} for k, m in enumerate(mutated)},
    }
    for what, changes in cases.items():
        provider = cluster.provider()
        _keep_with(provider, **changes)
        before = _records(cluster, api.PATH_THRESHOLD_KEEP_SIGNATURES)
        b_id, _b = boot_hello(teecloud_home, world, provider)
        after = _records(cluster, api.PATH_THRESHOLD_KEEP_SIGNATURES)
        for i in provider._challenged:
            assert after[i][len(before[i]) :] == ["denied"], (what, i, after[i])
            kept = cluster.nodes[i].kms.service.app_signatures.get(1, b_id)
            assert kept is None, (what, kept)
            if what == "another epoch":
                assert cluster.nodes[i].kms.service.app_signatures.get(2, b_id) is None
    reasons = [
        r.reason
        for n in cluster.nodes.values()
        for r in n.kms.audit.read()
        if r.endpoint == api.PATH_THRESHOLD_KEEP_SIGNATURES and r.decision == "denied"
    ]
    assert any("refused" in x for x in reasons) and any("epoch" in x for x in reasons), reasons


def test_the_quote_oracle_gets_nothing_and_the_cache_is_not_read_before_the_rule(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    _app_id, state = boot_hello(teecloud_home, world, cluster.provider())
    oracle = GetQuoteOracle(AgentService(state))
    vm = json.dumps(state.vm_config) if state.vm_config else ""
    reads: list[int] = []
    for i, node in cluster.nodes.items():
        cache = node.kms.service.app_signatures
        assert cache is not None
        real = cache.get
        cache.get = lambda e, a, real=real, i=i: (reads.append(i), real(e, a))[1]  # type: ignore[method-assign]
    sig = state.keys.k256_signature.hex()
    for i, node in cluster.nodes.items():
        k, der = attacker_cert(node.kms, oracle, state.app_id)
        status, body = post_with_cert(node.server.url, api.PATH_THRESHOLD_EVALUATE, k, der, {"vm_config": vm})
        assert status == 403 and body["step"] == "boot_time", (i, body)
        assert sig not in json.dumps(body)
        status, body = post_with_cert(
            node.server.url,
            api.PATH_THRESHOLD_KEEP_SIGNATURES,
            k,
            der,
            {"vm_config": vm, "app_public_key": k256_public_key(state.keys.k256_key).hex(), "signature": sig},
        )
        assert status == 403 and body["step"] == "boot_time", (i, body)
    assert reads == []  # the cache was never consulted for a refused request
    # strict fields: 400, nothing judged
    url = cluster.nodes[1].server.url
    k, der = attacker_cert(cluster.nodes[1].kms, oracle, state.app_id)
    for bad in (
        {"signature": "zz" * 65},
        {"signature": sig[:-2]},
        {"app_public_key": "04" + "11" * 32},
        {"epoch": "1"},
        {"extra": 1},
        {"certificate": "x" * 5000},
    ):
        status, body = post_with_cert(url, api.PATH_THRESHOLD_KEEP_SIGNATURES, k, der, bad)
        assert status == 400, (bad, body)


def test_the_cache_is_sealed_bounded_and_refuses_a_swapped_or_stale_entry(
    tmp_path: Path, keys: _Keys
) -> None:
    key = bytes(range(32))

    def seal(data: bytes) -> bytes:
        return bytes(b ^ key[i % 32] for i, b in enumerate(data))  # a stand-in sealer (reversible)

    app_a, app_b = b"\xaa" * 20, b"\xbb" * 20
    pub_a = k256_public_key(bytes([3]) * 32)
    sig_a = _group_sign(keys.signing, kms_issued_digest(app_a, pub_a))
    gpk = keys.signing[0].group_public_key
    assert app_key_signature_problem(app_a, pub_a, sig_a, gpk) == ""
    assert app_key_signature_problem(app_b, pub_a, sig_a, gpk) != ""  # another app's message
    assert app_key_signature_problem(app_a, pub_a, sig_a, te.dkg_local(T, N)[0].group_public_key) != ""

    cache = AppSignatureCache(tmp_path / "c", seal, seal, max_entries=4)
    assert cache.put(1, app_a, app_key=(pub_a, sig_a)) is True
    assert cache.put(1, app_a, app_key=(pub_a, sig_a)) is False  # nothing changed
    assert cache.put(1, app_a, app_ca_public_key=b"\x02" + b"\x01" * 32) is True  # merged
    assert cache.get(1, app_a) == KeptSignatures(pub_a, sig_a, b"\x02" + b"\x01" * 32)
    files = list((tmp_path / "c").glob("*.sealed"))
    assert len(files) == 1 and sig_a.hex().encode() not in files[0].read_bytes()  # sealed
    # the host swaps app A's sealed file in as app B's, or as epoch 2's: neither is served
    for epoch, app in ((1, app_b), (2, app_a)):
        cache._path(epoch, app).write_bytes(cache._path(1, app_a).read_bytes())
        assert cache.get(epoch, app) is None, (epoch, app)
    cache._path(1, app_b).write_bytes(b"garbage")
    assert cache.get(1, app_b) is None  # unreadable: a miss, never an error
    assert cache.get(1, app_a) is not None
    # a full cache: bounded, the oldest dropped, no temp file left
    for k in range(10):
        cache.put(1, bytes([k]) * 20, app_key=(pub_a, sig_a))
        time.sleep(0.01)
    assert len(list(cache.dir.glob("*.sealed"))) <= 4
    assert not [p for p in cache.dir.iterdir() if not p.name.endswith(".sealed")]
    assert cache.get(1, bytes([9]) * 20) is not None and cache.get(1, bytes([0]) * 20) is None


def test_a_new_signing_key_or_epoch_starts_empty(teecloud_home: Path, world: World, cluster: Cluster) -> None:
    app_id, _state = boot_hello(teecloud_home, world, cluster.provider())
    node = cluster.nodes[1]
    service = node.kms.service
    answer = api.ThresholdEvaluateResponse(
        app_id=app_id.hex(), instance_id="00", epoch=1, index=1, partials=[]
    )
    service._attach_kept(answer, app_id)
    assert answer.kept_app_key is not None and answer.kept_app_ca is not None
    # another epoch: nothing is kept for it
    other = answer.model_copy(update={"epoch": 2, "kept_app_key": None, "kept_app_ca": None})
    service._attach_kept(other, app_id)
    assert other.kept_app_key is None and other.kept_app_ca is None
    # a new signing key (a rotation of the group's key): what was kept under the old one is not served
    fresh = te.dkg_local(T, N)
    service.threshold.signer = ThresholdSigner(fresh[0], _signer(node).pool)
    again = answer.model_copy(update={"kept_app_key": None, "kept_app_ca": None})
    service._attach_kept(again, app_id)
    assert again.kept_app_key is None


def test_generated_mutations_of_kept_signatures_and_certificates_are_refused_by_the_cvm(keys: _Keys) -> None:
    """The CVM's checks alone (no network): every one-bit mutation of a genuine kept signature, and of a
    genuine kept app CA certificate's DER that still parses, is refused and its node named, or — for the
    certificate — re-assembled to exactly the genuine one (a bit outside the TBS and signature values)."""
    shares = local_joint_feldman(T, N, epoch=1)
    gpk = keys.ca[0].group_public_key
    root_tbs = tc.root_ca_to_sign(gpk, not_before=int(time.time()) - 60)
    root = tc.assemble_certificate(
        root_tbs, _group_sign(keys.ca, root_tbs.digest), tc.group_ca_public_key(gpk)
    )
    group = ThresholdGroup(
        epoch=1,
        t=T,
        commitments=shares[0].commitments,
        nodes={i: f"https://127.0.0.1:{i}" for i in range(1, N + 1)},
        signing_key=keys.signing[0].group_public_key,
        ca_root_cert=cert_to_pem(root),
    )
    provider = ThresholdKeyProvider(group, dict.fromkeys(group.nodes))  # type: ignore[arg-type]
    app_id = b"\x5a" * 20
    app_pub = k256_public_key(bytes([5]) * 32)
    sig = _group_sign(keys.signing, kms_issued_digest(app_id, app_pub))
    faults: dict[int, str] = {}
    good = {1: api.KeptAppKey(app_public_key=app_pub.hex(), signature=sig.hex())}
    assert provider._kept_app_key(app_id, app_pub, good, faults) == sig and faults == {}
    for bit in range(0, 65 * 8, 3):
        m = bytearray(sig)
        m[bit // 8] ^= 1 << (bit % 8)
        kept = {2: api.KeptAppKey(app_public_key=app_pub.hex(), signature=bytes(m).hex())}
        assert provider._kept_app_key(app_id, app_pub, kept, faults) is None, bit
        assert "kept app-key signature refused" in faults.pop(2), bit
    assert provider._kept_app_key(b"\x5b" * 20, app_pub, good, faults) is None  # another app's
    assert set(faults) == {1}

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_key_pem = ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    to_sign = tc.app_ca_to_sign(root, app_id, ca_key.public_key())
    cert = tc.assemble_certificate(to_sign, _group_sign(keys.ca, to_sign.digest), tc.group_ca_public_key(gpk))
    pem = cert_to_pem(cert)
    key33 = ca_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    faults = {}
    assert (
        provider._kept_app_ca(
            app_id, ca_key_pem, {1: api.KeptAppCa(app_ca_public_key=key33.hex(), certificate=pem)}, faults
        )
        == pem
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    tried = 0
    for pos in range(0, len(der), max(1, len(der) // 60)):
        m = bytearray(der)
        m[pos] ^= 0x02
        try:
            mutated = cert_to_pem(x509.load_der_x509_certificate(bytes(m)))
        except (ValueError, x509.InvalidVersion):
            continue
        tried += 1
        kept_ca = {3: api.KeptAppCa(app_ca_public_key=key33.hex(), certificate=mutated)}
        got = provider._kept_app_ca(app_id, ca_key_pem, kept_ca, faults)
        assert got is None or got == pem, pos  # refused, or re-assembled to exactly the genuine one
        if got is None:
            assert "kept app CA certificate refused" in faults.pop(3), pos
    assert tried >= 20


def test_the_keep_hand_over_runs_after_the_boot_on_its_own_credential_only(
    teecloud_home: Path, world: World, cluster: Cluster
) -> None:
    """A first boot's keys come back before any node keeps its signatures (the hand-over waits here, at
    every node); once it ends, the next boot of the app is one round. While it runs, a call for the same
    CVM after its boot (RTMR3 extended past boot-mr-done by the guest) gets no boot-time credential: its
    own quote is taken and every node refuses it at boot_time."""
    gate = threading.Event()
    for node in cluster.nodes.values():
        real = node.kms.service.threshold_keep

        def slow(*a: object, real: Callable[..., object] = real, **kw: object) -> object:
            assert gate.wait(60), "the test never opened the gate"
            return real(*a, **kw)

        node.kms.service.threshold_keep = slow  # type: ignore[method-assign]
    provider = cluster.provider()
    app_id = world.register(compose_hash(HELLO))
    tee = SimulatedTdx(teecloud_home)
    state = boot(
        tee, json.dumps(HELLO), app_id, None, provider, extra_events=[("os-image-hash", tee.os_image_hash)]
    )
    assert not gate.is_set() and provider.faults == {} and state.keys.k256_signature
    assert all(n.kms.service.app_signatures.get(1, app_id) is None for n in cluster.nodes.values())
    # the same CVM after its boot, while the hand-over holds the boot's connections: refused at boot_time
    evaluated = _records(cluster, api.PATH_THRESHOLD_EVALUATE)
    with pytest.raises(KmsClientError):
        provider.get_app_keys(tee, app_id, state.instance_id)
    for i, node in cluster.nodes.items():
        recs = [r for r in node.kms.audit.read() if r.endpoint == api.PATH_THRESHOLD_EVALUATE]
        assert all((r.decision, r.step) == ("denied", "boot_time") for r in recs[len(evaluated[i]) :]), i
    assert sum(_records(cluster, api.PATH_THRESHOLD_EVALUATE)[i].count("denied") for i in evaluated) >= T
    gate.set()
    assert provider.wait_for_hand_overs()
    kept = _records(cluster, api.PATH_THRESHOLD_KEEP_SIGNATURES)
    assert {i for i, d in kept.items() if d == ["allowed"]} == set(provider._challenged)
    signed = _spent(cluster)
    again = cluster.provider()
    _, state2 = boot_hello(teecloud_home, world, again, app_id=app_id)
    assert state2.keys.k256_signature == state.keys.k256_signature
    assert state2.keys.ca_cert_pem == state.keys.ca_cert_pem
    assert _spent(cluster) == signed  # the kept copies served: no presignature spent
