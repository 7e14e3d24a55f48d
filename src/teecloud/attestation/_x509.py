"""Certificate-chain checks shared by the SEV-SNP, Nitro and NVIDIA verifiers (private).

Why hand-written: `cryptography.x509.verification` only builds TLS server/client paths (it requires
SAN/EKU profiles, positive serials and rejects RSA-PSS roots), which AMD's VCEK chain, the Nitro cabundle
and NVIDIA's device chain do not follow. What we need is small: a name-chained path from the leaf to a
caller-supplied trust anchor, each link's signature (`Certificate.verify_directly_issued_by`), CA basic
constraints on issuers, an allowed signature-algorithm set, and validity at a given time.

Trust anchors are bytes (PEM or DER). A root in the evidence is trusted only when its subject and public key
equal those of an anchor; anything else is `UntrustedRoot` naming the root that was found.
"""

from __future__ import annotations

import datetime as dt
import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from teecloud.attestation._cache import BoundedCache, named_cache
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    Expired,
    MalformedEvidence,
    UntrustedRoot,
    UsageError,
)

__all__ = [
    "ECDSA_SHA384",
    "MAX_CERT_BYTES",
    "MAX_CHAIN_BYTES",
    "MAX_CHAIN_DEPTH",
    "RSA_PSS",
    "build_and_verify_chain",
    "check_validity",
    "common_name",
    "describe",
    "load_anchors",
    "load_certificate",
    "load_certificates",
    "pick_leaf",
]

MAX_CERT_BYTES = 16 * 1024
MAX_CHAIN_BYTES = 64 * 1024
MAX_CHAIN_DEPTH = 8

CHAIN_STEP = "cert_chain_verified"

ECDSA_SHA384 = frozenset({SignatureAlgorithmOID.ECDSA_WITH_SHA384})
RSA_PSS = frozenset({SignatureAlgorithmOID.RSASSA_PSS})

_PEM_MARKER = b"-----BEGIN CERTIFICATE-----"


def _quiet_load(loader: Callable[[bytes], x509.Certificate], data: bytes) -> x509.Certificate:
    # Real AMD VCEKs carry serial number 0, which RFC 5280 forbids; cryptography warns (and will one day
    # refuse). We accept them: the serial plays no part in these checks.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*serial number.*")
        return loader(data)


# cryptography parses names, extensions and keys lazily, on first access, and raises whatever the inner
# decoder raises (ValueError, KeyError, InvalidVersion, DuplicateExtension, ...: no common base class). Every
# part the checks read is touched once at load time, and anything that parser raises on hostile bytes is
# mapped here, at the boundary, to MalformedEvidence.
_LAZY_PARSE_ERRORS = (Exception,)


def _materialize(cert: x509.Certificate) -> None:
    with warnings.catch_warnings():
        # e.g. "Attribute's length must be ...": a malformed name is judged by the checks, not printed
        warnings.simplefilter("ignore")
        _touch(cert)


def _touch(cert: x509.Certificate) -> None:
    describe(cert.subject)
    describe(cert.issuer)
    _ = cert.not_valid_before_utc, cert.not_valid_after_utc
    _ = cert.signature_algorithm_oid, cert.signature_hash_algorithm, cert.signature_algorithm_parameters
    _ = list(cert.extensions)
    _spki(cert)


def load_certificate(data: bytes, *, what: str) -> x509.Certificate:
    """One certificate, DER or PEM; hostile bytes raise MalformedEvidence naming `what`."""
    if len(data) > MAX_CERT_BYTES:
        raise MalformedEvidence(f"{what}: certificate is {len(data)} bytes, limit is {MAX_CERT_BYTES}")
    try:
        if data.lstrip().startswith(_PEM_MARKER):
            cert = _quiet_load(x509.load_pem_x509_certificate, data)
        else:
            cert = _quiet_load(x509.load_der_x509_certificate, data)
        _materialize(cert)
    except _LAZY_PARSE_ERRORS as exc:
        raise MalformedEvidence(f"{what}: not a valid X.509 certificate ({exc})", step=CHAIN_STEP) from exc
    return cert


def load_certificates(data: bytes, *, what: str) -> list[x509.Certificate]:
    """A PEM bundle (one or more certificates) or a single DER certificate."""
    if len(data) > MAX_CHAIN_BYTES:
        raise MalformedEvidence(f"{what}: {len(data)} bytes, limit is {MAX_CHAIN_BYTES}", step=CHAIN_STEP)
    if _PEM_MARKER not in data:
        return [load_certificate(data, what=what)]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*serial number.*")
            certs = x509.load_pem_x509_certificates(data)
        for cert in certs:
            _materialize(cert)
    except _LAZY_PARSE_ERRORS as exc:
        raise MalformedEvidence(
            f"{what}: not a valid PEM certificate bundle ({exc})", step=CHAIN_STEP
        ) from exc
    if len(certs) > MAX_CHAIN_DEPTH:
        raise MalformedEvidence(
            f"{what}: {len(certs)} certificates, limit is {MAX_CHAIN_DEPTH}", step=CHAIN_STEP
        )
    return certs


