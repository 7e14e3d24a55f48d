"""AMD Key Distribution Service (KDS) CRLs for SEV-SNP chains, with an on-disk cache.

AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface Specification" (pub. 57230):

    GET /vcek/v1/{product_name}/crl     DER CRL signed by the ARK (RSA-PSS), listing revoked ASKs
    GET /vlek/v1/{product_name}/crl     the same for the ASVK that signs VLEKs

The client only fetches and parses; the verifier (attestation._revocation) checks the CRL's signature, its
dates and the serial numbers. A cached CRL is used until its nextUpdate, then fetched again; one that is
already past its nextUpdate when served is refused.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import httpx
from cryptography import x509

from teecloud._fs import atomic_write
from teecloud.collateral._http import bounded_get
from teecloud.collateral.errors import InvalidCollateral

__all__ = ["AMD_KDS_URL", "MAX_CRL_SIZE", "AmdKdsClient", "crl_next_update"]

AMD_KDS_URL = "https://kdsintf.amd.com"
MAX_CRL_SIZE = 1024 * 1024
_PRODUCT = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,31}")


def crl_next_update(der: bytes) -> int:
    """Unix time of a DER CRL's nextUpdate; InvalidCollateral if it is not a CRL or has none."""
    try:
        crl = x509.load_der_x509_crl(der)
        nxt = crl.next_update_utc
    except ValueError as exc:
        raise InvalidCollateral(f"not a DER CRL: {exc}") from exc
    if nxt is None:
        raise InvalidCollateral("the CRL has no nextUpdate")
    return int(nxt.timestamp())


class AmdKdsClient:
    """Fetches the ARK's CRL for a product line (Milan, Genoa, Turin, ...), caching it by nextUpdate.
    `transport` replaces the HTTP transport (tests use httpx.MockTransport)."""

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        base_url: str = AMD_KDS_URL,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self.transport = transport
        self.fetches = 0
        self.cache_hits = 0

    def _path(self, key: str, product: str) -> Path:
        return self.cache_dir / f"{key}-{product}.crl"

    def crl(self, product: str, *, key: str = "vcek", now: int) -> bytes:
        """The DER CRL for `product` ("vcek" chains: ARK -> ASK; "vlek": ARK -> ASVK), cached until its
        nextUpdate."""
        if not _PRODUCT.fullmatch(product):
            raise ValueError(f"product must be an AMD product line name such as Milan, got {product!r}")
        if key not in ("vcek", "vlek"):
            raise ValueError(f"key must be 'vcek' or 'vlek', got {key!r}")
        path = self._path(key, product)
        try:
            cached = path.read_bytes()
            if now < crl_next_update(cached):
                self.cache_hits += 1
                return cached
        except (OSError, InvalidCollateral):
            pass
        der = self._fetch(f"/{key}/v1/{product}/crl")
        nxt = crl_next_update(der)
        if nxt <= now:
            raise InvalidCollateral(
                f"the AMD KDS at {self.base_url} served a {product} CRL that expired at "
                f"{dt.datetime.fromtimestamp(nxt, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
            )
        atomic_write(path, der, mode=0o644)
        return der

    def _fetch(self, path: str) -> bytes:
        self.fetches += 1
        url = self.base_url + path
        with httpx.Client(timeout=self.timeout, transport=self.transport) as client:
            return bounded_get(
                client,
                url,
                name="AMD KDS",
                base_url=self.base_url,
                path=path,
                max_bytes=MAX_CRL_SIZE,
                not_found=f"AMD KDS at {self.base_url} has no CRL at {path}",
            ).content
