"""ACME DNS-01 issuance end to end against real pebble (127.0.0.1), with the gateway's local challenge DNS
server (dnslib) as pebble's resolver: the wildcard + apex certificate, its chain to pebble's root, storage,
renewal by an injected clock, and the failures (wrong TXT, CA down, untrusted CA) leaving no partial state."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from dnslib import QTYPE, RCODE, DNSRecord

from teecloud.chain import ChainClient
from teecloud.gateway.acme import AcmeCertificates, AcmeError, LocalChallengeDns, caa_records
from teecloud.gateway.certkeys import (
    CERT_KEYS_PATH,
    CertKeyRefused,
    check_cert_key,
    fetch_document,
    parse_document,
    presented_cert,
)
from teecloud.gateway.errors import DataPlaneError, GatewayUsageError
from teecloud.gateway.server import GatewayServer
from teecloud.peer import ChainGate, PeerPolicy, PeerVerifier, StaticCollateral
from teecloud.tee.simulated import SimulatedTdx
from tests.gateway.test_registration import chain

from .pebble import Pebble, free_port

BASE = "gw.teecloud.test"
__all__ = ["chain"]  # the module-scoped embedded chain fixture of the registration tests


def _acme(home: Path, pebble: Pebble, dns: object, **kw: object) -> AcmeCertificates:
    return AcmeCertificates(
        home,
        directory_url=pebble.directory_url,
        base_domain=BASE,
        dns=dns,  # type: ignore[arg-type]
        ca_bundle=pebble.ca_bundle,
        timeout_s=30,
        **kw,  # type: ignore[arg-type]
    )


def _verify_chain(pebble: Pebble, leaf_pem: str, chain_pem: str, name: str, at: int) -> None:
    import datetime as dt

    root = x509.load_pem_x509_certificate(pebble.root_pem().encode())
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    inters = x509.load_pem_x509_certificates(chain_pem.encode()) if chain_pem else []
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(dt.datetime.fromtimestamp(at, dt.UTC))
        .build_server_verifier(x509.DNSName(name))
    )
    verifier.verify(leaf, inters)


def _spki(pem: str) -> bytes:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.slow
def test_issue_store_reuse_and_renew(tmp_path: Path, pebble: Pebble, dns: LocalChallengeDns) -> None:
    acme = _acme(tmp_path, pebble, dns)
    assert acme.current() is None
    cert, changed = acme.ensure()
    assert changed
    # the chain validates to pebble's issuing root, for a name under the wildcard and for the apex
    app_name = f"{'ab' * 20}-8080.{BASE}"
    _verify_chain(pebble, cert.issued.cert_pem, cert.chain_pem, app_name, cert.not_before + 60)
    _verify_chain(pebble, cert.issued.cert_pem, cert.chain_pem, BASE, cert.not_before + 60)
    with pytest.raises(x509.verification.VerificationError):
        _verify_chain(pebble, cert.issued.cert_pem, cert.chain_pem, "a.b." + BASE, cert.not_before + 60)
    # stored: one 0600 file (key + chain), the account key 0600, the account URI kept
    for name in ("certificate.pem", "account.pem"):
        assert stat.S_IMODE((tmp_path / "acme" / name).stat().st_mode) == 0o600
    assert acme.account_uri.startswith(f"https://127.0.0.1:{pebble.port}/")
    # the challenge records are gone
    assert not _txt(dns, f"_acme-challenge.{BASE}")
    # not due: the same certificate, no change (no reload), nothing asked of the CA
    again, changed = _acme(tmp_path, pebble, dns).ensure(now=cert.not_before + 3600)
    assert not changed and again.issued.cert_pem == cert.issued.cert_pem
    # inside the renewal window (injected clock): a new certificate with a new key, the same account
    renew_at = cert.not_after - min(30 * 24 * 3600, (cert.not_after - cert.not_before) // 3) + 1
    second = _acme(tmp_path, pebble, dns)
    assert not second.due(cert, renew_at - 2)
    assert second.due(cert, renew_at)
    renewed, changed = second.ensure(now=renew_at)
    assert changed and _spki(renewed.issued.cert_pem) != _spki(cert.issued.cert_pem)
    assert second.account_uri == acme.account_uri
    assert second.current() == renewed


class WrongTxt:
    """A DNS provider that publishes a value that is not the key authorization's digest."""

    def __init__(self, inner: LocalChallengeDns) -> None:
        self.inner = inner

    def set_txt(self, name: str, value: str) -> None:
        self.inner.set_txt(name, value[::-1])

    def clear_txt(self, name: str, value: str) -> None:
        self.inner.clear_txt(name, value[::-1])


