"""Certificate alt names: only DNS names (RFC 1035, optional leading wildcard) or IP addresses are certified;
a NUL byte or space never reaches a certificate, whoever asks (the agent's GetTlsKey, the KMS's SignCert)."""

from __future__ import annotations

import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys.certs import issue_cert
from teecloud.keys.errors import KeysError


def _issue(names: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    return issue_cert(
        key.public_key(),
        issuer_key=key,
        issuer_name=None,
        subject_cn="t",
        not_before=now,
        not_after=now + 60,
        alt_names=names,
    )


def test_dns_names_wildcards_and_ips_are_certified() -> None:
    cert = _issue(["app.example.com", "*.apps.example.com", "127.0.0.1", "::1", "a-b.c"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "*.apps.example.com" in san.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize(
    "bad", ["evil.com\x00.good.com", "a b", "-a.com", "a..b", "*", "a.*.b", "x" * 64 + ".com", "é.com"]
)
def test_anything_else_is_refused(bad: str) -> None:
    with pytest.raises(KeysError):
        _issue([bad])
