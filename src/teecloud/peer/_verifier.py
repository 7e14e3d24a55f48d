"""RA-TLS peer verification under one policy.

`PeerVerifier.verify_cert(cert_der)`, for the certificate a TLS peer proved it holds the key of:
  (1) parse     the RA-TLS extensions (evidence, event log, app_id, usage)                       `parsed`
  (2) fresh     now within [not_before - clock skew, not_after]; lifetime at most the policy's   `cert_fresh`
                (the one place a certificate's window is judged)
  (3) kind      the evidence is a TDX quote or a SEV-SNP report (attestation.verifier), and its kind is in
                the policy's allowlist (`PeerPolicy.accepted_kinds`, default TDX only)             `kind`
  (4) evidence  collateral for it (injected sources: DCAP collateral, SEV-SNP VCEK chain); verified by
                teecloud.attestation.verifier.verify_peer_evidence (signatures, chain, TCB; for TDX the
                event log replays to the RTMRs; the development root only when the policy trusts one)
                                                                          `collateral_ok`, `quote_verified`...
  (5) binding   report_data = sha512("ratls-cert:" ‖ SPKI) binds the certificate's key
                (teecloud.keys.ratls.check_key_binding)                                `ratls_cert_verified`
  (6) policy    simulated evidence only with a trusted development root; never a debug TEE; TCB status
                within the policy's floor                          `quote_verified`, `policy`, `tcb_ok`
  (7) boot_info from the verified evidence only (dstack's AppBootInfo, TDX); the certificate's app_id
                extension, when present, must equal the measured app-id (the one place it is checked;
                SEV-SNP evidence measures no app-id, so an app_id claim on it is refused)        `boot_info`
`verify_quote(quote, event_log)` runs (3)-(7) for evidence fetched over another channel (the caller checks
its report_data against its own nonce). Results are reused per certificate hash for at most `cache_s`
seconds and never past not_after (the cache is bounded in entries; certificates are bounded in size by the
TLS layer and the parser).

SEV-SNP peers are attested (an `AttestedPeer` whose `kind` is SNP and which has no `boot_info`), but
`require_boot_time` refuses them: the boot-time rule is defined over TDX's RTMR3 and event log, and SNP has
no runtime measurement register, so nothing is released or signed for an SNP peer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from teecloud.attestation import snp
from teecloud.attestation.boottime import BootMeasurement, check_boot_time
from teecloud.attestation.dcap import TCB_STATUS_ORDER
from teecloud.attestation.errors import NotBootTime, UsageError, VerificationError
from teecloud.attestation.models import TeeKind, VerifiedEvidence
from teecloud.attestation.policy import Policy
from teecloud.attestation.verifier import PEER_KINDS, TrustAnchors, peer_evidence_kind, verify_peer_evidence
from teecloud.chain.api import BootInfo
from teecloud.errors import Error
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import check_key_binding, parse_ratls_cert
from teecloud.peer._collateral import CollateralSource

__all__ = [
    "AttestedPeer",
    "PeerPolicy",
    "PeerRejected",
    "PeerVerifier",
    "build_boot_info",
    "require_boot_time",
]


class PeerRejected(Error):
    """A peer's evidence failed a check. `step` names it; `reason` is safe to show and to audit.
    `boot_info` is set when the failure came after boot_info was known (for the audit record)."""

    def __init__(self, reason: str, *, step: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.step = step
        self.boot_info: BootInfo | None = None


@dataclass(frozen=True)
class PeerPolicy:
    """What a verifier accepts. The rule "simulated evidence only where a development root is trusted" is
    decided here and nowhere else: `dev_root_der` set ⇔ simulated evidence accepted."""

    dev_root_der: bytes | None = None
    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    max_cert_lifetime_s: int = 3600
    clock_skew_s: int = 60
    base: Policy | None = None  # reference values, advisories etc. for the attestation library
    # The evidence kinds this caller accepts (an allowlist; simulated TDX is TDX, accepted only with a
    # development root). SEV-SNP needs the AMD root(s) it chains to (ARK, DER or PEM).
    accepted_kinds: tuple[TeeKind, ...] = (TeeKind.TDX,)
    amd_roots: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        unknown = [k for k in self.accepted_kinds if k not in PEER_KINDS]
        if unknown or not self.accepted_kinds:
            raise ValueError(f"accepted_kinds must be a non-empty subset of {[k.value for k in PEER_KINDS]}")
        if TeeKind.SNP in self.accepted_kinds and not self.amd_roots:
            raise ValueError("accepting SEV-SNP evidence needs the AMD root certificate(s) (amd_roots)")

    @classmethod
    def production(cls, **kw: object) -> PeerPolicy:
        """Hardware evidence only (no development root), TCB UpToDate, no debug."""
        if kw.get("dev_root_der") is not None:
            raise ValueError("a production policy trusts no development root")
        return cls(**kw)  # type: ignore[arg-type]

    @classmethod
    def dev(cls, dev_root_der: bytes, **kw: object) -> PeerPolicy:
        """Also accepts simulated evidence signed by this installation's development root."""
        if not dev_root_der:
            raise ValueError("a dev policy needs the development root certificate (DER)")
        return cls(dev_root_der=dev_root_der, **kw)  # type: ignore[arg-type]

    @property
    def trusts_dev_root(self) -> bool:
        return self.dev_root_der is not None

    def attestation_policy(self) -> Policy:
        """The attestation library's policy: simulated evidence as decided above, and a TCB floor no higher
        than the lowest accepted status (the exact set is then checked by the verifier)."""
        base = self.base if self.base is not None else Policy.default()
        ranks = [TCB_STATUS_ORDER.index(s) for s in self.accepted_tcb_statuses if s in TCB_STATUS_ORDER]
        floor = base.min_tcb_status
        if ranks and TCB_STATUS_ORDER.index(floor) < max(ranks):
            floor = TCB_STATUS_ORDER[max(ranks)]
        return dataclasses.replace(base, allow_simulated=self.trusts_dev_root, min_tcb_status=floor)


