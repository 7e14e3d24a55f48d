"""Review 7: the share-recovery protocol (keys.share_repair enrollment) and the reshare's carried sharings
(kms.threshold_carry) attacked at the protocol level, with the attacker's exact steps and generated
mutations around them. Every test here asserts a refusal (or a hiding property) that HELD, except the one
R7-2 one, which asserts the safe behaviour of a finding since fixed (seal_carried refuses)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from teecloud.keys import share_repair as sr
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys._groups import P256
from teecloud.keys.errors import KeyUsageError
from teecloud.kms import api
from teecloud.kms.errors import BootstrapError, KmsClientError, SealingError
from teecloud.kms.threshold_carry import (
    carried_for,
    carried_page,
    carry_deal,
    carry_receive,
    refuse_old_env_shares,
    seal_carried,
)
from teecloud.kms.threshold_env import EnvKeyStore, ceremony_quorum
from teecloud.kms.threshold_sign import AppCaCache

G = tx.EDWARDS25519
Q = G.order
APP_A, APP_B = bytes([0xA1]) * 20, bytes([0xB2]) * 20


def _enroll(
    shares: dict[int, int], sharing: tuple[bytes, ...], helpers: list[int], target: int
) -> tuple[dict[int, sr.RepairSplit], dict[int, dict[int, bytes]], dict[int, int]]:
    """One honest enrollment: every helper's split, the public table and each helper's sum τ_j."""
    splits = {i: sr.repair_split(G, sharing, i, shares[i], helpers, target) for i in helpers}
    table = {i: s.commitments for i, s in splits.items()}
    sums = {j: sr.repair_sum(G, j, {i: splits[i].pieces[j] for i in helpers}, table) for j in helpers}
    return splits, table, sums


def _lagrange_poly_at(points: dict[int, int], x: int) -> int:
    out = 0
    for i, yi in points.items():
        num, den = 1, 1
        for j in points:
            if j != i:
                num, den = num * (x - j) % Q, den * (i - j) % Q
        out = (out + yi * num * pow(den, -1, Q)) % Q
    return out


# ------------------------------------------------------------------------------------ recovery: blinding


@pytest.mark.parametrize("seed", range(5))
def test_target_and_a_colluding_helper_learn_nothing_of_an_honest_helpers_share(seed: int) -> None:
    """t = 3, helpers {1, 2, 3}, target 5. The coalition (t−1 = 2 members: the target 5 and helper 3) sees
    helper 3's own split, the pieces δ_{1,3}, δ_{2,3} sent to 3, and every sum τ_j; with f(3) and f(5) it
    holds t−1 points. For EVERY candidate value v of f(1), a polynomial f' through (3, f(3)), (5, f(5)),
    (1, v) and secret pieces of helpers 1 and 2 exist that reproduce exactly what the coalition saw — so
    its view does not pin f(1) (information-theoretically, up to the public commitments, which hide the
    pieces as discrete logs)."""
    rng = random.Random(seed)
    keys = tx.dkg_local(3, 5)
    shares = {k.index: k.share for k in keys}
    sharing = keys[0].commitments
    helpers, r, c = [1, 2, 3], 5, 3
    splits, _, sums = _enroll(shares, sharing, helpers, r)
    assert sum(sums.values()) % Q == shares[r]
    lam = sr.lagrange_at(helpers, r, Q)
    seen = {  # the coalition's view
        "split_c": dict(splits[c].pieces),
        "to_c": {i: splits[i].pieces[c] for i in helpers},
        "sums": dict(sums),
    }
    for _ in range(20):
        v = rng.randrange(Q)
        f1 = {3: shares[3], 5: shares[5], 1: v}
        f2 = _lagrange_poly_at(f1, 2)
        s1, s2 = lam[1] * v % Q, lam[2] * f2 % Q
        u = rng.randrange(Q)  # the one free unknown
        d11 = u
        d12 = (s1 - seen["to_c"][1] - d11) % Q
        d21 = (seen["sums"][1] - seen["split_c"][1] - d11) % Q
        d22 = (s2 - seen["to_c"][2] - d21) % Q
        # the alternative pieces reproduce every value the coalition saw
        assert (d12 + d22 + seen["split_c"][2]) % Q == seen["sums"][2]
        assert (d11 + d12 + seen["to_c"][1]) % Q == s1 and (d21 + d22 + seen["to_c"][2]) % Q == s2


def test_the_target_cannot_be_zero_nor_a_helper_nor_out_of_range() -> None:
    """An enrollment at x = 0 would hand out the secret itself; at a helper's index, that helper's share."""
    keys = tx.dkg_local(3, 5)
    sharing = keys[0].commitments
    for target in (0, 1, 65, -1):
        with pytest.raises(KeyUsageError):
            sr.repair_split(G, sharing, 1, keys[0].share, [1, 2, 3], target)
    with pytest.raises(KeyUsageError):  # not t helpers
        sr.repair_split(G, sharing, 1, keys[0].share, [1, 2], 5)
    with pytest.raises(KeyUsageError):
        sr.repair_split(G, sharing, 1, keys[0].share, [1, 2, 3, 4], 5)
    with pytest.raises(sr.RepairError):  # a helper whose share is not of this sharing
        sr.repair_split(G, sharing, 1, (keys[0].share + 1) % Q, [1, 2, 3], 5)


@pytest.mark.parametrize("seed", range(4))
def test_the_recovering_member_refuses_every_bad_piece_sum_table_or_short_helper_set(seed: int) -> None:
    rng = random.Random(seed)
    keys = tx.dkg_local(3, 5)
    shares = {k.index: k.share for k in keys}
    sharing = keys[0].commitments
    helpers, r = [1, 2, 4], 5
    splits, table, sums = _enroll(shares, sharing, helpers, r)
    assert sr.repair_finish(G, sharing, r, table, sums) == shares[r]
    # a wrong sum from helper j: named
    for j in helpers:
        bad = {**sums, j: (sums[j] + rng.randrange(1, Q)) % Q}
        with pytest.raises(sr.RepairError) as err:
            sr.repair_finish(G, sharing, r, table, bad)
        assert err.value.party == j
    # a split that is not of the helper's real share (its commitments relabelled or another sharing's)
    for i in helpers:
        row = dict(table[i])
        a, b = rng.sample(helpers, 2)
        row[a], row[b] = G.base_mul(rng.randrange(1, Q)), row[b]
        with pytest.raises(sr.RepairError) as err:
            sr.repair_finish(G, sharing, r, {**table, i: row}, sums)
        assert err.value.party == i
    # a helper's piece that does not match its public commitment: named by the summing helper
    for i in helpers:
        for j in helpers:
            pieces = {k: splits[k].pieces[j] for k in helpers}
            pieces[i] = (pieces[i] + 1) % Q
            with pytest.raises(sr.RepairError) as err:
                sr.repair_sum(G, j, pieces, table)
            assert err.value.party == i
    # fewer than t helpers (t−1 colluders' pieces alone), or a helper set with the target in it
    short = {i: table[i] for i in helpers[:2]}
    with pytest.raises(KeyUsageError):
        sr.repair_finish(G, sharing, r, short, {i: sums[i] for i in helpers[:2]})
    # consistent pieces of ANOTHER sharing (t−1 helpers make their own, self-consistent): refused
    other = tx.dkg_local(3, 5)
    _, o_table, o_sums = _enroll({k.index: k.share for k in other}, other[0].commitments, helpers, r)
    with pytest.raises(sr.RepairError):
        sr.repair_finish(G, sharing, r, o_table, o_sums)
    # sums of two recoveries (same helpers, two sessions) mixed: their sum is not f(r)
    _, table2, sums2 = _enroll(shares, sharing, helpers, r)
    with pytest.raises(sr.RepairError):
        sr.repair_finish(G, sharing, r, table, {**sums, helpers[0]: sums2[helpers[0]]})
    assert sr.repair_finish(G, sharing, r, table2, sums2) == shares[r]


# ----------------------------------------------------------------------------------- reshare: carried


def _store(path: Path, index: int, t: int) -> EnvKeyStore:
    return EnvKeyStore(path, lambda b: b, lambda b: b, index=index, t=t)


@pytest.fixture
def old_world(tmp_path: Path) -> dict[str, object]:
    """Five 3-of-5 members holding two apps' env shares (epoch 1) and the group's signing and CA keys."""
    env_a, env_b = tx.dkg_local(3, 5), tx.dkg_local(3, 5)
    sig, ca = te.dkg_local(3, 5), te.dkg_local(3, 5, group=P256)
    stores = {}
    for i in range(1, 6):
        s = _store(tmp_path / f"old-{i}", i, 3)
        s.put(1, APP_A, env_a[i - 1])
        s.put(1, APP_B, env_b[i - 1])
        stores[i] = s
    return {"env_a": env_a, "env_b": env_b, "sig": sig, "ca": ca, "stores": stores}


def _deal(w: dict[str, object], dealers: tuple[int, ...] = (1, 2, 3)) -> dict[int, list]:  # type: ignore[type-arg]
    stores, sig, ca = w["stores"], w["sig"], w["ca"]
    return {
        d: carry_deal(
            epoch=1,
            index=d,
            t_new=4,
            n_new=7,
            env_store=stores[d],  # type: ignore[index]
            signing_key=sig[d - 1],  # type: ignore[index]
            ca_key=ca[d - 1],  # type: ignore[index]
        )
        for d in dealers
    }


def _for(items: dict[int, list], index: int) -> dict[int, list[api.CarriedSubshare]]:  # type: ignore[type-arg]
    return {d: carried_for(its, index) for d, its in items.items()}


def test_honest_carry_keeps_every_public_key(old_world: dict[str, object]) -> None:
    items = _deal(old_world)
    got = {j: carry_receive(_for(items, j), index=j, t_new=4, n_new=7) for j in range(1, 8)}
    env_a = old_world["env_a"]
    assert got[1].env[APP_A].commitments[0] == env_a[0].commitments[0]  # type: ignore[index]
    assert got[7].signing_key is not None and got[7].ca_key is not None


def _mutate(
    answers: dict[int, list[api.CarriedSubshare]], dealer: int, fn: object
) -> dict[int, list[api.CarriedSubshare]]:
    out = {d: list(v) for d, v in answers.items()}
    out[dealer] = fn(out[dealer])  # type: ignore[operator]
    return out


def _swap_apps(items: list[api.CarriedSubshare]) -> list[api.CarriedSubshare]:
    """The dealer labels app A's dealing as app B's and B's as A's (old commitments travel along)."""
    swap = {APP_A.hex(): APP_B.hex(), APP_B.hex(): APP_A.hex()}
    return [c.model_copy(update={"app_id": swap.get(c.app_id, c.app_id)}) for c in items]


def _swap_apps_keep_old(items: list[api.CarriedSubshare]) -> list[api.CarriedSubshare]:
    """The dealer keeps each app's old commitments but deals the OTHER app's share under them."""
    by = {c.app_id: c for c in items}
    a, b = by[APP_A.hex()], by[APP_B.hex()]
    fields = ("commitments", "subshare")
    na = a.model_copy(update={f: getattr(b, f) for f in fields})
    nb = b.model_copy(update={f: getattr(a, f) for f in fields})
    return [na if c is a else nb if c is b else c for c in items]


def _kind_swap(items: list[api.CarriedSubshare]) -> list[api.CarriedSubshare]:
    """The signing key's dealing relabelled as the CA key's and back (secp256k1 vs P-256)."""
    swap = {"sigkey": "ca-sigkey", "ca-sigkey": "sigkey"}
    by = {c.kind: c for c in items if c.kind in swap}
    out = [c for c in items if c.kind not in swap]
    out += [
        by["sigkey"].model_copy(update={"kind": "ca-sigkey"}),
        by["ca-sigkey"].model_copy(update={"kind": "sigkey"}),
    ]
    return out


def _env_as_key(items: list[api.CarriedSubshare]) -> list[api.CarriedSubshare]:
    """App A's env dealing sent as the group's signing key (same set of labels: sigkey dropped)."""
    a = next(c for c in items if c.app_id == APP_A.hex())
    return [c for c in items if c.kind != "sigkey"] + [a.model_copy(update={"kind": "sigkey", "app_id": ""})]


def _own_sharing(items: list[api.CarriedSubshare]) -> list[api.CarriedSubshare]:
    """A dealer carries a sharing with ANOTHER public key for app A (its own fresh one, self-consistent)."""
    fresh = tx.dkg_local(3, 5)
    d = sr.reshare_deal(G, fresh[0].commitments, 1, fresh[0].share, 4, 7)
    return [
        c.model_copy(
            update={
                "old_commitments": [p.hex() for p in fresh[0].commitments],
                "commitments": [p.hex() for p in d.commitments],
                "subshare": G.scalar(d.subshares[5]).hex(),
            }
        )
        if c.app_id == APP_A.hex()
        else c
        for c in items
    ]


def _drop_app(items: list[api.CarriedSubshare]) -> list[api.CarriedSubshare]:
    return [c for c in items if c.app_id != APP_B.hex()]


def _dup(items: list[api.CarriedSubshare]) -> list[api.CarriedSubshare]:
    return [*items, items[0]]


@pytest.mark.parametrize(
    "attack", [_swap_apps, _swap_apps_keep_old, _kind_swap, _env_as_key, _own_sharing, _drop_app, _dup]
)
def test_a_dealer_that_swaps_or_replaces_a_carried_sharing_is_refused(
    old_world: dict[str, object], attack: object
) -> None:
    items = _deal(old_world)
    honest = _for(items, 5)
    with pytest.raises(KmsClientError):
        carry_receive(_mutate(honest, 2, attack), index=5, t_new=4, n_new=7)


@pytest.mark.parametrize("seed", range(3))
def test_generated_mutations_of_a_carried_subshare_or_dealing_are_refused(
    old_world: dict[str, object], seed: int
) -> None:
    rng = random.Random(seed)
    items = _deal(old_world)
    honest = _for(items, 6)
    for _ in range(12):
        dealer = rng.choice([1, 2, 3])
        k = rng.randrange(len(honest[dealer]))
        c = honest[dealer][k]
        field = rng.choice(["subshare", "commitments", "old_commitments"])
        if field == "subshare":
            raw = bytearray(bytes.fromhex(c.subshare))
            raw[rng.randrange(32)] ^= 1 << rng.randrange(8)
            new = c.model_copy(update={"subshare": raw.hex()})
        else:
            pts = list(getattr(c, field))
            pts[rng.randrange(len(pts))] = (
                pts[(rng.randrange(len(pts)) + 1) % len(pts)] if len(pts) > 1 else pts[0]
            )
            pts.reverse()
            new = c.model_copy(update={field: pts})
        if new == c:
            continue
        mutated = {d: list(v) for d, v in honest.items()}
        mutated[dealer][k] = new
        with pytest.raises(KmsClientError):
            carry_receive(mutated, index=6, t_new=4, n_new=7)


def test_too_few_dealers_or_old_shares_mixed_with_new_do_not_give_the_key(
    old_world: dict[str, object],
) -> None:
    items = _deal(old_world)
    two = {d: v for d, v in _for(items, 4).items() if d in (1, 2)}
    with pytest.raises(KmsClientError, match="exactly t_old"):
        carry_receive(two, index=4, t_new=4, n_new=7)
    new = {j: carry_receive(_for(items, j), index=j, t_new=4, n_new=7).env[APP_A] for j in (1, 2, 3, 4)}
    env_a: list[tx.EnvKeyShare] = old_world["env_a"]  # type: ignore[assignment]
    point = G.base_mul(12345)
    # an old share does not fit the new commitments (its partial's proof fails), nor combine with new ones
    mixed = [tx.partial_decrypt(env_a[0], APP_A, point)] + [
        tx.partial_decrypt(new[j], APP_A, point) for j in (2, 3, 4)
    ]
    with pytest.raises(tx.ThresholdEcdhError):
        tx.combine(new[1].commitments, APP_A, point, mixed)
    good = tx.combine(
        new[1].commitments, APP_A, point, [tx.partial_decrypt(new[j], APP_A, point) for j in new]
    )
    assert good == tx.combine(
        env_a[0].commitments, APP_A, point, [tx.partial_decrypt(s, APP_A, point) for s in env_a[:3]]
    )


def test_a_carried_env_share_is_never_silently_dropped_for_an_old_one(
    tmp_path: Path, old_world: dict[str, object]
) -> None:
    # a 3-of-5 -> 3-of-5 reshare (same t and index): member 2 re-joins into its old home
    items = {
        d: carry_deal(
            epoch=1,
            index=d,
            t_new=3,
            n_new=5,
            env_store=old_world["stores"][d],  # type: ignore[index]
            signing_key=None,
            ca_key=None,
        )
        for d in (1, 3, 4)
    }
    carried = carry_receive(_for(items, 2), index=2, t_new=3, n_new=5)
    store: EnvKeyStore = old_world["stores"][2]  # type: ignore[index]
    old = store.get(1, APP_A)
    assert old is not None and carried.env[APP_A].share != old.share
    saved: list[str] = []
    try:
        seal_carried(
            carried, 1, store, lambda k, f: saved.append(f) or tmp_path, signing_file="s", ca_file="c"
        )
    except Exception:  # a clear refusal is a safe outcome too
        return
    fresh = _store(store.dir, 2, 3)
    assert fresh.get(1, APP_A) == carried.env[APP_A], "the old polynomial's share was kept"


def test_a_home_with_old_env_shares_of_the_epoch_is_refused_before_anything_is_written(
    tmp_path: Path, old_world: dict[str, object]
) -> None:
    """R7-2's fix: seal_carried (and the launcher, before it saves the round's root share) refuses a home
    holding env shares of the round's epoch with a clear error, writing nothing; a fresh home takes them."""
    items = {
        d: carry_deal(
            epoch=1,
            index=d,
            t_new=3,
            n_new=5,
            env_store=old_world["stores"][d],  # type: ignore[index]
            signing_key=old_world["sig"][d - 1],  # type: ignore[index]
            ca_key=None,
        )
        for d in (1, 3, 4)
    }
    carried = carry_receive(_for(items, 2), index=2, t_new=3, n_new=5)
    store: EnvKeyStore = old_world["stores"][2]  # type: ignore[index]
    before = sorted(p.name for p in store.dir.iterdir()), store.get(1, APP_A)
    saved: list[str] = []
    with pytest.raises(BootstrapError, match="already holds 2 env share"):
        refuse_old_env_shares(1, store)
    with pytest.raises(BootstrapError, match="fresh home"):
        seal_carried(
            carried, 1, store, lambda k, f: saved.append(f) or tmp_path, signing_file="s", ca_file="c"
        )
    assert (
        saved == []
        and (sorted(p.name for p in store.dir.iterdir()), _store(store.dir, 2, 3).get(1, APP_A)) == before
    )
    # the same carried shares into a fresh home: every env share and the signing key share sealed
    fresh = _store(tmp_path / "fresh-2", 2, 3)
    refuse_old_env_shares(1, fresh)
    seal_carried(carried, 1, fresh, lambda k, f: saved.append(f) or tmp_path, signing_file="s", ca_file="c")
    assert saved == ["s"] and {a: _store(fresh.dir, 2, 3).get(1, a) for a in (APP_A, APP_B)} == carried.env
    # another epoch's shares in the home do not stop a round of epoch 2
    refuse_old_env_shares(2, store)


