"""Threshold mode: a reshare carries everything a node holds of an epoch (issue 19), not only its root
(VOPRF) share: its share of every app's env sharing of that epoch (kms.threshold_env), and its shares of the
group's signing key (secp256k1) and CA key (P-256) (kms.threshold_sign). Each is re-dealt in the same round
by the same t_old dealers with keys.share_repair's resharing (Desmedt–Jajodia 1997, as Herzberg et al.
CRYPTO '95 use it): the same public keys, new shares that do not combine with old ones.

    dealer (ReshareDealer.open)   carry_deal: one ReshareDealing per sharing it holds, in memory with the
                                  round's root dealing; ReshareDeal hands new member j its sub-shares of
                                  each (`carried`), one page at a time (carried_page: from an offset, at
                                  most MAX_CARRIED_PAGE and PAGE_BYTES per answer, with the total), under
                                  the round's rule (boot-time evidence of an allowed build, member token,
                                  each page once)
    receiver (join_reshare)       collects every page of every dealer (kms.threshold_client._collect), then
                                  carry_receive: every dealer must carry the same sharings with the same old
                                  commitments (a dealer that differs is named); each is checked
                                  (C_0 = Y_i, sub-share against the dealing) and summed with Lagrange
                                  weights; the result keeps each old public key; then
                                  check_carried_keys: the signing and CA keys carried are the ones KmsGroup
                                  records for the epoch (RecordedKeys, read at the finality depth before
                                  any page was asked for), else the join fails naming the dealers
    receiver (launcher)           seal_carried: env shares into the node's EnvKeyStore, the signing and CA
                                  shares beside the root share, all before the node serves

A sharing that a dealer lacks (an env key made while it was down and never recovered) is not carried by it:
the receiver refuses a round whose dealers do not all carry the same set, naming them (recover first:
docs/kms.md, runbook).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from teecloud.keys import share_repair as sr
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys._groups import P256, SECP256K1, Group
from teecloud.keys.errors import KeysError
from teecloud.kms import api
from teecloud.kms.errors import BootstrapError, KmsClientError
from teecloud.kms.threshold_env import EnvKeyStore

__all__ = [
    "CarriedItem",
    "CarriedShares",
    "RecordedKeys",
    "carried_for",
    "carried_page",
    "carry_deal",
    "carry_receive",
    "check_carried_keys",
    "refuse_old_env_shares",
    "seal_carried",
]

MAX_CARRIED_PAGE = api.MAX_CARRIED_PAGE  # sharings per ReshareDeal answer (a page)
MAX_CARRIED_TOTAL = api.MAX_CARRIED_TOTAL  # sharings per round, over all its pages
PAGE_BYTES = (
    512 * 1024
)  # a page's carried sharings as JSON: well under the client's 1 MiB (MAX_RESPONSE_BYTES)
_KINDS: dict[str, Group] = {"env": tx.EDWARDS25519, "sigkey": SECP256K1, "ca-sigkey": P256}


def _group(kind: str) -> Group:
    return _KINDS[kind]


def _scalar_hex(kind: str, k: int) -> str:
    return _group(kind).scalar(k).hex()


def _scalar_of(kind: str, text: str) -> int:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError("a scalar is 32 bytes")
    return int.from_bytes(raw, "little" if kind == "env" else "big")


@dataclass(frozen=True)
class CarriedItem:
    """One sharing a dealer re-deals: `kind` ("env", "sigkey", "ca-sigkey"), the app (env only), the old
    commitments and the dealing (secret sub-shares)."""

    kind: str
    app_id: bytes
    old_commitments: tuple[bytes, ...]
    dealing: sr.ReshareDealing = field(repr=False)


def carry_deal(
    *,
    epoch: int,
    index: int,
    t_new: int,
    n_new: int,
    env_store: EnvKeyStore | None,
    signing_key: te.KeyShare | None,
    ca_key: te.KeyShare | None,
) -> list[CarriedItem]:
    """Dealer `index`'s re-dealing of every sharing it holds of `epoch` (its sealed env shares, and the
    group's signing and CA key shares)."""
    out: list[CarriedItem] = []
    if env_store is not None:
        for app_id in env_store.apps(epoch):
            share = env_store.get(epoch, app_id)
            if share is None:
                continue
            d = sr.reshare_deal(tx.EDWARDS25519, share.commitments, index, share.share, t_new, n_new)
            out.append(CarriedItem("env", app_id, share.commitments, d))
    for kind, key in (("sigkey", signing_key), ("ca-sigkey", ca_key)):
        if key is not None:
            if key.index != index:
                raise KeysError(f"the {kind} share is share {key.index}, not {index}")
            d = sr.reshare_deal(key.group, key.commitments, index, key.share, t_new, n_new)
            out.append(CarriedItem(kind, b"", key.commitments, d))
    if len(out) > MAX_CARRIED_TOTAL:
        raise KeysError(f"more than {MAX_CARRIED_TOTAL} sharings to carry")
    return out


