"""Threshold env secrets (teecloud.kms.threshold_env): five running members (each its own service, RA-TLS
listener, data directory, simulated TEE, sealed shares and boot-time peer identity) make an app's env key
by a Joint-Feldman ceremony on its first GetAppEnvEncryptPubKey, sign the dstack-format answer with the
group's threshold ECDSA key, and give a booting CVM proved partials for its own env's ephemeral key only.
Attacks: a lying node, two nodes down, the quote oracle, app A asking for B's point, an unregistered app,
malformed points, concurrent first requests, a ceremony failing half way."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import coincurve
import dstack_sdk
import httpx
import pytest

from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys.appkeys import env_encrypt_pubkey_digest
from teecloud.keys.envcrypt import EnvDecryptionFailed, decrypt_env_with_shared_secret, encrypt_env
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied, KmsClientError
from teecloud.kms.threshold_client import fetch_env_public_key
from teecloud.kms.threshold_env import EnvKeyBusy, legacy_digest
from teecloud.tee.simulated import SimulatedTdx
from tests.kms import _threshold_env_world
from tests.kms._threshold_env_world import (
    N,
    T,
    boot_with_env,
    env_files,
    kms_clients,
    provider_for,
    pubkey,
)
from tests.kms.conftest import World, post_with_cert
from tests.kms.test_quote_oracle import GetQuoteOracle, attacker_cert
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO, boot_hello

pytestmark = pytest.mark.slow

members = _threshold_env_world.members  # the committee fixture (tests/review6 uses it too)


def test_env_key_made_on_first_request_signed_by_the_group_and_decrypted_at_boot(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, signing_key = members
    app_id = world.register(compose_hash(HELLO))
    first = pubkey(nodes[2], app_id)  # node 2 coordinates the ceremony
    # one sealed share per member, each its own share of ONE sharing (the same commitments everywhere)
    assert all(len(f) == 1 for f in env_files(nodes).values())
    held = [n.service.env_keys.store.get(1, app_id) for n in nodes.values()]  # type: ignore[union-attr]
    assert len({h.commitments for h in held if h is not None}) == 1
    pub = bytes.fromhex(first.public_key)
    assert pub == tx.x25519_public_key(held[0].commitments)  # type: ignore[union-attr]
    # every node returns the same public key, signed by the group's key (coincurve and dstack-sdk)
    for n in nodes.values():
        ans = pubkey(n, app_id)
        assert ans.public_key == first.public_key
        for sig, digest in (
            (ans.signature_v1, env_encrypt_pubkey_digest(app_id, pub, ans.timestamp)),
            (ans.signature, legacy_digest(app_id, pub)),
        ):
            rec = coincurve.PublicKey.from_signature_and_message(bytes.fromhex(sig), digest, hasher=None)
            assert rec.format(compressed=True) == signing_key
        signer = dstack_sdk.verify_env_encrypt_public_key(
            pub, bytes.fromhex(ans.signature_v1), app_id.hex(), ans.timestamp
        )
        assert signer == "0x" + signing_key.hex()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            legacy = dstack_sdk.verify_env_encrypt_public_key_legacy(
                pub, bytes.fromhex(ans.signature), app_id.hex()
            )
        assert legacy == "0x" + signing_key.hex()
    # a tampered answer does not verify under the group key
    bad = bytearray(pub)
    bad[0] ^= 1
    assert (
        dstack_sdk.verify_env_encrypt_public_key(
            bytes(bad), bytes.fromhex(first.signature_v1), app_id.hex(), first.timestamp
        )
        != "0x" + signing_key.hex()
    )

    # dstack-sdk's encrypt_env_vars to that key; the CVM boots and decrypts from 3 proved partials
    blob = bytes.fromhex(
        asyncio.run(dstack_sdk.encrypt_env_vars([dstack_sdk.EnvVar("SECRET", "s3cr3t")], pub.hex()))
    )
    dev = SimulatedTdx(teecloud_home)
    provider = boot_with_env(teecloud_home, world, nodes, signing_key, dev, blob, app_id=app_id)
    assert provider.faults == {}
    assert provider.env_shared_secret is not None
    assert decrypt_env_with_shared_secret(provider.env_shared_secret, blob) == {"SECRET": "s3cr3t"}
    # each node that answered judged the request itself and audited it
    asked = [
        i
        for i, n in nodes.items()
        if any(
            r.endpoint == api.PATH_THRESHOLD_ENV_PARTIAL and r.decision == "allowed"
            for r in n.service.audit.read()
        )
    ]
    assert len(asked) == T

    # a lying node (a wrong partial with a self-consistent proof under its own fake commitments, or a wrong
    # proof) is named and skipped; two nodes down: the rest still decrypt
    env2 = nodes[2].service.env_keys
    assert env2 is not None
    real = env2.partial

    def lie(epoch: int, app: bytes, key: bytes) -> api.ThresholdEnvPartialResponse:
        ans = real(epoch, app, key)
        element = bytes.fromhex(ans.element)
        return ans.model_copy(update={"element": tx._add(element, tx.BASE).hex()})

    env3 = nodes[3].service.env_keys
    assert env3 is not None
    real3 = env3.partial

    def bad_proof(epoch: int, app: bytes, key: bytes) -> api.ThresholdEnvPartialResponse:
        ans = real3(epoch, app, key)
        proof = bytearray(bytes.fromhex(ans.proof))
        proof[40] ^= 4
        return ans.model_copy(update={"proof": proof.hex()})

    env2.partial = lie  # type: ignore[method-assign]
    env3.partial = bad_proof  # type: ignore[method-assign]
    provider = boot_with_env(teecloud_home, world, nodes, signing_key, dev, blob, app_id=app_id)
    assert set(provider.faults) == {2, 3}
    assert all("proof does not verify" in provider.faults[i] for i in (2, 3))
    assert decrypt_env_with_shared_secret(provider.env_shared_secret or b"", blob) == {"SECRET": "s3cr3t"}
    env2.partial = real  # type: ignore[method-assign]
    env3.partial = real3  # type: ignore[method-assign]

    # the deploy side: t nodes must agree on the key, each answer's signatures recover to the group key,
    # and a node that answers another key (here: signed for another app's sharing) is named
    clients = kms_clients(nodes, dev)
    got, faults = fetch_env_public_key(clients, app_id, t=T, signing_key=signing_key)
    assert got == pub and faults == {}
    other_app = world.register(compose_hash(dict(HELLO, name="someone-else")))
    other_answer = pubkey(nodes[4], other_app)
    env4 = nodes[4].service.env_keys
    assert env4 is not None
    env4.public_key = lambda epoch, app: other_answer  # type: ignore[method-assign,assignment,misc]
    got, faults = fetch_env_public_key(clients, app_id, t=T, signing_key=signing_key)
    assert got == pub and set(faults) == {4} and "does not recover to the group" in faults[4]
    with pytest.raises(KmsClientError, match="fewer than 3 KMS nodes agree"):
        fetch_env_public_key(clients, app_id, t=T, signing_key=b"\x02" + b"\x11" * 32)
    nodes[4].server.stop()
    nodes[5].server.stop()
    provider = boot_with_env(teecloud_home, world, nodes, signing_key, dev, blob, app_id=app_id)
    assert decrypt_env_with_shared_secret(provider.env_shared_secret or b"", blob) == {"SECRET": "s3cr3t"}


def test_attacks_on_the_env_partial(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, signing_key = members
    app_a = world.register(compose_hash(HELLO))
    other = dict(HELLO, name="other-app")
    app_b = world.register(compose_hash(other))
    pub_b = bytes.fromhex(pubkey(nodes[1], app_b).public_key)
    pub_a = bytes.fromhex(pubkey(nodes[3], app_a).public_key)
    assert pub_a != pub_b
    blob_b = encrypt_env(pub_b, {"B_SECRET": "for b only"})
    dev = SimulatedTdx(teecloud_home)

    # App A's boot binds B's env blob: every node answers x_A·P (from A's evidence, never the body's),
    # which combines to a secret that does not decrypt B's env
    provider = provider_for(nodes, signing_key, dev)
    provider.bind_encrypted_env(blob_b)
    _, state = boot_hello(teecloud_home, world, provider, app_id=app_a)
    secret = provider.env_shared_secret
    assert secret is not None
    with pytest.raises(EnvDecryptionFailed):
        decrypt_env_with_shared_secret(secret, blob_b)
    shares_a = [n.service.env_keys.store.get(1, app_a) for n in nodes.values()]  # type: ignore[union-attr]
    point = tx.ephemeral_point(blob_b)
    xa_p = tx.combine(
        shares_a[0].commitments,  # type: ignore[union-attr]
        app_a,
        point,
        [tx.partial_decrypt(s, app_a, point) for s in shares_a[:T] if s is not None],
    )
    assert secret == xa_p

    # The quote oracle: a running app's GetQuote binds an attacker's key; no node gives a partial
    oracle = GetQuoteOracle(AgentService(state))
    vm = json.dumps(state.vm_config) if state.vm_config else ""
    for i, n in nodes.items():
        k, der = attacker_cert(SimpleNamespace(service=n.service), oracle, app_a)  # type: ignore[arg-type]
        status, body = post_with_cert(
            n.server.url,
            api.PATH_THRESHOLD_ENV_PARTIAL,
            k,
            der,
            {"vm_config": vm, "ephemeral_key": blob_b[:32].hex()},
        )
        assert status == 403 and body["step"] == "boot_time" and "element" not in body, (i, body)

    # Malformed points: 400 with the reason, never a 500 (no certificate needed to be refused)
    p = 2**255 - 19
    twist = next(u for u in range(2, 200) if _on_twist(u))
    bad = {
        "non-canonical (u = p)": p.to_bytes(32, "little").hex(),
        "non-canonical (top bit)": (bytes(31) + b"\x80").hex(),
        "small order (u = 0)": bytes(32).hex(),
        "small order (u = 1)": (1).to_bytes(32, "little").hex(),
        "u = -1": (p - 1).to_bytes(32, "little").hex(),
        "off the curve (twist)": twist.to_bytes(32, "little").hex(),
        "wrong length": "00" * 31,
        "not hex": "zz" * 32,
    }
    # generated mutations: random keys and flipped bytes of a genuine one are a 400 (malformed) or a 403
    # (well-formed, but no attested caller), never a 500 and never a partial
    rng = random.Random(19)
    genuine = bytearray(blob_b[:32])
    for k in range(24):
        if k % 2:
            key = bytes(rng.getrandbits(8) for _ in range(32))
        else:
            key = bytes(genuine[:k] + bytes([genuine[k] ^ (1 << (k % 8))]) + genuine[k + 1 :])
        r = httpx.post(
            nodes[2].server.url + api.PATH_THRESHOLD_ENV_PARTIAL,
            json={"vm_config": "", "ephemeral_key": key.hex()},
            verify=False,
            timeout=30,
        )
        assert r.status_code in (400, 403) and "element" not in r.json(), (key.hex(), r.text)
    for what, key in bad.items():
        r = httpx.post(
            nodes[1].server.url + api.PATH_THRESHOLD_ENV_PARTIAL,
            json={"vm_config": "", "ephemeral_key": key},
            verify=False,
            timeout=30,
        )
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert r.json()["step"] == "request"


def _on_twist(u: int) -> bool:
    p = 2**255 - 19
    rhs = (u**3 + 486662 * u * u + u) % p
    return pow(rhs, (p - 1) // 2, p) == p - 1


def test_no_ceremony_for_an_unregistered_app_and_concurrent_first_requests(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, signing_key = members
    stranger = bytes.fromhex("77" * 20)
    for n in nodes.values():
        with pytest.raises(AccessDenied, match="not registered in KmsAuth"):
            pubkey(n, stranger)
    assert all(f == [] for f in env_files(nodes).values())
    # a root epoch these nodes do not serve: no ceremony either
    registered = world.register(compose_hash(dict(HELLO, name="epoch-two")))
    with pytest.raises(AccessDenied, match="serves no root epoch 2"):
        nodes[1].service.env_encrypt_pubkey(registered.hex(), 2)
    assert all(f == [] for f in env_files(nodes).values())
    # its CVM booting with an env blob (the attacker's exact steps: a boot of an app KmsAuth does not
    # allow) gets no keys and no partial from any node
    blob = encrypt_env(bytes(32 * [9]), {"K": "v"})
    provider = provider_for(nodes, signing_key, SimulatedTdx(teecloud_home))
    provider.bind_encrypted_env(blob)
    with pytest.raises(Exception, match=r"(?i)denied|refused|not allowed|valid partial"):
        boot_hello(teecloud_home, world, provider, app_id=stranger)
    assert provider.env_shared_secret is None
    for n in nodes.values():
        assert not any(
            r.endpoint == api.PATH_THRESHOLD_ENV_PARTIAL and r.decision == "allowed"
            for r in n.service.audit.read()
        )

    # first requests of one app at once, on one node and on two: one ceremony; the others wait or are
    # told to retry; in the end every node serves the same key and holds exactly one sharing
    app_id = world.register(compose_hash(dict(HELLO, name="concurrent")))
    results: list[object] = []

    def ask(i: int) -> None:
        try:
            results.append(pubkey(nodes[i], app_id).public_key)
        except EnvKeyBusy as exc:
            results.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 1, 4)]
    for th_ in threads:
        th_.start()
    for th_ in threads:
        th_.join()
    keys = {r for r in results if isinstance(r, str)}
    busy = [r for r in results if isinstance(r, EnvKeyBusy)]
    assert len(keys) <= 1 and len(keys) + len(busy) >= 1
    assert all("retry" in str(b) for b in busy)
    final = {pubkey(n, app_id).public_key for n in nodes.values()}
    assert len(final) == 1 and (not keys or keys == final)
    assert all(len(f) == 1 for f in env_files(nodes).values())


def test_a_ceremony_failing_half_way_leaves_nothing_sealed_and_is_retried(
    world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, _ = members
    app_id = world.register(compose_hash(dict(HELLO, name="retry")))
    env3 = nodes[3].service.env_keys
    assert env3 is not None
    real = env3.serve_share

    def refuse(node: object, req: object) -> tuple[int, bytes]:
        raise AccessDenied("simulated fault", step="round")

    env3.serve_share = refuse  # type: ignore[method-assign,assignment]
    with pytest.raises(Exception, match=r"member 3|simulated fault"):
        pubkey(nodes[1], app_id)
    assert all(f == [] for f in env_files(nodes).values())  # nothing sealed anywhere
    env3.serve_share = real  # type: ignore[method-assign]
    ans = pubkey(nodes[1], app_id)
    assert {pubkey(n, app_id).public_key for n in nodes.values()} == {ans.public_key}


def test_a_member_opens_at_most_its_budget_of_ceremonies_per_minute(
    world: World, members: tuple[dict[int, Member], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 6, R6-2: anyone can register apps, so each member bounds the new ceremonies it opens per
    minute for all apps together; over the budget a first request is told to retry (503), nothing sealed."""
    from teecloud.kms import threshold_env

    nodes, _ = members
    monkeypatch.setattr(threshold_env, "CEREMONIES_PER_MINUTE", 2)
    apps = [world.register(compose_hash(dict(HELLO, name=f"budget-{k}"))) for k in range(3)]
    pubkey(nodes[1], apps[0])
    pubkey(nodes[2], apps[1])  # another coordinator: the budget is each member's, whoever asks
    with pytest.raises(EnvKeyBusy, match=r"in the last minute|budget"):
        pubkey(nodes[3], apps[2])
    assert all(len(f) == 2 for f in env_files(nodes).values())
    # the apps that have their key are served as before (no ceremony: no budget used)
    assert pubkey(nodes[4], apps[0]).public_key == pubkey(nodes[1], apps[0]).public_key


