"""NVIDIA GPU attestation evidence: an SPDM 1.1 GET_MEASUREMENTS request and its signed MEASUREMENTS response.

Formats: DMTF DSP0274 (SPDM) 1.1.x, GET_MEASUREMENTS request and MEASUREMENTS response (section 10.11),
measurement block and DMTF measurement field (tables "Measurement block format" and "DMTF measurement
specification format"). NVIDIA's opaque data is a list of (type u16, size u16, value) little-endian fields;
the type numbers are those of NVIDIA's nvtrust verifier (driver version = 3, VBIOS version = 6, ...).
Hand-written: there is no maintained Python SPDM parser.

Verification steps (`verify_nvidia_evidence`):
  (1) decode the evidence (hex text as written by the NVIDIA tools, or raw bytes) and parse request and
      response exactly, every length bounded and accounted for;
  (2) chain the signing certificate (the leaf of `cert_chain_pem`) to a caller-trusted NVIDIA device identity
      root (ECDSA SHA-384), every certificate valid at `now`;
  (3) ECDSA P-384/SHA-384 signature, r || s big-endian in the last 96 bytes, over
      request || response-without-signature (SPDM 1.1 L1/L2 transcript of this exchange);
  (4) the requester nonce equals `expected_nonce` when the caller gives one (freshness);
  (5) collect the measurement blocks ("measurement_<index>"), nonce, driver and VBIOS versions;
  (6) with RIMs given (`rims`, NVIDIA's Reference Integrity Manifests; `verify_rim`): each RIM verifies,
      is for the evidence's driver or VBIOS version, and every active golden measurement it lists is a
      measurement block of the evidence with one of its allowed values.

RIM format (`verify_rim`), as NVIDIA's RIM service serves it and nvtrust's verifier reads it: an ISO/IEC
19770-2:2015 SWID tag (`SoftwareIdentity`, TCG PC Client RIM profile) whose `Meta@colloquialVersion` is the
driver or VBIOS version and whose `Payload` holds one `Resource` per measurement index (`index`, `active`,
`name`, `size`, `alternatives` = N and N attributes `Hash0..HashN-1` in the xmlenc#sha384 namespace, hex),
signed by an enveloped XML-DSig signature whose KeyInfo carries the signing certificate chain. Checked here:
the chain to a trusted RIM root (ECDSA SHA-384), the XML signature (signxml), and only the signed content is
read. Not checked (simplified): the SWID schema itself (structure is checked field by field instead), the
TCG RIM attributes other than those above, and OCSP for the RIM signing chain (the device chain's revocation
is `revocation`).
"""

from __future__ import annotations

import hmac
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from teecloud.attestation import _x509
from teecloud.attestation._revocation import MAX_OCSP_BYTES, Revocation, check_revocation
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    MalformedEvidence,
    PolicyViolation,
    SignatureInvalid,
)
from teecloud.attestation.models import Step, TeeKind, VerifiedEvidence

__all__ = [
    "MAX_EVIDENCE_SIZE",
    "MAX_OCSP_BYTES",
    "MAX_RIM_SIZE",
    "RIM_HASH_NS",
    "RIM_NS",
    "TCB_STATUS",
    "GoldenMeasurement",
    "MeasurementBlock",
    "Revocation",
    "Rim",
    "SpdmMeasurements",
    "check_rim",
    "looks_like",
    "parse_nvidia_evidence",
    "verify_nvidia_evidence",
    "verify_rim",
]

MAX_EVIDENCE_SIZE = 64 * 1024  # decoded bytes; a real H100 exchange is ~4 KiB
MAX_RIM_SIZE = 1024 * 1024  # a driver RIM is ~20 KiB
MAX_RIMS = 8
MAX_RIM_MEASUREMENTS = 512
MAX_RIM_ALTERNATIVES = 16
RIM_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
RIM_HASH_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
_DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
SPDM_VERSION_1_1 = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
REQUEST_SIZE = 37  # version, code, param1, param2, nonce[32], slot_id_param
NONCE_SIZE = 32
SIGNATURE_SIZE = 96  # ECDSA P-384: r || s, 48 bytes each, big-endian
REQUEST_SIGNATURE_BIT = 0x01  # Param1 bit 0: signature requested
DMTF_SPEC_BIT = 0x01  # MeasurementSpecification bit 0: DMTF format

