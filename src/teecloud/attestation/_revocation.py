"""Revocation of the certificates in a verified chain, offline, from CRLs and OCSP responses the caller
supplies (private; used by the SEV-SNP, Nitro and NVIDIA verifiers).

No network here (the collateral layer fetches AMD's KDS CRL; NVIDIA's OCSP responses and the CRLs named in
certificates' distribution points are fetched by the caller). For each certificate of the path below the
trust anchor:
  (1) a CRL issued in its issuer's name (RFC 5280 section 6.3, without delta CRLs or distribution-point
      scoping) must be signed by that issuer's key and current at `now` (thisUpdate <= now <= nextUpdate);
      the certificate's serial number listed in it = revoked;
  (2) or an OCSP response (RFC 6960) for its issuer and serial, signed by the issuer or by a responder the
      issuer certified for OCSP signing, current at `now`: "revoked" = revoked, "good" = checked;
  (3) otherwise it is reported as not checked -- never as passed.
A CRL or OCSP response that names an issuer of the chain but fails its signature or dates rejects the
evidence: the caller meant it to be checked.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from teecloud.attestation import _x509
from teecloud.attestation.errors import CertificateChainInvalid, Expired, MalformedEvidence

__all__ = ["MAX_CRL_BYTES", "MAX_OCSP_BYTES", "Revocation", "RevocationResult", "check_revocation"]

MAX_CRL_BYTES = 4 * 1024 * 1024  # AMD's KDS CRLs are ~1-2 KB; a large CA's CRL can be megabytes
MAX_OCSP_BYTES = 64 * 1024
MAX_ITEMS = 16
STEP = "revocation"
NOT_SUPPLIED = "revocation not checked: no CRL or OCSP response was supplied"


@dataclass(frozen=True)
class Revocation:
    """What the caller supplies: CRLs (DER or PEM) and OCSP responses (DER)."""

    crls: tuple[bytes, ...] = ()
    ocsp_responses: tuple[bytes, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.crls and not self.ocsp_responses


@dataclass(frozen=True)
class RevocationResult:
    checked: tuple[str, ...]  # "<cn>: CRL of <issuer>, next update ..." per certificate
    not_checked: tuple[str, ...]  # common names

    @property
    def complete(self) -> bool:
        return not self.not_checked

    def summary(self) -> str:
        if not self.checked:
            return NOT_SUPPLIED
        text = "revocation checked: " + "; ".join(self.checked)
        if self.not_checked:
            text += "; not checked (no CRL or OCSP response for it): " + ", ".join(self.not_checked)
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "checked": list(self.checked),
            "not_checked": list(self.not_checked),
            "complete": self.complete,
        }


def _load_crl(blob: bytes, i: int) -> x509.CertificateRevocationList:
    if len(blob) > MAX_CRL_BYTES:
        raise MalformedEvidence(f"CRL #{i} is {len(blob)} bytes, limit is {MAX_CRL_BYTES}", step=STEP)
    try:
        crl = (
            x509.load_pem_x509_crl(blob)
            if blob.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_crl(blob)
        )
        _ = crl.issuer.rfc4514_string(), crl.last_update_utc, crl.next_update_utc, crl.signature_algorithm_oid
    except Exception as exc:  # lazily decoded fields raise ValueError / KeyError / ...
        raise MalformedEvidence(f"CRL #{i} is not a valid X.509 CRL ({exc})", step=STEP) from exc
    return crl


def _load_ocsp(blob: bytes, i: int) -> ocsp.OCSPResponse:
    if len(blob) > MAX_OCSP_BYTES:
        raise MalformedEvidence(
            f"OCSP response #{i} is {len(blob)} bytes, limit is {MAX_OCSP_BYTES}", step=STEP
        )
    try:
        resp = ocsp.load_der_ocsp_response(blob)
        _ = resp.response_status
    except Exception as exc:
        raise MalformedEvidence(f"OCSP response #{i} is not a DER OCSP response ({exc})", step=STEP) from exc
    return resp


def _at(now: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, tz=dt.UTC)


def _verify_signed(
    key: object, signature: bytes, data: bytes, hash_alg: hashes.HashAlgorithm | None, pss: bool
) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and hash_alg is not None:
            key.verify(signature, data, ec.ECDSA(hash_alg))
        elif isinstance(key, rsa.RSAPublicKey) and hash_alg is not None:
            pad: padding.AsymmetricPadding = (
                padding.PSS(padding.MGF1(hash_alg), padding.PSS.DIGEST_LENGTH) if pss else padding.PKCS1v15()
            )
            key.verify(signature, data, pad, hash_alg)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


def _certified_responder(responder: x509.Certificate, issuer: x509.Certificate, now: int) -> bool:
    try:
        responder.verify_directly_issued_by(issuer)
        eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        _x509.check_validity([responder], now)
    except Exception:  # not a certified responder of this issuer (unsigned, no EKU, expired, unreadable)
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in eku


def _ocsp_signed_by(resp: ocsp.OCSPResponse, issuer: x509.Certificate, now: int) -> bool:
    """Signed by the issuer itself, or by a responder certificate (in the response) that the issuer signed
    for id-kp-OCSPSigning and that is valid at `now` (RFC 6960 section 4.2.2.2)."""
    pss = resp.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.RSASSA_PSS
    try:
        hash_algorithm = resp.signature_hash_algorithm
    except UnsupportedAlgorithm:  # a signature algorithm this verifier does not know: not signed by anyone
        return False
    if _verify_signed(issuer.public_key(), resp.signature, resp.tbs_response_bytes, hash_algorithm, pss):
        return True
    for responder in resp.certificates:
        if _certified_responder(responder, issuer, now) and _verify_signed(
            responder.public_key(),
            resp.signature,
            resp.tbs_response_bytes,
            hash_algorithm,
            pss,
        ):
            return True
    return False


def check_revocation(
    path: Sequence[x509.Certificate], revocation: Revocation, *, now: int
) -> RevocationResult:
    """Check every certificate of `path` (leaf first, trust anchor last) against what was supplied.
    Raises CertificateChainInvalid (revoked; a CRL/OCSP response of a chain issuer whose signature fails),
    Expired (such a CRL/response outside its validity at `now`) or MalformedEvidence (unreadable)."""
    if len(revocation.crls) > MAX_ITEMS or len(revocation.ocsp_responses) > MAX_ITEMS:
        raise MalformedEvidence(f"at most {MAX_ITEMS} CRLs and {MAX_ITEMS} OCSP responses", step=STEP)
    crls = [_load_crl(b, i) for i, b in enumerate(revocation.crls)]
    responses = [_load_ocsp(b, i) for i, b in enumerate(revocation.ocsp_responses)]
    at = _at(now)
    checked: list[str] = []
    not_checked: list[str] = []
    for cert, issuer in itertools.pairwise(path):
        who = _x509.common_name(cert) or _x509.describe(cert.subject)
        by = _x509.common_name(issuer) or _x509.describe(issuer.subject)
        done = False
        # (1): CRLs of this certificate's issuer
        for crl in crls:
            if crl.issuer != cert.issuer:
                continue
            if not _crl_signed_by(crl, issuer):
                raise CertificateChainInvalid(f"the CRL of '{by}' is not signed by '{by}'", step=STEP)
            nxt = crl.next_update_utc
            if at < crl.last_update_utc or nxt is None or at > nxt:
                raise Expired(
                    f"the CRL of '{by}' is not current at {at.isoformat()} (thisUpdate "
                    f"{crl.last_update_utc.isoformat()}, nextUpdate {nxt.isoformat() if nxt else 'none'})",
                    step=STEP,
                )
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                raise CertificateChainInvalid(
                    f"certificate '{who}' (serial {cert.serial_number:x}) is revoked by its issuer '{by}' "
                    f"since {entry.revocation_date_utc.isoformat()}",
                    step=STEP,
                )
            checked.append(f"{who}: not in the CRL of '{by}' (next update {nxt.isoformat()})")
            done = True
            break
        if done:
            continue
        # (2): OCSP responses for this certificate
        for resp in responses:
            if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
                continue
            for single in resp.responses:
                if single.serial_number != cert.serial_number:
                    continue
                if single.issuer_key_hash != _issuer_key_hash_for(issuer, single.hash_algorithm):
                    continue
                if not _ocsp_signed_by(resp, issuer, now):
                    raise CertificateChainInvalid(
                        f"the OCSP response for '{who}' is not signed by '{by}' or its OCSP responder",
                        step=STEP,
                    )
                nxt = single.next_update_utc
                if at < single.this_update_utc or (nxt is not None and at > nxt):
                    raise Expired(
                        f"the OCSP response for '{who}' is not current at {at.isoformat()}", step=STEP
                    )
                status = single.certificate_status
                if status == ocsp.OCSPCertStatus.REVOKED:
                    raise CertificateChainInvalid(
                        f"certificate '{who}' is revoked (OCSP response of '{by}')", step=STEP
                    )
                if status == ocsp.OCSPCertStatus.GOOD:
                    checked.append(f"{who}: OCSP good from '{by}'")
                    done = True
                break
            if done:
                break
        if not done:
            not_checked.append(who)
    return RevocationResult(tuple(checked), tuple(not_checked))


def _issuer_key_hash_for(issuer: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    # RFC 6960: hash of the issuer's subjectPublicKey BIT STRING value (without tag, length, unused bits).
    spki = issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_bits = _subject_public_key_bits(spki)
    h = hashes.Hash(algorithm)
    h.update(key_bits)
    return h.finalize()


def _subject_public_key_bits(spki: bytes) -> bytes:
    """The subjectPublicKey BIT STRING contents of a DER SubjectPublicKeyInfo (minus the unused-bits byte)."""

    def tlv(data: bytes, pos: int) -> tuple[int, int, int]:
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        return tag, pos, pos + length

    _, start, _ = tlv(spki, 0)  # SEQUENCE
    _, _, alg_end = tlv(spki, start)  # AlgorithmIdentifier
    tag, bits_start, bits_end = tlv(spki, alg_end)  # BIT STRING
    if tag != 0x03:
        raise ValueError("not a SubjectPublicKeyInfo")
    return spki[bits_start + 1 : bits_end]