@dataclass(frozen=True)
class AttestedPeer:
    """A peer whose evidence passed every step of the policy. Only `PeerVerifier` makes one; handlers that
    release anything accept nothing else."""

    evidence: VerifiedEvidence
    measured_boot_info: BootInfo | None  # None for evidence that measures no dstack boot (SEV-SNP)
    cert_sha256: str = ""
    usage: str = ""
    not_after: int = 0

    @property
    def kind(self) -> TeeKind:
        return self.evidence.kind

    @property
    def boot_info(self) -> BootInfo:
        """dstack's AppBootInfo, measured. Raises PeerRejected(step="boot_info") for a peer whose evidence
        names no app (SEV-SNP): fail closed for any caller that reads an identity it does not have."""
        if self.measured_boot_info is None:
            raise PeerRejected(
                f"{self.kind.value} evidence carries no dstack boot measurement (app-id, compose-hash, "
                "instance-id): it names no app",
                step="boot_info",
            )
        return self.measured_boot_info

    @property
    def app_id(self) -> bytes:
        return self.boot_info.app_id

    @property
    def instance_id(self) -> bytes:
        return self.boot_info.instance_id

    @property
    def compose_hash(self) -> bytes:
        return self.boot_info.compose_hash

    @property
    def os_image_hash(self) -> bytes:
        return self.boot_info.os_image_hash

    @property
    def simulated(self) -> bool:
        return self.evidence.simulated


def _exact(name: str, value: bytes, size: int, *, zero_if_empty: bool = False) -> bytes:
    if not value and zero_if_empty:
        return bytes(size)
    if len(value) != size:
        raise PeerRejected(
            f"the event log gives {name} as {len(value)} bytes, expected {size}", step="boot_info"
        )
    return value


def build_boot_info(evidence: VerifiedEvidence) -> BootInfo:
    """dstack's AppBootInfo from verified evidence. The values come only from the quote (measurements,
    TCB, device) and the event log replayed against it; nothing the peer says is used."""
    info = evidence.app_info
    if info is None:
        raise PeerRejected("the evidence carries no replayed event log (no app info)", step="boot_info")
    if not info.compose_hash:
        raise PeerRejected("the event log has no compose-hash event", step="boot_info")
    device_id = evidence.device_id or info.device_id
    return BootInfo(
        app_id=_exact("app_id", info.app_id, 20),
        compose_hash=_exact("compose_hash", info.compose_hash, 32),
        # dstack: an app without per-instance identity reports the zero address.
        instance_id=_exact("instance_id", info.instance_id, 20, zero_if_empty=True),
        device_id=_exact("device_id", device_id, 32),
        mr_aggregated=_exact("mr_aggregated", info.mr_aggregated, 32),
        mr_system=_exact("mr_system", info.mr_system, 32),
        os_image_hash=_exact("os_image_hash", info.os_image_hash, 32),
        tcb_status=evidence.tcb_status,
        advisory_ids=tuple(evidence.advisory_ids),
    )


