"""Size limits for untrusted input, in one place (the verifier refuses anything larger before parsing)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "VerifierLimits"]


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
