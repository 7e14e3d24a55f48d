"""KMS root keys and the per-app keys derived from them (reference/dstack.md §5).

    app CA key       derive_p256_key(root CA, [app_id, "app-ca"])               (kdf.derive_p256_key)
    disk key         derive_dh_secret(root CA, [app_id, instance_id, "app-disk-crypt-key"])
    env key          derive_dh_secret(root CA, [app_id, "env-encrypt-key"])     X25519 static secret
    app k256 key     HKDF(root k256, [app_id, "app-key"])
    k256_signature   root k256 over keccak256("dstack-kms-issued:" ‖ app_id ‖ compressed app k256 pubkey)
    env pubkey sig   root k256 over keccak256("dstack-env-encrypt-pubkey:" ‖ app_id ‖ u64_be(ts) ‖ pubkey)
                     (dstack's signature_v1, accepted by dstack_sdk.verify_env_encrypt_public_key)

Key material is deterministic in (root, app_id, instance_id); only the app CA certificate's validity
depends on `now`. Pure: no I/O, no clock (`RootKeys.generate` uses the OS random generator only).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_utils.crypto import keccak

from teecloud.keys.certs import cert_to_pem, key_to_pem, make_app_ca_cert, spki_der
from teecloud.keys.errors import KeyUsageError, MalformedKeyMaterial
from teecloud.keys.kdf import derive_dh_secret, derive_key, derive_p256_key
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest, sign_k256_recoverable

__all__ = [
    "AppKeys",
    "RootKeys",
    "derive_app_keys",
    "env_encrypt_pubkey",
    "env_encrypt_pubkey_digest",
    "sign_env_encrypt_pubkey",
]

_K256_PEM_LABEL = "TEECLOUD K256 PRIVATE KEY"
_K256_PEM_RE = re.compile(
    rf"-----BEGIN {_K256_PEM_LABEL}-----\s*([0-9a-fA-F]{{64}})\s*-----END {_K256_PEM_LABEL}-----"
)


@dataclass(frozen=True)
class RootKeys:
    """A KMS's root keys: P-256 CA key (issues app CAs) and secp256k1 key (signs app keys)."""

    ca_key: ec.EllipticCurvePrivateKey
    k256_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.ca_key, ec.EllipticCurvePrivateKey) or not isinstance(
            self.ca_key.curve, ec.SECP256R1
        ):
            raise KeyUsageError("RootKeys.ca_key must be a P-256 private key")
        k256_public_key(self.k256_key)  # validates length and range

    @classmethod
    def generate(cls) -> RootKeys:
        while True:
            k256 = os.urandom(32)
            try:
                k256_public_key(k256)
            except KeyUsageError:  # ~2^-128: out of range, draw again
                continue
            return cls(ec.generate_private_key(ec.SECP256R1()), k256)

    @property
    def ca_public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo DER of the root CA key (dstack's key_provider_info "id" is its hex)."""
        return spki_der(self.ca_key.public_key())

    @property
    def k256_public_key(self) -> bytes:
        return k256_public_key(self.k256_key)

    def to_pem(self) -> bytes:
        """Both keys as PEM text: PKCS#8 for the CA key, then a hex block for the k256 secret."""
        ca = self.ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        k = f"-----BEGIN {_K256_PEM_LABEL}-----\n{self.k256_key.hex()}\n-----END {_K256_PEM_LABEL}-----\n"
        return ca + k.encode()

    @classmethod
    def from_pem(cls, data: bytes) -> RootKeys:
        text = bytes(data).decode("ascii", "replace")
        m = _K256_PEM_RE.search(text)
        if m is None:
            raise MalformedKeyMaterial(f"no {_K256_PEM_LABEL} block in root key file")
        ca_block = text[: m.start()].strip().encode()
        try:
            ca = serialization.load_pem_private_key(ca_block, password=None)
        except (ValueError, TypeError) as exc:
            raise MalformedKeyMaterial(f"root CA key is not a PKCS#8 PEM key: {exc}") from exc
        if not isinstance(ca, ec.EllipticCurvePrivateKey):
            raise MalformedKeyMaterial("root CA key is not an EC key")
        try:
            return cls(ca, bytes.fromhex(m.group(1)))
        except KeyUsageError as exc:
            raise MalformedKeyMaterial(str(exc)) from exc


@dataclass(frozen=True)
class AppKeys:
    """What a key provider hands a CVM (dstack's GetAppKey response, plus the KMS k256 public key)."""

    ca_key_pem: str
    ca_cert_pem: str
    disk_crypt_key: bytes
    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes
    kms_k256_pubkey: bytes
    key_provider_info: dict[str, Any] = field(default_factory=dict)
    gateway_app_id: str = ""
    os_image_hash: bytes = b""

    @property
    def k256_public_key(self) -> bytes:
        return k256_public_key(self.k256_key)

    def ca_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.ca_key_pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise MalformedKeyMaterial("app CA key is not an EC key")
        return key


def _check_app_id(app_id: bytes) -> None:
    if not isinstance(app_id, bytes | bytearray) or not 1 <= len(app_id) <= 64:
        raise KeyUsageError("app_id must be 1..64 bytes (20 for an on-chain app id)")


def derive_app_keys(
    root: RootKeys,
    app_id: bytes,
    instance_id: bytes,
    *,
    now: int,
    key_provider_info: dict[str, Any] | None = None,
    gateway_app_id: str = "",
    os_image_hash: bytes = b"",
) -> AppKeys:
    """Derive every key of one app instance from the root keys (see the module docstring)."""
    _check_app_id(app_id)
    app_id = bytes(app_id)
    instance_id = bytes(instance_id)
    app_ca = derive_p256_key(root.ca_key, [app_id, b"app-ca"])
    ca_cert = make_app_ca_cert(app_ca, app_id, root_ca_key=root.ca_key, now=now)
    disk = derive_dh_secret(root.ca_key, [app_id, instance_id, b"app-disk-crypt-key"])
    env = derive_dh_secret(root.ca_key, [app_id, b"env-encrypt-key"])
    app_k256 = derive_key(root.k256_key, [app_id, b"app-key"])
    app_k256_pub = k256_public_key(app_k256)
    signature = sign_k256_recoverable(root.k256_key, kms_issued_digest(app_id, app_k256_pub))
    info = (
        key_provider_info
        if key_provider_info is not None
        else {
            "name": "kms",
            "id": root.ca_public_key_der.hex(),
        }
    )
    return AppKeys(
        ca_key_pem=key_to_pem(app_ca),
        ca_cert_pem=cert_to_pem(ca_cert),
        disk_crypt_key=disk,
        env_crypt_key=env,
        k256_key=app_k256,
        k256_signature=signature,
        kms_k256_pubkey=root.k256_public_key,
        key_provider_info=dict(info),
        gateway_app_id=gateway_app_id,
        os_image_hash=bytes(os_image_hash),
    )


def env_encrypt_pubkey(root: RootKeys, app_id: bytes) -> bytes:
    """The app's X25519 env-encryption public key (32 bytes); its secret is AppKeys.env_crypt_key."""
    _check_app_id(app_id)
    secret = derive_dh_secret(root.ca_key, [bytes(app_id), b"env-encrypt-key"])
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def env_encrypt_pubkey_digest(app_id: bytes, pubkey: bytes, timestamp: int) -> bytes:
    """keccak256("dstack-env-encrypt-pubkey:" ‖ app_id ‖ u64_be(timestamp) ‖ pubkey)."""
    if not 0 <= timestamp < 1 << 64:
        raise KeyUsageError("timestamp must fit in an unsigned 64-bit integer")
    return keccak(
        b"dstack-env-encrypt-pubkey:" + bytes(app_id) + timestamp.to_bytes(8, "big") + bytes(pubkey)
    )


def sign_env_encrypt_pubkey(root: RootKeys, app_id: bytes, pubkey: bytes, timestamp: int) -> bytes:
    """dstack's signature_v1 (65 bytes, recoverable) over env_encrypt_pubkey_digest."""
    _check_app_id(app_id)
    if len(pubkey) != 32:
        raise KeyUsageError(f"an X25519 public key is 32 bytes, got {len(pubkey)}")
    return sign_k256_recoverable(root.k256_key, env_encrypt_pubkey_digest(app_id, pubkey, timestamp))
