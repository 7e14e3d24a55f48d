"""The compose hash AppAuth allows: re-exported from `teecloud.appcompose`, the one implementation that
boot measures into RTMR3 (a second, subtly different copy here once registered hashes no CVM could boot)."""

from __future__ import annotations

from teecloud.appcompose import compose_hash, normalize_app_compose

__all__ = ["compose_hash", "normalize_app_compose"]
