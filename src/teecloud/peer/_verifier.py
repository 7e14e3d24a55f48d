"""RA-TLS peer verification under one policy.

`PeerVerifier.verify_cert(cert_der)`, for the certificate a TLS peer proved it holds the key of:
  (1) parse     the RA-TLS extensions (quote, event log, app_id, usage)                         `parsed`
  (2) fresh     now within [not_before - clock skew, not_after]; lifetime at most the policy's   `cert_fresh`
  (3) quote     collateral for its FMSPC (injected source); the quote verifies against it, the
                development root only when the policy trusts one; report_data =
                sha512("ratls-cert:" ‖ SPKI) binds the same key; the event log replays to the RTMRs
                (teecloud.keys.ratls.verify_ratls_cert → teecloud.attestation)          `collateral_ok`, ...
  (4) policy    simulated evidence only with a trusted development root; never a debug TEE; TCB status
                within the policy's floor                          `quote_verified`, `policy`, `tcb_ok`
  (5) boot_info from the verified evidence only (dstack's AppBootInfo); the certificate's app_id
                extension, when present, must equal the measured app-id                          `boot_info`
`verify_quote(quote, event_log)` runs (3)-(5) for a quote fetched over another channel (the caller checks
its report_data against its own nonce). Results of (1)-(5) are reused per certificate hash for at most
`cache_s` seconds and never past not_after (the cache is bounded in entries; certificates are bounded in
size by the TLS layer and the parser).
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

from teecloud.attestation.boottime import BootMeasurement, check_boot_time
from teecloud.attestation.dcap import TCB_STATUS_ORDER
from teecloud.attestation.errors import NotBootTime, VerificationError
from teecloud.attestation.models import VerifiedEvidence
from teecloud.attestation.policy import Policy
from teecloud.chain.api import BootInfo
from teecloud.errors import Error
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import parse_ratls_cert, verify_ratls_cert
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
    boot_info: BootInfo
    cert_sha256: str = ""
    usage: str = ""
    not_after: int = 0

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
    registration, threshold partials) calls this. Raises PeerRejected(step="boot_time")."""
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
        clock: Callable[[], float] = time.time,
        cache_s: int = 300,
        cache_entries: int = 4096,
    ) -> None:
        self.policy = policy
        self.collateral = collateral
        self.clock = clock
        self._attestation_policy = policy.attestation_policy()
        self._cache_s = cache_s
        self._cache_entries = cache_entries
        self._cache: OrderedDict[str, tuple[int, AttestedPeer]] = OrderedDict()
        self._lock = threading.Lock()

    def verify_cert(self, cert_der: bytes | None) -> AttestedPeer:
        """(1)-(5) of the module docstring. Raises PeerRejected with the failing step."""
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
        # (3)
        collateral = self._collateral_for(claims.quote, now)
        try:
            evidence = verify_ratls_cert(
                claims.certificate,  # the parsed object: not decoded a second time
                collateral=collateral,
                now=max(now, not_before),
                dev_root_der=self.policy.dev_root_der,
                policy=self._attestation_policy,
            )
        except (VerificationError, KeysError) as exc:
            step = getattr(exc, "step", "") or "quote_verified"
            raise PeerRejected(str(getattr(exc, "reason", exc)), step=step) from exc
        # (4)-(5)
        boot_info = self._judge(evidence)
        if claims.app_id and claims.app_id != boot_info.app_id:
            err = PeerRejected(
                f"certificate app_id {claims.app_id.hex()} differs from the measured app-id "
                f"{boot_info.app_id.hex()}",
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
        """(3)-(5) for a quote and event log fetched over another channel (no certificate binding: the
        caller compares report_data with what it asked for)."""
        evidence = self.verify_evidence(quote, event_log, now=now)
        return AttestedPeer(evidence, build_boot_info(evidence))

    def verify_evidence(
        self, quote: bytes, event_log: str | bytes, *, now: int | None = None
    ) -> VerifiedEvidence:
        """(3)-(4) only: the evidence under this policy, for a caller that shows what ran whether or not it
        is a KMS-mode app with a full boot_info (an explorer)."""
        from teecloud.attestation.verifier import verify_tdx_with_event_log

        at = int(self.clock()) if now is None else now
        collateral = self._collateral_for(quote, at)
        try:
            evidence = verify_tdx_with_event_log(
                quote,
                collateral,
                event_log,
                now=at,
                dev_root_der=self.policy.dev_root_der,
                policy=self._attestation_policy,
            )
        except VerificationError as exc:
            step = getattr(exc, "step", "") or "quote_verified"
            raise PeerRejected(str(getattr(exc, "reason", exc)), step=step) from exc
        self._check_policy(evidence)
        return evidence

    def _collateral_for(self, quote: bytes, now: int) -> bytes:
        try:
            return self.collateral.collateral_for(quote, now=now)
        except (VerificationError, KeysError, ValueError) as exc:
            raise PeerRejected(f"no collateral for this quote: {exc}", step="collateral_ok") from exc
        except Exception as exc:  # collateral service down: fail closed
            raise PeerRejected(
                f"cannot fetch collateral ({type(exc).__name__}: {exc})", step="collateral_ok"
            ) from exc

    def _judge(self, evidence: VerifiedEvidence) -> BootInfo:
        self._check_policy(evidence)
        # (5)
        return build_boot_info(evidence)

    def _check_policy(self, evidence: VerifiedEvidence) -> None:
        # (4) decided here whatever the attestation library was told
        if evidence.simulated and not self.policy.trusts_dev_root:
            raise PeerRejected(
                "simulated evidence is refused: no development root is trusted here", step="quote_verified"
            )
        if evidence.debug:
            raise PeerRejected(
                "the TEE runs in debug mode (its memory is readable by the host)", step="policy"
            )
        if evidence.tcb_status not in self.policy.accepted_tcb_statuses:
            raise PeerRejected(
                f"TCB status {evidence.tcb_status} is below the floor "
                f"({', '.join(self.policy.accepted_tcb_statuses)})",
                step="tcb_ok",
            )


def _cert_window(cert: x509.Certificate) -> tuple[int, int]:
    return int(cert.not_valid_before_utc.timestamp()), int(cert.not_valid_after_utc.timestamp())