# ------------------------------------------------------------------------------- quorum and app-CA cache


def test_every_quorum_leaves_an_honest_dealer_beside_t_minus_1_colluders() -> None:
    """A coordinator with t−1 colluding members cannot run a ceremony whose key they know: each member
    refuses a view of fewer than ceremony_quorum(t, n) dealers (tests/review6, generated views), and that
    quorum always exceeds t−1, for every committee size the code allows."""
    for n in range(1, 65):
        for t in range(1, n + 1):
            q = ceremony_quorum(t, n)
            assert t <= q <= n and q - (t - 1) >= 1, (t, n, q)


def test_a_kept_app_ca_relabelled_by_the_host_is_not_served_and_the_cache_stays_bounded(
    tmp_path: Path,
) -> None:
    """The host's steps: copy the sealed entry of (epoch 1, app A, key KA) over the file of (1, B, KB), or of
    (2, A, KA); then fill the cache past its bound."""
    cache = AppCaCache(tmp_path / "ca", lambda b: b, lambda b: b, max_entries=8)
    ka, kb = b"\x02" + b"\x11" * 32, b"\x03" + b"\x22" * 32
    assert cache.put(1, APP_A, ka, "CERT-A")
    assert cache.put(1, APP_A, ka, "CERT-OTHER") is False  # the first kept stays
    for epoch, app, key in ((1, APP_B, kb), (2, APP_A, ka), (1, APP_A, kb), (1, APP_B, ka)):
        cache._path(epoch, app, key).write_bytes(cache._path(1, APP_A, ka).read_bytes())
        assert cache.get(epoch, app, key) is None, (epoch, app, key)
    assert cache.get(1, APP_A, ka) == "CERT-A"
    for k in range(40):
        cache.put(1, bytes([k]) * 20, ka, f"C{k}")
    assert len(list(cache.dir.glob("*.sealed"))) <= 8
    assert not [p for p in cache.dir.iterdir() if not p.name.endswith(".sealed")]  # no temp file left


