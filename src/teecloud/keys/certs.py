"""X.509 certificates of the key hierarchy: KMS root CA -> app CA -> per-call TLS leaves (RFC 5280).

All ECDSA signatures here use RFC 6979 deterministic nonces, so a certificate is a pure function of its
inputs (key, names, validity): the app CA certificate is reproducible from the root key, app id and `now`.
Pure functions: time comes in as `now` (unix seconds).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from teecloud.keys.errors import CertChainInvalid, KeyUsageError, MalformedKeyMaterial

__all__ = [
    "APP_CA_VALIDITY_S",
    "ROOT_CA_CN",
    "cert_from_pem_or_der",
    "cert_to_pem",
    "issue_cert",
    "key_to_pem",
    "make_app_ca_cert",
    "make_root_ca_cert",
    "parse_pem_chain",
    "spki_der",
    "verify_cert_chain",
]

ROOT_CA_CN = "teecloud KMS Root CA"
APP_CA_VALIDITY_S = 10 * 365 * 24 * 3600
MAX_CERT_BYTES = 1 << 20  # RA-TLS certificates carry a quote and event log; 1 MiB is far above real ones


def _utc(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _name(cn: str, org: str = "teecloud") -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def spki_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _serial(*parts: bytes) -> int:
    # Deterministic, positive, < 2^159 (RFC 5280 §4.1.2.2: at most 20 octets).
    return int.from_bytes(hashlib.sha256(b"".join(parts)).digest()[:19], "big") | 1


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """Unencrypted PKCS#8 PEM text (what GetTlsKey returns and what sealed files hold inside their AEAD)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def issue_cert(
    public_key: ec.EllipticCurvePublicKey,
    *,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_name: x509.Name | None,
    subject_cn: str,
    not_before: int,
    not_after: int,
    alt_names: Sequence[str] = (),
    ca: bool = False,
    server_auth: bool = False,
    client_auth: bool = False,
    extra_extensions: Sequence[x509.UnrecognizedExtension] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """Build and sign one certificate. `issuer_name=None` makes it self-signed."""
    if not_after <= not_before:
        raise KeyUsageError(f"not_after ({not_after}) must be after not_before ({not_before})")
    subject = _name(subject_cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name if issuer_name is not None else subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        usages = [
            u
            for u, on in (
                (ExtendedKeyUsageOID.SERVER_AUTH, server_auth),
                (ExtendedKeyUsageOID.CLIENT_AUTH, client_auth),
            )
            if on
        ]
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in alt_names]), critical=False
        )
    for ext in extra_extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=True)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or len(name) > 253:
        raise KeyUsageError(f"invalid alt name {name[:80]!r}")
    try:
        name.encode("ascii")
    except UnicodeEncodeError as exc:
        raise KeyUsageError(f"alt name {name[:80]!r} must be ASCII (use the IDNA A-label form)") from exc
    # RFC 1035 host names (letters, digits, hyphens; labels of 1-63), optionally one leading "*." (RFC 6125):
    # no NUL, space or other byte a certificate consumer might cut a name at.
    if not _DNS_NAME.fullmatch(name):
        raise KeyUsageError(f"alt name {name[:80]!r} is not a DNS name (RFC 1035) or an IP address")
    return x509.DNSName(name)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")


def make_root_ca_cert(
    ca_key: ec.EllipticCurvePrivateKey, *, now: int, validity_s: int = APP_CA_VALIDITY_S
) -> x509.Certificate:
    """The self-signed KMS root CA certificate (the key provider publishes it; verifiers pin its key)."""
    return issue_cert(
        ca_key.public_key(),
        issuer_key=ca_key,
        issuer_name=None,
        subject_cn=ROOT_CA_CN,
        not_before=now,
        not_after=now + validity_s,
        ca=True,
        serial=_serial(b"root", spki_der(ca_key.public_key())),
    )


def make_app_ca_cert(
    app_ca_key: ec.EllipticCurvePrivateKey,
    app_id: bytes,
    *,
    root_ca_key: ec.EllipticCurvePrivateKey,
    now: int,
    validity_s: int = APP_CA_VALIDITY_S,
) -> x509.Certificate:
    """The app CA certificate, signed by the KMS root CA key."""
    return issue_cert(
        app_ca_key.public_key(),
        issuer_key=root_ca_key,
        issuer_name=_name(ROOT_CA_CN),
        subject_cn=f"teecloud App CA {app_id.hex()}",
        not_before=now,
        not_after=now + validity_s,
        ca=True,
        serial=_serial(b"app-ca", app_id, spki_der(app_ca_key.public_key()), now.to_bytes(8, "big")),
    )


def cert_from_pem_or_der(data: bytes | str | x509.Certificate) -> x509.Certificate:
    """Parse one untrusted certificate (PEM or DER), size-limited; MalformedKeyMaterial on failure."""
    if isinstance(data, x509.Certificate):
        return data
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_CERT_BYTES:
        raise MalformedKeyMaterial(f"certificate is {len(raw)} bytes, above the {MAX_CERT_BYTES}-byte limit")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise MalformedKeyMaterial(f"not an X.509 certificate: {exc}") from exc


def parse_pem_chain(pems: Sequence[str | bytes]) -> list[x509.Certificate]:
    return [cert_from_pem_or_der(p) for p in pems]


def verify_cert_chain(
    chain: Sequence[x509.Certificate],
    *,
    trusted_public_key: ec.EllipticCurvePublicKey,
    now: int,
) -> None:
    """Check a leaf-first chain: (1) each certificate is valid at `now`; (2) each is signed by the next,
    whose name matches its issuer and which is a CA; (3) the last one is signed by `trusted_public_key`
    (which may also be the last certificate's own key, for a chain that includes its root).
    Raises CertChainInvalid with the failing step."""
    if not chain:
        raise CertChainInvalid("empty certificate chain")
    when = _utc(now)
    for i, cert in enumerate(chain):
        # (1)
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise CertChainInvalid(
                f"certificate {i} ({cert.subject.rfc4514_string()}) is not valid at {when.isoformat()} "
                f"(valid {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()})"
            )
        # (2)
        if i + 1 < len(chain):
            issuer = chain[i + 1]
            if not _is_ca(issuer):
                raise CertChainInvalid(f"certificate {i + 1} ({issuer.subject.rfc4514_string()}) is not a CA")
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise CertChainInvalid(
                    f"certificate {i} is not issued by certificate {i + 1}: {exc}"
                ) from exc
    # (3)
    last = chain[-1]
    try:
        sig_hash = last.signature_hash_algorithm
        if sig_hash is None:
            raise CertChainInvalid("the last certificate has no signature hash algorithm")
        trusted_public_key.verify(last.signature, last.tbs_certificate_bytes, ec.ECDSA(sig_hash))
    except InvalidSignature as exc:
        raise CertChainInvalid("the chain does not end at the trusted key") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
