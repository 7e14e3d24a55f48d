"""Where a verifier gets DCAP collateral (QuoteCollateralV3 JSON) for a quote: the injected I/O seam."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["CollateralSource", "PccsCollateral", "StaticCollateral"]


class CollateralSource(Protocol):
    def collateral_for(self, quote: bytes, *, now: int) -> bytes: ...


class StaticCollateral:
    """Collateral from a callable (the simulated platform's `collateral()`), cached until the refresh
    interval passes; the verifier still checks every validity date against `now`."""

    def __init__(self, fetch: Callable[[], bytes], *, refresh_s: int = 600) -> None:
        self._fetch = fetch
        self._refresh_s = refresh_s
        self._cached: tuple[int, bytes] | None = None
        self._lock = threading.Lock()

    def collateral_for(self, quote: bytes, *, now: int) -> bytes:
        with self._lock:
            if self._cached is None or now - self._cached[0] >= self._refresh_s or now < self._cached[0]:
                self._cached = (now, self._fetch())
            return self._cached[1]


class PccsCollateral:
    """Collateral from a PCCS (teecloud.collateral.PccsClient), chosen by the quote's FMSPC and PCK CA."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def collateral_for(self, quote: bytes, *, now: int) -> bytes:
        from teecloud.attestation.dcap import pck_ca, pck_fmspc

        data = self._client.get_collateral(pck_fmspc(quote), ca=pck_ca(quote), tee="tdx", now=now)
        return bytes(data)