@pytest.mark.slow
def test_wrong_txt_fails_clearly_and_keeps_state(
    tmp_path: Path, pebble: Pebble, dns: LocalChallengeDns
) -> None:
    fresh = _acme(tmp_path / "fresh", pebble, WrongTxt(dns))
    with pytest.raises(AcmeError) as err:
        fresh.ensure()
    assert err.value.step == "finalize"
    assert "could not validate the DNS-01 challenge" in str(err.value)
    assert not (tmp_path / "fresh" / "acme" / "certificate.pem").exists()
    assert not _txt(dns, f"_acme-challenge.{BASE}")
    # a renewal that fails keeps the certificate in use, byte for byte, and is retried later, not at once
    home = tmp_path / "renew"
    good, _ = _acme(home, pebble, dns).ensure()
    before = (home / "acme" / "certificate.pem").read_bytes()
    bad = _acme(home, pebble, WrongTxt(dns), retry_s=600)
    kept, changed = bad.ensure(now=good.not_after - 1)
    assert not changed and kept == good and bad.failures == 1
    assert "could not validate" in bad.last_error
    assert (home / "acme" / "certificate.pem").read_bytes() == before
    kept, changed = bad.ensure(now=good.not_after - 1)
    assert not changed and bad.failures == 1  # not retried before retry_s


def test_ca_down_is_a_clear_error(tmp_path: Path, dns: LocalChallengeDns) -> None:
    acme = AcmeCertificates(
        tmp_path, directory_url=f"https://127.0.0.1:{free_port()}/dir", base_domain=BASE, dns=dns
    )
    with pytest.raises(AcmeError) as err:
        acme.ensure()
    assert err.value.step == "account"
    assert "cannot reach the ACME server" in str(err.value)
    assert not (tmp_path / "acme" / "certificate.pem").exists()


@pytest.mark.slow
def test_untrusted_ca_certificate_is_refused(tmp_path: Path, pebble: Pebble, dns: LocalChallengeDns) -> None:
    acme = AcmeCertificates(tmp_path, directory_url=pebble.directory_url, base_domain=BASE, dns=dns)
    with pytest.raises(AcmeError, match="TLS certificate is not trusted"):
        acme.ensure()


def test_usage_errors(tmp_path: Path, dns: LocalChallengeDns) -> None:
    with pytest.raises(GatewayUsageError):
        AcmeCertificates(tmp_path, directory_url="http://ca/dir", base_domain=BASE, dns=dns)
    with pytest.raises(GatewayUsageError):
        dns.set_txt("www.example.com", "x")


def _txt(dns: LocalChallengeDns, name: str) -> list[str]:
    answer = DNSRecord.parse(DNSRecord.question(name, "TXT").send("127.0.0.1", dns.port, timeout=2))
    if answer.header.rcode == RCODE.NXDOMAIN:
        return []
    return [b"".join(rr.rdata.data).decode() for rr in answer.rr if rr.rtype == QTYPE.TXT]