def pick_leaf(certs: Sequence[x509.Certificate]) -> x509.Certificate:
    """The end-entity of an unordered bundle: the one certificate that issued none of the others.
    Falls back to the first certificate when that is ambiguous (then the chain checks decide)."""
    issuers = {c.issuer for c in certs if c.issuer != c.subject}
    candidates = [c for c in certs if c.subject not in issuers and c.issuer != c.subject]
    return candidates[0] if len(candidates) == 1 else certs[0]


def load_anchors(trust_anchors: Sequence[bytes]) -> list[x509.Certificate]:
    """Trust anchors come from the caller (configuration), so a bad one is a UsageError, not hostile input."""
    anchors: list[x509.Certificate] = []
    for i, blob in enumerate(trust_anchors):
        if not isinstance(blob, bytes | bytearray):
            raise UsageError(f"trust anchor #{i} must be bytes (PEM or DER), got {type(blob).__name__}")
        try:
            anchors.extend(load_certificates(bytes(blob), what=f"trust anchor #{i}"))
        except MalformedEvidence as exc:
            raise UsageError(exc.reason) from exc
    if not anchors:
        raise UsageError("no trust anchors given: pass the vendor root certificate(s) to trust")
    return anchors


def describe(name: x509.Name) -> str:
    """A stable, human-readable form of a distinguished name (RFC 4514)."""
    return name.rfc4514_string()


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _same_identity(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.subject == b.subject and _spki(a) == _spki(b)


def _check_link(child: x509.Certificate, issuer: x509.Certificate, algorithms: frozenset[object]) -> None:
    who = describe(child.subject)
    if child.signature_algorithm_oid not in algorithms:
        raise CertificateChainInvalid(
            f"certificate '{who}' is signed with {child.signature_algorithm_oid._name}, "
            f"which this chain does not allow",
            step=CHAIN_STEP,
        )
    if not isinstance(child.signature_hash_algorithm, hashes.SHA384):
        got = child.signature_hash_algorithm.name if child.signature_hash_algorithm else "none"
        raise CertificateChainInvalid(
            f"certificate '{who}' uses hash {got}, expected SHA-384", step=CHAIN_STEP
        )
    try:
        child.verify_directly_issued_by(issuer)
    except InvalidSignature as exc:
        raise CertificateChainInvalid(
            f"signature on certificate '{who}' does not verify with the key of '{describe(issuer.subject)}'",
            step=CHAIN_STEP,
        ) from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateChainInvalid(
            f"certificate '{who}' is not validly issued by '{describe(issuer.subject)}' ({exc})",
            step=CHAIN_STEP,
        ) from exc


def _check_issuer_is_ca(issuer: x509.Certificate, below: int) -> None:
    """`below` = number of CA certificates between this issuer and the leaf (for pathLenConstraint)."""
    who = describe(issuer.subject)
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise CertificateChainInvalid(
            f"issuer '{who}' has no basicConstraints: not a CA", step=CHAIN_STEP
        ) from exc
    except (ValueError, TypeError) as exc:
        raise CertificateChainInvalid(
            f"issuer '{who}' has malformed extensions ({exc})", step=CHAIN_STEP
        ) from exc
    if not bc.ca:
        raise CertificateChainInvalid(
            f"issuer '{who}' is not a CA (basicConstraints cA=false)", step=CHAIN_STEP
        )
    if bc.path_length is not None and below > bc.path_length:
        raise CertificateChainInvalid(f"issuer '{who}' path length constraint exceeded", step=CHAIN_STEP)
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign:
        raise CertificateChainInvalid(
            f"issuer '{who}' key usage does not allow certificate signing", step=CHAIN_STEP
        )


def check_validity(certs: Iterable[x509.Certificate], now: int) -> None:
    """Every certificate must be valid at `now` (unix seconds); Expired names the first one that is not."""
    try:
        at = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise UsageError(f"verification time {now!r} is out of range") from exc
    for cert in certs:
        who = describe(cert.subject)
        if at < cert.not_valid_before_utc:
            raise Expired(
                f"certificate '{who}' is not valid before {cert.not_valid_before_utc.isoformat()} "
                f"(verification time {at.isoformat()})",
                step=CHAIN_STEP,
            )
        if at > cert.not_valid_after_utc:
            raise Expired(
                f"certificate '{who}' expired at {cert.not_valid_after_utc.isoformat()} "
                f"(verification time {at.isoformat()})",
                step=CHAIN_STEP,
            )


@dataclass(frozen=True)
class VerifiedChain:
    """leaf first, trust anchor last (the anchor's own certificate object, not the copy in the evidence)."""

    path: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.path[0]

    @property
    def root(self) -> x509.Certificate:
        return self.path[-1]

    def summary(self) -> str:
        names = [f"'{common_name(c) or describe(c.subject)}'" for c in self.path]
        return " <- ".join(names) + " (trust anchor)"


def build_and_verify_chain(
    leaf: x509.Certificate,
    pool: Sequence[x509.Certificate],
    trust_anchors: Sequence[bytes],
    *,
    now: int,
    algorithms: frozenset[object],
    root_algorithms: frozenset[object] | None = None,
) -> VerifiedChain:
    """Chain `leaf` through `pool` (any order) to a trust anchor, then check every link at time `now`.

    Steps:
      (1) build the path by issuer name, at most MAX_CHAIN_DEPTH long, preferring evidence certificates;
      (2) the top must be a self-issued root equal (subject + key) to an anchor, or be issued by an anchor;
          otherwise UntrustedRoot naming the root that was found;
      (3) every link's signature, algorithm (SHA-384, allowed set) and the root's self-signature;
      (4) issuers are CAs (basicConstraints, pathLen, keyCertSign);
      (5) every certificate, anchor included, is valid at `now`.
    """
    check_validity((), now)  # rejects an unusable `now` before any work
    # Everything below but step (5) is a pure function of the certificates, so a verified path is reused
    # for the same certificates, anchors and algorithm sets whenever `now` is inside its validity window.
    key = (
        leaf.public_bytes(serialization.Encoding.DER),
        tuple(c.public_bytes(serialization.Encoding.DER) for c in pool),
        tuple(bytes(a) for a in trust_anchors),
        algorithms,
        root_algorithms,
    )
    hit = _CHAINS.get(key)
    if hit is not None and hit[1][0] <= now <= hit[1][1]:
        return hit[0]
    chain = _build_and_verify(leaf, pool, load_anchors(trust_anchors), now, algorithms, root_algorithms)
    lo = max(c.not_valid_before_utc.timestamp() for c in chain.path)
    hi = min(c.not_valid_after_utc.timestamp() for c in chain.path)
    _CHAINS.put(
        key, (chain, (lo, hi)), sum(len(k) for k in key[:1]) + sum(map(len, key[1])) + sum(map(len, key[2]))
    )
    return chain


_CHAINS: BoundedCache[tuple[object, ...], tuple[VerifiedChain, tuple[float, float]]] = named_cache(
    "x509.chains"
)


def _build_and_verify(
    leaf: x509.Certificate,
    pool: Sequence[x509.Certificate],
    anchors: list[x509.Certificate],
    now: int,
    algorithms: frozenset[object],
    root_algorithms: frozenset[object] | None,
) -> VerifiedChain:
    # (1): build by name
    path: list[x509.Certificate] = [leaf]
    while path[-1].issuer != path[-1].subject:
        if len(path) > MAX_CHAIN_DEPTH:
            raise CertificateChainInvalid(f"certificate chain longer than {MAX_CHAIN_DEPTH}", step=CHAIN_STEP)
        want = path[-1].issuer
        nxt = next((c for c in pool if c.subject == want and all(c is not p for p in path)), None)
        if nxt is None:
            nxt = next((a for a in anchors if a.subject == want), None)
        if nxt is None:
            raise UntrustedRoot(
                f"certificate chain ends at '{describe(want)}', which is neither in the chain nor an anchor",
                step=CHAIN_STEP,
            )
        path.append(nxt)
    # (2): the root must be a trust anchor
    top = path[-1]
    anchor = next((a for a in anchors if _same_identity(a, top)), None)
    if anchor is None:
        raise UntrustedRoot(
            f"certificate chain ends at root '{describe(top.subject)}', which is not a trusted anchor",
            step=CHAIN_STEP,
        )
    path[-1] = anchor
    if len(path) == 1:
        raise CertificateChainInvalid(
            "the signing certificate is itself a root; expected a chain", step=CHAIN_STEP
        )
    # (3): signatures, leaf upwards, then the root's self-signature
    for child, issuer in itertools.pairwise(path):
        _check_link(child, issuer, algorithms)
    _check_link(anchor, anchor, root_algorithms or algorithms)
    # (4): issuers are CAs
    for below, issuer in enumerate(path[1:]):
        _check_issuer_is_ca(issuer, below)
    # (5): validity
    check_validity(path, now)
    return VerifiedChain(tuple(path))
