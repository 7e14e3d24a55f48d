"""SignCert certifies only the names the KMS issues for the attested app and instance (an allowlist):
`<app_id>` alone, or `<app_id>[-<port>][s|g].<domain>` under a configured base domain (never the instance id:
the chain authorizes app ids, not instance ids). Each attack
is a genuine booting app (boot-time evidence, allowed on chain) asking for more."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID

from teecloud.keys.ratls import OID_APP_ID
from teecloud.kms.client import vm_config_json
from teecloud.kms.errors import AccessDenied
from teecloud.kms.issuer import KeyIssuer, check_app_cert_domain, csr_names
from tests.kms.conftest import Kms
from tests.kms.test_attack_attempts import _genuine
from tests.kms.test_boot_rule import cert_with_log

DOMAIN = "app.localhost"
IID = bytes.fromhex("ab" * 20)


def _csr(
    cn: str | None,
    sans: list[x509.GeneralName] = (),  # type: ignore[assignment]
    *,
    extra: list[x509.ExtensionType] = (),  # type: ignore[assignment]
    subject: x509.Name | None = None,
    password: bool = False,
) -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    name = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else [])
    b = x509.CertificateSigningRequestBuilder().subject_name(name)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    for e in extra:
        b = b.add_extension(e, critical=False)
    if password:
        b = b.add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"secret")
    return b.sign(key, hashes.SHA256())


def _pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def booted(teecloud_home, world, kms: Kms):
    """A genuine booting app (`mine`), a victim app on the same chain, and SignCert bound to the first."""
    kms.service.issuer.app_cert_domains = (DOMAIN,)
    mine, victim = world.register(), world.register()

    def sign(csr: x509.CertificateSigningRequest | str) -> list[str]:
        # a fresh boot per request: a boot has 8 key requests (refused CSRs count, as for any request)
        tee, key, quote, log = _genuine(teecloud_home, mine, iid=IID)
        der = cert_with_log(kms, key, quote, json.dumps(log), mine)
        text = csr if isinstance(csr, str) else _pem(csr)
        return kms.service.sign_cert(der, text, vm_config=vm_config_json(tee)).certificate_chain

    def refused(csr: x509.CertificateSigningRequest | str) -> AccessDenied:
        with pytest.raises(AccessDenied) as err:
            sign(csr)
        assert err.value.step == "csr", (err.value.step, err.value.reason)
        return err.value

    return mine, victim, sign, refused


def test_own_names_are_issued_and_bound_to_the_caller(booted) -> None:
    mine, _, sign, _ = booted
    a = mine.hex()
    names = [a, f"{a}.{DOMAIN}", f"{a}-8080.{DOMAIN}", f"{a}-443s.{DOMAIN}", f"{a}g.{DOMAIN}"]
    chain = sign(_csr(a, [x509.DNSName(n) for n in names]))
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == a
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == names
    assert leaf.extensions.get_extension_for_oid(OID_APP_ID).value.value.endswith(mine)
    # an empty subject: the KMS names the certificate after the app
    empty = x509.load_pem_x509_certificate(sign(_csr(None))[0].encode())
    assert empty.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == a


def test_another_apps_id_is_refused(booted) -> None:
    """(1) boot genuinely as `mine`; (2) ask for the victim's gateway name as CN, then as a SAN beside one's
    own CN; (3) the victim's id with a port/suffix."""
    mine, victim, _, refused = booted
    v = victim.hex()
    assert "another app" in refused(_csr(f"{v}.{DOMAIN}")).reason
    assert "another app" in refused(_csr(mine.hex(), [x509.DNSName(f"{v}-443s.{DOMAIN}")])).reason
    assert "another app" in refused(_csr(v)).reason


