"""teecloud.tee: produce TEE evidence (quotes, RTMR extension, event log) on the platform we run on.

Backends implement `teecloud.tee.base.TeePlatform`: `SimulatedTdx` (real DCAP v4 quotes under a local dev
root CA), `TdxPlatform` and `SevSnpPlatform` (Linux configfs-tsm). `detect()` picks one.
"""

from __future__ import annotations

from teecloud.tee.base import TeePlatform
from teecloud.tee.errors import (
    QuoteGenerationError,
    SimulatedTeeStateError,
    TeeError,
    TeeUnavailable,
    TeeUsageError,
)
from teecloud.tee.simulated import SimulatedTdx

__all__ = [
    "QuoteGenerationError",
    "SimulatedTdx",
    "SimulatedTeeStateError",
    "TeeError",
    "TeePlatform",
    "TeeUnavailable",
    "TeeUsageError",
]