def require_boot_time(peer: AttestedPeer) -> BootMeasurement:
    """The boot-time rule (teecloud.attestation.boottime) for an attested peer: its quoted RTMR3 must be the
    boot grammar's value for its identity, and that identity must be the one its boot_info names. Every
    path that releases or signs anything for a CVM (KMS app keys and certificates, KMS onboarding, gateway
    registration, threshold partials) calls this. Raises PeerRejected(step="boot_time").

    Only TDX evidence can satisfy it: the rule is the quoted RTMR3 against the boot grammar's replay, and
    SEV-SNP has no RTMR3 (its launch MEASUREMENT is fixed at launch; no register records what ran after
    boot), so an SNP peer is refused here with that reason rather than judged by a weaker rule."""
    if peer.kind != TeeKind.TDX or peer.measured_boot_info is None:
        raise PeerRejected(
            f"{peer.kind.value} evidence cannot show boot time: keys and certificates are released only to "
            "evidence whose RTMR3 equals the boot measurement, and "
            f"{peer.kind.value} has no RTMR3 or runtime event log",
            step="boot_time",
        )
    try:
        measured = check_boot_time(peer.evidence)
    except NotBootTime as exc:
        err = PeerRejected(exc.reason, step="boot_time")
        err.boot_info = peer.boot_info
        raise err from exc
    bi = peer.boot_info
    if (measured.app_id, measured.compose_hash) != (bi.app_id, bi.compose_hash) or (
        measured.instance_id or bytes(20)
    ) != bi.instance_id:
        err = PeerRejected(
            "the boot measurement and the boot_info name different identities", step="boot_time"
        )
        err.boot_info = bi
        raise err
    if measured.os_image_hash is not None and measured.os_image_hash != bi.os_image_hash:
        err = PeerRejected(
            "the boot measurement and the boot_info name different OS images", step="boot_time"
        )
        err.boot_info = bi
        raise err
    return measured


