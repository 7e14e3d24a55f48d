"""teecloud.attestation: verify TEE evidence (Intel TDX/SGX, AMD SEV-SNP, AWS Nitro, NVIDIA GPU).

A pure library: evidence bytes, collateral, trust anchors and the verification time go in; a typed result
comes out. No network, no clock reads. Layers: parse (`dcap.parse_quote`, `eventlog.parse_event_log`),
verify (`dcap.verify_dcap_quote`, `eventlog.verify_event_log`, `verifier.verify`), judge (`policy.Policy`).
"""

from __future__ import annotations

from teecloud.attestation._limits import DEFAULT_LIMITS, VerifierLimits
from teecloud.attestation.dcap import DEV_ROOT_CN_PREFIX, parse_quote, pck_fmspc, verify_dcap_quote
from teecloud.attestation.errors import (
    AttestationError,
    CertificateChainInvalid,
    CollateralMismatch,
    EventLogMismatch,
    Expired,
    MalformedEvidence,
    PolicyViolation,
    SignatureInvalid,
    TcbNotAcceptable,
    UntrustedRoot,
    UsageError,
    VerificationError,
)
from teecloud.attestation.eventlog import (
    RUNTIME_EVENT_TYPE,
    derive_app_info,
    event_log_to_json,
    parse_event_log,
    replay_rtmrs,
    runtime_event_digest,
    verify_event_log,
)
from teecloud.attestation.models import (
    AppInfo,
    EventLogEntry,
    Step,
    TeeKind,
    VerificationResult,
    VerifiedEvidence,
)
from teecloud.attestation.policy import POLICY_VERSION, Policy
from teecloud.attestation.verifier import (
    TrustAnchors,
    detect_kind,
    split_certificates,
    unwrap_evidence,
    verify,
    verify_tdx_with_event_log,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DEV_ROOT_CN_PREFIX",
    "POLICY_VERSION",
    "RUNTIME_EVENT_TYPE",
    "AppInfo",
    "AttestationError",
    "CertificateChainInvalid",
    "CollateralMismatch",
    "EventLogEntry",
    "EventLogMismatch",
    "Expired",
    "MalformedEvidence",
    "Policy",
    "PolicyViolation",
    "SignatureInvalid",
    "Step",
    "TcbNotAcceptable",
    "TeeKind",
    "TrustAnchors",
    "UntrustedRoot",
    "UsageError",
    "VerificationError",
    "VerificationResult",
    "VerifiedEvidence",
    "VerifierLimits",
    "derive_app_info",
    "detect_kind",
    "event_log_to_json",
    "parse_event_log",
    "parse_quote",
    "pck_fmspc",
    "replay_rtmrs",
    "runtime_event_digest",
    "split_certificates",
    "unwrap_evidence",
    "verify",
    "verify_dcap_quote",
    "verify_event_log",
    "verify_tdx_with_event_log",
]