def test_wildcards_ip_and_foreign_names_are_refused(booted) -> None:
    mine, _, _, refused = booted
    a = mine.hex()
    for bad in (f"*.{DOMAIN}", "*", f"*{a}.{DOMAIN}", "localhost", DOMAIN, f"{a}.evil.localhost"):
        refused(_csr(a, [x509.DNSName(bad)]))
    ip = refused(_csr(a, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    assert "IPAddress" in ip.reason
    refused(_csr(a, [x509.RFC822Name("x@example.com")]))
    refused(_csr(a, [x509.UniformResourceIdentifier(f"https://{a}.{DOMAIN}")]))
    # look-alikes: uppercase hex (a second spelling of the name), a sub- or super-domain, trailing dot
    for bad in (a.upper(), f"{a}.sub.{DOMAIN}", f"{a}.{DOMAIN}.evil.com", f"{a}.{DOMAIN}.", f"x{a}"):
        refused(_csr(bad))
    # a port or suffix without a domain, an impossible port, a leading zero
    for bad in (f"{a}-80", f"{a}s", f"{a}-0.{DOMAIN}", f"{a}-65536.{DOMAIN}", f"{a}-080.{DOMAIN}"):
        refused(_csr(bad))


def test_extra_extensions_attributes_and_subjects_are_refused(booted) -> None:
    """The KMS sets every extension itself: a CSR asking for CA rights, key usages, or an app_id extension
    naming the victim is refused, not silently dropped."""
    mine, victim, _, refused = booted
    a = mine.hex()
    extras: list[x509.ExtensionType] = [
        x509.BasicConstraints(ca=True, path_length=None),
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]),
        x509.UnrecognizedExtension(OID_APP_ID, b"\x04\x14" + victim),
        x509.NameConstraints(permitted_subtrees=[x509.DNSName(DOMAIN)], excluded_subtrees=None),
    ]
    for e in extras:
        assert "only subjectAltName" in refused(_csr(a, extra=[e])).reason
    assert "attribute" in refused(_csr(a, password=True)).reason
    two = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, a), x509.NameAttribute(NameOID.COMMON_NAME, a)])
    org = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Victim Inc"),
            x509.NameAttribute(NameOID.COMMON_NAME, a),
        ]
    )
    for subject in (two, org):
        assert "one common name" in refused(_csr(None, subject=subject)).reason


def test_malformed_and_oversized_csrs_are_refused(booted) -> None:
    _, _, _, refused = booted
    refused("not a csr")
    refused("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    refused("A" * 20000)
    dup = _pem(_csr(None, [x509.DNSName(f"{'ab' * 20}"), x509.DNSName(f"{'ab' * 20}")]))
    assert "distinct" in refused(dup).reason


def test_instance_names_are_refused(booted) -> None:
    """The measured instance id is the CVM's claim (in the Docker runtime the node picks it): a host that
    boots its own app with instance-id = a victim's app id must not get the victim's name certified."""
    mine, victim, _, refused = booted
    assert "instance id" in refused(_csr(IID.hex())).reason
    assert "instance id" in refused(_csr(mine.hex(), [x509.DNSName(f"{IID.hex()}-443s.{DOMAIN}")])).reason
    app = bytes(range(20))
    with pytest.raises(AccessDenied, match="another app"):
        csr_names(_csr("00" * 20), app_id=app, instance_id=bytes(20), domains=(DOMAIN,))
    with pytest.raises(AccessDenied, match="instance id"):
        csr_names(_csr(victim.hex()), app_id=app, instance_id=victim, domains=(DOMAIN,))


def test_configured_domains_are_checked() -> None:
    for bad in ("*.app.localhost", "App.localhost", "", "a..b", "-a.b", "a_b.c", "x" * 201):
        with pytest.raises(ValueError):
            check_app_cert_domain(bad)
    with pytest.raises(ValueError):
        KeyIssuer(object(), app_cert_domains=("*.x",))  # type: ignore[arg-type]


def test_generated_names_match_an_independent_oracle() -> None:
    """500 names generated from parts (own/other/uppercase ids, ports, suffixes, domains): accepted exactly
    when the oracle, written from the rule's text rather than its regex, says so."""
    app, inst, other = bytes([1] * 20), bytes([2] * 20), bytes([3] * 20)
    ids = [app.hex(), inst.hex(), other.hex(), app.hex().upper(), app.hex()[:-1], "*"]
    ports = ["", "-1", "-80", "-65535", "-0", "-65536", "-080", "-x", "-"]
    suffixes = ["", "s", "g", "S", "x"]
    domains = [
        "",
        "." + DOMAIN,
        ".other.localhost",
        "." + DOMAIN.upper(),
        "." + DOMAIN + ".",
        ".sub." + DOMAIN,
    ]
    rng = random.Random(18)

    def oracle(i: str, p: str, s: str, d: str) -> bool:
        if i != app.hex():
            return False
        if d == "":
            return p == "" and s == ""
        if d != "." + DOMAIN or s not in ("", "s", "g"):
            return False
        if p == "":
            return True
        digits = p[1:]
        return digits.isdigit() and not digits.startswith("0") and 1 <= int(digits) <= 65535

    for _ in range(500):
        parts = (rng.choice(ids), rng.choice(ports), rng.choice(suffixes), rng.choice(domains))
        name = "".join(parts)
        try:
            # as a SAN (a CN is at most 64 characters), beside a CN that is always allowed
            csr = _csr(app.hex(), [x509.DNSName(name)])
            csr_names(csr, app_id=app, instance_id=inst, domains=(DOMAIN,))
            accepted = True
        except AccessDenied:
            accepted = False
        assert accepted == oracle(*parts), name
