"""Errors raised by TEE backends (producing evidence, not verifying it).

TeeError
├── TeeUsageError (also ValueError)   caller mistake: report_data > 64 bytes, bad RTMR index, bad name
├── TeeUnavailable                    no usable TEE interface on this machine / backend not reachable
│   └── GpuUnavailable                no GPU evidence source usable (no NVML, no GPU, CC mode off)
├── QuoteGenerationError              the kernel / quoting service failed to produce evidence
└── SimulatedTeeStateError            the simulated platform's files are incomplete or corrupt
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = [
    "GpuUnavailable",
    "QuoteGenerationError",
    "SimulatedTeeStateError",
    "TeeError",
    "TeeUnavailable",
    "TeeUsageError",
]


class TeeError(Error):
    """Base class of every error raised by `teecloud.tee`."""


class TeeUsageError(TeeError, ValueError):
    """The caller passed something invalid (e.g. report_data longer than 64 bytes)."""


class TeeUnavailable(TeeError):
    """No usable TEE interface (device, configfs-tsm provider) is present."""


class GpuUnavailable(TeeUnavailable):
    """No usable GPU evidence source: NVML absent, no GPU, or the GPU not in confidential-computing mode."""


class QuoteGenerationError(TeeError):
    """The platform failed to produce a quote / report."""


class SimulatedTeeStateError(TeeError):
    """The simulated TEE's persistent state (dev root CA, keys) is incomplete or corrupt; it is never
    regenerated over silently."""
