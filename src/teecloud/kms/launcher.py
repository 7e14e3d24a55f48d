"""One way to start a KMS, used by `teecloud kms up` and by the local cloud (`teecloud up`).

    launch_kms(KmsLaunch(...)) -> RunningKms

(1) boot the KMS's TEE (measure its build into RTMR3), (2) unseal or create its root keys and wrap them in
the `RootKeyHolder` the service is given (nothing else sees the root), (3) let the caller publish what
KmsAuth must know (`on_keys`; best effort: serving does not depend on it), (4) build the service and
(5) start both listeners, the admin one behind the token kept in `<home>/kms/admin-token` (0600, created
once).

The launcher knows nothing of the simulator: a caller in dev mode passes the simulated platform's collateral
and OS-image references (`teecloud.tee.simulated`) like any other.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from teecloud._fs import atomic_write
from teecloud.kms.audit import AuditLog
from teecloud.kms.authz import AuthChain
from teecloud.kms.bootstrap import KmsIdentity, boot_kms_tee, finish_kms_boot, kms_dir, start_kms_state
from teecloud.kms.errors import BootstrapError, KmsError
from teecloud.kms.peering import PeerIdentity
from teecloud.kms.rootkeys import LocalRootKeys, RootKeyHolder
from teecloud.kms.sealing import platform_sealing_secret, seal, sealing_key, unseal
from teecloud.kms.server import KmsServer
from teecloud.kms.service import CollateralSource, KmsConfig, KmsService, OsImageReference
from teecloud.kms.threshold import (
    ReshareDealer,
    ThresholdEvaluator,
    ThresholdShare,
    erase_share,
    load_shares,
    save_share,
)
from teecloud.kms.threshold_carry import CarriedShares, refuse_old_env_shares, seal_carried
from teecloud.kms.threshold_env import ENV_DIR, EnvKeyStore
from teecloud.kms.threshold_sign import (
    CA_SHARE_FILE,
    SIGNING_SHARE_FILE,
    open_ca_signer,
    open_signer,
    save_ca_root,
    save_signing_share,
)
from teecloud.tee.base import TeePlatform

__all__ = [
    "ADMIN_TOKEN_FILE",
    "KmsLaunch",
    "RunningKms",
    "admin_token_path",
    "launch_kms",
    "load_admin_token",
]

log = logging.getLogger("teecloud.kms")

ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 (a file name)


def admin_token_path(home: Path | None = None) -> Path:
    return kms_dir(home) / ADMIN_TOKEN_FILE


def load_admin_token(home: Path | None = None) -> str:
    """The admin listener's bearer token: read from `<home>/kms/admin-token`, created (0600) when absent."""
    path = admin_token_path(home)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if not token:
        token = secrets.token_urlsafe(32)
        atomic_write(path, token.encode(), mode=0o600)
    return token


@dataclass(frozen=True)
class KmsLaunch:
    """Everything a KMS is started from. `chain` is a ChainClient (or anything with is_app_allowed /
    is_kms_allowed, and optionally block_number, set_kms_info and label)."""

    tee: TeePlatform
    chain: AuthChain
    collateral: CollateralSource
    dev: bool = False
    home: Path | None = None
    os_image_reference: OsImageReference | None = None
    host: str = "127.0.0.1"
    port: int = 0
    admin_port: int = 0
    gateway_app_id: str = ""
    kms_contract: str = ""
    dev_root_der: bytes | None = None
    # Threshold node: serve the sealed share in `<home>/kms/threshold-share.sealed` (teecloud.kms.threshold);
    # its own root keys are then only its server identity (no publishing, no whole-key endpoints).
    threshold: bool = False
    # A share-less threshold node that deals in DKG rounds (admin /dkg/open) and serves nothing else.
    threshold_dealer: bool = False
    # Join a DKG or reshare round at boot: called with (tee, identity) before the boot finishes (the dealers
    # release sub-shares to boot-time evidence only); its share is sealed, then the node serves it.
    join: Callable[[TeePlatform, KmsIdentity], ThresholdShare] | None = None
    # A reshare's join: what the dealers carried besides the root share (kms.threshold_carry), after join
    join_carried: CarriedShares | None = None
    # An on-chain permission counts only once this many blocks deep (teecloud.peer.ChainGate); 0: the head.
    finality_depth: int = 0
    # Called with (holder, identity, created) once the root keys are loaded; returns what was published.
    on_keys: Callable[[RootKeyHolder, KmsIdentity, bool], str] | None = None
    # Refuse app key requests that do not send the CVM's measured app-compose (KmsConfig.require_app_compose)
    require_app_compose: bool = False


