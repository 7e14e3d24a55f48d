"""Key issuing: what an authorized caller gets, through the root-key holder (teecloud.kms.rootkeys).

Every method that releases a key or signs for an app takes an `AuthorizedApp` / `AuthorizedKms`
(teecloud.kms.authz), which only the Authorizer makes: issuing cannot be reached without authorization.
The public env-encryption key needs none (it is public by design).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from teecloud.keys.certs import cert_to_pem
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import OID_APP_ID
from teecloud.kms import api
from teecloud.kms.authz import AuthorizedApp, AuthorizedKms
from teecloud.kms.errors import AccessDenied
from teecloud.kms.rootkeys import RootKeyHolder, WholeRootExporter

__all__ = ["KeyIssuer", "check_app_cert_domain", "csr_names"]

MAX_CSR_ALT_NAMES = 32
MAX_CSR_PEM_BYTES = 16 * 1024

# The names SignCert certifies for an attested app (dstack's gateway names): the app's id as one label,
# lowercase hex, either alone or as `<app_id>[-<port>][s|g].<domain>` under a base domain the KMS is
# configured with. Nothing else: no other label, no wildcard, no IP address, no other domain. Not the
# instance id either: the chain authorizes an app id, while an instance id is whatever the booting CVM
# measured (in the Docker runtime the node chooses it), so it could be spelled like another app's id.
_NAME = re.compile(r"(?P<id>[0-9a-f]{40})(?:-(?P<port>[1-9][0-9]{0,4}))?(?P<suffix>[sg])?")
_EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")  # PKCS#9 extensionRequest
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def check_app_cert_domain(domain: str) -> str:
    """A configured base domain: lowercase LDH labels (RFC 1035 §2.3.1), at most 200 characters. Raises
    ValueError (a configuration mistake)."""
    labels = domain.split(".")
    if not 0 < len(domain) <= 200 or not all(_DOMAIN_LABEL.fullmatch(x) for x in labels):
        raise ValueError(f"app certificate domain {domain!r} is not a lowercase DNS name (no wildcard)")
    return domain


def _name_reason(name: str, app: str, instance: str, domains: tuple[str, ...]) -> str | None:
    """None when `name` is one the KMS issues for app id `app` under these domains, else why not."""
    head, _, domain = name.partition(".")
    m = _NAME.fullmatch(head)
    if m is None:
        return f"{name!r} is not <app_id>[-<port>][s|g][.<domain>] (lowercase hex id)"
    if m["id"] == instance:
        return f"{name!r} names the instance id: only app-id names are certified (no chain authorizes it)"
    if m["id"] != app:
        return f"{name!r} names another app than the attested one"
    if not domain:
        if m["port"] or m["suffix"]:
            return f"{name!r}: a port or s/g suffix only with a domain"
        return None
    if m["port"] and not 1 <= int(m["port"]) <= 65535:
        return f"{name!r}: port out of range"
    if domain not in domains:
        return f"{name!r}: {domain!r} is not a domain this KMS issues app names under"
    return None


def csr_names(
    csr: x509.CertificateSigningRequest, *, app_id: bytes, instance_id: bytes, domains: tuple[str, ...]
) -> tuple[str, list[str]]:
    """The CSR's (CN, DNS SANs), when they are exactly names the KMS issues for this app (the allowlist
    above) and the CSR asks for nothing else. Raises AccessDenied(step="csr") naming what
    was refused. An empty subject gets the app id as its CN.

    (1) attributes: only the extension request (PKCS#9 §5.4.2 in RFC 2985); a challenge password or any
        other attribute is refused;
    (2) subject: nothing, or exactly one common name;
    (3) extensions: only subjectAltName, and in it only DNS names (no IP, URI, e-mail, directory name);
    (4) every name (CN and SANs) on the allowlist; at most MAX_CSR_ALT_NAMES SANs, no duplicates."""
    app, instance = app_id.hex(), (instance_id.hex() if any(instance_id) else "")
    # (1)
    for attr in csr.attributes:
        if attr.oid != _EXTENSION_REQUEST:
            raise AccessDenied(
                f"the CSR carries attribute {attr.oid.dotted_string}; only the extension request is accepted",
                step="csr",
            )
    # (2)
    attrs = list(csr.subject)
    if not attrs:
        cn = app_id.hex()
    elif len(attrs) == 1 and attrs[0].oid == NameOID.COMMON_NAME and isinstance(attrs[0].value, str):
        cn = attrs[0].value
    else:
        raise AccessDenied(
            f"the CSR's subject is {csr.subject.rfc4514_string()!r}: only one common name is accepted",
            step="csr",
        )
    # (3)
    sans: list[str] = []
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension) as exc:
        raise AccessDenied(f"the CSR's extensions do not parse: {exc}", step="csr") from exc
    for ext in extensions:
        if ext.oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            raise AccessDenied(
                f"the CSR asks for extension {ext.oid.dotted_string}; only subjectAltName is accepted "
                "(the KMS sets every other extension itself)",
                step="csr",
            )
        san = ext.value
        if not isinstance(san, x509.SubjectAlternativeName):  # the OID says it is one
            raise AccessDenied("the CSR's subjectAltName does not parse", step="csr")
        for general in san:
            if not isinstance(general, x509.DNSName):
                raise AccessDenied(
                    f"the CSR asks for a {type(general).__name__} ({general.value!r}); only DNS names are "
                    "certified",
                    step="csr",
                )
            sans.append(general.value)
    if len(sans) > MAX_CSR_ALT_NAMES or len(set(sans)) != len(sans):
        raise AccessDenied(f"at most {MAX_CSR_ALT_NAMES} distinct subject alternative names", step="csr")
    # (4)
    for name in (cn, *sans):
        reason = _name_reason(name, app, instance, domains)
        if reason is not None:
            raise AccessDenied(f"the CSR names {reason}", step="csr")
    return cn, sans


class KeyIssuer:
    def __init__(
        self,
        holder: RootKeyHolder,
        *,
        gateway_app_id: str = "",
        app_cert_domains: tuple[str, ...] = (),
        signed_cert_lifetime_s: int = 30 * 24 * 3600,
        app_key_cache_s: int = 600,
        app_key_cache_entries: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.holder = holder
        self.gateway_app_id = gateway_app_id
        self.app_cert_domains = tuple(check_app_cert_domain(d) for d in app_cert_domains)
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
        extension, for names on the allowlist of `csr_names` only. Returns (the issued CN, the answer). A
        bad CSR is AccessDenied at step `csr`."""
        if not isinstance(app, AuthorizedApp):
            raise TypeError("certificates only for an AuthorizedApp")
        bi = app.boot_info
        if len(csr_pem) > MAX_CSR_PEM_BYTES:
            raise AccessDenied(f"the CSR is above {MAX_CSR_PEM_BYTES} bytes", step="csr")
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise AccessDenied(f"the CSR does not parse: {exc}", step="csr") from exc
        if not csr.is_signature_valid:
            raise AccessDenied("the CSR's self-signature does not verify", step="csr")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise AccessDenied("only EC (P-256/P-384) keys are certified", step="csr")
        cn, alt = csr_names(csr, app_id=bi.app_id, instance_id=bi.instance_id, domains=self.app_cert_domains)
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
