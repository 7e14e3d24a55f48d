"""Receipt-log roots on chain: the publisher posts the signed head to ReceiptRoots on the embedded chain
(ecrecover-checked, growing only), and `teecloud ai verify --receipt-roots` checks a receipt's inclusion
against the on-chain root."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from teecloud.ai import ReceiptBody, ReceiptInvalid, ReceiptLog, sign_receipt
from teecloud.ai.roots import RootPublisher, check_anchored, root_digest, sign_root
from teecloud.chain import DEV_KEYS, ChainClient, ChainRpcServer, ContractReverted
from teecloud.chain.receiptroots import ReceiptRoots
from teecloud.cli import app as teecloud_app

from ._keys import AppKeys, app_keys

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141  # secp256k1 order


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChainClient]:
    with ChainClient.embedded(tmp_path_factory.mktemp("roots-chain"), DEV_KEYS[0]) as c:
        yield c


@pytest.fixture
def roots(chain: ChainClient) -> ReceiptRoots:
    return ReceiptRoots.deploy(chain)


def body_for(keys: AppKeys, i: int) -> ReceiptBody:
    return ReceiptBody(
        id=f"r{i}-{os.urandom(4).hex()}",
        app_id=keys.keyset.app_id,
        keyset_digest=keys.keyset.digest(),
        model="tiny",
        weights_sha256=bytes(32),
        request_sha256=hashlib.sha256(f"q{i}".encode()).digest(),
        response_sha256=hashlib.sha256(f"a{i}".encode()).digest(),
        stream=False,
        e2ee=False,
        started_ms=1,
        finished_ms=2,
    )


def fill(log: ReceiptLog, keys: AppKeys, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = sign_receipt(body_for(keys, i), keys.signing_secret, keys.keyset)
        log.append(r)
        ids.append(r.body.id)
    return ids


def answer(log: ReceiptLog, keys: AppKeys, rid: str, since: int = 0) -> dict[str, Any]:
    """What GET /v1/receipts/{rid}?since= returns (teecloud.ai.server)."""
    found = log.get(rid)
    assert found is not None
    doc, index = found
    head = log.tree_head(keys.keyset.app_id, keys.signing_secret, 1000)
    size, proof, _ = log.proof(index, head.tree_size)
    out: dict[str, Any] = {
        "receipt": doc,
        "leaf_index": index,
        "tree_size": size,
        "inclusion_proof": [p.hex() for p in proof],
        "tree_head": head.to_json(),
    }
    if since:
        out["consistency"] = {"first": since, "proof": [p.hex() for p in log.consistency(since, size)]}
    return out


def test_the_digest_is_the_contracts(roots: ReceiptRoots) -> None:
    app_id, root = os.urandom(20), os.urandom(32)
    for size in (1, 7, 2**40):
        assert roots.head_digest(app_id, size, root) == root_digest(app_id, size, root)


def test_the_publisher_posts_growing_heads_under_the_apps_key(
    chain: ChainClient, roots: ReceiptRoots, tmp_path: Path
) -> None:
    keys = app_keys()
    log = ReceiptLog(tmp_path / "receipts")
    fill(log, keys, 3)
    pub = RootPublisher(log, keys.keyset.app_id, keys.signing_secret, roots.publish, interval=3600)
    assert pub.publish_once() == 3
    on_chain = roots.head(keys.keyset.app_id, keys.keyset.signing_address)
    head = log.tree_head(keys.keyset.app_id, keys.signing_secret, 0)
    assert (on_chain.tree_size, on_chain.root) == (3, head.root_hash) and on_chain.published_at > 0
    assert pub.publish_once() is None  # nothing new: no transaction
    fill(log, keys, 2)
    assert pub.publish_once() == 5
    assert roots.head(keys.keyset.app_id, keys.keyset.signing_address).tree_size == 5


def test_the_contract_refuses_replays_and_keeps_other_keys_apart(roots: ReceiptRoots) -> None:
    keys, other = app_keys(), app_keys()
    app, signer = keys.keyset.app_id, keys.keyset.signing_address
    r5, r3 = os.urandom(32), os.urandom(32)
    roots.publish(app, 5, r5, sign_root(keys.signing_secret, app, 5, r5))
    # an older head of the same key (a rollback), or the same one again: refused
    with pytest.raises(ContractReverted, match="does not grow"):
        roots.publish(app, 3, r3, sign_root(keys.signing_secret, app, 3, r3))
    with pytest.raises(ContractReverted, match="does not grow"):
        roots.publish(app, 5, r5, sign_root(keys.signing_secret, app, 5, r5))
    # another key's head for this app, or the app's signature over another root: stored under another address
    forged = os.urandom(32)
    roots.publish(app, 9, forged, sign_root(other.signing_secret, app, 9, forged))
    roots.publish(app, 10, forged, sign_root(keys.signing_secret, app, 10, r5))
    assert roots.head(app, signer).tree_size == 5 and roots.head(app, signer).root == r5
    assert roots.head(app, other.keyset.signing_address).tree_size == 9
    # malformed signatures
    sig = sign_root(keys.signing_secret, app, 11, r5)
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    high_s = r + (N - s).to_bytes(32, "big") + bytes([v ^ 1])  # the same signature, malleated
    with pytest.raises(ContractReverted, match="high-s"):
        roots.publish(app, 11, r5, high_s)
    with pytest.raises(ContractReverted, match="bad signature v"):
        roots.publish(app, 11, r5, sig[:64] + bytes([5]))
    with pytest.raises(ContractReverted, match="65 bytes"):
        roots.publish(app, 11, r5, sig[:64])
    with pytest.raises(ContractReverted, match="empty tree"):
        roots.publish(app, 0, r5, sign_root(keys.signing_secret, app, 1, r5))


def test_check_anchored(tmp_path: Path) -> None:
    keys = app_keys()
    log = ReceiptLog(tmp_path / "receipts")
    fill(log, keys, 4)
    root4 = log.tree_head(keys.keyset.app_id, keys.signing_secret, 0).root_hash
    fill(log, keys, 3)
    head7 = log.tree_head(keys.keyset.app_id, keys.signing_secret, 0)
    proof = log.consistency(4, 7)
    check_anchored(2, head7, 4, root4, proof)  # leaf 2 is in the 4-tree the chain holds
    check_anchored(6, head7, 7, head7.root_hash, None)
    bad = [
        (2, 0, root4, proof, "no receipt root"),
        (5, 4, root4, proof, "not yet anchored"),
        (2, 4, os.urandom(32), proof, "does not extend"),  # a forked log
        (2, 4, root4, [proof[0][::-1], *proof[1:]], "does not extend"),
        (2, 4, root4, None, "consistency proof"),
        (2, 7, os.urandom(32), None, "forked"),
        (2, 8, root4, None, "older"),
    ]
    for index, size, root, prf, reason in bad:
        with pytest.raises(ReceiptInvalid, match=reason) as err:
            check_anchored(index, head7, size, root, prf)
        assert err.value.step == "on_chain"


def test_ai_verify_checks_the_on_chain_root(chain: ChainClient, roots: ReceiptRoots, tmp_path: Path) -> None:
    keys = app_keys()
    log = ReceiptLog(tmp_path / "receipts")
    ids = fill(log, keys, 3)
    RootPublisher(log, keys.keyset.app_id, keys.signing_secret, roots.publish, interval=3600).publish_once()
    late = fill(log, keys, 2)  # not yet published
    rpc = ChainRpcServer(chain.transport.chain).start()  # type: ignore[attr-defined]
    try:

        def verify(doc: dict[str, Any]) -> Any:
            (tmp_path / "answer.json").write_text(json.dumps(doc))
            args = ["ai", "verify", str(tmp_path / "answer.json"), "--kms-root", keys.root_public.hex()]
            args += ["--rpc-url", rpc.url, "--receipt-roots", roots.address, "--json"]
            return CliRunner().invoke(teecloud_app, args)

        ok = verify(answer(log, keys, ids[1], since=3))
        assert ok.exit_code == 0, ok.output
        assert "on_chain" in json.loads(ok.output)["steps"]
        no_since = verify(answer(log, keys, ids[1]))
        assert no_since.exit_code == 1 and "since=3" in no_since.output
        unanchored = verify(answer(log, keys, late[0], since=3))
        assert unanchored.exit_code == 1 and "not yet anchored" in unanchored.output
        # another key's log published for the same app id does not anchor this app's receipts
        other = app_keys(app_id=keys.keyset.app_id)
        olog = ReceiptLog(tmp_path / "other")
        oid = fill(olog, other, 1)
        nothing = verify(answer(olog, other, oid[0]))
        assert nothing.exit_code == 1 and "no receipt root" in nothing.output
        args = ["ai", "verify", str(tmp_path / "answer.json"), "--kms-root", keys.root_public.hex()]
        usage = CliRunner().invoke(teecloud_app, [*args, "--receipt-roots", roots.address])
        assert usage.exit_code == 2 and "go together" in usage.output
    finally:
        rpc.stop()


@pytest.mark.slow
def test_publish_verified_checks_the_key_chain_up_to_kmsauth(chain: ChainClient) -> None:
    """The head is stored in verified_heads[app_id] only when signed by a receipt key that the app key signed
    for its purpose and that the KMS root recorded in KmsAuth issued to this app."""
    from teecloud.ai.roots import chain_proof

    chain.deploy()
    keys = app_keys()
    chain.kms.set_info(keys.root_public, b"\x01" * 65)
    roots = ReceiptRoots.deploy(chain, chain.kms_auth)
    app, r1, r2 = keys.keyset.app_id, os.urandom(32), os.urandom(32)
    proof = chain_proof(keys.keyset)
    roots.publish_verified(app, 3, r1, sign_root(keys.signing_secret, app, 3, r1), proof)
    assert roots.verified_head(app).tree_size == 3 and roots.verified_head(app).root == r1
    with pytest.raises(ContractReverted, match="does not grow"):
        roots.publish_verified(app, 2, r2, sign_root(keys.signing_secret, app, 2, r2), proof)
    # another KMS's app: its chain ends at a root KmsAuth does not record
    rogue_kms = app_keys(root_secret=hashlib.sha256(b"another kms").digest())
    with pytest.raises(ContractReverted, match="not the KMS root recorded"):
        rp = chain_proof(rogue_kms.keyset)
        roots.publish_verified(
            rogue_kms.keyset.app_id,
            9,
            r2,
            sign_root(rogue_kms.signing_secret, rogue_kms.keyset.app_id, 9, r2),
            rp,
        )
    # the app's chain presented for another app id: the KMS signature is over this app id
    other_app = os.urandom(20)
    with pytest.raises(ContractReverted, match="app key not signed by the KMS root"):
        roots.publish_verified(other_app, 9, r2, sign_root(keys.signing_secret, other_app, 9, r2), proof)
    # a head signed by another key, with the app's chain
    rogue = app_keys(app_id=app)
    with pytest.raises(ContractReverted, match="not signed by the signing key given"):
        roots.publish_verified(app, 9, r2, sign_root(rogue.signing_secret, app, 9, r2), proof)
    # another key presented as the signing key under the app's chain
    with pytest.raises(ContractReverted, match="not issued by the app key"):
        roots.publish_verified(
            app,
            9,
            r2,
            sign_root(rogue.signing_secret, app, 9, r2),
            {**proof, "signing_key": chain_proof(rogue.keyset)["signing_key"]},
        )
    assert roots.verified_head(app).tree_size == 3
    with pytest.raises(ContractReverted, match="no KmsAuth"):
        ReceiptRoots.deploy(chain).publish_verified(
            app, 3, r1, sign_root(keys.signing_secret, app, 3, r1), proof
        )


def test_ai_verify_uses_the_verified_head(chain: ChainClient, tmp_path: Path) -> None:
    from teecloud.ai.roots import chain_proof

    chain.deploy()
    keys = app_keys()
    chain.kms.set_info(keys.root_public, b"\x01" * 65)
    roots = ReceiptRoots.deploy(chain, chain.kms_auth)
    log = ReceiptLog(tmp_path / "receipts")
    ids = fill(log, keys, 2)
    proof = chain_proof(keys.keyset)
    pub = RootPublisher(
        log,
        keys.keyset.app_id,
        keys.signing_secret,
        lambda a, n, r, s: roots.publish_verified(a, n, r, s, proof),
        interval=3600,
    )
    assert pub.publish_once() == 2
    assert roots.head(keys.keyset.app_id, keys.keyset.signing_address).tree_size == 0  # only the verified one
    rpc = ChainRpcServer(chain.transport.chain).start()  # type: ignore[attr-defined]
    try:
        (tmp_path / "answer.json").write_text(json.dumps(answer(log, keys, ids[0])))
        args = ["ai", "verify", str(tmp_path / "answer.json"), "--kms-root", keys.root_public.hex(), "--json"]
        out = CliRunner().invoke(
            teecloud_app, [*args, "--rpc-url", rpc.url, "--receipt-roots", roots.address]
        )
        assert out.exit_code == 0 and "on_chain" in json.loads(out.output)["steps"], out.output
    finally:
        rpc.stop()