@dataclass
class RunningKms:
    server: KmsServer
    service: KmsService
    keys: RootKeyHolder
    identity: KmsIdentity
    created: bool
    published: str = ""  # what on_keys published (e.g. the bootstrap quote hash written to KmsAuth)
    publish_error: str = ""
    join_error: str = ""  # a rotation round this node failed to join (it serves its older epochs)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def admin_url(self) -> str:
        return self.server.admin_url

    def stop(self) -> None:
        self.server.stop()


def _member_at_boot(
    spec: KmsLaunch, identity: KmsIdentity
) -> tuple[dict[int, ThresholdShare], PeerIdentity, str]:
    """A threshold member's boot, before its boot finishes: join a round (when told to), load its shares (one
    per root epoch), and make its peer identity for the newest epoch from a quote taken now
    (teecloud.kms.peering: the boot-time key). A rotation's join that fails leaves the epochs held serving:
    nothing new is sealed and the error is returned."""
    join_error = ""
    try:
        held = load_shares(spec.tee, identity, spec.home)
        if spec.join is not None:
            try:
                joined = spec.join(spec.tee, identity)
                if held and joined.epoch < max(held):
                    raise BootstrapError(
                        f"the round makes epoch {joined.epoch}, older than this node's epoch {max(held)}: "
                        "rotation goes forward only"
                    )
                if spec.join_carried is not None:  # before the round's root share is saved (R7-2)
                    refuse_old_env_shares(joined.epoch, _env_store(spec, identity, joined))
            except KmsError as exc:
                if not held:
                    raise
                # a rotation's join (teecloud.kms.rotation) that failed: the old epoch keeps serving; the
                # round is re-run
                join_error = exc.diagnostics()
                log.error("joining the round failed; serving the epochs this node holds: %s", join_error)
            else:
                save_share(joined, spec.tee, identity, spec.home)
                if spec.join_carried is not None:
                    _seal_carried(spec, identity, joined, spec.join_carried)
                held = load_shares(spec.tee, identity, spec.home)
        if not held:
            raise BootstrapError(
                f"no threshold share sealed under {kms_dir(spec.home)}: run the key ceremony first "
                "(`teecloud kms threshold-init` in development)"
            )
        newest = held[max(held)]
        peer = PeerIdentity.at_boot(spec.tee, epoch=newest.epoch, index=newest.index, share=newest.share)
        return held, peer, join_error
    finally:
        finish_kms_boot(spec.tee)


def _env_store(spec: KmsLaunch, identity: KmsIdentity, joined: ThresholdShare) -> EnvKeyStore:
    """The env-share store of a joined member's home, sealed like its root share."""
    key, mr = sealing_key(platform_sealing_secret(spec.tee), identity.mr_aggregated), identity.mr_aggregated
    return EnvKeyStore(
        kms_dir(spec.home) / ENV_DIR,
        lambda data: seal(key, mr, data),
        lambda blob: unseal(key, mr, blob),
        index=joined.index,
        t=joined.t,
    )


def _seal_carried(
    spec: KmsLaunch, identity: KmsIdentity, joined: ThresholdShare, carried: CarriedShares
) -> None:
    """A reshare's carried shares, sealed like the node's own (env shares in its EnvKeyStore, the signing and
    CA key shares beside the root share), before it serves."""
    seal_carried(
        carried,
        joined.epoch,
        _env_store(spec, identity, joined),
        lambda share, file: save_signing_share(share, spec.tee, identity, spec.home, file=file),
        signing_file=SIGNING_SHARE_FILE,
        ca_file=CA_SHARE_FILE,
    )
    log.info(
        "reshare carried %d env shares%s%s",
        len(carried.env),
        ", the signing key share" if carried.signing_key else "",
        ", the CA key share" if carried.ca_key else "",
    )