class PeerVerifier:
    def __init__(
        self,
        policy: PeerPolicy,
        collateral: CollateralSource,
        *,
        snp_certs: CollateralSource | None = None,
        clock: Callable[[], float] = time.time,
        cache_s: int = 300,
        cache_entries: int = 4096,
    ) -> None:
        """`collateral` gives DCAP collateral for a TDX quote; `snp_certs` gives the VCEK (or VLEK)
        certificate and its ASK for a SEV-SNP report (AMD KDS or a cache of it), when the policy accepts
        SEV-SNP."""
        self.policy = policy
        self.collateral = collateral
        self.snp_certs = snp_certs
        self.clock = clock
        self._attestation_policy = policy.attestation_policy()
        self._anchors = TrustAnchors(dev_root_der=policy.dev_root_der, amd_ark=policy.amd_roots)
        self._cache_s = cache_s
        self._cache_entries = cache_entries
        self._cache: OrderedDict[str, tuple[int, AttestedPeer]] = OrderedDict()
        self._lock = threading.Lock()

    def verify_cert(self, cert_der: bytes | None) -> AttestedPeer:
        """(1)-(7) of the module docstring. Raises PeerRejected with the failing step."""
        if not cert_der:
            raise PeerRejected("no client certificate: this endpoint needs mutual RA-TLS", step="tls")
        now = int(self.clock())
        digest = hashlib.sha256(cert_der).hexdigest()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and now <= hit[0] and now <= hit[1].not_after:
            return hit[1]
        # (1)
        try:
            claims = parse_ratls_cert(cert_der)
        except (VerificationError, KeysError, ValueError) as exc:
            raise PeerRejected(f"not an RA-TLS certificate: {exc}", step="parsed") from exc
        # (2)
        not_before, not_after = _cert_window(claims.certificate)
        if now > not_after:
            raise PeerRejected(f"certificate expired at {not_after} (now {now})", step="cert_fresh")
        if now + self.policy.clock_skew_s < not_before:
            raise PeerRejected(f"certificate is not valid before {not_before} (now {now})", step="cert_fresh")
        if not_after - not_before > self.policy.max_cert_lifetime_s:
            raise PeerRejected(
                f"certificate is valid for {not_after - not_before} s; at most "
                f"{self.policy.max_cert_lifetime_s} s is accepted (a fresh certificate per request)",
                step="cert_fresh",
            )
        # (3)-(4), judged as of a time inside the certificate's window (the clock-skew allowance)
        evidence = self._verified(claims.quote, claims.event_log, max(now, not_before))
        # (5)
        try:
            check_key_binding(claims, evidence.report_data)
        except KeysError as exc:
            raise PeerRejected(str(getattr(exc, "reason", exc)), step="ratls_cert_verified") from exc
        # (6)-(7)
        boot_info = self._judge(evidence)
        if claims.app_id and (boot_info is None or claims.app_id != boot_info.app_id):
            measured = boot_info.app_id.hex() if boot_info is not None else f"none ({evidence.kind.value})"
            err = PeerRejected(
                f"certificate app_id {claims.app_id.hex()} differs from the measured app-id {measured}",
                step="boot_info",
            )
            err.boot_info = boot_info
            raise err
        peer = AttestedPeer(evidence, boot_info, digest, claims.usage, not_after)
        with self._lock:
            self._cache[digest] = (now + self._cache_s, peer)
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return peer

    def verify_quote(self, quote: bytes, event_log: str | bytes, *, now: int | None = None) -> AttestedPeer:
        """(3)-(7) for evidence and event log fetched over another channel (no certificate binding: the
        caller compares report_data with what it asked for)."""
        evidence = self.verify_evidence(quote, event_log, now=now)
        return AttestedPeer(evidence, build_boot_info(evidence) if evidence.kind == TeeKind.TDX else None)

    def verify_evidence(
        self, quote: bytes, event_log: str | bytes, *, now: int | None = None
    ) -> VerifiedEvidence:
        """(3), (4) and (6) only: the evidence under this policy, for a caller that shows what ran whether or
        not it is a KMS-mode app with a full boot_info (an explorer)."""
        evidence = self._verified(quote, event_log, int(self.clock()) if now is None else now)
        self._check_policy(evidence)
        return evidence

    def _verified(self, quote: bytes, event_log: str | bytes, at: int) -> VerifiedEvidence:
        # (3)
        try:
            kind = peer_evidence_kind(quote)
        except VerificationError as exc:
            raise PeerRejected(f"not peer evidence: {exc.reason}", step="parsed") from exc
        if kind not in self.policy.accepted_kinds:
            raise PeerRejected(
                f"{kind.value} evidence is not accepted for this policy (accepted: "
                f"{', '.join(k.value for k in self.policy.accepted_kinds)})",
                step="kind",
            )
        # (4)
        collateral = self._collateral_for(kind, quote, at)
        try:
            return verify_peer_evidence(
                quote,
                collateral=collateral,
                event_log=event_log,
                now=at,
                anchors=self._anchors,
                policy=self._attestation_policy,
            )
        except VerificationError as exc:
            step = getattr(exc, "step", "") or "quote_verified"
            raise PeerRejected(str(getattr(exc, "reason", exc)), step=step) from exc
        except UsageError as exc:  # e.g. a VCEK source that returned no certificate
            raise PeerRejected(f"cannot verify this evidence: {exc}", step="collateral_ok") from exc

    def _collateral_for(self, kind: TeeKind, quote: bytes, now: int) -> bytes:
        source = self.collateral if kind == TeeKind.TDX else self.snp_certs
        if source is None:
            raise PeerRejected(
                f"no certificate source for {kind.value} evidence is configured", step="collateral_ok"
            )
        try:
            return source.collateral_for(quote, now=now)
        except (VerificationError, KeysError, ValueError) as exc:
            raise PeerRejected(f"no collateral for this quote: {exc}", step="collateral_ok") from exc
        except Exception as exc:  # collateral service down: fail closed
            raise PeerRejected(
                f"cannot fetch collateral ({type(exc).__name__}: {exc})", step="collateral_ok"
            ) from exc

    def _judge(self, evidence: VerifiedEvidence) -> BootInfo | None:
        self._check_policy(evidence)
        # (7)
        return build_boot_info(evidence) if evidence.kind == TeeKind.TDX else None

    def _check_policy(self, evidence: VerifiedEvidence) -> None:
        # (6) decided here whatever the attestation library was told
        if evidence.kind not in self.policy.accepted_kinds:  # the verifier's kind is the one that counts
            raise PeerRejected(f"{evidence.kind.value} evidence is not accepted for this policy", step="kind")
        if evidence.simulated and not self.policy.trusts_dev_root:
            raise PeerRejected(
                "simulated evidence is refused: no development root is trusted here", step="quote_verified"
            )
        if evidence.debug:
            raise PeerRejected(
                "the TEE runs in debug mode (its memory is readable by the host)", step="policy"
            )
        # SEV-SNP has one acceptable outcome: the reported TCB matches the VCEK's (attestation.snp)
        accepted = (snp.TCB_STATUS,) if evidence.kind == TeeKind.SNP else self.policy.accepted_tcb_statuses
        if evidence.tcb_status not in accepted:
            raise PeerRejected(
                f"TCB status {evidence.tcb_status} is below the floor ({', '.join(accepted)})",
                step="tcb_ok",
            )


def _cert_window(cert: x509.Certificate) -> tuple[int, int]:
    return int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp())