def test_a_wrong_partial_is_named_by_the_library_and_fewer_than_t_get_nothing() -> None:
    """Generated mutations of a genuine partial (each byte of element and proof, other index) fail the
    check, naming the node."""
    shares = tx.dkg_local(T, N)
    app_id = b"\x01" * 20
    blob = encrypt_env(tx.x25519_public_key(shares[0].commitments), {"K": "v"})
    point = tx.ephemeral_point(blob)
    good = tx.partial_decrypt(shares[0], app_id, point)
    for k in range(0, 32, 5):
        el = bytearray(good.element)
        el[k] ^= 1
        pr = bytearray(good.proof)
        pr[k] ^= 1
        for mutated in (
            tx.EcdhPartial(1, bytes(el), good.proof),
            tx.EcdhPartial(1, good.element, bytes(pr)),
            tx.EcdhPartial(2, good.element, good.proof),
        ):
            assert not tx.verify_partial(shares[0].commitments, app_id, point, mutated)
    # another app's label: the proof does not carry over
    assert not tx.verify_partial(shares[0].commitments, b"\x02" * 20, point, good)
    with pytest.raises(tx.ThresholdEcdhError, match="2 valid ECDH partials, 3 needed"):
        tx.combine(
            shares[0].commitments, app_id, point, [tx.partial_decrypt(s, app_id, point) for s in shares[:2]]
        )
    # the networked DKG's receive step: a dealer whose sub-share does not match its commitments is named
    dealings = {d: tx.deal(T, N) for d in range(1, N + 1)}
    commitments = {d: c for d, (c, _) in dealings.items()}
    subs = {d: s[2] for d, (_, s) in dealings.items()}
    mine = tx.dkg_receive(2, T, commitments, subs)
    assert mine.commitments[0] == tx._sum([c[0] for c in commitments.values()])
    subs[4] = (subs[4] + 1) % tx.ORDER
    with pytest.raises(tx.ThresholdEcdhError, match="node 4"):
        tx.dkg_receive(2, T, commitments, subs)
