"""The KMS service: its decisions (KmsService), independent of HTTP (kms.http) and of the listeners
(kms.server).

Trust procedure for every attested request (`KmsService.attest`):
  (1) the TLS layer (stdlib ssl) proved the caller holds the private key of the certificate it presented;
      the chain to the public temporary CA carries no trust (docs/kms.md);
  (2) the certificate is fresh: now within [not_before, not_after] and its lifetime at most
      `KmsConfig.max_client_cert_lifetime_s`;
  (3) RA-TLS: the evidence is of a kind the KMS accepts (TDX), the quote verifies against collateral for
      its FMSPC (a development root only in dev mode), the event log replays to the RTMRs
      (teecloud.attestation.verifier.verify_peer_evidence), report_data = sha512("ratls-cert:" ‖ SPKI)
      binds that same key (teecloud.keys.ratls.check_key_binding), and the policy holds (TCB floor, no
      debug);
  (4) production mode never accepts simulated evidence, whatever the verifier said;
  (5) boot_info is built from the verified evidence only;
  (1)-(5) are the shared RA-TLS peer verifier's (teecloud.peer.PeerVerifier), under the KMS's PeerPolicy;
  (6) every releasing endpoint (GetAppKey, SignCert, GetKmsKey): the quoted RTMR3 is exactly the boot
      grammar's value for the caller's identity — keys only to a booting CVM, never on a quote taken after
      boot (teecloud.attestation.boottime); for apps the OS image and VM shape are the measured ones, and
      the boot-nonce holds a fresh challenge of this KMS, so a request is bound to one boot
      (teecloud.kms.challenge);
then, per endpoint, the chain decides (KmsAuth.isAppAllowed / isKmsAllowed, failing closed) and only then
are keys derived. Each request is audited with its boot_info, decision and reason, never with keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509

from teecloud.attestation.policy import Policy
from teecloud.chain.api import BlockRef
from teecloud.chain.errors import NotDeployed
from teecloud.ids import HexError, parse_app_id
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.certs import cert_to_pem
from teecloud.keys.errors import KeysError
from teecloud.kms import api
from teecloud.kms.audit import AuditLog, new_request_id
from teecloud.kms.authz import (
    AuthChain,
    AuthorizedApp,
    Authorizer,
    ChainAuthorizer,
    OsImageReference,
    parse_vm_config,
)
from teecloud.kms.bootstrap import KmsIdentity, KmsState
from teecloud.kms.challenge import BootChallenges, FirstUseLedger
from teecloud.kms.errors import AccessDenied, KmsUsageError, SealingError
from teecloud.kms.issuer import KeyIssuer
from teecloud.kms.peering import AdmittedNode, Committee, PeerAdmission, PeerClient, PeerIdentity
from teecloud.kms.rootkeys import LocalRootKeys, RootKeyHolder
from teecloud.kms.rotation import FIRST_EPOCH, evaluation_epoch
from teecloud.kms.sealing import platform_sealing_secret, seal, sealing_key, unseal
from teecloud.kms.threshold import DkgPlan, ReshareDealer, ResharePlan, ThresholdEvaluator
from teecloud.kms.threshold_carry import CarriedItem, carry_deal
from teecloud.kms.threshold_env import ENV_DIR, EnvKeys, EnvKeyStore
from teecloud.kms.threshold_net import SignRounds
from teecloud.kms.threshold_sign import (
    APP_CA_CACHE_DIR,
    APP_SIGNATURE_CACHE_DIR,
    AppCaCache,
    AppSignatureCache,
    ThresholdSigner,
    app_key_signature_problem,
)
from teecloud.peer import (
    AttestedPeer,
    CollateralSource,
    PeerPolicy,
    PeerVerifier,
    StaticCollateral,
)
from teecloud.tee.base import TeePlatform

__all__ = [
    "AttestedPeer",
    "CollateralSource",
    "KmsConfig",
    "KmsService",
    "OsImageReference",
    "StaticCollateral",
    "parse_vm_config",
]

log = logging.getLogger("teecloud.kms")

# SignCert on a threshold node (docs/kms.md, "SignCert in threshold mode"): refused before anything is judged
SIGNCERT_THRESHOLD_REFUSAL = (
    "SignCert is not served in threshold mode: no KMS node holds an app CA key (it is derived inside the CVM "
    "from t partial evaluations) and the group's CA key signs only app CA certificates; the CVM's guest "
    "agent issues its certificates itself under its group-signed app CA (GetTlsKey), the same chain [leaf, "
    "app CA, group root CA]"
)

_T = TypeVar("_T")


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class KmsConfig:
    """Limits and modes, in one place.

    dev_mode                    trust the installation's development root (simulated TEEs); not for production
    max_client_cert_lifetime_s  client RA-TLS certificates valid longer than this are refused (freshness)
    clock_skew_s                tolerated clock difference for not_before
    evidence_cache_s            verified evidence is reused (keyed by certificate hash) for at most this long,
                                and never past the certificate's not_after
    signed_cert_lifetime_s      lifetime of certificates issued by SignCert
    app_cert_domains            base domains under which SignCert certifies an app's names
                                (`<app_id>[-<port>][s|g].<domain>`); the bare app id is always allowed
    max_body_bytes              request bodies above this are refused before parsing
    accepted_tcb_statuses       TCB floor enforced by the KMS itself, on top of the attestation policy
    boot_challenge_window_s     a boot's challenge (its boot-nonce) releases keys for this long after issue
    boot_challenge_max_uses     ... and for at most this many key requests (teecloud.kms.challenge)
    app_key_cache_s             derived app keys are reused per (app_id, instance_id, os image, gateway) for
                                at most this long: derivation is a pure function of the immutable root keys;
                                only the app CA certificate's not_before (the derivation time) ages. 0: off
    require_app_compose         app releasing paths refuse a request without the CVM's measured app-compose
                                (so every app's `gpu_attestation` is read: the GPU gate, docs/ai.md); off by
                                default while some key clients do not send it
    chain_finality_depth        an on-chain permission counts once this many blocks deep; removals at once
                                (teecloud.peer.ChainGate). 0: the head decides (local chains)
    """

    dev_mode: bool = False
    max_client_cert_lifetime_s: int = 3600
    clock_skew_s: int = 60
    evidence_cache_s: int = 300
    evidence_cache_entries: int = 4096
    signed_cert_lifetime_s: int = 30 * 24 * 3600
    app_cert_domains: tuple[str, ...] = ()
    max_body_bytes: int = 256 * 1024
    gateway_app_id: str = ""
    kms_contract: str = ""
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    app_key_cache_s: int = 600
    app_key_cache_entries: int = 4096
    boot_challenge_window_s: int = 600
    boot_challenge_max_uses: int = 8
    # --- gpu gate
    require_app_compose: bool = False
    # --- end gpu gate
    chain_finality_depth: int = 0


# ------------------------------------------------------------------------------------------------ logic

PEER_NODE_CERT_MAX_S = 366 * 24 * 3600  # a KMS server certificate's longest life (kms.client)
# KmsGroup's active committee per epoch (R4-6) is reused while the chain stays at the block it was read at,
# and for at most this long (a reader without block numbers reads it on every admission)
ACTIVE_COMMITTEE_CACHE_S = 30.0


def _norm_app_id(text: str) -> bytes:
    try:
        return parse_app_id(text)
    except HexError as exc:
        raise KmsUsageError(str(exc)) from exc


class KmsService:
    """The KMS's decisions, independent of HTTP (tests and the bench call it directly too)."""

    def __init__(
        self,
        *,
        state: KmsState,
        identity: KmsIdentity,
        tee: TeePlatform,
        chain: AuthChain,
        collateral: CollateralSource,
        audit: AuditLog,
        config: KmsConfig | None = None,
        policy: Policy | None = None,
        dev_root_der: bytes | None = None,
        block_number: Callable[[], int | BlockRef] | None = None,  # ChainConnection.checked_head: by hash
        os_image_reference: OsImageReference | None = None,
        root_keys: RootKeyHolder | None = None,
        challenges: BootChallenges | None = None,
        threshold: ThresholdEvaluator | None = None,
        reshare: ReshareDealer | None = None,
        erase_share: Callable[[], bool] | None = None,
        peer_identity: PeerIdentity | None = None,
        install_signing_key: Callable[[te.KeyShare], ThresholdSigner | None] | None = None,
        clock: Callable[[], float] = time.time,
        ca_signer: ThresholdSigner | None = None,
        install_ca_key: Callable[[te.KeyShare], ThresholdSigner | None] | None = None,
        save_ca_root: Callable[[x509.Certificate], object] | None = None,
    ) -> None:
        """`os_image_reference` gives an OS image's reference measurements (simulated images:
        `teecloud.tee.simulated.simulated_os_image_reference`). `root_keys` holds the root (default: the
        whole key from `state`, `LocalRootKeys`). `challenges` issues and redeems boot challenges (default:
        a fresh secret of this process, with the config's window and use count). `threshold` makes this a
        threshold node (teecloud.kms.threshold): it serves ThresholdEvaluate and refuses the whole-key
        endpoints (GetAppKey, SignCert, GetKmsKey, env keys): its own root is only its server identity.
        `reshare` (with `threshold`) lets it deal its share to a new committee (ReshareDeal); `erase_share`
        removes its sealed share when it is retired (retire_share). `peer_identity` (a threshold node's
        boot-time key and membership proof, teecloud.kms.peering) lets it talk to the other running members
        of its committee: it is also its TLS server key (kms.server.make_server_identity).
        `install_signing_key` seals a signing share made by a networked round and returns its signer
        (teecloud.kms.threshold_net). `ca_signer`, `install_ca_key`, `save_ca_root`: the same for the group's
        P-256 CA key and its root CA certificate (ThresholdSignAppCa, docs/kms.md)."""
        self.state = state
        self.identity = identity
        self.tee = tee
        self.config = config or KmsConfig()
        self.collateral = collateral
        self.audit = audit
        # The attestation policy: TCB floor UpToDate, no debug; simulated evidence only in dev mode.
        # A production KMS never accepts simulated evidence, whatever policy it was handed.
        if policy is None:
            policy = dataclasses.replace(Policy.default(), allow_simulated=self.config.dev_mode)
        elif policy.allow_simulated and not self.config.dev_mode:
            policy = dataclasses.replace(policy, allow_simulated=False)
        self.policy = policy
        if dev_root_der is not None and not self.config.dev_mode:
            raise KmsUsageError("a development root may be trusted only in dev mode")
        if self.config.dev_mode and dev_root_der is None:
            raise KmsUsageError("dev mode needs the development root certificate (dev_root_der)")
        self.dev_root_der = dev_root_der if self.config.dev_mode else None
        peer_policy = PeerPolicy(
            dev_root_der=self.dev_root_der,
            accepted_tcb_statuses=self.config.accepted_tcb_statuses,
            max_cert_lifetime_s=self.config.max_client_cert_lifetime_s,
            clock_skew_s=self.config.clock_skew_s,
            base=self.policy,
        )
        self.peers = PeerVerifier(
            peer_policy,
            collateral,
            clock=clock,
            cache_s=self.config.evidence_cache_s,
            cache_entries=self.config.evidence_cache_entries,
        )
        self.authorizer = ChainAuthorizer(
            chain, block_number=block_number, finality_depth=self.config.chain_finality_depth
        )
        self.challenges = challenges or BootChallenges(
            window_s=self.config.boot_challenge_window_s,
            max_uses=self.config.boot_challenge_max_uses,
            clock=clock,
        )
        self.authz = Authorizer(
            self.peers,
            self.authorizer,
            os_image_reference=os_image_reference,
            dev_mode=self.config.dev_mode,
            challenges=self.challenges,
            require_app_compose=self.config.require_app_compose,
            # beside the audit log: this KMS's data directory (a restart must not forget)
            onboarding=FirstUseLedger(audit.path.parent / "onboarding-ledger.json", clock=clock),
        )
        self.keys: RootKeyHolder = root_keys if root_keys is not None else LocalRootKeys(state)
        self.issuer = KeyIssuer(
            self.keys,
            gateway_app_id=self.config.gateway_app_id,
            app_cert_domains=self.config.app_cert_domains,
            signed_cert_lifetime_s=self.config.signed_cert_lifetime_s,
            app_key_cache_s=self.config.app_key_cache_s,
            app_key_cache_entries=self.config.app_key_cache_entries,
            clock=clock,
        )
        self.threshold = threshold
        self.reshare = reshare
        self._erase_share = erase_share
        self.clock = clock
        # Running KMS nodes' certificates live as long as the node's boot-time key (its server certificate
        # too), so they are checked by the same verifier under a server certificate's lifetime.
        self.node_peers = PeerVerifier(
            dataclasses.replace(peer_policy, max_cert_lifetime_s=PEER_NODE_CERT_MAX_S),
            collateral,
            clock=clock,
            cache_s=self.config.evidence_cache_s,
            cache_entries=self.config.evidence_cache_entries,
        )
        self.peer_identity = peer_identity
        self._head = block_number
        self._active_cache: dict[
            int, tuple[str | int, float, tuple[tuple[bytes, ...], dict[int, bytes]] | None]
        ] = {}
        self._active_lock = threading.Lock()
        self.peering = PeerAdmission(
            lambda der: self.authz.attest(der, peers=self.node_peers),
            self.authz.chain,
            self._committee,
            still_active=self._committee_still_active,
            registered_key=self._registered_peer_key,
        )
        self._install_signing_key = install_signing_key
        self.ca_signer = ca_signer
        self._install_ca_key = install_ca_key
        self._save_ca_root = save_ca_root
        self._peer_clients: dict[tuple[int, str], PeerClient] = {}
        self._peer_clients_lock = threading.Lock()
        self.sign_rounds: SignRounds | None = None
        if threshold is not None and peer_identity is not None:
            self.sign_rounds = SignRounds(
                index=threshold.index,
                t=len(threshold.commitments),
                n=threshold.n,
                signer=lambda: self.threshold.signer if self.threshold is not None else None,
                install_key=self._install_signer,
                connect=self._peer_client,
                clock=clock,
                ca_signer=lambda: self.ca_signer,
                install_ca_key=self._install_ca_signer if install_ca_key is not None else None,
            )
        self.env_keys: EnvKeys | None = None
        if threshold is not None and peer_identity is not None:
            self.env_keys = self._make_env_keys(threshold, clock)
        self.app_ca_cache: AppCaCache | None = None
        self.app_signatures: AppSignatureCache | None = None
        if threshold is not None:
            seal_key = sealing_key(platform_sealing_secret(self.tee), self.identity.mr_aggregated)
            mr = self.identity.mr_aggregated
            self.app_ca_cache = AppCaCache(
                self.audit.path.parent / APP_CA_CACHE_DIR,
                lambda data: seal(seal_key, mr, data),
                lambda blob: unseal(seal_key, mr, blob),
            )
            self.app_signatures = AppSignatureCache(
                self.audit.path.parent / APP_SIGNATURE_CACHE_DIR,
                lambda data: seal(seal_key, mr, data),
                lambda blob: unseal(seal_key, mr, blob),
            )

    def _make_env_keys(self, threshold: ThresholdEvaluator, clock: Callable[[], float]) -> EnvKeys:
        """Per-app env keys (teecloud.kms.threshold_env), sealed beside the audit log in this node's dir."""
        seal_key = sealing_key(platform_sealing_secret(self.tee), self.identity.mr_aggregated)
        mr = self.identity.mr_aggregated
        store = EnvKeyStore(
            self.audit.path.parent / ENV_DIR,
            lambda data: seal(seal_key, mr, data),
            lambda blob: unseal(seal_key, mr, blob),
            index=threshold.index,
            t=len(threshold.commitments),
        )
        return EnvKeys(
            index=threshold.index,
            t=len(threshold.commitments),
            n=threshold.n,
            epochs=lambda: self.threshold.epochs if self.threshold is not None else (),
            store=store,
            signer=lambda: self.threshold.signer if self.threshold is not None else None,
            connect=self._peer_client,
            app_registered=self._app_deployed,
            clock=clock,
        )

    def _app_deployed(self, app_id: bytes) -> None:
        """The threshold env-key gate (docs/kms.md): KmsAuth deployed `app_id` itself from its app blueprint
        (`deployed_apps`), read through the chain gate at this node's finality depth (the head and every
        block of the window; chain id checked). Anything but a clear yes: AccessDenied (403, step chain)."""
        self.authorizer.app_deployed(app_id)

    @property
    def os_image_reference(self) -> OsImageReference | None:
        return self.authz.os_image_reference

    @os_image_reference.setter
    def os_image_reference(self, value: OsImageReference | None) -> None:
        self.authz.os_image_reference = value

    # --- (1)-(6): teecloud.kms.authz.Authorizer (peer verifier, boot time, OS image, chain)

    def attest(self, cert_der: bytes | None) -> AttestedPeer:
        return self.authz.attest(cert_der)

    def _audited(
        self, endpoint: str, cert_der: bytes | None, peer_addr: str, fn: Callable[[dict[str, Any]], _T]
    ) -> _T:
        """Run `fn(ctx)` and audit its outcome: allowed unless it raised (AccessDenied is re-raised as is).
        Returns (or raises) only once the record is durable (AuditLog group commit): an answered request
        always has its record on disk. If the record cannot be written, the request fails, keys unsent."""
        ctx: dict[str, Any] = {"boot_info": None, "reason": "ok", "request_id": new_request_id()}
        cert_hash = hashlib.sha256(cert_der).hexdigest() if cert_der else ""
        error: BaseException | None = None
        result: _T | None = None
        try:
            result = fn(ctx)
        except AccessDenied as exc:
            error, decision, reason, step = exc, "denied", exc.reason, exc.step
            if ctx["boot_info"] is None:
                ctx["boot_info"] = exc.boot_info
        except Exception as exc:
            error, decision, reason, step = (
                exc,
                "denied",
                f"internal error ({type(exc).__name__})",
                "internal",
            )
        else:
            decision, reason, step = "allowed", ctx["reason"], "released"
        rec = self.audit.prepare(
            ts=int(self.clock()),
            endpoint=endpoint,
            decision=decision,
            reason=reason,
            step=step,
            peer=peer_addr,
            cert_sha256=cert_hash,
            boot_info=ctx["boot_info"],
            request_id=ctx["request_id"],
        )
        self.audit.submit(rec).result()  # raises OSError if it could not be made durable
        if error is not None:
            raise error
        assert result is not None
        return result

    # --- endpoints: each key-releasing one passes only an Authorized* object to the issuer

    def get_app_key(
        self,
        cert_der: bytes | None,
        *,
        vm_config: str | Mapping[str, Any] = "",
        peer_addr: str = "",
        app_compose: str = "",
    ) -> api.AppKeyResponse:
        """An attested, allowed app's keys. `vm_config` is the request's (dstack VmConfig JSON): its VM
        shape selects the RTMR0 reference; missing or malformed, nothing is released. `app_compose` is the
        request's normalized app-compose.json, read for the GPU gate only when it hashes to the measured
        compose-hash (Authorizer.authorize_app)."""

        def decide(ctx: dict[str, Any]) -> api.AppKeyResponse:
            self._whole_root_only()
            app = self.authz.authorize_app(cert_der, vm_config, ctx=ctx, app_compose=app_compose)
            ctx["reason"] = f"app allowed by KmsAuth{': ' + app.reason if app.reason else ''}"
            return self.issuer.app_keys(app)

        return self._audited(api.PATH_GET_APP_KEY, cert_der, peer_addr, decide)

    def sign_cert(
        self,
        cert_der: bytes | None,
        csr_pem: str,
        *,
        vm_config: str | Mapping[str, Any] = "",
        peer_addr: str = "",
        app_compose: str = "",
    ) -> api.SignCertResponse:
        """Issue a certificate for the CSR's key under the caller's app CA, for an attested caller the chain
        allows. `vm_config` as for get_app_key (RTMR0 is checked for the VM shape it states)."""

        def decide(ctx: dict[str, Any]) -> api.SignCertResponse:
            if self.threshold is not None or self.reshare is not None:
                raise AccessDenied(SIGNCERT_THRESHOLD_REFUSAL, step="mode")
            app = self.authz.authorize_app(cert_der, vm_config, ctx=ctx, app_compose=app_compose)
            cn, answer = self.issuer.sign_cert(app, csr_pem)
            ctx["reason"] = f"certificate issued for CN={cn}"
            return answer

        return self._audited(api.PATH_SIGN_CERT, cert_der, peer_addr, decide)

    def get_kms_key(self, cert_der: bytes | None, *, peer_addr: str = "") -> api.KmsKeyResponse:
        """Onboarding: root keys, only to an attested KMS that KmsAuth.isKmsAllowed accepts."""

        def decide(ctx: dict[str, Any]) -> api.KmsKeyResponse:
            self._whole_root_only()
            kms = self.authz.authorize_kms(cert_der, ctx=ctx)
            ctx["reason"] = (
                f"KMS allowed by KmsAuth{': ' + kms.reason if kms.reason else ''}; root keys replicated"
            )
            return self.issuer.kms_keys(kms)

        return self._audited(api.PATH_GET_KMS_KEY, cert_der, peer_addr, decide)

    def threshold_evaluate(
        self,
        cert_der: bytes | None,
        *,
        vm_config: str | Mapping[str, Any] = "",
        peer_addr: str = "",
        app_compose: str = "",
        epoch: int | None = None,
    ) -> api.ThresholdEvaluateResponse:
        """Threshold mode: this node's partial evaluations for the attested, allowed app instance, after the
        same rule as GetAppKey, applied by this node alone (its own boot challenge included), under a root
        epoch the app's measured app-compose names (teecloud.kms.rotation.evaluation_epoch). With them,
        what this node keeps for (that epoch, the verified app_id) from an earlier boot (`_attach_kept`)."""

        def decide(ctx: dict[str, Any]) -> api.ThresholdEvaluateResponse:
            if self.threshold is None:
                raise AccessDenied("this KMS is not a threshold node", step="mode")
            app = self.authz.authorize_app(cert_der, vm_config, ctx=ctx, app_compose=app_compose)
            wanted = evaluation_epoch(app_compose, epoch)
            answer = self.threshold.evaluate(app, epoch=wanted)
            if self.ca_signer is not None and self.ca_signer.ca_root is not None:
                answer.ca_presignatures = [p.hex() for p in self.ca_signer.pool.unused()[:16]]
            # only now, after the whole rule said yes: the cache never decides a release
            self._attach_kept(answer, app.boot_info.app_id)
            ctx["reason"] = (
                f"partial evaluation (epoch {answer.epoch}, share {answer.index}); "
                f"app allowed by KmsAuth{': ' + app.reason if app.reason else ''}"
            )
            return answer

        return self._audited(api.PATH_THRESHOLD_EVALUATE, cert_der, peer_addr, decide)

    def _attach_kept(self, answer: api.ThresholdEvaluateResponse, app_id: bytes) -> None:
        """Add what this node keeps for (answer.epoch, app_id) to an evaluate answer, each item checked
        again first: the app-key signature under this node's current signing key (a new signing key, or a
        file the host swapped in, is a miss), the app CA certificate against this node's root. A cache
        that cannot be read is a miss, never a failed evaluation."""
        cache = self.app_signatures
        kept = cache.get(answer.epoch, app_id) if cache is not None else None
        if kept is None:
            return
        signer = self.threshold.signer if self.threshold is not None else None
        if kept.signature and signer is not None and signer.key.curve == te.SECP256K1.name:
            problem = app_key_signature_problem(
                app_id, kept.app_public_key, kept.signature, signer.group_public_key
            )
            if problem:
                log.warning("a kept app-key signature is not served: %s", problem)
            else:
                answer.kept_app_key = api.KeptAppKey(
                    app_public_key=kept.app_public_key.hex(), signature=kept.signature.hex()
                )
        ca = self.ca_signer
        if kept.app_ca_public_key and ca is not None and ca.ca_root is not None and self.app_ca_cache:
            pem = self.app_ca_cache.get(answer.epoch, app_id, kept.app_ca_public_key)
            if pem is None:
                return
            try:
                canonical = cert_to_pem(ca.check_app_ca(app_id, kept.app_ca_public_key, pem))
            except AccessDenied as exc:
                log.warning("a kept app CA certificate no longer checks (not served): %s", exc.reason)
                return
            answer.kept_app_ca = api.KeptAppCa(
                app_ca_public_key=kept.app_ca_public_key.hex(), certificate=canonical
            )

    def threshold_keep(
        self, cert_der: bytes | None, req: api.ThresholdKeepRequest, *, peer_addr: str = ""
    ) -> api.ThresholdKeepResponse:
        """Threshold mode: keep the group's signature of the attested app's k256 key and/or its app CA
        certificate for (epoch, app_id), so that the next boot's ThresholdEvaluate answer carries them.
        Steps: (1) the whole rule of ThresholdEvaluate (boot-time evidence, chain, retired instances) and
        its epoch rule; (2) the signature must verify under this node's signing key over exactly this
        app's message (app_id from the verified boot_info), the certificate must be exactly the TBS this
        node builds for this app and key under its root, signed by the group's CA key; (3) only then kept
        (sealed, atomic; the app CA certificate in its canonical encoding). AccessDenied otherwise."""

        def decide(ctx: dict[str, Any]) -> api.ThresholdKeepResponse:
            if self.threshold is None or self.app_signatures is None or self.app_ca_cache is None:
                raise AccessDenied("this KMS is not a threshold node", step="mode")
            if bool(req.app_public_key) != bool(req.signature) or bool(req.app_ca_public_key) != bool(
                req.certificate
            ):
                raise AccessDenied("a key comes with its signature or certificate", step="request")
            # (1)
            app = self.authz.authorize_app(cert_der, req.vm_config, ctx=ctx, app_compose=req.app_compose)
            epoch = evaluation_epoch(req.app_compose, req.epoch)
            if epoch not in self.threshold.epochs:
                raise AccessDenied(f"this node serves no root epoch {epoch}", step="epoch")
            app_id = app.boot_info.app_id
            # (2)
            app_key: tuple[bytes, bytes] | None = None
            if req.signature:
                signer = self.threshold.signer
                if signer is None or signer.key.curve != te.SECP256K1.name:
                    raise AccessDenied("this KMS holds no threshold signing share", step="mode")
                pub, sig = bytes.fromhex(req.app_public_key), bytes.fromhex(req.signature)
                problem = app_key_signature_problem(app_id, pub, sig, signer.group_public_key)
                if problem:
                    raise AccessDenied(f"the app-key signature is refused: {problem}", step="request")
                app_key = (pub, sig)
            ca_key: bytes | None = None
            canonical = ""
            if req.certificate:
                ca = self.ca_signer
                if ca is None or ca.ca_root is None:
                    raise AccessDenied("this KMS holds no share of a group CA key with its root", step="mode")
                ca_key = bytes.fromhex(req.app_ca_public_key)
                canonical = cert_to_pem(ca.check_app_ca(app_id, ca_key, req.certificate))
            # (3)
            if ca_key is not None:
                self.app_ca_cache.put(epoch, app_id, ca_key, canonical)
            changed = self.app_signatures.put(epoch, app_id, app_key=app_key, app_ca_public_key=ca_key)
            ctx["reason"] = (
                f"kept signatures of app {app_id.hex()} (epoch {epoch}): "
                f"app key {'yes' if app_key else 'no'}, app CA {'yes' if ca_key else 'no'}"
                + ("" if changed else " (already kept)")
            )
            return api.ThresholdKeepResponse(kept_app_key=app_key is not None, kept_app_ca=ca_key is not None)

        return self._audited(api.PATH_THRESHOLD_KEEP_SIGNATURES, cert_der, peer_addr, decide)

    def threshold_sign(
        self, cert_der: bytes | None, req: api.ThresholdSignRequest, *, peer_addr: str = ""
    ) -> api.ThresholdSignResponse:
        """Threshold mode: this node's share of the KMS signature over the app key of the attested, allowed
        app (the same rule as ThresholdEvaluate; the message is built from the verified app_id)."""

        def decide(ctx: dict[str, Any]) -> api.ThresholdSignResponse:
            signer = self.threshold.signer if self.threshold is not None else None
            if signer is None:
                raise AccessDenied("this KMS holds no threshold signing share", step="mode")
            try:
                app_pub, session = bytes.fromhex(req.app_public_key), bytes.fromhex(req.session)
            except ValueError as exc:
                raise AccessDenied("app_public_key and session must be hex", step="request") from exc
            app = self.authz.authorize_app(cert_der, req.vm_config, ctx=ctx, app_compose=req.app_compose)
            share = signer.sign_app_key(app, app_pub, session)
            return _signature_share_answer(ctx, app, share, signer.pool.public(session), "signature share")

        return self._audited(api.PATH_THRESHOLD_SIGN, cert_der, peer_addr, decide)

    def threshold_sign_app_ca(
        self, cert_der: bytes | None, req: api.ThresholdSignAppCaRequest, *, peer_addr: str = ""
    ) -> api.ThresholdSignResponse:
        """Threshold mode: this node's share of the attested, allowed app's app CA certificate under the
        group's root CA (the same rule as ThresholdEvaluate; the TBS is built here from the verified app_id,
        kms.threshold_sign.ThresholdSigner.sign_app_ca)."""

        def decide(ctx: dict[str, Any]) -> api.ThresholdSignResponse:
            signer = self.ca_signer if self.threshold is not None else None
            if signer is None or signer.ca_root is None:
                raise AccessDenied("this KMS holds no share of a group CA key with its root", step="mode")
            app_ca_pub, session = bytes.fromhex(req.app_ca_public_key), bytes.fromhex(req.session)
            app = self.authz.authorize_app(cert_der, req.vm_config, ctx=ctx, app_compose=req.app_compose)
            share = signer.sign_app_ca(app, app_ca_pub, session)
            return _signature_share_answer(
                ctx, app, share, signer.pool.public(session), "app CA signature share"
            )

        return self._audited(api.PATH_THRESHOLD_SIGN_APP_CA, cert_der, peer_addr, decide)

    def _app_ca_parts(self, req: api.AppCaCachedRequest) -> tuple[ThresholdSigner, AppCaCache, bytes, bytes]:
        signer = self.ca_signer if self.threshold is not None else None
        if signer is None or signer.ca_root is None or self.app_ca_cache is None:
            raise AccessDenied("this KMS holds no share of a group CA key with its root", step="mode")
        assert self.threshold is not None
        if req.epoch not in self.threshold.epochs:
            raise AccessDenied(f"this node serves no root epoch {req.epoch}", step="epoch")
        return signer, self.app_ca_cache, bytes.fromhex(req.app_id), bytes.fromhex(req.app_ca_public_key)

    def app_ca_cached(self, req: api.AppCaCachedRequest) -> api.AppCaCachedResponse:
        """Threshold mode, public: the group-signed app CA certificate this node keeps for (epoch, app, key),
        '' when none. Certificates are public (every RA-TLS chain of the app carries its own); the one kept is
        checked again against this node's root before it is served (a file the host swapped is not)."""
        signer, cache, app_id, key = self._app_ca_parts(req)
        pem = cache.get(req.epoch, app_id, key)
        if pem is None:
            return api.AppCaCachedResponse()
        try:
            canonical = cert_to_pem(signer.check_app_ca(app_id, key, pem))
        except AccessDenied as exc:
            log.warning("a kept app CA certificate no longer checks (not served): %s", exc.reason)
            return api.AppCaCachedResponse()
        return api.AppCaCachedResponse(certificate=canonical)

    def app_ca_store(self, req: api.AppCaCachedRequest, *, peer_addr: str = "") -> api.AppCaCachedResponse:
        """Threshold mode: keep a group-signed app CA certificate a CVM assembled from t shares, only if it is
        exactly the TBS this node builds for (app_id, key) under its root and verifies under the group's CA
        key: what is kept is what t nodes signed for that app and key, whoever sends it (audited)."""

        def decide(ctx: dict[str, Any]) -> api.AppCaCachedResponse:
            signer, cache, app_id, key = self._app_ca_parts(req)
            # the canonical encoding of what t nodes signed is kept, never the bytes the caller sent
            canonical = cert_to_pem(signer.check_app_ca(app_id, key, req.certificate))
            stored = cache.put(req.epoch, app_id, key, canonical)
            ctx["reason"] = f"app CA certificate of app {app_id.hex()} (epoch {req.epoch}) " + (
                "kept" if stored else "already kept"
            )
            return api.AppCaCachedResponse(stored=stored)

        return self._audited(api.PATH_THRESHOLD_APP_CA_STORE, None, peer_addr, decide)

    def ca_root_share(self, req: api.CaRootShareRequest) -> api.ThresholdSignResponse:
        """Admin: this member's share of the group root CA's self-signature (kms.threshold_sign)."""
        if self.ca_signer is None:
            raise KmsUsageError("this member holds no share of the group's P-256 CA key")
        session = bytes.fromhex(req.session)
        try:
            share = self.ca_signer.sign_root_ca(req.not_before, session)
        except AccessDenied as exc:
            raise KmsUsageError(str(exc)) from exc
        presig = self.ca_signer.pool.public(session)
        return api.ThresholdSignResponse(
            app_id="",
            index=share.index,
            session=session.hex(),
            big_r=presig.big_r.hex(),
            kinv_commitments=[c.hex() for c in presig.kinv_commitments],
            sigma_commitments=[c.hex() for c in presig.sigma_commitments],
            s=f"{share.s:064x}",
        )

    def ca_root_install(self, req: api.CaRootInstallRequest) -> api.PoolResponse:
        """Admin: keep the group root CA certificate, only if it is this group's root (checked)."""
        if self.ca_signer is None:
            raise KmsUsageError("this member holds no share of the group's P-256 CA key")
        try:
            cert = x509.load_pem_x509_certificate(req.certificate.encode())
        except ValueError as exc:
            raise KmsUsageError("not a PEM certificate") from exc
        held = self.ca_signer.ca_root
        if held is not None and held != cert:
            # one root per CA key: a second (other validity) would let an operator swap what app CAs chain to
            raise KmsUsageError("this member already keeps another group root CA certificate")
        try:
            self.ca_signer.install_ca_root(cert)
        except SealingError as exc:
            raise KmsUsageError(str(exc)) from exc
        if self._save_ca_root is not None:
            self._save_ca_root(cert)
        return self.presignature_pool()

    def _install_ca_signer(self, key: te.KeyShare) -> None:
        if self._install_ca_key is None:
            raise KmsUsageError("this node cannot seal a CA key share (no sealing configured)")
        self.ca_signer = self._install_ca_key(key)
        log.info("CA key share %d sealed (group CA key %s)", key.index, key.group_public_key.hex()[:16])

    def reshare_open(self, req: api.ReshareOpenRequest) -> api.ReshareOpenResponse:
        """Admin: open a reshare round on this old node; returns its dealing's commitments."""
        if self.reshare is None or self.threshold is None:
            raise KmsUsageError("this KMS holds no threshold share to reshare")
        try:
            plan = ResharePlan(
                session=bytes.fromhex(req.session),
                epoch=req.epoch,
                old_commitments=tuple(bytes.fromhex(c) for c in req.old_commitments),
                dealers=tuple(req.dealers),
                t_new=req.t_new,
                n_new=req.n_new,
            )
            hashes = {int(j): bytes.fromhex(h) for j, h in req.member_token_hashes.items()}
            commitments = self.reshare.open(plan, hashes)
        except (ValueError, SealingError, KeysError) as exc:  # KeysError: what it carries (threshold_carry)
            raise KmsUsageError(f"reshare plan refused: {exc}") from exc
        log.info("reshare round %s opened (%d-of-%d)", req.session[:8], req.t_new, req.n_new)
        return api.ReshareOpenResponse(
            dealer=self.threshold.index, commitments=[c.hex() for c in commitments]
        )

    def dkg_open(self, req: api.DkgOpenRequest) -> api.ReshareOpenResponse:
        """Admin: open a DKG round on this (share-less) node as dealer `req.dealer`."""
        if self.reshare is None:
            raise KmsUsageError("this KMS is not a threshold node")
        try:
            plan = DkgPlan(
                session=bytes.fromhex(req.session),
                epoch=req.epoch,
                dealers=tuple(req.dealers),
                t_new=req.t,
                n_new=req.n,
                complaint_round=req.complaint_round,
            )
            hashes = (
                {int(j): bytes.fromhex(h) for j, h in req.member_token_hashes.items()}
                if req.member_token_hashes is not None
                else None
            )
            commitments = self.reshare.open_dkg(plan, req.dealer, hashes)
        except (ValueError, SealingError) as exc:
            raise KmsUsageError(f"DKG plan refused: {exc}") from exc
        log.info("DKG round %s opened as dealer %d (%d-of-%d)", req.session[:8], req.dealer, req.t, req.n)
        return api.ReshareOpenResponse(dealer=req.dealer, commitments=[c.hex() for c in commitments])

    def reshare_deal(
        self, cert_der: bytes | None, req: api.ReshareDealRequest, *, peer_addr: str = ""
    ) -> api.ReshareDealResponse:
        """A joining KMS node's sub-share of this node's share, for an open round: only to boot-time
        evidence of a KMS build KmsAuth allows (the same rule as GetKmsKey), once per new index."""

        def decide(ctx: dict[str, Any]) -> api.ReshareDealResponse:
            if self.reshare is None:
                raise AccessDenied("this KMS is not a threshold node", step="mode")
            kms = self.authz.authorize_kms(cert_der, ctx=ctx)
            try:
                session = bytes.fromhex(req.session)
                token = bytes.fromhex(req.member_token) if req.member_token is not None else None
            except ValueError as exc:
                raise AccessDenied("the reshare session or member token is not hex", step="request") from exc
            answer = self.reshare.deal_for(kms, session, req.index, token, req.offset)
            page = "" if req.offset == 0 else f", carried page at {req.offset}"
            ctx["reason"] = f"reshare sub-share for new share {req.index} (round {req.session[:8]}){page}"
            return answer

        return self._audited(api.PATH_RESHARE_DEAL, cert_der, peer_addr, decide)

    def dkg_board(
        self, cert_der: bytes | None, req: api.DkgBoardRequest, *, peer_addr: str = ""
    ) -> api.DkgBoardResponse:
        """A DKG round's complaint phase (GJKR): a new member posts its statement or confirmation and reads
        this dealer's board, under the same rule as ReshareDeal (boot-time evidence of a KMS build KmsAuth
        allows) and as the member that took its sub-share here (its board token)."""

        def decide(ctx: dict[str, Any]) -> api.DkgBoardResponse:
            if self.reshare is None:
                raise AccessDenied("this KMS is not a threshold node", step="mode")
            kms = self.authz.authorize_kms(cert_der, ctx=ctx)
            answer = self.reshare.board(
                kms,
                bytes.fromhex(req.session),
                req.index,
                bytes.fromhex(req.board_token),
                req.complaints,
                bytes.fromhex(req.confirm) if req.confirm is not None else None,
            )
            what = "statement" if req.complaints is not None else "confirmation" if req.confirm else "read"
            ctx["reason"] = f"DKG board {what} of member {req.index} (round {req.session[:8]})"
            return answer

        return self._audited(api.PATH_DKG_BOARD, cert_der, peer_addr, decide)

    def carry_for_reshare(self, epoch: int, index: int, t_new: int, n_new: int) -> list[CarriedItem]:
        """What a reshare of `epoch` deals besides the root share (kms.threshold_carry): every env share of
        the epoch this node holds, and its shares of the group's signing and CA keys."""
        signer = self.threshold.signer if self.threshold is not None else None
        return carry_deal(
            epoch=epoch,
            index=index,
            t_new=t_new,
            n_new=n_new,
            env_store=self.env_keys.store if self.env_keys is not None else None,
            signing_key=signer.key if signer is not None else None,
            ca_key=self.ca_signer.key if self.ca_signer is not None else None,
        )

    def retire_share(self) -> api.RetireShareResponse:
        """Admin: after a reshare moved the key to a new committee, forget this node's share: the sealed copy
        is erased and this process stops evaluating and dealing (it then refuses ThresholdEvaluate)."""
        if self.threshold is None:
            raise KmsUsageError("this KMS holds no threshold share")
        index, epoch = self.threshold.index, self.threshold.epoch
        self.threshold = None
        self.reshare = None
        self.env_keys, self.ca_signer = None, None  # their sealed copies go with the root share's
        erased = self._erase_share() if self._erase_share is not None else False
        log.warning("threshold share %d of epoch %d retired (sealed copy erased: %s)", index, epoch, erased)
        return api.RetireShareResponse(index=index, epoch=epoch, sealed_copy_erased=erased)

    # --- threshold mode: running nodes (teecloud.kms.peering)

    def _committee(self) -> Committee | None:
        ev = self.threshold
        return None if ev is None else Committee(ev.epoch, ev.n, ev.commitments)

    def _committee_still_active(self, committee: Committee) -> None:
        """R4-6: refuses (step membership) when KmsGroup names another committee (other commitments) as the
        active one of this node's epoch: a superseded committee neither admits nor calls its members. No
        active committee (none recorded yet: `teecloud up` records it after the first rounds) or no
        KmsGroup on this chain: nothing supersedes this node's share. A failed read refuses (step chain)."""
        active = self._active_record(committee.epoch)
        if active is not None and active[0] != committee.commitments:
            raise AccessDenied(
                f"committee superseded on chain: KmsGroup's active committee of epoch {committee.epoch} is "
                "another one (this node's share awaits retirement)",
                step="membership",
            )

    def _registered_peer_key(self, committee: Committee, index: int) -> str | None:
        """One live process per share index: the hex sha256(SPKI) KmsGroup records as member `index`'s
        current boot-time peer key in this node's committee while it is the active one (None: none recorded,
        or no active committee: then steps (1)-(4) decide alone, docs/kms.md). Same cache as R4-6's."""
        active = self._active_record(committee.epoch)
        if active is None or active[0] != committee.commitments:
            return None  # superseded: _committee_still_active refuses
        key = active[1].get(index)
        return key.hex() if key is not None else None

    def _active_record(self, epoch: int) -> tuple[tuple[bytes, ...], dict[int, bytes]] | None:
        """KmsGroup's active committee of `epoch` (its commitments and members' recorded peer keys), cached
        while the chain stays at the block it was read at and for at most ACTIVE_COMMITTEE_CACHE_S (without
        a block reader: read every time)."""
        try:
            head = self._head() if self._head is not None else None
        except Exception as exc:  # fail closed, as for the read below (review 5, R5-2: it was an HTTP 500)
            what = type(exc).__name__
            raise AccessDenied(f"the chain's head could not be read: {what}", step="chain") from exc
        key = head.hash if isinstance(head, BlockRef) else head
        now = self.clock()
        with self._active_lock:
            cached = self._active_cache.get(epoch)
        if (
            cached is not None
            and key is not None
            and cached[0] == key
            and 0 <= now - cached[1] < (ACTIVE_COMMITTEE_CACHE_S)
        ):
            return cached[2]
        try:
            group = getattr(self.authorizer.chain, "kms_group", None)
            active = group.active(epoch) if group is not None else None
        except NotDeployed:
            active = None
        except Exception as exc:  # fail closed on anything the chain client raises
            raise AccessDenied(f"KmsGroup could not be read: {type(exc).__name__}", step="chain") from exc
        value = None if active is None else (tuple(active.commitments), dict(active.peer_keys))
        if key is not None:
            with self._active_lock:
                if len(self._active_cache) >= 64:
                    self._active_cache.clear()
                self._active_cache[epoch] = (key, now, value)
        return value

    def admit_peer(
        self, cert_der: bytes | None, member: api.PeerMember | None, ctx: dict[str, Any]
    ) -> AdmittedNode:
        """The rule for a running member of this node's committee (kms.peering.PeerAdmission.admit)."""
        if self.peer_identity is None:
            raise AccessDenied(
                "this node has no boot-time peer identity (not a threshold member)", step="mode"
            )
        node = self.peering.admit(cert_der, member)
        ctx["boot_info"] = node.boot_info
        return node

    def _peer_client(self, index: int, url: str) -> PeerClient:
        """One client per member and URL, kept (its checked server certificate is pinned; a member whose
        certificate changes is checked again, kms.client.KmsClient)."""
        assert self.peer_identity is not None
        with self._peer_clients_lock:
            client = self._peer_clients.get((index, url))
            if client is None:
                if len(self._peer_clients) >= 256:
                    self._peer_clients.clear()
                client = PeerClient(
                    url, identity=self.peer_identity, admission=self.peering, expected_index=index
                )
                self._peer_clients[(index, url)] = client
            return client

    def _install_signer(self, key: te.KeyShare) -> None:
        if self._install_signing_key is None or self.threshold is None:
            raise KmsUsageError("this node cannot seal a signing share (no sealing configured)")
        self.threshold.signer = self._install_signing_key(key)
        log.info("signing share %d sealed (group key %s)", key.index, key.group_public_key.hex()[:16])

    def _rounds(self) -> SignRounds:
        if self.sign_rounds is None or self.threshold is None:
            raise KmsUsageError("this KMS is not a running threshold member (no share or no peer identity)")
        return self.sign_rounds

    def round_open(self, req: api.RoundOpenRequest) -> api.RoundPublic:
        """Admin: open a signing-key DKG or presigning round on this member (kms.threshold_net)."""
        out = self._rounds().open(req)
        log.info("%s round %s opened (%d)", req.kind, req.session[:8], req.count)
        return out

    def presignature_pool(self) -> api.PoolResponse:
        """Admin: how many unused presignatures this member holds (0 without a signing share)."""
        signer = self.threshold.signer if self.threshold is not None else None
        ca = self.ca_signer
        return api.PoolResponse(
            unused=len(signer.pool.unused()) if signer is not None else 0,
            signing_key=signer.group_public_key.hex() if signer is not None else "",
            ca_unused=len(ca.pool.unused()) if ca is not None else 0,
            ca_key=ca.group_public_key.hex() if ca is not None else "",
            ca_root=ca is not None and ca.ca_root is not None,
        )

    def round_view(self, req: api.RoundViewRequest) -> api.RoundViewResponse:
        return self._rounds().view(req)

    def round_advance(self, req: api.RoundAdvanceRequest) -> api.RoundPublic:
        return self._rounds().advance(req)

    def peer_round(
        self, cert_der: bytes | None, req: api.PeerRoundRequest, *, peer_addr: str = ""
    ) -> api.PeerRoundResponse:
        """A running member's sub-shares of an open round: only under kms.peering's rule, once per stage."""

        def decide(ctx: dict[str, Any]) -> api.PeerRoundResponse:
            rounds = self.sign_rounds
            if rounds is None or self.threshold is None:
                raise AccessDenied("this KMS is not a running threshold member", step="mode")
            node = self.admit_peer(cert_der, req.member, ctx)
            dealer, shares = rounds.serve(node, req)
            assert self.peer_identity is not None
            ctx["reason"] = f"{req.stage} sub-shares of round {req.session[:8]} for member {node.index}"
            return api.PeerRoundResponse(
                session=req.session,
                stage=req.stage,
                dealer=dealer,
                shares=shares,
                member=self.peer_identity.member,
            )

        return self._audited(api.PATH_PEER_ROUND, cert_der, peer_addr, decide)

    def peer_hello(
        self, cert_der: bytes | None, req: api.PeerHelloRequest, *, peer_addr: str = ""
    ) -> api.PeerHelloResponse:
        """A running member checks its channel to this node (both sides apply the same rule)."""

        def decide(ctx: dict[str, Any]) -> api.PeerHelloResponse:
            node = self.admit_peer(cert_der, req.member, ctx)
            assert self.peer_identity is not None
            ctx["reason"] = f"running member {node.index} admitted (boot-time key; {node.reason})"
            return api.PeerHelloResponse(index=node.index, member=self.peer_identity.member)

        return self._audited(api.PATH_PEER_HELLO, cert_der, peer_addr, decide)

    def _whole_root_only(self) -> None:
        if self.threshold is not None or self.reshare is not None:
            raise AccessDenied(
                "this is a threshold KMS node: keys come from t nodes' partial evaluations "
                "(ThresholdEvaluate), never from one node",
                step="mode",
            )

    def boot_challenge(self) -> api.BootChallengeResponse:
        """Public: a challenge for a booting CVM's boot-nonce (teecloud.kms.challenge)."""
        return api.BootChallengeResponse(
            challenge=self.challenges.issue().hex(), window_s=self.challenges.window_s
        )

    def env_encrypt_pubkey(self, app_id_text: str, epoch: int | None = None) -> api.EnvEncryptPubKeyResponse:
        """Public: the app's X25519 env-encryption key, signed by the KMS root k256 key (dstack format). A
        threshold node: the app's per-app sharing (made by a ceremony among the members on first request),
        signed by t members with the group's signing key (teecloud.kms.threshold_env)."""
        if self.threshold is not None:
            if self.env_keys is None:
                raise KmsUsageError("this threshold node has no peer identity: it serves no env keys")
            return self.env_keys.public_key(epoch or FIRST_EPOCH, _norm_app_id(app_id_text))
        return self.issuer.env_encrypt_pubkey(_norm_app_id(app_id_text))

    def _env(self) -> EnvKeys:
        if self.env_keys is None or self.threshold is None:
            raise AccessDenied("this KMS is not a running threshold member", step="mode")
        return self.env_keys

    def threshold_env_partial(
        self, cert_der: bytes | None, req: api.ThresholdEnvPartialRequest, *, peer_addr: str = ""
    ) -> api.ThresholdEnvPartialResponse:
        """Threshold mode: D_i = x_i·P for the ephemeral key of the caller's own encrypted env, after the
        same rule as ThresholdEvaluate (authorize_app: boot-time evidence, this node's challenge, OS image,
        chain, GPU gate); the app and epoch come from the verified evidence and its measured app-compose."""

        env = self._env()
        env.check_ephemeral_key(bytes.fromhex(req.ephemeral_key))  # a malformed point: 400, before anything

        def decide(ctx: dict[str, Any]) -> api.ThresholdEnvPartialResponse:
            app = self.authz.authorize_app(cert_der, req.vm_config, ctx=ctx, app_compose=req.app_compose)
            wanted = evaluation_epoch(req.app_compose, req.epoch)
            answer = env.partial(
                wanted or FIRST_EPOCH, app.boot_info.app_id, bytes.fromhex(req.ephemeral_key)
            )
            ctx["reason"] = (
                f"env partial (epoch {answer.epoch}, share {answer.index}); "
                f"app allowed by KmsAuth{': ' + app.reason if app.reason else ''}"
            )
            return answer

        return self._audited(api.PATH_THRESHOLD_ENV_PARTIAL, cert_der, peer_addr, decide)

    def peer_env_dkg(
        self, cert_der: bytes | None, req: api.PeerEnvDkgRequest, *, peer_addr: str = ""
    ) -> api.PeerEnvDkgResponse:
        """A running member drives a stage of an app's env-key ceremony here (kms.peering's rule)."""

        def decide(ctx: dict[str, Any]) -> api.PeerEnvDkgResponse:
            env = self._env()
            node = self.admit_peer(cert_der, req.member, ctx)
            answer = env.stage(req)
            assert self.peer_identity is not None
            answer.member = self.peer_identity.member
            ctx["reason"] = f"env-key ceremony {req.session[:8]} stage {req.stage} for member {node.index}"
            return answer

        return self._audited(api.PATH_PEER_ENV_DKG, cert_der, peer_addr, decide)

    def peer_env_share(
        self, cert_der: bytes | None, req: api.PeerEnvShareRequest, *, peer_addr: str = ""
    ) -> api.PeerEnvShareResponse:
        def decide(ctx: dict[str, Any]) -> api.PeerEnvShareResponse:
            env = self._env()
            node = self.admit_peer(cert_der, req.member, ctx)
            dealer, share = env.serve_share(node, req)
            assert self.peer_identity is not None
            ctx["reason"] = f"env-key sub-share of ceremony {req.session[:8]} for member {node.index}"
            return api.PeerEnvShareResponse(
                session=req.session, dealer=dealer, share=share.hex(), member=self.peer_identity.member
            )

        return self._audited(api.PATH_PEER_ENV_SHARE, cert_der, peer_addr, decide)

    def peer_env_recover(
        self, cert_der: bytes | None, req: api.PeerEnvRecoverRequest, *, peer_addr: str = ""
    ) -> api.PeerEnvRecoverResponse:
        """A running member recovers ITS OWN missing env share here, this node a helper (kms.peering's rule,
        then EnvKeys.serve_recover's; docs/kms.md "Share recovery")."""

        def decide(ctx: dict[str, Any]) -> api.PeerEnvRecoverResponse:
            env = self._env()
            node = self.admit_peer(cert_der, req.member, ctx)
            answer = env.serve_recover(node, req)
            assert self.peer_identity is not None
            answer.member = self.peer_identity.member
            ctx["reason"] = (
                f"env share recovery {req.session[:8]} step {req.stage} for member {node.index} "
                f"(epoch {req.epoch}, app {req.app_id})"
            )
            return answer

        return self._audited(api.PATH_PEER_ENV_RECOVER, cert_der, peer_addr, decide)

    def peer_env_piece(
        self, cert_der: bytes | None, req: api.PeerEnvPieceRequest, *, peer_addr: str = ""
    ) -> api.PeerEnvPieceResponse:
        def decide(ctx: dict[str, Any]) -> api.PeerEnvPieceResponse:
            env = self._env()
            node = self.admit_peer(cert_der, req.member, ctx)
            helper, piece = env.serve_piece(node, req)
            assert self.peer_identity is not None
            ctx["reason"] = f"env share recovery piece of {req.session[:8]} for helper {node.index}"
            return api.PeerEnvPieceResponse(
                session=req.session, helper=helper, piece=piece.hex(), member=self.peer_identity.member
            )

        return self._audited(api.PATH_PEER_ENV_PIECE, cert_der, peer_addr, decide)

    def peer_env_sign(
        self, cert_der: bytes | None, req: api.PeerEnvSignRequest, *, peer_addr: str = ""
    ) -> api.PeerEnvSignResponse:
        def decide(ctx: dict[str, Any]) -> api.PeerEnvSignResponse:
            env = self._env()
            node = self.admit_peer(cert_der, req.member, ctx)
            sessions = [bytes.fromhex(s) for s in req.sessions]
            if len(sessions) == 1:
                raise KmsUsageError("sessions: two presignatures, or none for a probe")
            pub, pairs = env.sign_shares(req.epoch, bytes.fromhex(req.app_id), req.timestamp, sessions)
            signer = self.threshold.signer if self.threshold is not None else None
            unused = (
                [u.hex() for u in signer.pool.unused()][:512] if signer is not None and not sessions else []
            )
            assert self.peer_identity is not None
            ctx["reason"] = f"env public key signature shares for member {node.index}"
            return api.PeerEnvSignResponse(
                index=env.index,
                public_key=pub.hex(),
                shares=[
                    api.EnvSignShare(
                        session=p.session.hex(),
                        big_r=p.big_r.hex(),
                        kinv_commitments=[c.hex() for c in p.kinv_commitments],
                        sigma_commitments=[c.hex() for c in p.sigma_commitments],
                        s=f"{sh.s:064x}",
                    )
                    for p, sh in pairs
                ],
                unused=unused,
                member=self.peer_identity.member,
            )

        return self._audited(api.PATH_PEER_ENV_SIGN, cert_der, peer_addr, decide)

    def env_peers(self, req: api.EnvPeersRequest) -> api.RoundViewResponse:
        """Admin: the other members' URLs (env-key ceremonies are coordinated by the node asked)."""
        self._env().set_peers({int(i): u for i, u in req.peers.items()})
        return api.RoundViewResponse(view_hash="")

    def meta(self) -> api.KmsMeta:
        return api.KmsMeta(
            ca_cert=self.keys.root_ca_cert_pem,
            ca_pubkey=self.keys.ca_public_key_der.hex(),
            k256_pubkey=self.keys.k256_public_key.hex(),
            dev_mode=self.config.dev_mode,
            tee=str(self.tee.kind),
            mr_aggregated=self.identity.mr_aggregated.hex(),
            gateway_app_id=self.config.gateway_app_id,
            kms_contract=self.config.kms_contract,
            group_ca_cert=(
                cert_to_pem(self.ca_signer.ca_root)
                if self.threshold is not None and self.ca_signer is not None and self.ca_signer.ca_root
                else ""
            ),
        )

    def temp_ca(self) -> api.TempCaCertResponse:
        return api.TempCaCertResponse(
            temp_ca_cert=self.state.temp_ca_cert_pem, temp_ca_key=self.state.temp_ca_key_pem
        )

    def status(self, *, public_url: str = "", chain: str = "") -> api.StatusResponse:
        return api.StatusResponse(
            status="serving",
            dev_mode=self.config.dev_mode,
            tee=str(self.tee.kind),
            ca_pubkey=self.keys.ca_public_key_der.hex(),
            k256_pubkey=self.keys.k256_public_key.hex(),
            mr_aggregated=self.identity.mr_aggregated.hex(),
            public_url=public_url,
            requests_allowed=self.audit.allowed,
            requests_denied=self.audit.denied,
            chain=chain,
        )


def _signature_share_answer(
    ctx: dict[str, Any], app: AuthorizedApp, share: te.SignatureShare, presig: te.Presignature, what: str
) -> api.ThresholdSignResponse:
    """A node's signature share answer (ThresholdSignAppKey, ThresholdSignAppCa): the share over the named
    presignature, with its public part, for the app the node verified; the audit reason says which."""
    ctx["reason"] = (
        f"{what} {share.index} with presignature {presig.session.hex()}; "
        f"app allowed by KmsAuth{': ' + app.reason if app.reason else ''}"
    )
    return api.ThresholdSignResponse(
        app_id=app.boot_info.app_id.hex(),
        index=share.index,
        session=presig.session.hex(),
        big_r=presig.big_r.hex(),
        kinv_commitments=[c.hex() for c in presig.kinv_commitments],
        sigma_commitments=[c.hex() for c in presig.sigma_commitments],
        s=f"{share.s:064x}",
    )
