"""The hostile review's quote-oracle attack (issue 10, F1), step by step against a local cloud with
examples/hello deployed, from outside the CVM: every public way to get a quote over chosen bytes, turned into
an RA-TLS client certificate for the attacker's key, gets no keys from the KMS — denied with a reason,
nothing released, audited. Also: the KMS admin token is written under `teecloud up` (F8)."""

from __future__ import annotations

import hashlib
import ssl
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation.eventlog import parse_event_log
from teecloud.attestation.models import EventLogEntry
from teecloud.keys.certs import spki_der
from teecloud.keys.ratls import make_ratls_cert, ratls_report_data
from teecloud.kms.api import PATH_GET_APP_KEY, PATH_GET_TEMP_CA_CERT, PATH_SIGN_CERT
from teecloud.kms.audit import AuditLog
from tests.e2e.conftest import HELLO, wait_serving

pytestmark = [pytest.mark.docker, pytest.mark.slow]

KEY_FIELDS = ("ca_key", "disk_crypt_key", "env_crypt_key", "k256_key", "certificate_chain")


class CapturedQuote:
    """A QuoteSource that answers with a quote and event log captured from a public endpoint."""

    def __init__(self, quote: bytes, event_log: str) -> None:
        self._quote = quote
        self._log = list(parse_event_log(event_log))

    def quote(self, report_data: bytes) -> bytes:
        return self._quote

    def event_log(self) -> list[EventLogEntry]:
        return self._log


