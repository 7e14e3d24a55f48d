"""Errors of the collateral package (I/O around the pure verifier).

CollateralError            base
├── PccsUnavailable        the PCCS could not be reached or answered with an error
├── CollateralNotFound     the PCCS / store has nothing for this FMSPC
└── InvalidCollateral      what came back is not usable collateral (or not a certificate)
"""

from __future__ import annotations

from teecloud.errors import Error

__all__ = ["CollateralError", "CollateralNotFound", "InvalidCollateral", "PccsUnavailable", "why"]


class CollateralError(Error):
    def diagnostics(self) -> str:
        return f"{type(self).__name__}: {self}"


class PccsUnavailable(CollateralError):
    pass


class CollateralNotFound(CollateralError):
    pass


class InvalidCollateral(CollateralError):
    pass


def why(exc: BaseException) -> str:
    """A parse failure of a collateral document in words: a KeyError's text is only the quoted key
    (`'tcb_info'`), an AttributeError's names a Python type."""
    if isinstance(exc, KeyError):
        return f"it has no {exc.args[0] if exc.args else 'expected'} field"
    if isinstance(exc, AttributeError | TypeError):
        return "a member is not of the JSON type QuoteCollateralV3 and Intel's PCS API give it"
    return str(exc)
