"""The gateway's TLS keys, derived from the keys the KMS released to the gateway app at boot.

The KMS releases an app's keys only to boot-time evidence of an app KmsAuth allows (teecloud.kms), so only
the gateway app's measured code, booted as the KMS accepted, can hold these keys; and the same app keys
come back at every boot, so a restarted gateway has the same CA and certificate keys (nothing secret is kept
on disk: the data directory holds only certificates).

Derivation, per key path (GetKey-style, distinct paths per key):

    seed(path) = GetKey(path) = HKDF-SHA256(salt "RATLS", IKM = the app's k256 key, info = path)
                 (dstack's GetKey; teecloud.keys.sigchain.derive_get_key; a gateway inside a CVM asks its
                 guest agent's GetKey for the same bytes)
    key(path)  = P-256 d = (HKDF-SHA256(salt "RATLS", IKM = seed(path), info = "p256", 48 bytes)
                            mod (n-1)) + 1
                 (FIPS 186-5 A.2.1 "extra random bits", the construction of teecloud.keys.kdf.derive_p256_key)

    teecloud-gateway/v1/dev-ca                         the dev CA key
    teecloud-gateway/v1/public                         the dev CA's wildcard (public port) key
    teecloud-gateway/v1/registration                   the registration listener's key
    teecloud-gateway/v1/acme-account                   the ACME account key (ES256)
    teecloud-gateway/v1/acme-certificate/<generation>  the ACME certificate key of that issuance

The certificate-key signing key (`CertKeySigner`) is GetKey's secp256k1 key itself (no P-256 step), with the
signature chain dstack's GetKey returns for it, so that anyone holding the KMS's k256 root (or threshold
group) public key can check what it signs (teecloud.gateway.certkeys, "signature chain"):

    teecloud-gateway/v1/cert-key-signing               purpose "teecloud:gateway-cert-key-signing"
        signature_chain = [app k256 key over keccak256("<purpose>:<hex(signing public key)>"),
                           KMS root over keccak256("dstack-kms-issued:" || app_id || app public key)]
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.gateway.errors import GatewayUsageError
from teecloud.keys.appkeys import AppKeys
from teecloud.keys.kdf import P256_ORDER, derive_key
from teecloud.keys.sigchain import build_key_signature_chain, derive_get_key, sign_k256_recoverable

__all__ = [
    "ACME_ACCOUNT",
    "CERT_KEY_SIGNING",
    "CERT_KEY_SIGNING_PURPOSE",
    "DEV_CA",
    "KEY_PATH_PREFIX",
    "PUBLIC",
    "REGISTRATION",
    "CertKeySigner",
    "GatewayKeys",
    "acme_certificate_path",
    "is_key_origin",
    "key_origin",
]

KEY_PATH_PREFIX = "teecloud-gateway/v1/"
DEV_CA = KEY_PATH_PREFIX + "dev-ca"
PUBLIC = KEY_PATH_PREFIX + "public"
REGISTRATION = KEY_PATH_PREFIX + "registration"
ACME_ACCOUNT = KEY_PATH_PREFIX + "acme-account"
CERT_KEY_SIGNING = KEY_PATH_PREFIX + "cert-key-signing"  # GetKey's k256 key, not a P-256 path (below)
CERT_KEY_SIGNING_PURPOSE = "teecloud:gateway-cert-key-signing"
_ACME_CERTIFICATE = KEY_PATH_PREFIX + "acme-certificate/"
MAX_GENERATION = 1 << 32
_PATH = re.compile(
    r"teecloud-gateway/v1/(dev-ca|public|registration|acme-account|acme-certificate/[0-9]{1,10})"
)


def acme_certificate_path(generation: int) -> str:
    if not 1 <= generation < MAX_GENERATION:
        raise GatewayUsageError(f"an ACME certificate generation is 1..{MAX_GENERATION - 1}")
    return f"{_ACME_CERTIFICATE}{generation}"


def key_origin(path: str | None) -> str:
    """What the cert-keys document says of a key: `kms:<path>` (derived here) or `process` (born in the
    gateway process, gone with it)."""
    return f"kms:{path}" if path is not None else "process"


def is_key_origin(value: str) -> bool:
    return value == "process" or (value.startswith("kms:") and _PATH.fullmatch(value[4:]) is not None)


class CertKeySigner:
    """Signs statements about certificate keys with the GetKey k256 key at CERT_KEY_SIGNING, and hands out the
    GetKey signature chain of that key (what dstack's GetKey returns: app key, then KMS root)."""

    def __init__(self, app_id: bytes, secret: bytes, public_key: bytes, signature_chain: list[bytes]) -> None:
        if len(app_id) != 20 or len(signature_chain) != 2:
            raise GatewayUsageError("a signer needs a 20-byte app_id and a 2-signature GetKey chain")
        self.app_id = app_id
        self._secret = secret
        self.public_key = public_key
        self.signature_chain = list(signature_chain)

    @classmethod
    def from_app_keys(cls, keys: AppKeys, app_id: bytes) -> CertKeySigner:
        """From the app keys the KMS released (the app key and the KMS's k256_signature over it), as the guest
        agent's GetKey(CERT_KEY_SIGNING, CERT_KEY_SIGNING_PURPOSE) would answer."""
        derived = derive_get_key(keys.k256_key, CERT_KEY_SIGNING)
        chain = build_key_signature_chain(
            keys.k256_key, keys.k256_signature, CERT_KEY_SIGNING_PURPOSE, derived.public_key
        )
        return cls(app_id, derived.secret, derived.public_key, chain)

    def sign(self, digest: bytes) -> bytes:
        """65-byte recoverable secp256k1 signature over a 32-byte digest."""
        return sign_k256_recoverable(self._secret, digest)

    def __reduce__(self) -> str:
        raise TypeError("the gateway's keys do not leave the gateway process")


class GatewayKeys:
    """P-256 keys per path from GetKey seeds. `get_key(path) -> 32 bytes` is the app's GetKey. `signer`:
    the certificate-key signing key with its KMS chain (None: no chain published)."""

    def __init__(self, get_key: Callable[[str], bytes], *, signer: CertKeySigner | None = None) -> None:
        self._get_key = get_key
        self.signer = signer

    @classmethod
    def from_app_keys(cls, keys: AppKeys, *, app_id: bytes | None = None) -> GatewayKeys:
        """From the app keys the KMS returned at the gateway's boot (AgentState.keys); with the gateway's
        `app_id` also the certificate-key signer (its chain names that app)."""
        k256 = keys.k256_key
        signer = CertKeySigner.from_app_keys(keys, app_id) if app_id is not None else None
        return cls(lambda path: derive_get_key(k256, path).secret, signer=signer)

    def p256(self, path: str) -> ec.EllipticCurvePrivateKey:
        if _PATH.fullmatch(path) is None:
            raise GatewayUsageError(f"not a gateway key path: {path[:80]!r}")
        seed = self._get_key(path)
        if len(seed) != 32:
            raise GatewayUsageError("GetKey returned a seed that is not 32 bytes")
        okm = derive_key(seed, [b"p256"], 48)
        return ec.derive_private_key(int.from_bytes(okm, "big") % (P256_ORDER - 1) + 1, ec.SECP256R1())

    def __reduce__(self) -> str:  # never pickled, copied or sent anywhere
        raise TypeError("the gateway's keys do not leave the gateway process")
