"""The gateway's TLS keys derived from the KMS's keys for the gateway app (teecloud.gateway.kmskeys): the
derivation (GetKey's bytes per path, distinct per path and per app), a restarted gateway keeping its CA
(`ca.pem` reused) and certificate keys with no private key at rest, the quoted `key_origin`, the ACME account
and certificate keys (against pebble), and a gateway the KMS refuses getting no keys and serving no TLS."""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from teecloud.agent.keyprovider import LocalDevKeyProvider
from teecloud.chain import ChainClient
from teecloud.cli import app as cli_app
from teecloud.gateway.acme import AcmeCertificates, LocalChallengeDns
from teecloud.gateway.certkeys import (
    CERT_KEYS_PATH,
    CertKeyRefused,
    cert_key_report_data,
    check_cert_key,
    check_cert_key_signature,
    fetch_document,
    parse_document,
    presented_cert,
)
from teecloud.gateway.devca import DevCa
from teecloud.gateway.errors import GatewayUsageError
from teecloud.gateway.identity import boot_gateway, register_gateway_app
from teecloud.gateway.kmskeys import (
    ACME_ACCOUNT,
    DEV_CA,
    PUBLIC,
    REGISTRATION,
    GatewayKeys,
    acme_certificate_path,
)
from teecloud.keys.kdf import P256_ORDER, derive_key
from teecloud.keys.sigchain import derive_get_key
from teecloud.peer import PeerPolicy, PeerVerifier, StaticCollateral
from teecloud.tee.simulated import SimulatedTdx
from tests.gateway.test_registration import chain, make_gateway

from .pebble import Pebble

__all__ = ["chain"]  # the module-scoped embedded chain fixture of the registration tests

BASE = "teecloud.localhost"


