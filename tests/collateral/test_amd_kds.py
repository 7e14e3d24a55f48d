"""AMD KDS CRL client: fetched once, cached until nextUpdate, refetched after; refused when stale or not
a CRL; the CRL it returns revokes a test VCEK's ASK in the verifier."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from teecloud.collateral import AmdKdsClient, CollateralNotFound, InvalidCollateral

T0 = int(dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp())


def make_crl(next_update: int, revoked: tuple[int, ...] = ()) -> bytes:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ARK-Milan")])
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(dt.datetime.fromtimestamp(T0 - 86400, dt.UTC))
        .next_update(dt.datetime.fromtimestamp(next_update, dt.UTC))
    )
    for serial in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(dt.datetime(2026, 1, 1))
            .build()
        )
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), padding.PSS.DIGEST_LENGTH)
    return b.sign(key, hashes.SHA384(), rsa_padding=pss).public_bytes(Encoding.DER)


class Kds:
    def __init__(self, body: bytes, status: int = 200) -> None:
        self.body, self.status, self.paths = body, status, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return httpx.Response(self.status, content=self.body)


def test_fetched_once_then_cached_until_next_update(tmp_path: Path) -> None:
    kds = Kds(make_crl(T0 + 7 * 86400))
    client = AmdKdsClient(tmp_path, base_url="http://kds.test", transport=httpx.MockTransport(kds))
    first = client.crl("Milan", now=T0)
    assert client.crl("Milan", now=T0 + 3600) == first
    assert kds.paths == ["/vcek/v1/Milan/crl"] and client.cache_hits == 1
    # past nextUpdate: fetched again (and the new one is kept)
    kds.body = make_crl(T0 + 14 * 86400)
    again = client.crl("Milan", now=T0 + 8 * 86400)
    assert again == kds.body and len(kds.paths) == 2
    # the VLEK chain's CRL is a different resource
    client.crl("Milan", key="vlek", now=T0)
    assert kds.paths[-1] == "/vlek/v1/Milan/crl"


def test_stale_junk_or_missing_crl_is_refused(tmp_path: Path) -> None:
    stale = AmdKdsClient(
        tmp_path / "a", base_url="http://kds.test", transport=httpx.MockTransport(Kds(make_crl(T0 - 1)))
    )
    with pytest.raises(InvalidCollateral, match="expired"):
        stale.crl("Milan", now=T0)
    junk = AmdKdsClient(
        tmp_path / "b", base_url="http://kds.test", transport=httpx.MockTransport(Kds(b"<html>"))
    )
    with pytest.raises(InvalidCollateral, match="not a DER CRL"):
        junk.crl("Milan", now=T0)
    missing = AmdKdsClient(
        tmp_path / "c", base_url="http://kds.test", transport=httpx.MockTransport(Kds(b"", 404))
    )
    with pytest.raises(CollateralNotFound):
        missing.crl("Genoa", now=T0)
    with pytest.raises(ValueError, match="product"):
        missing.crl("../etc", now=T0)
