"""Fill an NvidiaCollateralCache from NVIDIA's services: the OCSP responder for GPU device certificates and
the RIM service for driver and VBIOS RIMs.

    POST <ocsp_url>            RFC 6960 OCSPRequest (DER, `application/ocsp-request`), one certificate,
                               SHA-384 CertID, a fresh nonce (RFC 8954) -> OCSPResponse (DER)
    GET  <rim_url>/<rim id>    {"id", "rim": base64 of the RIM's XML, "sha256", "rim_format", "last_updated",
                               "request_id"} (NVIDIA's RIM service API v1; ids such as
                               NV_GPU_DRIVER_GH100_550.90.07)

Nothing fetched is cached before it passed every check, and the cache's own rules then apply (an OCSP answer
only between thisUpdate and nextUpdate, a RIM only while it verifies), so a failed, stale, oversized or
wrong answer leaves the cache as it was. Checks of an OCSP answer, in order:
    (1) HTTP 200 within the timeout, at most MAX_OCSP_BYTES
    (2) a successful OCSPResponse for exactly the certificate asked about (serial, issuer key and name hash)
    (3) the nonce echoed, when the responder returns one (a responder may serve a pre-signed answer without)
    (4) signed by the issuer or a responder it certified for OCSP signing, current at `now`, status good or
        revoked (a revoked answer is cached too: the verifier must see it); "unknown" is refused
And of a RIM: (1) HTTP 200, at most MAX_RIM_ENVELOPE_BYTES; (2) the JSON envelope's id is the one asked for,
its format TCG (a SWID tag: the only one teecloud reads), its base64 decodes to at most MAX_RIM_SIZE bytes
whose sha256 is the envelope's; (3) the RIM verifies under the trust anchors at `now` (signature, chain) and,
if given, is for the expected driver/VBIOS version.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from teecloud.attestation._revocation import Revocation, check_revocation
from teecloud.attestation.errors import CertificateChainInvalid, VerificationError
from teecloud.attestation.nvidia import MAX_OCSP_BYTES, MAX_RIM_SIZE, Rim, verify_rim
from teecloud.collateral._http import bounded_get
from teecloud.collateral.errors import InvalidCollateral, PccsUnavailable
from teecloud.collateral.nvidia import NvidiaCollateralCache, OcspEntry, describe_ocsp

__all__ = [
    "MAX_RIM_ENVELOPE_BYTES",
    "NVIDIA_OCSP_URL",
    "NVIDIA_RIM_URL",
    "NvidiaCollateralClient",
    "OcspFetched",
]

NVIDIA_OCSP_URL = "https://ocsp.ndis.nvidia.com/"
NVIDIA_RIM_URL = "https://rim.attestation.nvidia.com/v1/rim"
MAX_RIM_ENVELOPE_BYTES = MAX_RIM_SIZE * 4 // 3 + 16 * 1024  # base64 of the largest RIM, plus the fields
DEFAULT_TIMEOUT_S = 10.0
NONCE_BYTES = 32
_RIM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


@dataclass(frozen=True)
class OcspFetched:
    entry: OcspEntry
    subject: str  # the certificate's subject, for messages


class NvidiaCollateralClient:
    """Fetches into `cache`. `client` is any httpx.Client (tests pass one bound to a local server)."""

    def __init__(
        self,
        cache: NvidiaCollateralCache,
        *,
        ocsp_url: str = NVIDIA_OCSP_URL,
        rim_url: str = NVIDIA_RIM_URL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        client: httpx.Client | None = None,
    ) -> None:
        self.cache = cache
        self.ocsp_url = ocsp_url
        self.rim_url = rim_url.rstrip("/")
        self.client = client or httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    def close(self) -> None:
        self.client.close()

    # --- OCSP -------------------------------------------------------------------------------------------

    def fetch_ocsp(self, cert: x509.Certificate, issuer: x509.Certificate, *, now: int) -> OcspFetched:
        """Ask the responder about `cert` (issued by `issuer`) and cache a checked answer."""
        nonce = os.urandom(NONCE_BYTES)
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(cert, issuer, hashes.SHA384())
            .add_extension(x509.OCSPNonce(nonce), critical=False)
            .build()
        )
        # (1)
        der = self._post(request.public_bytes(serialization.Encoding.DER))
        try:
            self._check_ocsp(der, request, nonce, cert, issuer, now=now)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # cryptography parses lazily
            raise InvalidCollateral(
                f"OCSP answer refused: unreadable ({type(exc).__name__}: {exc})"
            ) from None
        # the cache's validity rule: thisUpdate <= now < nextUpdate
        stored = self.cache.add_ocsp(der, now=now)
        return OcspFetched(entry=stored, subject=cert.subject.rfc4514_string())

    @staticmethod
    def _check_ocsp(
        der: bytes,
        request: ocsp.OCSPRequest,
        nonce: bytes,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        *,
        now: int,
    ) -> OcspEntry:
        # (2)
        entry = describe_ocsp(der)  # successful, one certificate, a nextUpdate
        resp = ocsp.load_der_ocsp_response(der)
        single = next(iter(resp.responses))
        if (
            single.serial_number != request.serial_number
            or single.issuer_key_hash != request.issuer_key_hash
            or single.issuer_name_hash != request.issuer_name_hash
            or single.hash_algorithm.name != request.hash_algorithm.name
        ):
            raise InvalidCollateral("the OCSP answer is about another certificate than the one asked for")
        # (3)
        try:
            echoed = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            echoed = None
        if echoed is not None and echoed != nonce:
            raise InvalidCollateral("the OCSP answer carries another nonce than ours (a replayed answer?)")
        # (4)
        if entry.status == "unknown":
            raise InvalidCollateral(f"the OCSP responder does not know serial {entry.serial:x}")
        try:
            result = check_revocation([cert, issuer], Revocation(ocsp_responses=(der,)), now=now)
            if entry.status != "good" or not result.checked:
                raise InvalidCollateral("the OCSP answer was not used for the certificate asked about")
        except CertificateChainInvalid as exc:
            # the signature is checked before the status: "revoked" here is a signed, current answer
            if entry.status != "revoked" or "is revoked" not in exc.reason:
                raise InvalidCollateral(f"OCSP answer refused: {exc.reason}") from None
        except VerificationError as exc:
            raise InvalidCollateral(f"OCSP answer refused: {exc.reason}") from None
        return entry

    def fetch_ocsp_chain(self, chain: Sequence[x509.Certificate], *, now: int) -> list[OcspFetched]:
        """Every certificate of a device chain (leaf first) but its last, each asked of the responder."""
        if not 2 <= len(chain) <= 8:
            raise InvalidCollateral("a device certificate chain is 2..8 certificates, leaf first")
        return [self.fetch_ocsp(cert, issuer, now=now) for cert, issuer in itertools.pairwise(chain)]

    def _post(self, body: bytes) -> bytes:
        service = f"NVIDIA OCSP at {self.ocsp_url}"
        headers = {"content-type": "application/ocsp-request", "accept": "application/ocsp-response"}
        try:
            with self.client.stream("POST", self.ocsp_url, content=body, headers=headers) as resp:
                if resp.status_code != 200:
                    raise PccsUnavailable(f"{service} answered HTTP {resp.status_code}")
                chunks, size = [], 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > MAX_OCSP_BYTES:
                        raise InvalidCollateral(f"{service}: the answer is over {MAX_OCSP_BYTES} bytes")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise PccsUnavailable(f"{service} is unreachable ({type(exc).__name__}: {exc})") from exc
        return b"".join(chunks)

    # --- RIMs -------------------------------------------------------------------------------------------

    def fetch_rim(
        self,
        rim_id: str,
        *,
        trust_anchors: Sequence[bytes],
        now: int,
        expected_version: str | None = None,
    ) -> Rim:
        """GET one RIM by id and cache it once it verifies."""
        if not _RIM_ID.fullmatch(rim_id):
            raise ValueError("a RIM id is 1..128 letters, digits, '_', '.' or '-'")
        # (1)
        resp = bounded_get(
            self.client,
            f"{self.rim_url}/{rim_id}",
            name="NVIDIA RIM service",
            base_url=self.rim_url,
            path=f"/{rim_id}",
            max_bytes=MAX_RIM_ENVELOPE_BYTES,
            not_found=f"the NVIDIA RIM service has no RIM {rim_id}",
        )
        # (2)
        xml = parse_rim_envelope(resp.content, rim_id)
        # (3)
        try:
            rim = verify_rim(xml, trust_anchors=trust_anchors, now=now)
        except VerificationError as exc:
            raise InvalidCollateral(f"RIM {rim_id} refused: {exc}") from None
        if expected_version is not None and rim.version != expected_version.lower():
            raise InvalidCollateral(f"RIM {rim_id} is for version {rim.version}, expected {expected_version}")
        return self.cache.add_rim(xml, trust_anchors=trust_anchors, now=now)


def parse_rim_envelope(body: bytes, rim_id: str) -> bytes:
    """The RIM's XML from the RIM service's JSON envelope, checked against the id asked for and its sha256."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidCollateral("the RIM service's answer is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidCollateral("the RIM service's answer is not a JSON object")
    if doc.get("id") != rim_id:
        raise InvalidCollateral(f"the RIM service answered for {str(doc.get('id'))[:128]!r}, not {rim_id!r}")
    fmt = doc.get("rim_format", "TCG")
    if not isinstance(fmt, str) or fmt.upper() != "TCG":
        raise InvalidCollateral(f"RIM format {str(fmt)[:32]!r} is not read here (only TCG SWID tags)")
    b64 = doc.get("rim")
    if not isinstance(b64, str) or len(b64) > MAX_RIM_ENVELOPE_BYTES:
        raise InvalidCollateral("the RIM service's answer has no rim")
    try:
        xml = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCollateral("the RIM service's rim is not base64") from None
    if not 0 < len(xml) <= MAX_RIM_SIZE:
        raise InvalidCollateral(f"a RIM is 1..{MAX_RIM_SIZE} bytes")
    digest = doc.get("sha256")
    if not isinstance(digest, str) or digest.lower() != hashlib.sha256(xml).hexdigest():
        raise InvalidCollateral("the RIM's sha256 is not the one the RIM service states")
    return xml