def _attacker_cert(kms_url: str, key: ec.EllipticCurvePrivateKey, source: CapturedQuote) -> bytes:
    # (3) a certificate for K under KMS.GetTempCaCert's CA (public by design), carrying the captured quote
    temp = httpx.get(kms_url + PATH_GET_TEMP_CA_CERT, verify=False, timeout=10).json()
    ca_cert = x509.load_pem_x509_certificate(temp["temp_ca_cert"].encode())
    ca_key = serialization.load_pem_private_key(temp["temp_ca_key"].encode(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = int(time.time()) - 30
    cert = make_ratls_cert(
        source,
        key,
        issuer_key=ca_key,
        issuer_cert=ca_cert,
        subject="teecloud app",
        usage="app:kms-client",
        not_before=now,
        not_after=now + 600,
        server_auth=False,
        client_auth=True,
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _mtls_post(url: str, key: ec.EllipticCurvePrivateKey, der: bytes, body: dict[str, Any]) -> httpx.Response:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "client.pem"
        pem.write_bytes(
            x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx.load_cert_chain(str(pem))
    with httpx.Client(verify=ctx, timeout=30) as http:
        return http.post(url, json=body)


def _assert_denied_and_audited(cloud: Any, r: httpx.Response, der: bytes, path: str) -> dict[str, Any]:
    body = r.json()
    assert r.status_code == 403, body
    assert body.get("error") == "denied" and body.get("reason"), body
    for field in KEY_FIELDS:
        assert field not in body
    cert_hash = hashlib.sha256(der).hexdigest()
    recs = [x for x in AuditLog(cloud.home / "kms" / "audit.jsonl").read() if x.cert_sha256 == cert_hash]
    assert recs and all(x.decision == "denied" for x in recs), recs
    assert recs[-1].endpoint == path and recs[-1].reason == body["reason"]
    return dict(body)


@pytest.fixture(scope="module")
def hello(session: Any) -> Any:
    from teecloud.cloud.deploy import deploy

    r = deploy(session, HELLO / "docker-compose.yml", name="oracle-target")
    assert r.status == "running", r.error
    wait_serving(r.urls[0] + "/")
    return r


def _csr(key: ec.EllipticCurvePrivateKey) -> str:
    from cryptography.hazmat.primitives import hashes

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "oracle-target")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_node_api_attestation_route_is_no_key_oracle(cloud: Any, hello: Any) -> None:
    kms_url = cloud.endpoints.kms
    # (1) K, (2) the node API's public attestation route over sha512("ratls-cert:" ‖ SPKI(K)), no token
    key = ec.generate_private_key(ec.SECP256R1())
    binding = ratls_report_data(spki_der(key.public_key()))
    att = httpx.get(
        f"{cloud.endpoints.node}/cvms/oracle-target/attestation", params={"report_data": binding.hex()}
    ).json()
    # the route never quotes the caller's bytes as they are (it quotes sha512("teecloud-attest:" ‖ nonce))
    assert bytes.fromhex(att["report_data"])[:64] != binding
    der = _attacker_cert(kms_url, key, CapturedQuote(bytes.fromhex(att["quote"]), att["event_log"]))
    # (4) GetAppKey and SignCert over mutual TLS
    r = _mtls_post(kms_url + PATH_GET_APP_KEY, key, der, {"vm_config": att["vm_config"]})
    _assert_denied_and_audited(cloud, r, der, PATH_GET_APP_KEY)
    r = _mtls_post(kms_url + PATH_SIGN_CERT, key, der, {"csr": _csr(key), "vm_config": att["vm_config"]})
    _assert_denied_and_audited(cloud, r, der, PATH_SIGN_CERT)


def test_the_apps_own_quote_route_is_no_key_oracle(cloud: Any, hello: Any) -> None:
    """The app's /quote?nonce= is raw GetQuote (as dstack-sdk requires): its quote binds K exactly, and is
    refused because the CVM is past its boot measurement."""
    kms_url = cloud.endpoints.kms
    key = ec.generate_private_key(ec.SECP256R1())
    binding = ratls_report_data(spki_der(key.public_key()))
    q = httpx.get(hello.urls[0] + "/quote", params={"nonce": binding.hex()}, timeout=10).json()
    der = _attacker_cert(kms_url, key, CapturedQuote(bytes.fromhex(q["quote"]), q["event_log"]))
    att = httpx.get(f"{cloud.endpoints.node}/cvms/oracle-target/attestation").json()
    r = _mtls_post(kms_url + PATH_GET_APP_KEY, key, der, {"vm_config": att["vm_config"]})
    body = _assert_denied_and_audited(cloud, r, der, PATH_GET_APP_KEY)
    assert body["step"] == "boot_time", body
    r = _mtls_post(kms_url + PATH_SIGN_CERT, key, der, {"csr": _csr(key), "vm_config": att["vm_config"]})
    assert _assert_denied_and_audited(cloud, r, der, PATH_SIGN_CERT)["step"] == "boot_time"


def test_kms_admin_token_is_written_and_works(cloud: Any) -> None:
    path = cloud.home / "kms" / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 32
    admin = cloud.endpoints.kms_admin
    assert httpx.get(admin + "/status", timeout=10).status_code == 401
    ok = httpx.get(admin + "/status", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert ok.status_code == 200, ok.text


def _raw_cert(kms_url: str, key: ec.EllipticCurvePrivateKey, quote: bytes, log_text: str) -> bytes:
    """A certificate for K under the temporary CA with the quote and the event log text exactly as the
    attacker wrote it (any bytes can go into the extension)."""
    from teecloud.keys.certs import issue_cert
    from teecloud.keys.ratls import OID_CERT_USAGE, OID_EVENT_LOG, OID_QUOTE, _ext

    temp = httpx.get(kms_url + PATH_GET_TEMP_CA_CERT, verify=False, timeout=10).json()
    ca_cert = x509.load_pem_x509_certificate(temp["temp_ca_cert"].encode())
    ca_key = serialization.load_pem_private_key(temp["temp_ca_key"].encode(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = int(time.time()) - 30
    cert = issue_cert(
        key.public_key(),
        issuer_key=ca_key,
        issuer_name=ca_cert.subject,
        subject_cn="teecloud app",
        not_before=now,
        not_after=now + 600,
        server_auth=False,
        client_auth=True,
        extra_extensions=[
            _ext(OID_QUOTE, quote),
            _ext(OID_EVENT_LOG, log_text.encode()),
            _ext(OID_CERT_USAGE, b"app:kms-client"),
        ],
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_f9_relabelled_events_get_no_keys_before_or_after_a_restart(
    cloud: Any, session: Any, hello: Any
) -> None:
    """Issue 16, F9, step by step: (1) K and the app's public /quote over K's binding; (2) every RTMR3 entry
    after boot-mr-done relabelled with another event_type, digests kept (RTMR3 still replays); (3) a
    certificate for K under GetTempCaCert's CA, GetAppKey and SignCert: denied, nothing released, audited;
    (4) `stop; start` of the app, and the saved quote and key replayed: denied again."""
    import json

    kms_url = cloud.endpoints.kms
    key = ec.generate_private_key(ec.SECP256R1())
    binding = ratls_report_data(spki_der(key.public_key()))
    q = httpx.get(hello.urls[0] + "/quote", params={"nonce": binding.hex()}, timeout=10).json()
    entries = json.loads(q["event_log"])
    rtmr3 = [i for i, e in enumerate(entries) if e["imr"] == 3]
    done = next(i for i in rtmr3 if entries[i]["event"] == "boot-mr-done")
    relabelled = 0
    for i in rtmr3:
        if i > done and entries[i]["event"] != "os-image-hash":
            entries[i]["event_type"] = 0x80000001
            relabelled += 1
    assert relabelled >= 3  # key-provider, storage-fs, system-ready at least
    der = _raw_cert(kms_url, key, bytes.fromhex(q["quote"]), json.dumps(entries))
    att = httpx.get(f"{cloud.endpoints.node}/cvms/oracle-target/attestation").json()
    r = _mtls_post(kms_url + PATH_GET_APP_KEY, key, der, {"vm_config": att["vm_config"]})
    body = _assert_denied_and_audited(cloud, r, der, PATH_GET_APP_KEY)
    assert body["step"] == "event_log_verified" and "RTMR3 holds only runtime events" in body["reason"], body
    r = _mtls_post(kms_url + PATH_SIGN_CERT, key, der, {"csr": _csr(key), "vm_config": att["vm_config"]})
    _assert_denied_and_audited(cloud, r, der, PATH_SIGN_CERT)

    # (4) the app restarts (a new boot, a new boot-nonce); the saved evidence is replayed unmodified too
    assert session.node.action(hello.instance_id, "stop").status == "stopped"
    session.node.wait(session.node.action(hello.instance_id, "start").instance_id)
    for text in (json.dumps(entries), q["event_log"]):
        der = _raw_cert(kms_url, key, bytes.fromhex(q["quote"]), text)
        r = _mtls_post(kms_url + PATH_GET_APP_KEY, key, der, {"vm_config": att["vm_config"]})
        _assert_denied_and_audited(cloud, r, der, PATH_GET_APP_KEY)
