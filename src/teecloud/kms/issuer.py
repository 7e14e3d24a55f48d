"""Key issuing: what an authorized caller gets, through the root-key holder (teecloud.kms.rootkeys).

Every method that releases a key or signs for an app takes an `AuthorizedApp` / `AuthorizedKms`
(teecloud.kms.authz), which only the Authorizer makes: issuing cannot be reached without authorization.
The public env-encryption key needs none (it is public by design).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys.certs import cert_to_pem
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import OID_APP_ID
from teecloud.kms import api
from teecloud.kms.authz import AuthorizedApp, AuthorizedKms
from teecloud.kms.errors import AccessDenied
from teecloud.kms.rootkeys import RootKeyHolder, WholeRootExporter

__all__ = ["KeyIssuer"]

MAX_CSR_ALT_NAMES = 32


class KeyIssuer:
    def __init__(
        self,
        holder: RootKeyHolder,
        *,
        gateway_app_id: str = "",
        signed_cert_lifetime_s: int = 30 * 24 * 3600,
        app_key_cache_s: int = 600,
        app_key_cache_entries: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.holder = holder
        self.gateway_app_id = gateway_app_id
        self.signed_cert_lifetime_s = signed_cert_lifetime_s
        self.clock = clock
        self._ttl = app_key_cache_s
        self._max = app_key_cache_entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[bytes, bytes, bytes, str], tuple[int, api.AppKeyResponse]] = (
            OrderedDict()
        )

    def app_keys(self, app: AuthorizedApp) -> api.AppKeyResponse:
        """Derived keys for this boot, from the cache when derived less than app_key_cache_s ago (derivation
        is a pure function of the immutable root; the cache key is everything derivation reads)."""
        if not isinstance(app, AuthorizedApp):
            raise TypeError("app keys only for an AuthorizedApp")
        bi = app.boot_info
        now = int(self.clock())
        key = (bi.app_id, bi.instance_id, bi.os_image_hash, self.gateway_app_id)
        if self._ttl > 0:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None and hit[0] <= now < hit[0] + self._ttl:
                return hit[1]
        keys = self.holder.derive_app_keys(
            bi.app_id,
            bi.instance_id,
            now=now,
            gateway_app_id=self.gateway_app_id,
            os_image_hash=bi.os_image_hash,
        )
        resp = api.AppKeyResponse(
            app_id=bi.app_id.hex(),
            instance_id=bi.instance_id.hex(),
            ca_key=keys.ca_key_pem,
            ca_cert=keys.ca_cert_pem,
            disk_crypt_key=keys.disk_crypt_key.hex(),
            env_crypt_key=keys.env_crypt_key.hex(),
            k256_key=keys.k256_key.hex(),
            k256_signature=keys.k256_signature.hex(),
            kms_k256_pubkey=keys.kms_k256_pubkey.hex(),
            gateway_app_id=keys.gateway_app_id,
            os_image_hash=keys.os_image_hash.hex(),
        )
        if self._ttl > 0:
            with self._lock:
                self._cache[key] = (now, resp)
                self._cache.move_to_end(key)
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return resp

    def sign_cert(self, app: AuthorizedApp, csr_pem: str) -> tuple[str, api.SignCertResponse]:
        """A certificate for the CSR's key under the app's CA, naming the measured app in its app_id
        extension. Returns (the issued CN, the answer). A bad CSR is AccessDenied at step `csr`."""
        if not isinstance(app, AuthorizedApp):
            raise TypeError("certificates only for an AuthorizedApp")
        bi = app.boot_info
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise AccessDenied(f"the CSR does not parse: {exc}", step="csr") from exc
        if not csr.is_signature_valid:
            raise AccessDenied("the CSR's self-signature does not verify", step="csr")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise AccessDenied("only EC (P-256/P-384) keys are certified", step="csr")
        cns = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = str(cns[0].value)[:64] if cns else f"app {bi.app_id.hex()}"
        alt: list[str] = []
        with contextlib.suppress(x509.ExtensionNotFound):
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            alt = [str(n) for n in san.get_values_for_type(x509.DNSName)][:MAX_CSR_ALT_NAMES]
        now = int(self.clock())
        try:
            leaf, ca_cert_pem = self.holder.sign_under_app_ca(
                bi.app_id,
                bi.instance_id,
                pub,
                now=now,
                subject_cn=cn,
                not_before=now - 60,
                not_after=now + self.signed_cert_lifetime_s,
                alt_names=alt,
                extra_extensions=[x509.UnrecognizedExtension(OID_APP_ID, b"\x04\x14" + bi.app_id)],
            )
        except KeysError as exc:
            raise AccessDenied(f"cannot certify this CSR: {exc}", step="csr") from exc
        return cn, api.SignCertResponse(
            certificate_chain=[cert_to_pem(leaf), ca_cert_pem, self.holder.root_ca_cert_pem]
        )

    def kms_keys(self, kms: AuthorizedKms) -> api.KmsKeyResponse:
        """Onboarding: the root, for a KMS that KmsAuth accepts."""
        if not isinstance(kms, AuthorizedKms):
            raise TypeError("root keys only for an AuthorizedKms")
        if not isinstance(self.holder, WholeRootExporter):
            raise AccessDenied(
                "this KMS holds no whole root to hand over (threshold mode: a node joins by resharing)",
                step="mode",
            )
        out = self.holder.export_whole_root()
        return api.KmsKeyResponse(
            ca_key=out.ca_key_pem,
            ca_cert=out.ca_cert_pem,
            k256_key=out.k256_key.hex(),
            temp_ca_key=out.temp_ca_key_pem,
            temp_ca_cert=out.temp_ca_cert_pem,
        )

    def env_encrypt_pubkey(self, app_id: bytes) -> api.EnvEncryptPubKeyResponse:
        """Public: the app's X25519 env-encryption key, signed by the KMS root k256 key (dstack format)."""
        answer = self.holder.env_encrypt_pubkey(app_id, now=int(self.clock()))
        return api.EnvEncryptPubKeyResponse(
            public_key=answer.public_key.hex(),
            signature=answer.signature.hex(),
            timestamp=answer.timestamp,
            signature_v1=answer.signature_v1.hex(),
        )
