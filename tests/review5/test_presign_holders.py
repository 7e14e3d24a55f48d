"""Review 5, R5-1: one presignature, two disjoint signing sets — no copy of any node needed.

R4-4's fix keeps a presignature in the memory of one process per share and says "no k is shared". But a
presignature made by participants P is held by every member of P, and ANY t of them sign with it
(keys.threshold_ecdsa: "Signing (online; any t holders of the presignature)"); each holder only knows that
it itself has not signed another digest. `teecloud kms presign` and `teecloud up` make presignatures among
all n running nodes, and `teecloud up --kms-nodes N --threshold T` accepts any T (only the default is a
majority). With |P| >= 2t, two disjoint sets of t holders each sign ONE digest with the same presignature:
every process keeps its rule, yet two signatures share k and give away the group's signing key.

How it happens without an attacker: the app's boot (ThresholdKeyProvider._sign_app_key) picks the lowest-named
session that t answering nodes offer. App X's boot signs with nodes {1, 2}; nodes 1 and 2 restart (their
pools are empty now); app Y's boot gets offers only from {3, 4}, which still list the same session as unused
(it is the lowest), and signs with it. A host that delays nodes' answers steers it at will.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import coincurve
import pytest

from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.errors import KeysError
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest
from teecloud.kms import authz, threshold_net
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_net import RoundFailed, run_presign_round, run_signing_key_dkg
from teecloud.kms.threshold_sign import PresignaturePool, ThresholdSigner
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_net_peering import Member, allow_build, start_member
from tests.kms.test_threshold_net_presign import endpoints

APP_X, APP_Y = bytes.fromhex("5a" * 20), bytes.fromhex("6b" * 20)
ORDER = te.ORDER


def _app(app_id: bytes) -> authz.AuthorizedApp:
    peer = SimpleNamespace(boot_info=SimpleNamespace(app_id=app_id))
    return authz.AuthorizedApp(peer, None, "review5", authz._SEAL)  # type: ignore[arg-type]


def _recover_key(sig1: bytes, d1: bytes, sig2: bytes, d2: bytes, group_key: bytes) -> int | None:
    """x from two ECDSA signatures with one k, x = (s1·k − e1) / r with k = (e1 − e2) / (s1 − s2); either s
    may have been low-s normalised, so each sign is tried and the candidate checked against the group key."""
    r1, r2 = int.from_bytes(sig1[:32], "big"), int.from_bytes(sig2[:32], "big")
    if r1 != r2:
        return None
    e1, e2 = int.from_bytes(d1, "big") % ORDER, int.from_bytes(d2, "big") % ORDER
    s1, s2 = int.from_bytes(sig1[32:64], "big"), int.from_bytes(sig2[32:64], "big")
    for a in (s1, ORDER - s1):
        for b in (s2, ORDER - s2):
            if a == b:
                continue
            k = (e1 - e2) * pow(a - b, -1, ORDER) % ORDER
            x = (a * k - e1) * pow(r1, -1, ORDER) % ORDER
            if x and coincurve.PrivateKey.from_int(x).public_key.format(compressed=True) == group_key:
                return x
    return None


def _sign(
    signers: dict[int, ThresholdSigner], who: list[int], app_id: bytes, pub: bytes, session: bytes
) -> bytes:
    digest = kms_issued_digest(app_id, pub)
    shares = [signers[i].sign_app_key(_app(app_id), pub, session) for i in who]
    return te.combine_signature(signers[who[0]].pool.public(session), digest, shares)


def _attack(signers: dict[int, ThresholdSigner], session: bytes, group_key: bytes, t: int) -> None:
    """Two disjoint sets of t holders, one digest each, the same presignature. Safe: refused somewhere
    (a presignature made by more than 2t-1 holders, or the second signing). Raises AssertionError with the
    recovered key otherwise."""
    pub_x = k256_public_key(hashlib.sha256(b"app X key").digest())
    pub_y = k256_public_key(hashlib.sha256(b"app Y key").digest())
    first, second = sorted(signers)[:t], sorted(signers)[t : 2 * t]
    sig_x = _sign(signers, first, APP_X, pub_x, session)
    try:
        sig_y = _sign(signers, second, APP_Y, pub_y, session)
    except (AccessDenied, KeysError):
        return  # safe: the second digest is refused
    d_x, d_y = kms_issued_digest(APP_X, pub_x), kms_issued_digest(APP_Y, pub_y)
    x = _recover_key(sig_x, d_x, sig_y, d_y, group_key)
    assert x is None, (
        f"nodes {first} signed app X and nodes {second} signed app Y with presignature {session.hex()}: "
        "the group's signing key was recovered from the two signatures"
    )


@pytest.mark.parametrize(("t", "n"), [(2, 4), (3, 6), (2, 5)])
def test_disjoint_signing_sets_never_share_a_presignature(t: int, n: int) -> None:
    """t-of-n with n >= 2t, presignatures among all n nodes (the default of `teecloud kms presign` and of
    `teecloud up`). For an even n every t that presigns at all (2t-1 <= n) has 2t <= n: the default majority
    (n//2+1) makes no presignatures there, so a 4- or 6-node group must lower t and is exposed. Safe: no two
    signatures under one R."""
    keys = te.dkg_local(t, n)
    try:
        presigs = te.presign_local(keys, list(range(1, n + 1)))
    except KeysError:
        return  # safe: a presignature is made by exactly 2t-1 participants
    signers = {k.index: ThresholdSigner(k, PresignaturePool()) for k in keys}
    for i, p in presigs.items():
        signers[i].pool.add([p])
    session = signers[1].pool.unused()[0]
    _attack(signers, session, keys[0].group_public_key, t)


@pytest.mark.slow
def test_running_members_never_sign_two_digests_with_one_presignature(
    teecloud_home: Path, world: World
) -> None:
    """The same over the network: four running members of a 2-of-4 committee, the signing-key DKG and one
    presigning round among all four (run_presign_round, as `teecloud kms presign` runs it by default)."""
    allow_build(world.chain, teecloud_home)
    members: dict[int, Member] = {}
    try:
        for s in local_joint_feldman(2, 4, epoch=1):
            members[s.index] = start_member(teecloud_home, world.chain, s, name="r5")
        eps = endpoints(members)
        group_key = run_signing_key_dkg(eps)
        # the fix (R5-1): a relay that opens a presigning round on all four is refused by the members ...
        with pytest.raises(RoundFailed, match="exactly 2t-1"):
            threshold_net._run(eps, "presign", count=1)
        # ... and run_presign_round chooses exactly 2t-1 = 3 of them: member 4 holds nothing
        run_presign_round(eps, 1, 2)
        signers = {i: m.service.threshold.signer for i, m in members.items()}  # type: ignore[union-attr]
        assert all(s is not None for s in signers.values())
        session = signers[1].pool.unused()[0]  # type: ignore[union-attr]
        _attack(signers, session, group_key, 2)  # type: ignore[arg-type]
    finally:
        stop_servers(m.server for m in members.values())


class _Node:
    """A node's answer to ThresholdSign as the service gives it (its pool's share for the verified app)."""

    def __init__(self, signer: ThresholdSigner) -> None:
        self.signer = signer

    def attested_call(
        self,
        tee: object,
        path: str,
        model: object,
        *,
        body: dict,
        usage: str,
        app_id: bytes,
        deadline: float | None = None,
    ):  # type: ignore[no-untyped-def,type-arg]
        from teecloud.kms import api

        session = bytes.fromhex(body["session"])
        pub = bytes.fromhex(body["app_public_key"])
        share = self.signer.sign_app_key(_app(app_id), pub, session)
        p = self.signer.pool.public(session)
        return api.ThresholdSignResponse(
            app_id=app_id.hex(),
            index=share.index,
            session=session.hex(),
            big_r=p.big_r.hex(),
            kinv_commitments=[c.hex() for c in p.kinv_commitments],
            sigma_commitments=[c.hex() for c in p.sigma_commitments],
            s=f"{share.s:064x}",
        )


def test_the_apps_client_never_picks_a_presignature_used_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """No attacker: 2-of-4, two presignatures among all four. App X's boot (the client's real choice:
    ThresholdKeyProvider._sign_app_key) signs with nodes 1, 2. Nodes 1 and 2 restart (empty pools). App
    Y's boot: nodes 3, 4 offer both sessions; the client picks the lowest, the one X used. Safe: no key
    recovered."""
    from teecloud.kms import threshold_client as tc

    monkeypatch.setattr(tc, "vm_config_json", lambda tee: "")
    t, n = 2, 4
    keys = te.dkg_local(t, n)
    signers = {k.index: ThresholdSigner(k, PresignaturePool()) for k in keys}
    with pytest.raises(KeysError, match="exactly 2t-1"):  # the fix (R5-1): never among all four
        te.presign_local(keys, list(range(1, n + 1)))
    for _ in range(2):
        for i, p in te.presign_local(keys, list(range(1, 2 * t))).items():
            signers[i].pool.add([p])
    group = SimpleNamespace(t=t, signing_key=keys[0].group_public_key, nodes={i: f"n{i}" for i in signers})
    client = SimpleNamespace(
        group=group,
        composes=SimpleNamespace(for_tee=lambda tee: ""),
        _clients={i: _Node(s) for i, s in signers.items()},
        _hedge_s=5.0,
        _call_s=15.0,
        _challenged=sorted(signers),
        _fan=tc._FanOut(len(signers)),  # the provider's shared fan-out pool (`_gather`)
    )
    client._gather = lambda *a, **kw: tc.ThresholdKeyProvider._gather(client, *a, **kw)  # type: ignore[arg-type]

    def boot(app_id: bytes, k256: bytes) -> bytes:  # _sign_app_key takes the app key's public key (SEC1)
        offered = {i: [s.hex() for s in signers[i].pool.unused()] for i in signers}
        pub = k256_public_key(k256)
        return tc.ThresholdKeyProvider._sign_app_key(client, None, app_id, offered, pub, {})  # type: ignore[arg-type]

    k_x, k_y = hashlib.sha256(b"app X key").digest(), hashlib.sha256(b"app Y key").digest()
    sig_x = boot(APP_X, k_x)
    assert (
        coincurve.PublicKey.from_signature_and_message(
            sig_x, kms_issued_digest(APP_X, k256_public_key(k_x)), hasher=None
        ).format()
        == keys[0].group_public_key
    )
    for i in (1, 2):  # nodes 1 and 2 restart: their pools are empty
        signers[i] = ThresholdSigner(signers[i].key, PresignaturePool())
        client._clients[i] = _Node(signers[i])
    # only node 3 still holds the presignatures: Y's boot finds none that 2 nodes hold (no second signature)
    with pytest.raises(tc.KmsClientError, match="no presignature is held by 2"):
        boot(APP_Y, k_y)
