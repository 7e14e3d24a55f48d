"""The local gateway CA: it issues the base domain's wildcard certificate. Only the CA certificate is written
out (`<data dir>/gateway/ca.pem`) so that `curl --cacert` and browsers can trust it.

Its key is either given (derived from the keys the KMS released to the gateway app, teecloud.gateway.kmskeys:
the same CA after a restart, whose certificate `ca.pem` is then reused while it is valid) or born in the
gateway process (a new CA per process). Either way it never leaves the process (nothing to steal at rest).

The wildcard's key is handed to the gateway's own HAProxy child (a 0600 file in the gateway's run
directory, which HAProxy needs to read at start and at a reload).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem

__all__ = ["DevCa", "IssuedCert"]


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: str
    key_pem: str
    not_after: int

    def haproxy_pem(self, chain_pem: str) -> str:
        """Leaf, chain, key: the file HAProxy's `crt` loads."""
        return self.cert_pem + chain_pem + self.key_pem


# a stored CA certificate with less than this left is re-issued (same key): clients keep trusting the key
_CA_RENEW_BEFORE_S = 30 * 24 * 3600


class DevCa:
    def __init__(
        self,
        *,
        now: int,
        validity_s: int = 365 * 24 * 3600,
        key: ec.EllipticCurvePrivateKey | None = None,
        cert_pem: str | None = None,
    ) -> None:
        """`key`: the CA key (None: a fresh one). `cert_pem`: a stored CA certificate, reused when it is this
        key's own self-signed CA certificate valid for at least 30 more days (otherwise a new one)."""
        self._key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        reused = _reusable(cert_pem, self._key, now) if cert_pem is not None and key is not None else None
        self.cert = reused or issue_cert(
            self._key.public_key(),
            issuer_key=self._key,
            issuer_name=None,
            subject_cn="teecloud gateway dev CA",
            not_before=now - 60,
            not_after=now + validity_s,
            ca=True,
        )
        self.cert_pem = cert_to_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def issue_wildcard(
        self,
        base_domain: str,
        *,
        now: int,
        validity_s: int = 90 * 24 * 3600,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> IssuedCert:
        """`*.<base>` and `<base>`, server auth, with `key` (None: a fresh P-256 key)."""
        return self.issue_server(
            f"*.{base_domain}", (f"*.{base_domain}", base_domain), now=now, validity_s=validity_s, key=key
        )

    def issue_server(
        self,
        cn: str,
        names: tuple[str, ...],
        *,
        now: int,
        validity_s: int = 90 * 24 * 3600,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> IssuedCert:
        """A server certificate for `names` (DNS names or IP literals) with `key` (None: a fresh one)."""
        if key is None:
            key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_cert(
            key.public_key(),
            issuer_key=self._key,
            issuer_name=self.cert.subject,
            subject_cn=cn,
            not_before=now - 60,
            not_after=now + validity_s,
            alt_names=names,
            server_auth=True,
        )
        return IssuedCert(cert_to_pem(cert), key_to_pem(key), now + validity_s)

    def __reduce__(self) -> str:  # never pickled, copied or sent anywhere with its key
        raise TypeError("the gateway CA key does not leave the gateway process")


def _reusable(cert_pem: str, key: ec.EllipticCurvePrivateKey, now: int) -> x509.Certificate | None:
    """The stored CA certificate if it is `key`'s own self-signed CA certificate, valid now and for at least
    _CA_RENEW_BEFORE_S more; None otherwise (a new one is issued)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode()[:16384])
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, pub) != key.public_key().public_bytes(
            serialization.Encoding.DER, pub
        ):
            return None
        cert.verify_directly_issued_by(cert)
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return None
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return None
    valid_from = int(cert.not_valid_before_utc.timestamp())
    valid_to = int(cert.not_valid_after_utc.timestamp())
    return cert if valid_from <= now and now + _CA_RENEW_BEFORE_S < valid_to else None


def load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())
