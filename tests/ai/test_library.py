"""teecloud.ai's pure library: JCS report_data, key set chains, receipts, the Merkle log, E2EE envelopes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from teecloud.ai import (
    ClientSession,
    EnvelopeRejected,
    KeySet,
    KeySetInvalid,
    MalformedInput,
    ReceiptBody,
    ReceiptInvalid,
    ReceiptLog,
    ServerKey,
    SignedReceipt,
    inclusion_proof,
    merkle_root,
    report_data_for,
    sign_receipt,
    verify_inclusion,
    verify_receipt,
)
from teecloud.ai.receiptlog import leaf_hash
from tests.ai._keys import app_keys


def body_for(keys, *, request: bytes = b"req", response: bytes = b"resp", rid: str = "r1") -> ReceiptBody:
    return ReceiptBody(
        id=rid,
        app_id=keys.keyset.app_id,
        keyset_digest=keys.keyset.digest(),
        model="tiny",
        weights_sha256=hashlib.sha256(b"weights").digest(),
        request_sha256=hashlib.sha256(request).digest(),
        response_sha256=hashlib.sha256(response).digest(),
        stream=False,
        e2ee=False,
        started_ms=1000,
        finished_ms=1200,
    )


# ------------------------------------------------------------------------------------ JCS and report_data


def test_report_data_is_sha256_of_the_rfc8785_form() -> None:
    digest, nonce = bytes(range(32)), bytes(16)
    # Written out by hand: keys sorted by UTF-16 code units, no spaces, strings as given.
    text = (
        '{"keyset_digest":"' + digest.hex() + '","nonce":"' + nonce.hex() + '",'
        '"purpose":"teecloud-ai-attestation"}'
    )
    assert report_data_for(digest, nonce) == hashlib.sha256(text.encode()).digest()
    assert report_data_for(digest, nonce, "other") != report_data_for(digest, nonce)


@pytest.mark.parametrize("n", [0, 15, 65])
def test_report_data_refuses_bad_nonce_sizes(n: int) -> None:
    with pytest.raises(MalformedInput):
        report_data_for(bytes(32), bytes(n))


# --------------------------------------------------------------------------------------------- key sets


def test_keyset_round_trips_and_its_chain_leads_to_the_kms_root() -> None:
    keys = app_keys()
    again = KeySet.from_json(json.loads(json.dumps(keys.keyset.to_json())))
    assert again == keys.keyset and again.digest() == keys.keyset.digest()
    again.verify_chain(keys.root_public)
    with pytest.raises(KeySetInvalid) as exc:
        again.verify_chain(app_keys(os.urandom(32)).root_public)
    assert exc.value.step == "chain"


def test_keyset_chain_is_bound_to_its_app_id() -> None:
    keys = app_keys()
    moved = KeySet.from_json({**keys.keyset.to_json(), "app_id": os.urandom(20).hex()})
    with pytest.raises(KeySetInvalid):
        moved.verify_chain(keys.root_public)


@pytest.mark.parametrize(
    "field,value",
    [("signing_address", "0x" + "00" * 20), ("epoch", -1), ("e2ee_public_key", "zz"), ("extra", 1)],
)
def test_keyset_parse_refuses_malformed(field: str, value: object) -> None:
    with pytest.raises(MalformedInput):
        KeySet.from_json({**app_keys().keyset.to_json(), field: value})


# --------------------------------------------------------------------------------------------- receipts


def test_receipt_signs_and_verifies_with_every_expectation() -> None:
    keys = app_keys()
    receipt = sign_receipt(body_for(keys), keys.signing_secret, keys.keyset)
    parsed = SignedReceipt.from_json(json.loads(json.dumps(receipt.to_json())))
    body = verify_receipt(
        parsed,
        kms_root_public_key=keys.root_public,
        expected_app_id=keys.keyset.app_id,
        pinned_keyset_digest=keys.keyset.digest(),
        request_body=b"req",
        response_body=b"resp",
    )
    assert body == receipt.body


def test_tampered_receipt_is_refused_at_the_signature() -> None:
    keys = app_keys()
    receipt = sign_receipt(body_for(keys), keys.signing_secret, keys.keyset)
    doc = receipt.to_json()
    doc["body"]["response_sha256"] = hashlib.sha256(b"another answer").hexdigest()
    with pytest.raises(ReceiptInvalid) as exc:
        verify_receipt(SignedReceipt.from_json(doc), kms_root_public_key=keys.root_public)
    assert exc.value.step == "signature"


def test_receipt_from_another_app_is_refused() -> None:
    keys, other = app_keys(), app_keys()
    receipt = sign_receipt(body_for(other), other.signing_secret, other.keyset)
    verify_receipt(receipt, kms_root_public_key=other.root_public)  # genuine, for its own app
    with pytest.raises(ReceiptInvalid) as exc:
        verify_receipt(receipt, kms_root_public_key=keys.root_public, expected_app_id=keys.keyset.app_id)
    assert exc.value.step == "app_id"
    with pytest.raises(ReceiptInvalid) as exc:
        verify_receipt(
            receipt, kms_root_public_key=keys.root_public, pinned_keyset_digest=keys.keyset.digest()
        )
    assert exc.value.step == "pinned_keyset"


def test_receipt_signed_by_a_key_the_kms_did_not_issue_is_refused() -> None:
    keys, rogue = app_keys(), app_keys(os.urandom(32))
    # The rogue key set claims the genuine app id; its chain ends at another root.
    forged = KeySet.from_json({**rogue.keyset.to_json(), "app_id": keys.keyset.app_id.hex()})
    body = body_for(keys)
    body = ReceiptBody(**{**body.__dict__, "keyset_digest": forged.digest()})
    receipt = sign_receipt(body, rogue.signing_secret, forged)
    with pytest.raises(ReceiptInvalid) as exc:
        verify_receipt(receipt, kms_root_public_key=keys.root_public)
    assert exc.value.step == "keyset_chain"


def test_a_verified_key_set_skips_only_its_own_chain_check() -> None:
    keys, rogue = app_keys(), app_keys(os.urandom(32))
    forged = KeySet.from_json({**rogue.keyset.to_json(), "app_id": keys.keyset.app_id.hex()})
    body = ReceiptBody(**{**body_for(keys).__dict__, "keyset_digest": forged.digest()})
    receipt = sign_receipt(body, rogue.signing_secret, forged)
    # The verifying proxy's attested key set is given as verified: any other key set, here one whose
    # chain ends at another root, is still checked in full and refused.
    with pytest.raises(ReceiptInvalid) as exc:
        verify_receipt(receipt, kms_root_public_key=keys.root_public, verified_keyset=keys.keyset)
    assert exc.value.step == "keyset_chain"
    # A receipt carrying the verified key set itself (every field equal, parsed anew) is not checked
    # again: shown by a root it was never checked under.
    genuine = SignedReceipt.from_json(
        sign_receipt(body_for(keys), keys.signing_secret, keys.keyset).to_json()
    )
    assert genuine.keyset is not keys.keyset and genuine.keyset == keys.keyset
    with pytest.raises(ReceiptInvalid):
        verify_receipt(genuine, kms_root_public_key=rogue.root_public)
    verify_receipt(genuine, kms_root_public_key=rogue.root_public, verified_keyset=keys.keyset)
    # Its other steps still run: the signature, the bytes.
    with pytest.raises(ReceiptInvalid) as exc:
        verify_receipt(
            genuine, kms_root_public_key=keys.root_public, verified_keyset=keys.keyset, response_body=b"x"
        )
    assert exc.value.step == "response"


def test_response_that_does_not_match_its_receipt_is_refused() -> None:
    keys = app_keys()
    receipt = sign_receipt(body_for(keys), keys.signing_secret, keys.keyset)
    for kw, step in [({"response_body": b"resp!"}, "response"), ({"request_body": b"other"}, "request")]:
        with pytest.raises(ReceiptInvalid) as exc:
            verify_receipt(receipt, kms_root_public_key=keys.root_public, **kw)  # type: ignore[arg-type]
        assert exc.value.step == step


# ----------------------------------------------------------------------------------------- Merkle log


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1's recursive definition, written independently of the implementation."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def test_merkle_root_and_every_inclusion_proof() -> None:
    leaves = [leaf_hash(hashlib.sha256(bytes([i])).digest()) for i in range(33)]
    for n in range(1, 34):
        root = merkle_root(leaves[:n])
        assert root == _mth(leaves[:n])
        for i in range(n):
            proof = inclusion_proof(leaves[:n], i)
            assert verify_inclusion(leaves[i], i, n, proof, root)
            assert not verify_inclusion(leaves[(i + 1) % 33], i, n, proof, root) or (n == 1 and i == 0)
            if n > 1:
                assert not verify_inclusion(leaves[i], (i + 1) % n, n, proof, root)
                assert not verify_inclusion(leaves[i], i, n, proof[:-1], root)


def test_receipt_log_persists_and_proves(tmp_path: Path) -> None:
    keys = app_keys()
    log = ReceiptLog(tmp_path / "log")
    receipts = [sign_receipt(body_for(keys, rid=f"r{i}"), keys.signing_secret, keys.keyset) for i in range(5)]
    for r in receipts:
        log.append(r)
    with pytest.raises(ValueError):
        log.append(receipts[0])
    # A torn append (crash mid-write) is cut back to whole leaves on reopen.
    with open(tmp_path / "log" / "leaves.bin", "ab") as f:
        f.write(b"\x01" * 7)
    reopened = ReceiptLog(tmp_path / "log")
    assert len(reopened) == 5
    doc, index = reopened.get("r3") or ({}, -1)
    assert index == 3 and SignedReceipt.from_json(doc) == receipts[3]
    size, proof, root = reopened.proof(index)
    assert verify_inclusion(leaf_hash(receipts[3].body.body_sha256()), index, size, proof, root)
    head = reopened.tree_head(keys.keyset.app_id, keys.signing_secret, 5)
    assert head.root_hash == root and head.tree_size == 5
    head.verify(keys.keyset.signing_public_key)
    with pytest.raises(ReceiptInvalid):
        head.verify(app_keys().keyset.signing_public_key)
    assert reopened.get("../etc/passwd") is None and reopened.get("nope") is None


# ------------------------------------------------------------------------------------------------ E2EE


def test_e2ee_round_trip_and_response_bound_to_its_request() -> None:
    server = ServerKey(os.urandom(32))
    client = ClientSession(server.public_key, "tiny", now=1000)
    opened = server.open_request(client.seal_request(b"secret prompt"), model="tiny", now=1001)
    assert opened.plaintext == b"secret prompt"
    answer = server.seal_response(opened, b"secret answer")
    assert client.open_response(answer) == b"secret answer"
    other = ClientSession(server.public_key, "tiny", now=1000)
    with pytest.raises(EnvelopeRejected):
        other.open_response(answer)


def test_e2ee_refuses_replay_stale_wrong_model_and_tampering() -> None:
    server = ServerKey(os.urandom(32), window_s=60)
    client = ClientSession(server.public_key, "tiny", now=1000)
    env = client.seal_request(b"p")
    server.open_request(env, model="tiny", now=1000)
    with pytest.raises(EnvelopeRejected, match="replayed"):
        server.open_request(env, model="tiny", now=1001)
    stale = ClientSession(server.public_key, "tiny", now=1000).seal_request(b"p")
    with pytest.raises(EnvelopeRejected, match="window"):
        server.open_request(stale, model="tiny", now=1100)
    other_model = ClientSession(server.public_key, "big", now=1000).seal_request(b"p")
    with pytest.raises(EnvelopeRejected, match="model"):
        server.open_request(other_model, model="tiny", now=1000)
    relabelled = {**ClientSession(server.public_key, "big", now=1000).seal_request(b"p"), "model": "tiny"}
    with pytest.raises(EnvelopeRejected, match="decrypt"):
        server.open_request(relabelled, model="tiny", now=1000)
    fresh = ClientSession(server.public_key, "tiny", now=1000).seal_request(b"p")
    ct = bytearray(bytes.fromhex(fresh["ciphertext"]))
    ct[0] ^= 1
    with pytest.raises(EnvelopeRejected, match="decrypt"):
        server.open_request({**fresh, "ciphertext": ct.hex()}, model="tiny", now=1000)
    for bad in [None, [], {"teecloud_e2ee": 2}, {**fresh, "epk": "00"}, {**fresh, "x": 1}]:
        with pytest.raises(EnvelopeRejected):
            server.open_request(bad, model="tiny", now=1000)


def test_replay_cache_is_bounded_and_refuses_when_full() -> None:
    server = ServerKey(os.urandom(32))
    server.replay.max_entries = 2
    for _ in range(2):
        server.open_request(
            ClientSession(server.public_key, "m", now=10).seal_request(b"x"), model="m", now=10
        )
    with pytest.raises(EnvelopeRejected) as exc:
        server.open_request(
            ClientSession(server.public_key, "m", now=10).seal_request(b"x"), model="m", now=10
        )
    assert exc.value.status == 429
    # After the window the old entries expire and room returns.
    server.open_request(ClientSession(server.public_key, "m", now=500).seal_request(b"x"), model="m", now=500)


def test_the_logs_incremental_tree_matches_the_definition_for_every_size() -> None:
    from teecloud.ai.receiptlog import _Tree

    leaves = [leaf_hash(hashlib.sha256(bytes([i])).digest()) for i in range(40)]
    tree = _Tree()
    for n, leaf in enumerate(leaves, start=1):
        tree.append(leaf)
        for size in range(1, n + 1):  # every earlier tree size stays provable
            assert tree.root(0, size) == _mth(leaves[:size])
        for i in range(n):
            assert tree.path(i, 0, n) == inclusion_proof(leaves[:n], i)


def test_consistency_proofs_for_every_pair_of_sizes() -> None:
    from teecloud.ai.receiptlog import _Tree, verify_consistency

    leaves = [leaf_hash(hashlib.sha256(bytes([i])).digest()) for i in range(33)]
    tree = _Tree()
    for leaf in leaves:
        tree.append(leaf)
    for n in range(1, 34):
        for m in range(1, n + 1):
            proof = tree.consistency(m, 0, n)
            assert verify_consistency(m, n, _mth(leaves[:m]), _mth(leaves[:n]), proof), (m, n)
            if m < n:
                # A rewritten first tree (one leaf changed) is not extended by the second.
                forged = [*leaves[: m - 1], leaf_hash(b"\xff" * 32)]
                assert not verify_consistency(m, n, _mth(forged), _mth(leaves[:n]), proof)
                assert not verify_consistency(m, n, _mth(leaves[:m]), _mth(leaves[:n]), proof[:-1])
                other = [*leaves[:m], *[leaf_hash(b"\xee" * 32)] * (n - m)]
                assert not verify_consistency(m, n, _mth(leaves[:m]), _mth(other), proof)