OPAQUE_DRIVER_VERSION = 3
OPAQUE_VBIOS_VERSION = 6
OPAQUE_FWID = 20
# TCG DICE TcbInfo extension (TCG "DICE Attestation Architecture", tcg-dice-TcbInfo) on the attestation
# certificate; its fwids list holds FWID ::= SEQUENCE { hashAlg OID, digest OCTET STRING }.
OID_DICE_TCB_INFO = x509.ObjectIdentifier("2.23.133.5.4.1")
_DER_SHA384_OID = bytes.fromhex("0609608648016503040202")
OPAQUE_FIELD_NAMES = {
    1: "cert_issuer_name",
    2: "cert_authority_key_identifier",
    3: "driver_version",
    4: "gpu_info",
    5: "sku",
    6: "vbios_version",
    7: "manufacturer_id",
    8: "tamper_detection",
    9: "smc",
    10: "vpr",
    11: "nvdec0_status",
    12: "msrscnt",
    13: "cprinfo",
    14: "board_id",
    15: "chip_sku",
    16: "chip_sku_mod",
    17: "project",
    18: "project_sku",
    19: "project_sku_mod",
    20: "fwid",
    21: "protected_pcie_status",
    22: "switch_pdi",
    23: "floorswept_ports",
    24: "position_id",
    25: "lock_switch_status",
    32: "gpu_link_conn",
    33: "sys_enable_status",
    34: "opaque_data_version",
    35: "chip_info",
    36: "feature_flag",
}

# DSP0274 1.1 "DMTFSpecMeasurementValueType" bits 6:0.
DMTF_VALUE_TYPES = {
    0: "immutable_rom",
    1: "mutable_firmware",
    2: "hardware_configuration",
    3: "firmware_configuration",
    4: "measurement_manifest",
}

# No TCB level in SPDM evidence; firmware state is judged from the measurements by policy.
TCB_STATUS = "NotApplicable"

_HEX = frozenset(string.hexdigits.encode() + string.whitespace.encode())


@dataclass(frozen=True)
class MeasurementBlock:
    index: int
    spec: int  # MeasurementSpecification
    value_type: int | None  # DMTF value type (bits 6:0), None for non-DMTF blocks
    raw_bitstream: bool  # DMTF bit 7: value is a raw bit stream, not a digest
    value: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "spec": self.spec,
            "type": DMTF_VALUE_TYPES.get(self.value_type, str(self.value_type))
            if self.value_type is not None
            else None,
            "raw_bitstream": self.raw_bitstream,
            "size": len(self.value),
        }


@dataclass(frozen=True)
class SpdmMeasurements:
    """A parsed GET_MEASUREMENTS / MEASUREMENTS exchange (not yet verified)."""

    request: bytes
    response: bytes  # including the signature
    spdm_version: int
    request_param1: int
    request_param2: int  # measurement operation (0xFF = all blocks)
    requester_nonce: bytes
    slot_id: int
    response_param1: int
    response_param2: int
    blocks: tuple[MeasurementBlock, ...]
    responder_nonce: bytes
    opaque_data: bytes
    opaque_fields: tuple[tuple[int, bytes], ...]
    signature: bytes

    @property
    def signed_bytes(self) -> bytes:
        return self.request + self.response[:-SIGNATURE_SIZE]

    def opaque(self, field_type: int) -> bytes | None:
        return next((v for t, v in self.opaque_fields if t == field_type), None)

    @property
    def driver_version(self) -> str | None:
        raw = self.opaque(OPAQUE_DRIVER_VERSION)
        return raw.split(b"\0", 1)[0].decode("ascii", "replace") if raw is not None else None

    @property
    def vbios_version(self) -> str | None:
        """Shown as nvidia-smi does, e.g. 96.00.9F.00.01: bytes 3..0 of the low word, then byte 4."""
        raw = self.opaque(OPAQUE_VBIOS_VERSION)
        if raw is None or len(raw) < 5:
            return None
        return ".".join(f"{b:02X}" for b in (raw[3], raw[2], raw[1], raw[0], raw[4]))


