"""The root-key seam: everything the KMS does with its root keys goes through a `RootKeyHolder`.

    derive_app_keys(app_id, instance_id, ...)   an app instance's keys (disk, env, k256 + signature, app CA)
    app_ca(app_id, now)                         the app's CA key and certificate (for SignCert)
    env_encrypt_pubkey(app_id, now)             the app's X25519 env key, signed (dstack's two signatures)
    export_for_onboarding()                     the whole root, for an authorized KMS joining (GetKmsKey)

`LocalRootKeys` holds the whole key in this process (today). A threshold holder (t-of-n across attested KMS
nodes, the next step) implements the same methods without any one node holding the root: handlers never see
`RootKeys` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from eth_utils.crypto import keccak

from teecloud.keys.appkeys import AppKeys, derive_app_keys, env_encrypt_pubkey, sign_env_encrypt_pubkey
from teecloud.keys.certs import key_to_pem
from teecloud.keys.kdf import derive_p256_key
from teecloud.keys.sigchain import sign_k256_recoverable
from teecloud.kms.bootstrap import KmsState

__all__ = ["EnvKeyAnswer", "LocalRootKeys", "OnboardingExport", "RootKeyHolder"]


@dataclass(frozen=True)
class EnvKeyAnswer:
    public_key: bytes
    signature: bytes  # dstack's legacy signature: keccak256("dstack-env-encrypt-pubkey:" ‖ app_id ‖ pk)
    signature_v1: bytes  # with the timestamp (teecloud.keys.appkeys.sign_env_encrypt_pubkey)
    timestamp: int


@dataclass(frozen=True)
class OnboardingExport:
    ca_key_pem: str
    ca_cert_pem: str
    k256_key: bytes
    temp_ca_key_pem: str
    temp_ca_cert_pem: str


class RootKeyHolder(Protocol):
    @property
    def ca_public_key_der(self) -> bytes: ...

    @property
    def k256_public_key(self) -> bytes: ...

    @property
    def root_ca_cert_pem(self) -> str: ...

    def derive_app_keys(
        self,
        app_id: bytes,
        instance_id: bytes,
        *,
        now: int,
        gateway_app_id: str = "",
        os_image_hash: bytes = b"",
    ) -> AppKeys: ...

    def app_ca(
        self, app_id: bytes, instance_id: bytes, *, now: int
    ) -> tuple[ec.EllipticCurvePrivateKey, str]: ...

    def env_encrypt_pubkey(self, app_id: bytes, *, now: int) -> EnvKeyAnswer: ...

    def export_for_onboarding(self) -> OnboardingExport: ...


class LocalRootKeys:
    """The whole root key in this process (single-KMS mode)."""

    def __init__(self, state: KmsState) -> None:
        self._state = state

    @property
    def ca_public_key_der(self) -> bytes:
        return self._state.root.ca_public_key_der

    @property
    def k256_public_key(self) -> bytes:
        return self._state.root.k256_public_key

    @property
    def root_ca_cert_pem(self) -> str:
        return self._state.root_ca_cert_pem

    def derive_app_keys(
        self,
        app_id: bytes,
        instance_id: bytes,
        *,
        now: int,
        gateway_app_id: str = "",
        os_image_hash: bytes = b"",
    ) -> AppKeys:
        return derive_app_keys(
            self._state.root,
            app_id,
            instance_id,
            now=now,
            gateway_app_id=gateway_app_id,
            os_image_hash=os_image_hash,
        )

    def app_ca(
        self, app_id: bytes, instance_id: bytes, *, now: int
    ) -> tuple[ec.EllipticCurvePrivateKey, str]:
        key = derive_p256_key(self._state.root.ca_key, [app_id, b"app-ca"])
        cert_pem = derive_app_keys(self._state.root, app_id, instance_id, now=now).ca_cert_pem
        x509.load_pem_x509_certificate(cert_pem.encode())  # a broken derivation fails here, not at a client
        return key, cert_pem

    def env_encrypt_pubkey(self, app_id: bytes, *, now: int) -> EnvKeyAnswer:
        root = self._state.root
        pub = env_encrypt_pubkey(root, app_id)
        legacy = sign_k256_recoverable(root.k256_key, keccak(b"dstack-env-encrypt-pubkey:" + app_id + pub))
        return EnvKeyAnswer(pub, legacy, sign_env_encrypt_pubkey(root, app_id, pub, now), now)

    def export_for_onboarding(self) -> OnboardingExport:
        s = self._state
        return OnboardingExport(
            ca_key_pem=key_to_pem(s.root.ca_key),
            ca_cert_pem=s.root_ca_cert_pem,
            k256_key=s.root.k256_key,
            temp_ca_key_pem=s.temp_ca_key_pem,
            temp_ca_cert_pem=s.temp_ca_cert_pem,
        )