def test_challenge_dns_serves_only_what_is_set(dns: LocalChallengeDns) -> None:
    name = "_acme-challenge.unit.teecloud.test"
    assert _txt(dns, name) == []
    dns.set_txt(name, "v1")
    dns.set_txt(name + ".", "v2")
    assert sorted(_txt(dns, name)) == ["v1", "v2"]
    assert _txt(dns, "unit.teecloud.test") == []
    dns.clear_txt(name, "v1")
    assert _txt(dns, name) == ["v2"]
    dns.clear_txt(name, "v2")
    assert _txt(dns, name) == []


def test_caa_records_pin_the_account() -> None:
    uri = "https://acme-v02.api.letsencrypt.org/acme/acct/123"
    assert caa_records(BASE, "letsencrypt.org", uri) == [
        f'{BASE}. CAA 0 issue "letsencrypt.org; accounturi={uri}"',
        f'{BASE}. CAA 0 issuewild "letsencrypt.org; accounturi={uri}"',
    ]


@pytest.mark.slow
def test_gateway_serves_the_acme_certificate_and_reloads_only_on_renewal(
    teecloud_home: Path,
    chain: ChainClient,
    pebble: Pebble,
    dns: LocalChallengeDns,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The public port presents pebble's certificate (chain to pebble's root) with its key's quote published;
    ticks that change nothing do not reload HAProxy; the renewal (injected clock) reloads it once, the new key
    is presented and published, and the old document no longer vouches for what is served."""
    tee = SimulatedTdx(teecloud_home)
    verifier = PeerVerifier(PeerPolicy.dev(tee.dev_root_der()), StaticCollateral(tee.collateral))
    now = [time.time()]
    acme = _acme(teecloud_home / "gw", pebble, dns, clock=lambda: now[0])
    with GatewayServer(
        teecloud_home / "gw",
        base_domain=BASE,
        peers=verifier,
        chain=ChainGate(chain, block_number=chain.block_number),
        admin_token="gateway-admin-token-for-tests",
        acme=acme,
        tee=tee,
        clock=lambda: now[0],
    ) as gw:
        sni = f"{'cd' * 20}-80.{BASE}"
        first = presented_cert("127.0.0.1", gw.public_port, server_name=sni)
        stored = acme.current()
        assert stored is not None and first == _pem_to_der(stored.issued.cert_pem)
        _verify_chain(pebble, stored.issued.cert_pem, stored.chain_pem, sni, stored.not_before + 60)
        old_document = fetch_document(gw.registration_url + CERT_KEYS_PATH)
        assert check_cert_key(first, old_document, verifier).role == "public"
        for _ in range(3):
            gw.tick()
        assert gw.driver.reloads == 0
        # a reload that fails once is retried at the next tick (the ticker thread runs too)
        real, calls, done = gw.driver.reload_certs, [], []

        def flaky(cert: Any, chain_pem: str) -> None:
            calls.append(cert)
            if len(calls) == 1:
                raise DataPlaneError("a reload failure, injected")
            real(cert, chain_pem)
            done.append(cert)

        monkeypatch.setattr(gw.driver, "reload_certs", flaky)
        errors = gw.sync_errors
        now[0] = stored.not_after - 60  # inside the renewal window
        deadline = time.monotonic() + 20
        while not done and time.monotonic() < deadline:
            gw.tick()
        assert len(calls) == 2 and gw.sync_errors == errors + 1
        assert gw.driver.reloads == 1
        for _ in range(3):
            gw.tick()
        assert gw.driver.reloads == 1 and len(calls) == 2
        second = presented_cert("127.0.0.1", gw.public_port, server_name=sni)
        assert second != first and second == _pem_to_der(acme.current().issued.cert_pem)  # type: ignore[union-attr]
        document = fetch_document(gw.registration_url + CERT_KEYS_PATH)
        assert check_cert_key(second, document, verifier, now=int(time.time())).role == "public"
        assert [k.role for k in parse_document(document)].count("public") == 1  # the old key retired
        with pytest.raises(CertKeyRefused, match="stale"):
            check_cert_key(second, old_document, verifier, now=int(time.time()))


def _pem_to_der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
