"""teecloud.kms.threshold_sign: a node's sealed signing share and presignature pool. A presignature signs
one message, ever (also across a restart of the node); the message is recomputed from the verified app; the
shares of any 3 of 5 nodes combine into the GetKey chain's KMS signature under the group key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import coincurve
import pytest

from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.sigchain import (
    derive_get_key,
    k256_public_key,
    kms_issued_digest,
    purpose_digest,
    sign_k256_recoverable,
    verify_key_signature_chain,
)
from teecloud.kms import authz
from teecloud.kms.bootstrap import boot_kms_tee
from teecloud.kms.errors import AccessDenied, SealingError
from teecloud.kms.threshold_sign import (
    PRESIG_FILE,
    SIGNING_SHARE_FILE,
    ThresholdSigner,
    open_signer,
    save_signing_share,
)
from teecloud.tee.simulated import SimulatedTdx

APP_ID = bytes.fromhex("5a" * 20)
APP_K256 = hashlib.sha256(b"the app's k256 key, derived in the CVM").digest()


def _app(app_id: bytes = APP_ID) -> authz.AuthorizedApp:
    """An AuthorizedApp as the Authorizer makes one (the whole rule is tested by the node tests)."""
    peer = SimpleNamespace(boot_info=SimpleNamespace(app_id=app_id))
    return authz.AuthorizedApp(peer, None, "test", authz._SEAL)  # type: ignore[arg-type]


@pytest.fixture
def nodes(teecloud_home: Path) -> dict[int, ThresholdSigner]:
    keys = te.dkg_local(3, 5)
    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    signers = {}
    for k in keys:
        home = teecloud_home / f"node-{k.index}"
        save_signing_share(k, tee, identity, home)
        signer = open_signer(tee, identity, home)
        assert signer is not None and signer.key == k
        signers[k.index] = signer
    for _ in range(2):
        presigs = te.presign_local(keys, [1, 2, 3, 4, 5])
        for i, p in presigs.items():
            signers[i].pool.add([p])
    return signers


def _sign(nodes: dict[int, ThresholdSigner], who: list[int], session: bytes, app_pub: bytes) -> bytes:
    shares = [nodes[i].sign_app_key(_app(), app_pub, session) for i in who]
    return te.combine_signature(
        nodes[who[0]].pool.public(session), kms_issued_digest(APP_ID, app_pub), shares
    )


def test_any_3_nodes_make_the_getkey_chain_signature(nodes) -> None:
    app_pub = k256_public_key(APP_K256)
    session = nodes[1].pool.unused()[0]
    kms_sig = _sign(nodes, [2, 3, 5], session, app_pub)
    derived = derive_get_key(APP_K256, "my/key")
    chain = [sign_k256_recoverable(APP_K256, purpose_digest("test", derived.public_key)), kms_sig]
    assert (
        verify_key_signature_chain(
            app_id=APP_ID,
            public_key=derived.public_key,
            purpose="test",
            signature_chain=chain,
            kms_root_public_key=nodes[1].group_public_key,
        )
        == app_pub
    )
    assert _sign(nodes, [1, 4, 5], session, app_pub) == kms_sig  # same message, same presignature: same


def test_a_presignature_never_signs_a_second_message(nodes, teecloud_home: Path) -> None:
    session = nodes[1].pool.unused()[0]
    first = k256_public_key(APP_K256)
    other = k256_public_key(hashlib.sha256(b"another key").digest())
    nodes[1].sign_app_key(_app(), first, session)
    with pytest.raises(AccessDenied, match="already signed another message"):
        nodes[1].sign_app_key(_app(), other, session)
    with pytest.raises(AccessDenied, match="already signed another message"):  # nor for another app
        nodes[1].sign_app_key(_app(bytes(20)), first, session)
    # ... also after a restart of the node: the binding was sealed before the share left
    tee = SimulatedTdx(teecloud_home)
    restarted = open_signer(tee, boot_kms_tee(tee), teecloud_home / "node-1")
    assert restarted is not None and session not in restarted.pool.unused()
    with pytest.raises(AccessDenied, match="already signed another message"):
        restarted.sign_app_key(_app(), other, session)
    assert restarted.sign_app_key(_app(), first, session) == nodes[1].sign_app_key(_app(), first, session)


def test_the_message_is_the_nodes_own(nodes) -> None:
    """The caller picks no digest: only its public key, which must be a compressed secp256k1 point."""
    session = nodes[2].pool.unused()[1]
    pub = k256_public_key(APP_K256)
    uncompressed = coincurve.PublicKey(pub).format(compressed=False)
    for bad in [b"", b"\x02" + bytes(32), uncompressed, hashlib.sha256(b"a digest").digest()]:
        with pytest.raises(AccessDenied, match="public key"):
            nodes[2].sign_app_key(_app(), bad, session)
    assert session in nodes[2].pool.unused()  # a refused request binds nothing
    share = nodes[2].sign_app_key(_app(), pub, session)
    assert te.verify_signature_share(nodes[2].pool.public(session), kms_issued_digest(APP_ID, pub), share)
    with pytest.raises(TypeError):
        nodes[2].sign_app_key(SimpleNamespace(boot_info=SimpleNamespace(app_id=APP_ID)), pub, session)  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="no presignature"):
        nodes[2].sign_app_key(_app(), pub, b"\x00" * 16)


def test_pool_is_sealed_and_fails_closed(nodes, teecloud_home: Path) -> None:
    home = teecloud_home / "node-3"
    blob = (home / "kms" / PRESIG_FILE).read_bytes()
    assert b"sigma_share" not in blob  # sealed, not plaintext
    tee = SimulatedTdx(teecloud_home)
    other_build = boot_kms_tee(tee, build="another KMS build")
    with pytest.raises(SealingError):
        open_signer(tee, other_build, home)
    (home / "kms" / PRESIG_FILE).write_bytes(blob[:-20] + b"x" * 20)
    with pytest.raises(SealingError):  # never rebuilt from scratch (that could reuse a nonce)
        open_signer(tee, boot_kms_tee(tee), home)
    with pytest.raises(SealingError, match="already in the pool"):
        nodes[3].pool.add([nodes[3].pool.public(nodes[3].pool.unused()[0])])
    assert (home / "kms" / SIGNING_SHARE_FILE).exists()