def launch_kms(spec: KmsLaunch) -> RunningKms:
    # (1)-(2)
    member = spec.threshold or spec.join is not None
    identity = boot_kms_tee(spec.tee, finish=not member)
    shares: dict[int, ThresholdShare] = {}
    peer_identity: PeerIdentity | None = None
    join_error = ""
    if member:
        shares, peer_identity, join_error = _member_at_boot(spec, identity)
    state, created = start_kms_state(spec.tee, identity, now=int(time.time()), home=spec.home)
    holder: RootKeyHolder = LocalRootKeys(state)  # the only place the sealed root becomes a holder
    evaluator = None
    reshare = ReshareDealer(None) if spec.threshold_dealer else None
    if shares:
        share = shares[max(shares)]
        evaluator_older = [s for e, s in sorted(shares.items()) if e != share.epoch]
        evaluator = ThresholdEvaluator(
            share,
            gateway_app_id=spec.gateway_app_id,
            signer=open_signer(spec.tee, identity, spec.home),
            older=evaluator_older,
        )
        reshare = ReshareDealer(share, older=evaluator_older)  # a reshare plan names its epoch
    # (3)
    published = publish_error = ""
    if spec.on_keys is not None and evaluator is None and reshare is None:
        try:
            published = spec.on_keys(holder, identity, created)
        except Exception as exc:  # publishing is governance's business; serving does not depend on it
            publish_error = f"{type(exc).__name__}: {exc}"
            log.warning("could not publish KMS info to KmsAuth: %s", publish_error)
    # (4)
    dev_root = spec.dev_root_der
    if spec.dev and dev_root is None:
        dev_root_fn = getattr(spec.tee, "dev_root_der", None)
        dev_root = dev_root_fn() if callable(dev_root_fn) else None
    service = KmsService(
        state=state,
        identity=identity,
        tee=spec.tee,
        chain=spec.chain,
        collateral=spec.collateral,
        audit=AuditLog(kms_dir(spec.home) / "audit.jsonl"),
        config=KmsConfig(
            dev_mode=spec.dev,
            gateway_app_id=spec.gateway_app_id,
            kms_contract=spec.kms_contract,
            require_app_compose=spec.require_app_compose,
            chain_finality_depth=spec.finality_depth,
        ),
        dev_root_der=dev_root if spec.dev else None,
        # checked_head (a ChainConnection's) also checks the endpoint still serves the same chain id
        block_number=getattr(spec.chain, "checked_head", None) or getattr(spec.chain, "block_number", None),
        os_image_reference=spec.os_image_reference,
        root_keys=holder,
        threshold=evaluator,
        reshare=reshare,
        erase_share=(lambda: erase_share(spec.home)) if evaluator is not None else None,
        peer_identity=peer_identity,
        install_signing_key=(
            lambda key: (
                save_signing_share(key, spec.tee, identity, spec.home),
                open_signer(spec.tee, identity, spec.home),
            )[1]
        ),
        # the group's P-256 CA key (issue 19's app CA): its own sealed share, pool and root certificate
        ca_signer=open_ca_signer(spec.tee, identity, spec.home) if evaluator is not None else None,
        install_ca_key=(
            lambda key: (
                save_signing_share(key, spec.tee, identity, spec.home, file=CA_SHARE_FILE),
                open_ca_signer(spec.tee, identity, spec.home),
            )[1]
        ),
        save_ca_root=lambda cert: save_ca_root(cert, spec.home),
    )
    if reshare is not None and evaluator is not None:
        reshare.carry = service.carry_for_reshare  # a reshare deals everything this node holds of the epoch
    # (5)
    server = KmsServer(
        service,
        host=spec.host,
        port=spec.port,
        admin_port=spec.admin_port,
        admin_token=load_admin_token(spec.home),
        chain_label=str(getattr(spec.chain, "label", "") or ""),
    ).start()
    return RunningKms(server, service, holder, identity, created, published, publish_error, join_error)
