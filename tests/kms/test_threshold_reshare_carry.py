"""A reshare carries everything (issue 19, kms.threshold_carry): five running members (3-of-5) that hold an
app's env sharing, the group's signing key and CA key reshare their root to a 4-of-7 committee over the
real ReshareDeal endpoint (boot-time evidence of an allowed build, one member token each); the new members
receive their shares of the env sharing and both keys too, with the same public keys; an env encrypted
before decrypts from the new shares; back to 3-of-5 the same; old and new shares do not mix, and a retired
node's carried shares are erased with its root share."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import coincurve
import pytest

from teecloud.appcompose import compose_hash
from teecloud.chain import ChainClient, ContractReverted
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys._groups import P256
from teecloud.keys.envcrypt import decrypt_env_with_shared_secret, encrypt_env
from teecloud.kms import api
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee, kms_dir
from teecloud.kms.client import KmsClient, connect_kms
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.threshold import ReshareDealer, ResharePlan, erase_share
from teecloud.kms.threshold_carry import CarriedShares, carried_for, carry_deal, carry_receive, seal_carried
from teecloud.kms.threshold_client import join_reshare
from teecloud.kms.threshold_env import ENV_DIR, EnvKeyStore
from teecloud.kms.threshold_sign import CA_SHARE_FILE, SIGNING_SHARE_FILE, PresignaturePool, ThresholdSigner
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World
from tests.kms.test_threshold_env import members, pubkey
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO
from tests.kms.test_threshold_reshare_chain_keys import group_chain, record_committee

pytestmark = pytest.mark.slow

__all__ = ["group_chain", "members"]

APP_SECRET = {"SECRET": "written before the reshare"}


def _allow_kms_build(world: World, home: Path) -> None:
    tee = SimulatedTdx(home)
    ident = boot_kms_tee(tee)
    for mr in (ident.mr_aggregated, ident.boot_mr_aggregated):
        with contextlib.suppress(ContractReverted):
            world.chain.add_kms_mr(mr)
    with contextlib.suppress(ContractReverted):
        world.chain.add_kms_device(tee.device_id)


def _store(path: Path, index: int, t: int) -> EnvKeyStore:
    """A new member's env store (sealing is the launcher's, tested elsewhere: identity here)."""
    return EnvKeyStore(path, lambda b: b, lambda b: b, index=index, t=t)


def _decrypts(shares: list[tx.EnvKeyShare], app_id: bytes, blob: bytes) -> dict[str, str]:
    point = tx.ephemeral_point(blob)
    c = shares[0].commitments
    secret = tx.combine(c, app_id, point, [tx.partial_decrypt(s, app_id, point) for s in shares])
    return decrypt_env_with_shared_secret(secret, blob)


def _signs(keys: list[te.KeyShare], group_key: bytes) -> None:
    presigs = te.presign_local(keys, [k.index for k in keys][: 2 * keys[0].t - 1])
    digest = hashlib.sha256(b"after the reshare").digest()
    sig = te.sign_local(presigs, sorted(presigs)[: keys[0].t], digest)
    if keys[0].curve == "secp256k1":
        rec = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
        assert rec.format(compressed=True) == group_key


def test_reshare_3of5_to_4of7_and_back_carries_env_signing_and_ca_keys(
    teecloud_home: Path,
    world: World,
    members: tuple[dict[int, Member], bytes],
    monkeypatch: pytest.MonkeyPatch,
    group_chain: ChainClient,
) -> None:
    nodes, signing_key = members
    _allow_kms_build(world, teecloud_home)
    app_id = world.register(compose_hash(dict(HELLO, name="carried")))
    pub = bytes.fromhex(pubkey(nodes[1], app_id).public_key)
    blob = encrypt_env(pub, APP_SECRET)
    ca_keys = te.dkg_local(3, 5, group=P256)  # the group's CA key (made by a networked round in production)
    for m in nodes.values():
        m.service.ca_signer = ThresholdSigner(ca_keys[m.index - 1], PresignaturePool())
    kms_group = record_committee(group_chain, nodes)  # what the new members check the carried keys against
    kms_group.record_signing_key(1, signing_key)
    kms_group.record_ca(1, ca_keys[0].group_public_key, hashlib.sha256(b"the root's DER").digest())

    # 3-of-5 -> 4-of-7: dealers 1, 3, 5 (their ReshareDealer carries what their service holds)
    dealers = (1, 3, 5)
    plan = ResharePlan(os.urandom(16), 1, nodes[1].service.threshold.commitments, dealers, 4, 7)  # type: ignore[union-attr]
    tokens = {j: hashlib.sha256(plan.session + bytes([j])).digest() for j in range(1, 8)}
    for i in dealers:
        svc = nodes[i].service
        svc.reshare = ReshareDealer(svc.threshold._share, carry=svc.carry_for_reshare)  # type: ignore[union-attr]
        svc.reshare.open(plan, {j: hashlib.sha256(tok).digest() for j, tok in tokens.items()})
    new: dict[int, CarriedShares] = {}
    roots = {}
    for j in range(1, 8):
        tee = SimulatedTdx(teecloud_home)
        boot_kms_tee(tee, finish=False)  # a new node at its boot
        clients = {
            i: connect_kms(
                nodes[i].server.url,
                collateral_for=lambda _q, _n, tee=tee: tee.collateral(),  # type: ignore[misc]
                dev_root_der=tee.dev_root_der(),
                expected_ca_pubkey_der=nodes[i].service.keys.ca_public_key_der,
            )
            for i in dealers
        }
        new[j] = CarriedShares()
        roots[j] = join_reshare(
            plan,
            j,
            tee,
            clients,
            app_id=KMS_APP_ID,
            member_token=tokens[j],
            carried_out=new[j],
            kms_group=kms_group,
        )
    assert {r.group_public_key for r in roots.values()} == {plan.old_commitments[0]}
    env47 = [new[j].env[app_id] for j in range(1, 8)]
    assert len({s.commitments for s in env47}) == 1 and env47[0].t == 4
    assert tx.x25519_public_key(env47[0].commitments) == pub  # the same env public key
    assert _decrypts(env47[1:5], app_id, blob) == APP_SECRET  # an env written before decrypts
    sig47 = [new[j].signing_key for j in range(1, 8)]
    ca47 = [new[j].ca_key for j in range(1, 8)]
    assert all(k is not None and k.t == 4 and k.n == 7 for k in (*sig47, *ca47))
    assert {k.group_public_key for k in sig47 if k} == {signing_key}
    assert {k.group_public_key for k in ca47 if k} == {ca_keys[0].group_public_key}
    _signs([k for k in sig47 if k], signing_key)
    _signs([k for k in ca47 if k], ca_keys[0].group_public_key)
    # old and new do not mix: an old share fails the new commitments' check
    old_env = nodes[2].service.env_keys.store.get(1, app_id)  # type: ignore[union-attr]
    assert old_env is not None
    with pytest.raises(tx.ThresholdEcdhError, match="does not match its commitments"):
        tx.EnvKeyShare(2, 4, old_env.share, env47[0].commitments)
    with pytest.raises(te.ThresholdSignatureError, match="does not match"):
        old_sig = nodes[2].service.threshold.signer.key  # type: ignore[union-attr]
        te.KeyShare(2, 4, 7, old_sig.share, sig47[0].commitments)  # type: ignore[union-attr]

    # 4-of-7 -> 3-of-5: the new members' stores (sealed by seal_carried), dealt by 2, 4, 6, 7
    stores = {j: _store(teecloud_home / f"new-{j}" / ENV_DIR, j, 4) for j in range(1, 8)}
    saved: dict[tuple[int, str], te.KeyShare] = {}

    def saver(j: int) -> Callable[[te.KeyShare, str], Path]:
        def save(key: te.KeyShare, file: str) -> Path:
            saved[(j, file)] = key
            return teecloud_home / f"new-{j}" / file

        return save

    for j in range(1, 8):
        seal_carried(new[j], 1, stores[j], saver(j), signing_file=SIGNING_SHARE_FILE, ca_file=CA_SHARE_FILE)
    assert all(stores[j].apps(1) == [app_id] for j in stores)
    back_dealers = (2, 4, 6, 7)
    items = {
        i: carry_deal(
            epoch=1,
            index=i,
            t_new=3,
            n_new=5,
            env_store=stores[i],
            signing_key=saved[(i, SIGNING_SHARE_FILE)],
            ca_key=saved[(i, CA_SHARE_FILE)],
        )
        for i in back_dealers
    }
    back = {
        j: carry_receive({i: carried_for(items[i], j) for i in back_dealers}, index=j, t_new=3, n_new=5)
        for j in range(1, 6)
    }
    env35 = [back[j].env[app_id] for j in range(1, 6)]
    assert tx.x25519_public_key(env35[0].commitments) == pub
    assert _decrypts(env35[2:5], app_id, blob) == APP_SECRET
    _signs([b.signing_key for b in back.values() if b.signing_key], signing_key)
    _signs([b.ca_key for b in back.values() if b.ca_key], ca_keys[0].group_public_key)
    # a 4-of-7 share does not check against the 3-of-5 commitments
    with pytest.raises(tx.ThresholdEcdhError):
        tx.EnvKeyShare(2, 3, env47[1].share, env35[0].commitments)
    # a dealer lacking the app's env share (it never recovered it): the receiver refuses, naming dealers
    short = {i: carried_for(items[i], 1) for i in back_dealers}
    short[6] = [c for c in short[6] if c.kind != "env"]
    with pytest.raises(KmsClientError, match=r"dealers \[6\] differ"):
        carry_receive(short, index=1, t_new=3, n_new=5)
    # a dealer whose env sub-share is wrong is named
    bad = {i: carried_for(items[i], 1) for i in back_dealers}
    k = next(n for n, c in enumerate(bad[4]) if c.kind == "env")
    wrong = (int.from_bytes(bytes.fromhex(bad[4][k].subshare), "little") + 1) % tx.ORDER
    bad[4][k] = bad[4][k].model_copy(update={"subshare": wrong.to_bytes(32, "little").hex()})
    with pytest.raises(KmsClientError, match="party 4"):
        carry_receive(bad, index=1, t_new=3, n_new=5)

    # old nodes retire: the root share's erasure takes the carried shares with it
    home1 = teecloud_home / "env-1"
    assert list((kms_dir(home1) / ENV_DIR).glob("*.sealed"))
    (kms_dir(home1) / SIGNING_SHARE_FILE).write_bytes(b"sealed")  # the member's signing share file
    erase_share(home1)
    assert not list((kms_dir(home1) / ENV_DIR).glob("*.sealed"))
    assert not (kms_dir(home1) / SIGNING_SHARE_FILE).exists()

    # more sharings than a round carries over all its pages (MAX_CARRIED_TOTAL; 2^20 in production): the
    # dealer refuses to open it, saying so (a 400 on its admin listener, never a 500)
    from teecloud.kms import threshold_carry
    from teecloud.kms.errors import KmsUsageError

    monkeypatch.setattr(threshold_carry, "MAX_CARRIED_TOTAL", 1)
    svc = nodes[1].service
    req = api.ReshareOpenRequest(
        session=os.urandom(16).hex(),
        epoch=1,
        old_commitments=[c.hex() for c in plan.old_commitments],
        dealers=list(dealers),
        t_new=4,
        n_new=7,
        member_token_hashes={str(j): hashlib.sha256(t).hexdigest() for j, t in tokens.items()},
    )
    with pytest.raises(KmsUsageError, match="more than 1 sharings"):
        svc.reshare_open(req)


class _Pages:
    """A dealer's client as the joining node uses it, recording the offsets asked and, for the receiver's
    negative cases, letting a test alter the dealer's answers (a dealer that lies about its pages)."""

    def __init__(
        self,
        client: object,
        tamper: Callable[[api.ReshareDealResponse], api.ReshareDealResponse] | None = None,
    ) -> None:
        self.client, self.tamper, self.offsets = client, tamper, []

    def attested_call(self, tee: object, path: str, model: type, *, body: dict, **kw: object) -> object:
        self.offsets.append(body["offset"])
        resp = self.client.attested_call(tee, path, model, body=body, **kw)  # type: ignore[attr-defined]
        return self.tamper(resp) if self.tamper is not None else resp