def looks_like(data: bytes) -> bool:
    """Hex text or raw bytes that start with an SPDM 1.1 GET_MEASUREMENTS request."""
    head = data[:8]
    if head[:2] == bytes([SPDM_VERSION_1_1, GET_MEASUREMENTS]):
        return True
    return head.strip().lower().startswith(b"11e0") and all(c in _HEX for c in data[:256])


def _decode(evidence: bytes) -> bytes:
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise MalformedEvidence(f"NVIDIA evidence must be bytes, got {type(evidence).__name__}")
    evidence = bytes(evidence)
    if len(evidence) > 2 * MAX_EVIDENCE_SIZE + 4096:
        raise MalformedEvidence(f"NVIDIA evidence is {len(evidence)} bytes, limit is {MAX_EVIDENCE_SIZE}")
    if evidence[:2] == bytes([SPDM_VERSION_1_1, GET_MEASUREMENTS]):
        data = evidence
    elif evidence and all(c in _HEX for c in evidence):
        try:
            data = bytes.fromhex(evidence.decode("ascii"))
        except ValueError as exc:
            raise MalformedEvidence(f"NVIDIA evidence is not valid hex ({exc})") from exc
    else:
        raise MalformedEvidence("NVIDIA evidence is neither hex text nor an SPDM GET_MEASUREMENTS exchange")
    if len(data) > MAX_EVIDENCE_SIZE:
        raise MalformedEvidence(f"NVIDIA evidence is {len(data)} bytes, limit is {MAX_EVIDENCE_SIZE}")
    return data


