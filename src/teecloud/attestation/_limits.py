"""Size limits for untrusted input, in one place (the verifier refuses anything larger before parsing)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CACHE_BUDGETS", "DEFAULT_LIMITS", "CacheBudget", "VerifierLimits"]


@dataclass(frozen=True)
class VerifierLimits:
    """Upper bounds on untrusted input. Real values are far below these (a TDX quote is ~5 KB, collateral
    ~20 KB, a dstack event log ~20 KB with ~30 entries); the bounds only stop resource exhaustion."""

    max_quote_size: int = 64 * 1024
    max_collateral_size: int = 512 * 1024
    max_event_log_size: int = 4 * 1024 * 1024
    max_event_log_entries: int = 4096
    max_event_payload_size: int = 256 * 1024
    max_evidence_size: int = 4 * 1024 * 1024  # dstack JSON, SNP/Nitro/NVIDIA evidence
    max_cert_chain_size: int = 256 * 1024
    max_policy_size: int = 1024 * 1024


DEFAULT_LIMITS = VerifierLimits()


@dataclass(frozen=True)
class CacheBudget:
    max_entries: int
    max_bytes: int


# Memory budgets of the verifier's memo caches (attestation._cache.BoundedCache), by cache name. Each is
# small next to a service's memory, and an attacker sending distinct inputs can only make entries evict.
CACHE_BUDGETS: dict[str, CacheBudget] = {
    "dcap.collateral": CacheBudget(64, 8 * 1024 * 1024),
    "dcap.pck_chain": CacheBudget(1024, 4 * 1024 * 1024),
    "dcap.anchor_names": CacheBudget(64, 1024 * 1024),
    "dcap.fmspc": CacheBudget(1024, 4 * 1024 * 1024),
    "dcap.verdicts": CacheBudget(16384, 4 * 1024 * 1024),
    "dcap.models": CacheBudget(256, 2 * 1024 * 1024),
    "dcap.model_candidates": CacheBudget(256, 4 * 1024 * 1024),
    "dcap.attestation_keys": CacheBudget(4096, 2 * 1024 * 1024),
    "dstack.json": CacheBudget(64, 8 * 1024 * 1024),
    "eventlog.parsed": CacheBudget(128, 16 * 1024 * 1024),
    "eventlog.replayed": CacheBudget(256, 4 * 1024 * 1024),
    "x509.chains": CacheBudget(256, 4 * 1024 * 1024),
    "x509.split": CacheBudget(256, 2 * 1024 * 1024),
    "x509.loaded": CacheBudget(512, 4 * 1024 * 1024),
}
