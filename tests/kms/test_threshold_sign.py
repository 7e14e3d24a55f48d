"""teecloud.kms.threshold_sign: a node's sealed signing share and in-memory presignature pool. A
presignature signs one message, and only in the process that made it (a restart has none); the message is
recomputed from the verified app; the shares of any 3 of 5 nodes combine into the GetKey chain's KMS
signature under the group key."""

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
    LEGACY_PRESIG_FILE,
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
    # ... nor after a restart, or in a copy of the node's disk: the pool never left the process (R4-4)
    tee = SimulatedTdx(teecloud_home)
    restarted = open_signer(tee, boot_kms_tee(tee), teecloud_home / "node-1")
    assert restarted is not None and restarted.key == nodes[1].key and restarted.pool.unused() == []
    for pub in (other, first):
        with pytest.raises(AccessDenied, match="no presignature"):
            restarted.sign_app_key(_app(), pub, session)


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


def test_pool_lives_in_memory_only(nodes, teecloud_home: Path) -> None:
    """R4-4: presignatures are never written (a copy of the disk, or a restored file, would sign with them
    again); a pool file an older version sealed is never loaded, and is deleted at open."""
    home = teecloud_home / "node-3"
    assert sorted(p.name for p in (home / "kms").iterdir() if "presig" in p.name) == []
    session = nodes[3].pool.unused()[0]
    sealed = (home / "kms" / SIGNING_SHARE_FILE).read_bytes()
    (home / "kms" / LEGACY_PRESIG_FILE).write_bytes(sealed)  # any file at the old name
    tee = SimulatedTdx(teecloud_home)
    reopened = open_signer(tee, boot_kms_tee(tee), home)
    assert reopened is not None and reopened.pool.unused() == []
    assert not (home / "kms" / LEGACY_PRESIG_FILE).exists()
    with pytest.raises(SealingError):  # the signing share stays sealed to the build
        open_signer(tee, boot_kms_tee(tee, build="another KMS build"), home)
    with pytest.raises(SealingError, match="already in the pool"):
        nodes[3].pool.add([nodes[3].pool.public(session)])
    assert session in nodes[3].pool.unused()
