"""Errors of the collateral package (I/O around the pure verifier).

CollateralError            base
├── PccsUnavailable        the PCCS could not be reached or answered with an error
├── CollateralNotFound     the PCCS / store has nothing for this FMSPC
└── InvalidCollateral      what came back is not usable collateral (or not a certificate)
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = ["CollateralError", "CollateralNotFound", "InvalidCollateral", "PccsUnavailable"]


class CollateralError(Error):
    def diagnostics(self) -> str:
        return f"{type(self).__name__}: {self}"


class PccsUnavailable(CollateralError):
    pass


class CollateralNotFound(CollateralError):
    pass


class InvalidCollateral(CollateralError):
    pass