def carried_for(items: Sequence[CarriedItem], index: int) -> list[api.CarriedSubshare]:
    """What new member `index` receives of each carried sharing (ReshareDealResponse.carried)."""
    return [
        api.CarriedSubshare(
            kind=c.kind,
            app_id=c.app_id.hex(),
            old_commitments=[p.hex() for p in c.old_commitments],
            commitments=[p.hex() for p in c.dealing.commitments],
            subshare=_scalar_hex(c.kind, c.dealing.subshares[index]),
        )
        for c in items
    ]


def carried_page(
    items: Sequence[CarriedItem], index: int, offset: int, *, page_size: int = MAX_CARRIED_PAGE
) -> list[api.CarriedSubshare]:
    """The page of `carried_for` from `offset`: at most `page_size` (≤ MAX_CARRIED_PAGE) sharings, and no
    more than PAGE_BYTES of them as JSON (a t = 64 sharing is ≈ 9 kB), at least one while any is left."""
    if not 1 <= page_size <= MAX_CARRIED_PAGE:
        raise ValueError(f"a page holds 1..{MAX_CARRIED_PAGE} carried sharings")
    out: list[api.CarriedSubshare] = []
    size = 0
    for c in carried_for(items[offset : offset + page_size], index):
        size += len(c.model_dump_json())
        if out and size > PAGE_BYTES:
            break
        out.append(c)
    return out


@dataclass
class CarriedShares:
    """A new member's shares of the carried sharings (each checked against its new commitments)."""

    env: dict[bytes, tx.EnvKeyShare] = field(default_factory=dict)
    signing_key: te.KeyShare | None = None
    ca_key: te.KeyShare | None = None


def carry_receive(
    answers: Mapping[int, Sequence[api.CarriedSubshare]], *, index: int, t_new: int, n_new: int
) -> CarriedShares:
    """New member `index`: the dealers' (`answers`: dealer -> what it carried for this member) sub-shares of
    each sharing, all dealers carrying the same sharings with the same old commitments; each summed
    (keys.share_repair.reshare_receive). Raises KmsClientError naming a dealer that differs or cheats."""
    by: dict[int, dict[tuple[str, str], api.CarriedSubshare]] = {}
    for dealer, items in answers.items():
        keyed = {(c.kind, c.app_id): c for c in items}
        if len(keyed) != len(items):
            raise KmsClientError(f"dealer {dealer} carried a sharing twice")
        by[dealer] = keyed
    sets = {d: set(k) for d, k in by.items()}
    first = next(iter(sets.values()), set())
    differ = sorted(d for d, s in sets.items() if s != first)
    if differ:
        raise KmsClientError(
            f"the dealers do not carry the same sharings (dealers {differ} differ from dealer "
            f"{min(sets)}): a dealer lacks an env share — recover it first (docs/kms.md, runbook)"
        )
    out = CarriedShares()
    for kind, app_hex in sorted(first):
        g = _group(kind)
        try:
            olds = {d: tuple(bytes.fromhex(c) for c in by[d][(kind, app_hex)].old_commitments) for d in by}
            old = olds[min(olds)]
            off = sorted(d for d, c in olds.items() if c != old)
            if off:
                raise KmsClientError(f"dealers {off} carry another {kind} sharing {app_hex} than the others")
            dealings = {d: tuple(bytes.fromhex(c) for c in by[d][(kind, app_hex)].commitments) for d in by}
            subs = {d: _scalar_of(kind, by[d][(kind, app_hex)].subshare) for d in by}
            share, new = sr.reshare_receive(g, old, index, dealings, subs)
            if kind == "env":
                out.env[bytes.fromhex(app_hex)] = tx.EnvKeyShare(index, t_new, share, new)
            elif kind == "sigkey":
                out.signing_key = te.KeyShare(index, t_new, n_new, share, new, g.name)
            else:
                out.ca_key = te.KeyShare(index, t_new, n_new, share, new, g.name)
        except (KeysError, ValueError) as exc:
            raise KmsClientError(f"the carried {kind} sharing {app_hex or ''} failed: {exc}") from exc
    return out


