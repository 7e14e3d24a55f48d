"""The local gateway CA: its key is born in the gateway process and never leaves it; it issues the base
domain's wildcard certificate. Only the CA certificate is written out (`<data dir>/gateway/ca.pem`) so that
`curl --cacert` and browsers can trust it. A new gateway process makes a new CA (nothing to steal at rest).

The wildcard's key is handed to the gateway's own HAProxy child (a 0600 file in the gateway's run
directory, which HAProxy needs to read at start and at a reload).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
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


class DevCa:
    def __init__(self, *, now: int, validity_s: int = 365 * 24 * 3600) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.cert = issue_cert(
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

    def issue_wildcard(self, base_domain: str, *, now: int, validity_s: int = 90 * 24 * 3600) -> IssuedCert:
        """`*.<base>` and `<base>`, server auth, a fresh P-256 key."""
        return self.issue_server(
            f"*.{base_domain}", (f"*.{base_domain}", base_domain), now=now, validity_s=validity_s
        )

    def issue_server(
        self, cn: str, names: tuple[str, ...], *, now: int, validity_s: int = 90 * 24 * 3600
    ) -> IssuedCert:
        """A server certificate for `names` (DNS names or IP literals) with a fresh P-256 key."""
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


def load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())