class _Reader:
    """Bounds-checked little-endian reader; running past the end is MalformedEvidence."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedEvidence(
                f"{self.what}: truncated in {field} (need {n} bytes at offset {self.pos})"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, field: str) -> int:
        return int.from_bytes(self.take(n, field), "little")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _parse_blocks(record: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    rd = _Reader(record, "SPDM measurement record")
    blocks: list[MeasurementBlock] = []
    seen: set[int] = set()
    for _ in range(count):
        index = rd.uint(1, "block index")
        spec = rd.uint(1, "measurement specification")
        size = rd.uint(2, "measurement size")
        body = rd.take(size, f"measurement block {index}")
        if index in seen:
            raise MalformedEvidence(f"SPDM measurement block {index} appears twice")
        seen.add(index)
        if spec & DMTF_SPEC_BIT:
            br = _Reader(body, f"SPDM measurement block {index}")
            vtype = br.uint(1, "DMTF value type")
            vsize = br.uint(2, "DMTF value size")
            value = br.take(vsize, "DMTF value")
            if br.left:
                raise MalformedEvidence(f"SPDM measurement block {index}: {br.left} trailing bytes")
            blocks.append(MeasurementBlock(index, spec, vtype & 0x7F, bool(vtype & 0x80), value))
        else:
            blocks.append(MeasurementBlock(index, spec, None, False, body))
    if rd.left:
        raise MalformedEvidence(
            f"SPDM measurement record: {rd.left} bytes beyond the {count} declared blocks"
        )
    return tuple(blocks)


def _parse_opaque(opaque: bytes) -> tuple[tuple[int, bytes], ...]:
    rd = _Reader(opaque, "NVIDIA opaque data")
    fields: list[tuple[int, bytes]] = []
    while rd.left:
        ftype = rd.uint(2, "field type")
        size = rd.uint(2, "field size")
        fields.append((ftype, rd.take(size, f"opaque field {ftype}")))
    return tuple(fields)


def parse_nvidia_evidence(evidence: bytes) -> SpdmMeasurements:
    """Parse the request and the response; every byte must be accounted for. No signature check."""
    data = _decode(evidence)
    rd = _Reader(data, "SPDM GET_MEASUREMENTS request")
    request = rd.take(REQUEST_SIZE, "request")
    version, code, param1, param2 = request[0], request[1], request[2], request[3]
    if version != SPDM_VERSION_1_1 or code != GET_MEASUREMENTS:
        raise MalformedEvidence(
            f"expected an SPDM 1.1 GET_MEASUREMENTS request, got version 0x{version:02x} code 0x{code:02x}"
        )
    if not param1 & REQUEST_SIGNATURE_BIT:
        raise MalformedEvidence("the GET_MEASUREMENTS request did not ask for a signature")
    requester_nonce = request[4 : 4 + NONCE_SIZE]
    slot_id = request[4 + NONCE_SIZE]

    response = data[REQUEST_SIZE:]
    rr = _Reader(response, "SPDM MEASUREMENTS response")
    rversion, rcode = rr.uint(1, "version"), rr.uint(1, "code")
    if rversion != version or rcode != MEASUREMENTS:
        raise MalformedEvidence(
            f"expected an SPDM 1.1 MEASUREMENTS response, got version 0x{rversion:02x} code 0x{rcode:02x}"
        )
    rparam1, rparam2 = rr.uint(1, "param1"), rr.uint(1, "param2")
    count = rr.uint(1, "number of blocks")
    record_len = rr.uint(3, "measurement record length")
    blocks = _parse_blocks(rr.take(record_len, "measurement record"), count)
    responder_nonce = rr.take(NONCE_SIZE, "nonce")
    opaque_len = rr.uint(2, "opaque length")
    opaque = rr.take(opaque_len, "opaque data")
    signature = rr.take(SIGNATURE_SIZE, "signature")
    if rr.left:
        raise MalformedEvidence(f"SPDM MEASUREMENTS response has {rr.left} bytes after the signature")
    return SpdmMeasurements(
        request=request,
        response=response,
        spdm_version=version,
        request_param1=param1,
        request_param2=param2,
        requester_nonce=requester_nonce,
        slot_id=slot_id,
        response_param1=rparam1,
        response_param2=rparam2,
        blocks=blocks,
        responder_nonce=responder_nonce,
        opaque_data=opaque,
        opaque_fields=_parse_opaque(opaque),
        signature=signature,
    )


@dataclass(frozen=True)
class GoldenMeasurement:
    index: int
    name: str
    active: bool
    size: int
    values: tuple[bytes, ...]  # the allowed values ("alternatives")


@dataclass(frozen=True)
class Rim:
    """A verified RIM: only what its signature covers."""

    tag_id: str
    name: str
    version: str  # Meta@colloquialVersion, lower case
    measurements: tuple[GoldenMeasurement, ...]
    signer: str  # the signing certificate's subject


def _rim_attr(el: Any, name: str, what: str) -> str:
    value = el.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise MalformedEvidence(f"RIM {what}: attribute {name!r} missing or oversized", step="rim")
    return value


def _rim_int(el: Any, name: str, what: str, hi: int) -> int:
    text = _rim_attr(el, name, what)
    if not text.isdigit() or not 0 <= int(text) <= hi:
        raise MalformedEvidence(f"RIM {what}: {name}={text!r} is not an integer 0..{hi}", step="rim")
    return int(text)


def verify_rim(xml: bytes, *, trust_anchors: Sequence[bytes], now: int) -> Rim:
    """(1) parse (no DTD, no entities, bounded); (2) the signing chain from the signature's X509Data to a
    trusted RIM root; (3) the enveloped XML signature by its leaf; (4) the golden measurements, read from the
    signed content only. Raises MalformedEvidence / CertificateChainInvalid / SignatureInvalid."""
    from lxml import etree
    from signxml.exceptions import InvalidInput
    from signxml.exceptions import InvalidSignature as XmlInvalidSignature
    from signxml.verifier import XMLVerifier

    # (1)
    if not isinstance(xml, bytes) or not 0 < len(xml) <= MAX_RIM_SIZE:
        raise MalformedEvidence(f"a RIM is 1..{MAX_RIM_SIZE} bytes of XML", step="rim")
    if b"<!DOCTYPE" in xml or b"<!ENTITY" in xml:
        raise MalformedEvidence("a RIM carries no DTD or entities", step="rim")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_comments=True)
    try:
        doc = etree.fromstring(xml, parser)
    except etree.XMLSyntaxError as exc:
        raise MalformedEvidence(f"RIM is not XML: {exc}", step="rim") from None
    if doc.tag != f"{{{RIM_NS}}}SoftwareIdentity":
        raise MalformedEvidence("RIM root element is not a 2015 SWID SoftwareIdentity", step="rim")
    # (2)
    pems = [
        "-----BEGIN CERTIFICATE-----\n" + "".join((c.text or "").split()) + "\n-----END CERTIFICATE-----\n"
        for c in doc.iterfind(
            f"{{{_DSIG_NS}}}Signature/{{{_DSIG_NS}}}KeyInfo/{{{_DSIG_NS}}}X509Data/"
            f"{{{_DSIG_NS}}}X509Certificate"
        )
    ]
    if not pems or len(pems) > 8:
        raise MalformedEvidence("RIM signature carries no (or too many) X509 certificates", step="rim")
    certs = _x509.load_certificates("".join(pems).encode(), what="RIM signing chain")
    leaf = _x509.pick_leaf(certs)
    chain = _x509.build_and_verify_chain(
        leaf, [c for c in certs if c is not leaf], trust_anchors, now=now, algorithms=_x509.ECDSA_SHA384
    )
    # (3)
    from cryptography.hazmat.primitives import serialization

    try:
        pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
        result = XMLVerifier().verify(xml, x509_cert=pem, parser=parser)
    except (XmlInvalidSignature, InvalidInput) as exc:
        raise SignatureInvalid(f"RIM XML signature does not verify: {exc}", step="rim") from None
    except Exception as exc:  # lxml's schema and c14n errors on a malformed signature: mapped here
        raise SignatureInvalid(f"RIM XML signature is malformed: {type(exc).__name__}", step="rim") from None
    signed = result.signed_xml if not isinstance(result, list) else None  # one signature, not several
    if signed is None or signed.tag != f"{{{RIM_NS}}}SoftwareIdentity":
        raise SignatureInvalid("the RIM signature does not cover the SoftwareIdentity", step="rim")
    # (4)
    meta = signed.find(f"{{{RIM_NS}}}Meta")
    payload = signed.find(f"{{{RIM_NS}}}Payload")
    if meta is None or payload is None:
        raise MalformedEvidence("RIM has no Meta or Payload", step="rim")
    golden: dict[int, GoldenMeasurement] = {}
    for res in payload:
        if res.tag != f"{{{RIM_NS}}}Resource" or res.get("type") != "Measurement":
            raise MalformedEvidence(
                "RIM Payload holds something other than Measurement resources", step="rim"
            )
        index = _rim_int(res, "index", "measurement", 255)
        n = _rim_int(res, "alternatives", f"measurement {index}", MAX_RIM_ALTERNATIVES)
        size = _rim_int(res, "size", f"measurement {index}", 64)
        active = _rim_attr(res, "active", f"measurement {index}")
        if active not in ("True", "False") or n < 1 or index in golden or len(golden) >= MAX_RIM_MEASUREMENTS:
            raise MalformedEvidence(
                f"RIM measurement {index}: bad active/alternatives or repeated", step="rim"
            )
        values = []
        for i in range(n):
            text = _rim_attr(res, f"{{{RIM_HASH_NS}}}Hash{i}", f"measurement {index}")
            try:
                value = bytes.fromhex(text)
            except ValueError:
                raise MalformedEvidence(f"RIM measurement {index}: Hash{i} is not hex", step="rim") from None
            if len(value) != size:
                raise MalformedEvidence(f"RIM measurement {index}: Hash{i} is not {size} bytes", step="rim")
            values.append(value)
        golden[index] = GoldenMeasurement(
            index, _rim_attr(res, "name", f"measurement {index}"), active == "True", size, tuple(values)
        )
    if not golden:
        raise MalformedEvidence("RIM lists no measurements", step="rim")
    return Rim(
        tag_id=_rim_attr(signed, "tagId", "SoftwareIdentity"),
        name=_rim_attr(signed, "name", "SoftwareIdentity"),
        version=_rim_attr(meta, "colloquialVersion", "Meta").lower(),
        measurements=tuple(golden[i] for i in sorted(golden)),
        signer=_x509.describe(chain.leaf.subject),
    )


def check_rim(m: SpdmMeasurements, rim: Rim) -> int:
    """The evidence is what `rim` allows: the RIM is for its driver or VBIOS version, and every active golden
    measurement is an evidence block with an allowed value. Returns how many were compared."""
    versions = {v.lower() for v in (m.driver_version, m.vbios_version) if v}
    if rim.version not in versions:
        raise PolicyViolation(
            f"RIM {rim.tag_id} is for version {rim.version}, the GPU reports {sorted(versions)}", step="rim"
        )
    blocks = {b.index: b.value for b in m.blocks}
    compared = 0
    for g in rim.measurements:
        if not g.active:
            continue
        value = blocks.get(g.index)
        if value is None:
            raise PolicyViolation(
                f"measurement {g.index} ({g.name}) of RIM {rim.tag_id} is absent", step="rim"
            )
        if not any(hmac.compare_digest(value, v) for v in g.values):
            raise PolicyViolation(
                f"measurement {g.index} ({g.name}) is {value.hex()[:16]}..., not a value RIM {rim.tag_id} "
                "allows (firmware or configuration other than the reference)",
                step="measurements",
            )
        compared += 1
    return compared


def verify_nvidia_evidence(
    evidence: bytes,
    *,
    cert_chain_pem: bytes,
    trust_anchors: Sequence[bytes],
    now: int,
    expected_nonce: bytes | None = None,
    revocation: Revocation | None = None,
    rims: Sequence[bytes] = (),
    rim_trust_anchors: Sequence[bytes] | None = None,
) -> VerifiedEvidence:
    """Verify GPU evidence signed by the leaf of `cert_chain_pem` (PEM, any order), chained to an anchor.
    `revocation`: OCSP responses from NVIDIA's OCSP service (or CRLs) for the device chain, checked
    offline; without them the result says "revocation not checked". `rims`: RIM XML documents (step 6),
    signed under `rim_trust_anchors` (default: `trust_anchors`); without them the measurements are reported,
    not judged."""
    steps: list[Step] = []
    # (1): parse
    m = parse_nvidia_evidence(evidence)
    steps.append(Step("parsed", True, f"SPDM 1.1 MEASUREMENTS with {len(m.blocks)} measurement blocks"))

    # (2): chain
    certs = _x509.load_certificates(cert_chain_pem, what="NVIDIA certificate chain")
    leaf = _x509.pick_leaf(certs)  # nvtrust writes leaf first; accept any order
    pool = [c for c in certs if c is not leaf]
    chain = _x509.build_and_verify_chain(leaf, pool, trust_anchors, now=now, algorithms=_x509.ECDSA_SHA384)
    steps.append(Step("cert_chain_verified", True, chain.summary()))
    revoked = check_revocation(chain.path, revocation or Revocation(), now=now)
    steps.append(Step("revocation", True, revoked.summary()))

    # (3): signature
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise CertificateChainInvalid("NVIDIA attestation certificate key is not ECDSA P-384")
    r = int.from_bytes(m.signature[:48], "big")
    s = int.from_bytes(m.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), m.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise SignatureInvalid(
            "SPDM MEASUREMENTS signature does not verify with the GPU attestation key"
        ) from exc
    steps.append(
        Step("quote_verified", True, "ECDSA P-384/SHA-384 SPDM signature by the GPU attestation key")
    )

    # (3b): the firmware the GPU reports (opaque FWID) must be the one its attestation certificate was issued
    # for. Matched as the DER of FWID{sha384, OCTET STRING(48)} inside the signed extension: the extension is
    # covered by the chain's signatures, and that byte pattern cannot arise across field boundaries.
    fwid = m.opaque(OPAQUE_FWID)
    fwid_checked = False
    if fwid is not None:
        try:
            dice = leaf.extensions.get_extension_for_oid(OID_DICE_TCB_INFO).value
        except x509.ExtensionNotFound:
            dice = None
        except (ValueError, TypeError) as exc:
            raise CertificateChainInvalid(
                f"NVIDIA attestation certificate extensions malformed ({exc})"
            ) from exc
        if isinstance(dice, x509.UnrecognizedExtension):
            if len(fwid) != 48 or _DER_SHA384_OID + b"\x04\x30" + fwid not in dice.value:
                raise CertificateChainInvalid(
                    "the GPU's reported FWID does not match the FWID in its attestation certificate "
                    "(evidence and certificate belong to different firmware)"
                )
            fwid_checked = True
            steps.append(Step("fwid_matched", True, "opaque FWID matches the certificate's DICE TcbInfo"))

    # (4): freshness
    if expected_nonce is not None:
        if not hmac.compare_digest(m.requester_nonce, bytes(expected_nonce)):
            raise PolicyViolation(
                f"nonce mismatch: the evidence answers nonce {m.requester_nonce.hex()}, "
                f"expected {bytes(expected_nonce).hex()} (stale or replayed evidence)",
                step="nonce",
            )
        steps.append(Step("nonce", True, "requester nonce matches the expected nonce"))

    # (6): reference measurements
    if len(rims) > MAX_RIMS:
        raise MalformedEvidence(f"at most {MAX_RIMS} RIMs", step="rim")
    rim_results: list[dict[str, Any]] = []
    for raw_rim in rims:
        rim = verify_rim(
            raw_rim, trust_anchors=trust_anchors if rim_trust_anchors is None else rim_trust_anchors, now=now
        )
        rim_results.append({"tag_id": rim.tag_id, "version": rim.version, "compared": check_rim(m, rim)})
    if rim_results:
        steps.append(
            Step(
                "rim_measurements",
                True,
                f"measurements match {len(rim_results)} RIM(s): "
                + ", ".join(str(r["tag_id"]) for r in rim_results),
            )
        )

    # (5): result
    serial = leaf.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    device_id = b""
    if serial and isinstance(serial[0].value, str):
        try:
            device_id = bytes.fromhex(serial[0].value)
        except ValueError:
            device_id = b""
    opaque_json = {
        OPAQUE_FIELD_NAMES.get(t, f"opaque_{t}"): v.hex()
        for t, v in m.opaque_fields
        if t not in (OPAQUE_DRIVER_VERSION, OPAQUE_VBIOS_VERSION)
    }
    fields: dict[str, Any] = {
        "spdm_version": f"{m.spdm_version >> 4}.{m.spdm_version & 0xF}",
        "nonce": m.requester_nonce.hex(),
        "responder_nonce": m.responder_nonce.hex(),
        "slot_id": m.slot_id,
        "measurement_operation": m.request_param2,
        "driver_version": m.driver_version,
        "vbios_version": m.vbios_version,
        "blocks": [b.to_json() for b in m.blocks],
        "opaque": opaque_json,
        "fwid_matched_certificate": fwid_checked,
        "leaf_subject": _x509.describe(leaf.subject),
        "revocation": revoked.to_json(),
        "rims": rim_results,  # empty: measurements not judged against a RIM
    }
    return VerifiedEvidence(
        tee=TeeKind.NVIDIA.value,
        tcb_status=TCB_STATUS,
        advisory_ids=(),
        measurements={f"measurement_{b.index}": b.value for b in m.blocks},
        report_data=m.requester_nonce,
        debug=False,
        device_id=device_id,
        fields=fields,
        steps=tuple(steps),
    )