@dataclass(frozen=True)
class RecordedKeys:
    """What KmsGroup records of an epoch's group keys (teecloud.chain.kmsgroup: `signing_key`, the key of
    `group_ca`), each 33 bytes SEC1 compressed, None where the chain records none."""

    signing_key: bytes | None
    ca_key: bytes | None


def check_carried_keys(
    carried: CarriedShares, recorded: RecordedKeys, *, epoch: int, dealers: Sequence[int]
) -> None:
    """A new member's carried signing and CA key sharings are of the keys KmsGroup records for `epoch`:
    each sharing's C_0 (its group public key) is the recorded key, and a key the chain records is carried.
    Dealers that agree among themselves pass carry_receive's checks whatever key they re-deal; only the
    chain says which key is the group's. Raises KmsClientError naming the dealers; writes nothing."""
    for what, share, on_chain in (
        ("signing key (secp256k1)", carried.signing_key, recorded.signing_key),
        ("CA key (P-256)", carried.ca_key, recorded.ca_key),
    ):
        got = share.group_public_key if share is not None else None
        if got == on_chain:
            continue
        dealt = f"carried {got.hex()}" if got is not None else "carried none"
        chain = f"KmsGroup records {on_chain.hex()}" if on_chain is not None else "KmsGroup records none"
        raise KmsClientError(
            f"dealers {sorted(dealers)} {dealt} as the group's {what} of epoch {epoch}, but {chain}: "
            "refusing to join (nothing was sealed; a group key the chain does not name is not the group's)"
        )


def refuse_old_env_shares(epoch: int, env_store: EnvKeyStore) -> None:
    """A reshare's new member joins only into a home without env shares of the round's epoch: such shares
    are of the old polynomials (another index or t, or the same ones on another sharing), and keeping
    them beside the new root share would serve a share of the wrong sharing (review 7, R7-2)."""
    old = env_store.apps(epoch)
    if old:
        raise BootstrapError(
            f"this home already holds {len(old)} env share(s) of epoch {epoch} (e.g. app {old[0].hex()}) "
            "from before this reshare: join the round into a fresh home (or retire this one first)"
        )


def seal_carried(
    carried: CarriedShares,
    epoch: int,
    env_store: EnvKeyStore,
    save_key: Callable[[te.KeyShare, str], Path],
    *,
    signing_file: str,
    ca_file: str,
) -> None:
    """Seal a new member's carried shares (the env shares one atomic write each; the key shares beside the
    root share). A home that already holds env shares of `epoch` is refused before anything is written
    (`refuse_old_env_shares`; the launcher runs that check before it saves the round's root share too)."""
    refuse_old_env_shares(epoch, env_store)
    for app_id, share in sorted(carried.env.items()):
        env_store.put(epoch, app_id, share)
    if carried.signing_key is not None:
        save_key(carried.signing_key, signing_file)
    if carried.ca_key is not None:
        save_key(carried.ca_key, ca_file)
