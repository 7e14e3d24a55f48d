"""The root-key seam: everything the KMS does with its root keys goes through a `RootKeyHolder`, whose
methods are operations on the root, never the root itself:

    ca_public_key_der, k256_public_key, root_ca_cert_pem   public
    derive_app_keys(app_id, instance_id, ...)    an app instance's keys (disk, env, k256 + signature, app CA):
                                                 app keys, derived, never root keys
    sign_under_app_ca(app_id, instance_id, pk)   a leaf certificate under the app's CA (SignCert)
    env_encrypt_pubkey(app_id, now)              the app's X25519 env key, signed (dstack's two signatures)
    issue_server_identity(tee, key, ...)         the KMS's own RA-TLS server certificate, under the root CA

No method of `RootKeyHolder` returns a root private key. The whole-root handover of single-KMS onboarding
(`GetKmsKey`) is a separate, narrower capability, `WholeRootExporter`, that only `LocalRootKeys` has: a
threshold deployment has no whole root to hand over (a node joins by resharing, docs/kms.md).

`LocalRootKeys` holds the whole key in this process (single-KMS mode). The threshold derivation (t of n KMS
nodes, teecloud.keys.threshold) is reached through `teecloud.kms.threshold`, not through this holder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from eth_utils.crypto import keccak

from teecloud.keys.appkeys import AppKeys, derive_app_keys, env_encrypt_pubkey, sign_env_encrypt_pubkey
from teecloud.keys.certs import issue_cert, key_to_pem
from teecloud.keys.kdf import derive_p256_key
from teecloud.keys.ratls import QuoteSource, make_ratls_cert
from teecloud.keys.sigchain import sign_k256_recoverable
from teecloud.kms.bootstrap import KmsState

__all__ = ["EnvKeyAnswer", "LocalRootKeys", "OnboardingExport", "RootKeyHolder", "WholeRootExporter"]


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

    def sign_under_app_ca(
        self,
        app_id: bytes,
        instance_id: bytes,
        public_key: ec.EllipticCurvePublicKey,
        *,
        now: int,
        subject_cn: str,
        not_before: int,
        not_after: int,
        alt_names: Sequence[str] = (),
        extra_extensions: Sequence[x509.UnrecognizedExtension] = (),
    ) -> tuple[x509.Certificate, str]:
        """(the leaf certificate, the app CA certificate PEM); the leaf serves both TLS roles."""
        ...

    def env_encrypt_pubkey(self, app_id: bytes, *, now: int) -> EnvKeyAnswer: ...

    def issue_server_identity(
        self,
        tee: QuoteSource,
        key: ec.EllipticCurvePrivateKey,
        *,
        subject: str,
        usage: str,
        not_before: int,
        not_after: int,
        alt_names: Sequence[str] = (),
    ) -> x509.Certificate:
        """An RA-TLS certificate for `key` (a quote from `tee` binds it), issued by the root CA."""
        ...


@runtime_checkable
class WholeRootExporter(Protocol):
    """Single-KMS onboarding only (GetKmsKey): the whole root, for a KMS that KmsAuth accepts."""

    def export_whole_root(self) -> OnboardingExport: ...


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

    def sign_under_app_ca(
        self,
        app_id: bytes,
        instance_id: bytes,
        public_key: ec.EllipticCurvePublicKey,
        *,
        now: int,
        subject_cn: str,
        not_before: int,
        not_after: int,
        alt_names: Sequence[str] = (),
        extra_extensions: Sequence[x509.UnrecognizedExtension] = (),
    ) -> tuple[x509.Certificate, str]:
        ca_key = derive_p256_key(self._state.root.ca_key, [app_id, b"app-ca"])
        ca_cert_pem = derive_app_keys(self._state.root, app_id, instance_id, now=now).ca_cert_pem
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())  # a broken derivation fails here
        leaf = issue_cert(
            public_key,
            issuer_key=ca_key,
            issuer_name=ca_cert.subject,
            subject_cn=subject_cn,
            not_before=not_before,
            not_after=not_after,
            alt_names=alt_names,
            server_auth=True,
            client_auth=True,
            extra_extensions=extra_extensions,
        )
        return leaf, ca_cert_pem

    def env_encrypt_pubkey(self, app_id: bytes, *, now: int) -> EnvKeyAnswer:
        root = self._state.root
        pub = env_encrypt_pubkey(root, app_id)
        legacy = sign_k256_recoverable(root.k256_key, keccak(b"dstack-env-encrypt-pubkey:" + app_id + pub))
        return EnvKeyAnswer(pub, legacy, sign_env_encrypt_pubkey(root, app_id, pub, now), now)

    def issue_server_identity(
        self,
        tee: QuoteSource,
        key: ec.EllipticCurvePrivateKey,
        *,
        subject: str,
        usage: str,
        not_before: int,
        not_after: int,
        alt_names: Sequence[str] = (),
    ) -> x509.Certificate:
        return make_ratls_cert(
            tee,
            key,
            issuer_key=self._state.root.ca_key,
            issuer_cert=self._state.root_ca_cert,
            subject=subject,
            usage=usage,
            not_before=not_before,
            not_after=not_after,
            alt_names=alt_names,
            server_auth=True,
            client_auth=True,
        )

    def export_whole_root(self) -> OnboardingExport:
        s = self._state
        return OnboardingExport(
            ca_key_pem=key_to_pem(s.root.ca_key),
            ca_cert_pem=s.root_ca_cert_pem,
            k256_key=s.root.k256_key,
            temp_ca_key_pem=s.temp_ca_key_pem,
            temp_ca_cert_pem=s.temp_ca_cert_pem,
        )
