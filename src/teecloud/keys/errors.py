"""Errors of the keys package.

    KeysError                            base; every error this package raises on purpose
    ├── KeyUsageError (ValueError)       the caller's mistake: wrong key length, unknown algorithm, bad option
    └── (hostile input: also a teecloud.attestation.errors.VerificationError, with `.reason` and `.step`)
        ├── MalformedKeyMaterial         cannot be parsed: bad PEM/DER, wrong lengths, truncated blobs
        │                                (also MalformedEvidence)
        ├── SignatureChainInvalid        a GetKey/Sign signature chain does not lead to the expected KMS
        │                                root (also SignatureInvalid)
        ├── EnvDecryptionFailed          an encrypted-env blob fails authentication or is not
        │                                {"env":[{"key","value"}]} (also VerificationError)
        ├── CertChainInvalid             an X.509 chain is broken, outside its validity, or not rooted at
        │                                the expected key (also CertificateChainInvalid)
        └── RaTlsCertInvalid             an RA-TLS certificate lacks its evidence, or its quote does not bind
                                         the certificate's key (also VerificationError)

Quote, collateral and event-log failures inside RA-TLS verification surface unchanged as the attestation
package's own VerificationError subclasses, so a caller catches `VerificationError` for every rejection.
"""

from __future__ import annotations

from teecloud.attestation.errors import (
    CertificateChainInvalid,
    MalformedEvidence,
    SignatureInvalid,
    VerificationError,
)
from teecloud.errors import Error

__all__ = [
    "CertChainInvalid",
    "EnvDecryptionFailed",
    "KeyUsageError",
    "KeysError",
    "MalformedKeyMaterial",
    "RaTlsCertInvalid",
    "SignatureChainInvalid",
]


class KeysError(Error):
    """Base class of every error this package raises on purpose."""

    def diagnostics(self) -> str:
        return f"{type(self).__name__}: {self}"


class KeyUsageError(KeysError, ValueError):
    """The caller made a mistake (not hostile input)."""


class MalformedKeyMaterial(KeysError, MalformedEvidence):
    """Untrusted key material, certificate or blob that cannot be parsed."""


class SignatureChainInvalid(KeysError, SignatureInvalid):
    default_step = "signature_chain_verified"


class EnvDecryptionFailed(KeysError, VerificationError):
    default_step = "env_decrypted"


class RaTlsCertInvalid(KeysError, VerificationError):
    default_step = "ratls_cert_verified"


class CertChainInvalid(KeysError, CertificateChainInvalid):
    """An X.509 chain (app CA, TLS leaf) is broken, expired at `now`, or ends at an unexpected key."""