def test_apps_anyone_can_deploy_cannot_block_every_future_reshare(tmp_path: Path) -> None:
    """The attacker's steps: `deploy_and_register_app` 1025 times (open to anyone: gas only), then one
    unauthenticated GetAppEnvEncryptPubKey per app (the node-wide budget lets 30 ceremonies a minute through:
    about 35 minutes). Every member then holds 1025 env shares of the epoch. Here: one member's store with
    1025 apps' shares (one sharing relabelled per app: the count is what matters), then its reshare deal."""
    share = tx.dkg_local(3, 5)[0]
    store = _store(tmp_path / "member-1", 1, 3)
    for k in range(1025):
        store.put(1, k.to_bytes(20, "big"), share)
    items = carry_deal(epoch=1, index=1, t_new=3, n_new=5, env_store=store, signing_key=None, ca_key=None)
    assert len(items) == 1025
    # fixed (R7-5): the bound is per ReshareDeal answer (MAX_CARRIED_PAGE sharings, PAGE_BYTES): the
    # receiver asks page after page by offset and gets every sharing exactly once
    pages: list[list[api.CarriedSubshare]] = []
    while (offset := sum(map(len, pages))) < len(items):
        pages.append(carried_page(items, 2, offset))
        assert 1 <= len(pages[-1]) <= api.MAX_CARRIED_PAGE
        assert (
            len(
                api.ReshareDealResponse(
                    session="", dealer=1, commitments=[], subshare="", carried=pages[-1]
                ).model_dump_json()
            )
            < 1 << 20
        )
    assert len(pages) >= 2
    got = [c.app_id for p in pages for c in p]
    assert sorted(got) == [k.to_bytes(20, "big").hex() for k in range(1025)]


def test_sealed_shares_and_answers_swapped_between_epochs_do_not_open(tmp_path: Path) -> None:
    """The host's steps: copy `1-<A>.sealed` / `1-<A>.answer` over `2-<A>.*` (another epoch, same app) and
    `1-<B>.*` (same epoch, another app)."""
    store = _store(tmp_path / "m", 1, 3)
    share = tx.dkg_local(3, 5)[0]
    store.put(1, APP_A, share)
    answer = api.EnvEncryptPubKeyResponse(
        public_key=tx.x25519_public_key(share.commitments).hex(),
        signature="00" * 65,
        timestamp=1,
        signature_v1="00" * 65,
    )
    store.put_answer(1, APP_A, answer)
    assert store.answer(1, APP_A) == answer
    for epoch, app in ((2, APP_A), (1, APP_B)):
        store._path(epoch, app).write_bytes(store._path(1, APP_A).read_bytes())
        store._answer_path(epoch, app).write_bytes(store._answer_path(1, APP_A).read_bytes())
        fresh = _store(store.dir, 1, 3)
        with pytest.raises(SealingError, match="relabelled"):
            fresh.get(epoch, app)
        assert fresh.answer(epoch, app) is None