def test_a_reshare_pages_its_carried_sharings_and_hands_over_only_a_complete_set(
    teecloud_home: Path,
    world: World,
    members: tuple[dict[int, Member], bytes],
    group_chain: ChainClient,
) -> None:
    """R7-5's fix over the real ReshareDeal endpoint: 7 env sharings (one sharing relabelled per app: the
    count is what matters) and the signing key = 8 sharings, 3 per page (page_size; 1024 in production):
    every dealer answers pages at 0, 3, 6 and the new member gets all 8. The attacker's and a lying
    dealer's steps: a page asked twice, a page before page 0, a page past the end (refused by the dealer);
    a dealer whose pages overlap, that counts fewer sharings, or whose pages disagree (refused by the
    receiver, which hands over nothing)."""
    nodes, signing_key = members
    _allow_kms_build(world, teecloud_home)
    app_id = world.register(compose_hash(dict(HELLO, name="paged")))
    kms_group = record_committee(group_chain, nodes)
    kms_group.record_signing_key(1, signing_key)
    pubkey(nodes[1], app_id)  # the env ceremony: every member holds its share
    apps = [app_id, *(bytes([0xE0, k]) * 10 for k in range(6))]
    for m in nodes.values():
        store = m.service.env_keys.store  # type: ignore[union-attr]
        share = store.get(1, app_id)
        assert share is not None
        for a in apps[1:]:
            store.put(1, a, share)
    dealers = (1, 3, 5)
    plan = ResharePlan(os.urandom(16), 1, nodes[1].service.threshold.commitments, dealers, 3, 4)  # type: ignore[union-attr]
    tokens = {j: hashlib.sha256(plan.session + bytes([j])).digest() for j in range(1, 5)}
    for i in dealers:
        svc = nodes[i].service
        svc.reshare = ReshareDealer(svc.threshold._share, carry=svc.carry_for_reshare, page_size=3)  # type: ignore[union-attr]
        svc.reshare.open(plan, {j: hashlib.sha256(tok).digest() for j, tok in tokens.items()})
    tee = SimulatedTdx(teecloud_home)
    boot_kms_tee(tee, finish=False)  # the new nodes at their boot

    def clients() -> dict[int, KmsClient]:
        return {
            i: connect_kms(
                nodes[i].server.url,
                collateral_for=lambda _q, _n: tee.collateral(),
                dev_root_der=tee.dev_root_der(),
                expected_ca_pubkey_der=nodes[i].service.keys.ca_public_key_der,
            )
            for i in dealers
        }

    def join(j: int, pages: dict[int, _Pages]) -> CarriedShares:
        out = CarriedShares()
        join_reshare(
            plan,
            j,
            tee,
            pages,
            app_id=KMS_APP_ID,
            member_token=tokens[j],
            carried_out=out,
            kms_group=kms_group,
        )  # type: ignore[arg-type]
        return out

    honest = {i: _Pages(c) for i, c in clients().items()}
    got = join(1, honest)
    assert all(p.offsets == [0, 3, 6] for p in honest.values())
    assert sorted(got.env) == sorted(apps)
    old = nodes[1].service.env_keys.store.get(1, app_id)  # type: ignore[union-attr]
    assert old is not None and {s.commitments[0] for s in got.env.values()} == {old.commitments[0]}
    assert got.signing_key is not None and got.signing_key.group_public_key == signing_key

    # the dealer's side: each page once, page 0 first, no page past the end
    def ask(i: int, j: int, offset: int) -> object:
        body = {"session": plan.session.hex(), "index": j, "member_token": tokens[j].hex(), "offset": offset}
        return clients()[i].attested_call(
            tee,
            api.PATH_RESHARE_DEAL,
            api.ReshareDealResponse,
            body=body,
            usage="kms:reshare",
            app_id=KMS_APP_ID,
        )

    with pytest.raises(KmsDenied, match="page at 3 of share 1 of this round was already handed out"):
        ask(1, 1, 3)
    with pytest.raises(KmsDenied, match="page 0 comes first"):
        ask(1, 4, 3)
    with pytest.raises(KmsDenied, match="no page of share 1 at offset 8"):
        ask(1, 1, 8)
    # generated: every other offset, past the end or out of the model's range, is refused (never a 500)
    for offset in (9, 100, 2**20, -1, 2**20 + 1, 2**63):
        with pytest.raises(KmsDenied):
            ask(3, 1, offset)

    # the receiver's side: a dealer lying about its pages fails the round, naming it; nothing handed over
    def at(offset: int, change: Callable[[api.ReshareDealResponse], dict]) -> Callable[..., object]:
        def tamper(r: api.ReshareDealResponse) -> api.ReshareDealResponse:
            return r.model_copy(update=change(r)) if r.offset == offset else r

        return tamper

    lies = {
        2: (3, at(3, lambda r: {"carried": r.carried[1:]}), "dealer 3 carried a sharing twice"),
        3: (5, lambda r: r.model_copy(update={"carried_total": 6}), r"dealers \[5\] differ"),
        4: (1, at(6, lambda r: {"carried_total": 9}), "node 1: its pages differ"),
    }
    for j, (liar, tamper, why) in lies.items():
        pages = {i: _Pages(c, tamper if i == liar else None) for i, c in clients().items()}
        out = CarriedShares()
        with pytest.raises(KmsClientError, match=why):
            join_reshare(
                plan,
                j,
                tee,
                pages,
                app_id=KMS_APP_ID,
                member_token=tokens[j],
                carried_out=out,
                kms_group=kms_group,
            )  # type: ignore[arg-type]
        assert out.env == {} and out.signing_key is None and out.ca_key is None