def _spki(pem_or_der: str | bytes) -> bytes:
    cert = (
        x509.load_pem_x509_certificate(pem_or_der.encode())
        if isinstance(pem_or_der, str)
        else x509.load_der_x509_certificate(pem_or_der)
    )
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pub(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def tee(teecloud_home: Path) -> SimulatedTdx:
    return SimulatedTdx(teecloud_home)


@pytest.fixture
def verifier(tee: SimulatedTdx) -> PeerVerifier:
    return PeerVerifier(PeerPolicy.dev(tee.dev_root_der()), StaticCollateral(tee.collateral))


def _boot_keys(home: Path, chain: ChainClient) -> tuple[GatewayKeys, SimulatedTdx, bytes]:
    """A gateway TEE booted as the gateway app (a fresh instance each time), the keys it was given (with the
    certificate-key signer) and the KMS's k256 root public key."""
    app_id = register_gateway_app(chain)
    tee = SimulatedTdx(home)
    state = boot_gateway(tee, app_id, LocalDevKeyProvider(home))
    keys = GatewayKeys.from_app_keys(state.keys, app_id=bytes.fromhex(app_id.removeprefix("0x")))
    return keys, tee, state.keys.kms_k256_pubkey


# ---------------------------------------------------------------------------------------- derivation


def test_derivation_is_getkey_then_p256_per_path() -> None:
    k256 = bytes(range(1, 33))
    keys = GatewayKeys(lambda path: derive_get_key(k256, path).secret)
    # recomputed independently of GatewayKeys: GetKey's HKDF, then 48 bytes mod (n - 1) + 1
    seed = derive_key(k256, [DEV_CA.encode()])
    expected = int.from_bytes(derive_key(seed, [b"p256"], 48), "big") % (P256_ORDER - 1) + 1
    assert keys.p256(DEV_CA).private_numbers().private_value == expected
    # the same path: the same key; every path its own key
    paths = [DEV_CA, PUBLIC, REGISTRATION, ACME_ACCOUNT, acme_certificate_path(1), acme_certificate_path(2)]
    pubs = [_pub(keys.p256(p)) for p in paths]
    assert len(set(pubs)) == len(paths)
    assert _pub(keys.p256(DEV_CA)) == pubs[0]
    # another app's key: other keys
    other = GatewayKeys(lambda path: derive_get_key(bytes(range(2, 34)), path).secret)
    assert _pub(other.p256(DEV_CA)) != pubs[0]
    # only the gateway's paths; never pickled
    for bad in ("", "teecloud-gateway/v1/other", "teecloud-gateway/v1/acme-certificate/x", DEV_CA + "\n"):
        with pytest.raises(GatewayUsageError):
            keys.p256(bad)
    with pytest.raises(GatewayUsageError):
        acme_certificate_path(0)
    with pytest.raises(TypeError):
        pickle.dumps(keys)


def test_dev_ca_reuses_only_its_own_valid_certificate() -> None:
    keys = GatewayKeys(lambda path: derive_get_key(b"\x07" * 32, path).secret)
    now = int(time.time())
    first = DevCa(now=now, key=keys.p256(DEV_CA))
    again = DevCa(now=now + 3600, key=keys.p256(DEV_CA), cert_pem=first.cert_pem)
    assert again.cert_pem == first.cert_pem
    # within 30 days of its end: a new certificate for the same key
    expiring = DevCa(
        now=int(first.cert.not_valid_after_utc.timestamp()) - 3600,
        key=keys.p256(DEV_CA),
        cert_pem=first.cert_pem,
    )
    assert expiring.cert_pem != first.cert_pem and _spki(expiring.cert_pem) == _spki(first.cert_pem)
    # another key's CA certificate, a non-CA certificate, garbage: not reused
    stranger = DevCa(now=now)
    for stored in (stranger.cert_pem, first.issue_wildcard(BASE, now=now).cert_pem, "junk", ""):
        ca = DevCa(now=now, key=keys.p256(DEV_CA), cert_pem=stored)
        assert ca.cert_pem != stored and _spki(ca.cert_pem) == _spki(first.cert_pem)


# ---------------------------------------------------------------------------------------- a gateway


def _no_private_keys_at_rest(home: Path, run_dir: Path) -> list[str]:
    """Files outside HAProxy's run directory (its child's copy of the wildcard) holding a private key."""
    return [
        str(p.relative_to(home))
        for p in home.rglob("*")
        if p.is_file() and run_dir not in p.parents and b"PRIVATE KEY" in p.read_bytes()
    ]


@pytest.mark.slow
def test_restart_keeps_the_ca_and_keys(
    teecloud_home: Path, chain: ChainClient, verifier: PeerVerifier
) -> None:
    seen = []
    for _restart in range(2):
        keys, tee, kms_root = _boot_keys(
            teecloud_home, chain
        )  # a new boot: a new instance, the same app keys
        with make_gateway(teecloud_home, chain, name="kms-keys", tee=tee, keys=keys) as gw:
            public = presented_cert("127.0.0.1", gw.public_port, server_name=f"x.{BASE}")
            registration = presented_cert("127.0.0.1", gw.registration_port)
            document = fetch_document(gw.registration_url + CERT_KEYS_PATH)
            seen.append((gw.ca_file.read_text(), _spki(public), _spki(registration)))
            # the wildcard validates to the CA in ca.pem
            ctx = ssl.create_default_context(cadata=gw.ca_file.read_text())
            with socket.create_connection(("127.0.0.1", gw.public_port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=f"x.{BASE}"):
                    pass
            assert _spki(public) == _pub(keys.p256(PUBLIC))
            assert _spki(registration) == _pub(keys.p256(REGISTRATION))
            assert _spki(gw.ca.cert_pem) == _pub(keys.p256(DEV_CA))
            assert _no_private_keys_at_rest(gw.home, gw.driver.run_dir) == []
            # the quotes bind each key with its stated origin
            origins = {k.role: k.key_origin for k in parse_document(document)}
            assert origins == {"public": f"kms:{PUBLIC}", "registration": f"kms:{REGISTRATION}"} | {
                "dev-ca": f"kms:{DEV_CA}"
            }
            verdict = check_cert_key(public, document, verifier)
            assert verdict.key_origin == f"kms:{PUBLIC}"
            # and the KMS signature chain over each key leads to the KMS root, for the gateway app
            assert keys.signer is not None
            app_id = keys.signer.app_id
            for der in (public, registration):
                signed = check_cert_key_signature(
                    der, document, kms_root_public_key=kms_root, expected_app_id=app_id, expected_domain=BASE
                )
                assert signed.app_id == app_id.hex() and signed.domain == BASE
            # ... and through the CLI, which trusts only the KMS root given to it
            args = ["gateway", "check-keys", f"127.0.0.1:{gw.registration_port}", "--keys"]
            args += [gw.registration_url + CERT_KEYS_PATH, "--kms-root-key", kms_root.hex(), "--json"]
            ok = CliRunner().invoke(cli_app, [*args, "--app-id", app_id.hex(), "--domain", BASE])
            assert ok.exit_code == 0, ok.output
            assert json.loads(ok.stdout.strip().splitlines()[-1])["role"] == "registration"
            other = CliRunner().invoke(cli_app, [*args, "--app-id", "22" * 20])
            assert other.exit_code == 1 and '"step": "app"' in other.stdout
            wrong_root = CliRunner().invoke(
                cli_app, [*args[:-3], "--kms-root-key", "02" + "11" * 32, "--json"]
            )
            assert wrong_root.exit_code == 1 and '"step": "chain"' in wrong_root.stdout
    (ca1, pub1, reg1), (ca2, pub2, reg2) = seen
    assert ca1 == ca2 and pub1 == pub2 and reg1 == reg2  # the same CA certificate, the same keys


@pytest.mark.slow
def test_a_gateway_without_kms_keys_makes_new_ones(teecloud_home: Path, chain: ChainClient) -> None:
    cas = []
    for _restart in range(2):
        with make_gateway(teecloud_home, chain, name="process-keys") as gw:
            cas.append(gw.ca.cert_pem)
    assert cas[0] != cas[1] and _spki(cas[0]) != _spki(cas[1])


def test_relabelled_origin_fails_the_binding(tee: SimulatedTdx, verifier: PeerVerifier) -> None:
    from teecloud.gateway.certkeys import CertKeyPublisher

    ca = DevCa(now=int(time.time()))
    pem = ca.issue_wildcard(BASE, now=int(time.time())).cert_pem
    pub = CertKeyPublisher(tee)
    pub.publish("public", pem, origin="process")
    doc = json.loads(pub.document())
    assert doc["keys"][0]["key_origin"] == "process"
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    assert check_cert_key(der, pub.document(), verifier).key_origin == "process"
    # the attacker's step: claim the key came from the KMS, keeping the quote
    doc["keys"][0]["key_origin"] = f"kms:{PUBLIC}"
    with pytest.raises(CertKeyRefused) as err:
        check_cert_key(der, json.dumps(doc).encode(), verifier)
    assert err.value.step == "binding"
    # dropping the origin (the earlier document form) does not match the quote either
    del doc["keys"][0]["key_origin"]
    with pytest.raises(CertKeyRefused) as err:
        check_cert_key(der, json.dumps(doc).encode(), verifier)
    assert err.value.step == "binding"
    # an earlier document (no origin, the origin-less binding) still verifies, with no origin stated
    digest = hashlib.sha256(_spki(pem)).digest()
    doc["keys"][0]["quote"] = tee.quote(cert_key_report_data(digest)).hex()
    assert check_cert_key(der, json.dumps(doc).encode(), verifier).key_origin == ""
    # not an origin: refused at parse
    for bad in ("kms:../../etc", "kms:teecloud-gateway/v1/other", "KMS", 7, "x" * 200):
        doc["keys"][0]["key_origin"] = bad
        with pytest.raises(CertKeyRefused) as err:
            parse_document(json.dumps(doc).encode())
        assert err.value.step == "published"
    with pytest.raises(GatewayUsageError):
        pub.publish("public", pem, origin="kms:nowhere")


# ---------------------------------------------------------------------------------------- ACME


@pytest.mark.slow
def test_acme_keys_are_derived_and_not_stored(tmp_path: Path, pebble: Pebble, dns: LocalChallengeDns) -> None:
    keys = GatewayKeys(lambda path: derive_get_key(b"\x09" * 32, path).secret)

    def acme() -> AcmeCertificates:
        return AcmeCertificates(
            tmp_path,
            directory_url=pebble.directory_url,
            base_domain="gw.teecloud.test",
            dns=dns,
            ca_bundle=pebble.ca_bundle,
            timeout_s=30,
            keys=keys,
        )

    first = acme()
    cert, changed = first.ensure()
    assert changed and cert.generation == 1
    assert _spki(cert.issued.cert_pem) == _pub(keys.p256(acme_certificate_path(1)))
    assert first.key_origin(cert) == f"kms:{acme_certificate_path(1)}"
    # nothing private at rest: no account key file, the store holds the generation and the chain only
    assert not (tmp_path / "acme" / "account.pem").exists()
    assert _no_private_keys_at_rest(tmp_path, tmp_path / "run") == []
    stored = (tmp_path / "acme" / "certificate.pem").read_bytes()
    assert stored.startswith(b"teecloud-key-generation: 1\n")
    # a restart: the same certificate with the key derived again, the same account (the same key)
    again = acme()
    assert again.current() == cert
    renew_at = cert.not_after - min(30 * 24 * 3600, (cert.not_after - cert.not_before) // 3) + 1
    renewed, changed = again.ensure(now=renew_at)
    assert changed and renewed.generation == 2
    assert _spki(renewed.issued.cert_pem) == _pub(keys.p256(acme_certificate_path(2)))
    assert again.account_uri == first.account_uri
    # another app's keys cannot use the stored record: it is ignored (a new issuance would follow)
    other = GatewayKeys(lambda path: derive_get_key(b"\x0a" * 32, path).secret)
    stranger = AcmeCertificates(
        tmp_path,
        directory_url=pebble.directory_url,
        base_domain="gw.teecloud.test",
        dns=dns,
        ca_bundle=pebble.ca_bundle,
        keys=other,
    )
    assert stranger.current() is None
