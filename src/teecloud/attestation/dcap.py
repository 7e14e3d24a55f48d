"""Intel DCAP quotes: TDX (quote v4 and v5) and SGX (quote v3), verified through dcap-qvl.

dcap-qvl checks the cryptography: the PCK certificate chain and CRLs up to the root, the collateral
(TCB info and QE identity) signatures and validity windows, the QE report, the quote signature, and the TCB
level. This module adds what dcap-qvl does not give:

- its own parse of the report body (TD report / SGX enclave report), so every field is named as Intel names
  it (Intel TDX DCAP Quoting Library API, appendix A.3 "Version 4 Quote Format" and A.4 "Version 5";
  Intel SGX ECDSA Quote Library API, section A.4 "Quote Format" for v3);
- the development-root rule (`DEV_ROOT_CN_PREFIX`): a quote whose PCK chain ends at a teecloud development
  root is never accepted as Intel evidence, and is accepted as *simulated* evidence only when the caller
  passes that very root;
- mapping dcap-qvl's errors (plain ValueError text) onto this package's error classes with reasons a user
  can act on.
"""

from __future__ import annotations

import binascii
import datetime as _dt
import functools
import hashlib
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from teecloud import _json
from teecloud.attestation import _tcb
from teecloud.attestation import dcap_layout as L
from teecloud.attestation._cache import BoundedCache, named_cache
from teecloud.attestation._limits import DEFAULT_LIMITS, VerifierLimits
from teecloud.attestation._pck import PckLeaf, canonical_pem, masked_tbs
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    CollateralMismatch,
    Expired,
    MalformedEvidence,
    PolicyViolation,
    SignatureInvalid,
    TcbNotAcceptable,
    UntrustedRoot,
    VerificationError,
)
from teecloud.attestation.models import Step, VerifiedEvidence

__all__ = [
    "DEV_ROOT_CN_PREFIX",
    "DEV_ROOT_REASON",
    "TCB_STATUS_ORDER",
    "is_development_chain",
    "looks_like_dcap_quote",
    "parse_quote",
    "pck_fmspc",
    "verify_dcap_quote",
]

DEV_ROOT_CN_PREFIX = "teecloud Development Root CA"
DEV_ROOT_REASON = "signed by a development root, not by Intel"
_DEV_ROOT_CN_BYTES = DEV_ROOT_CN_PREFIX.encode()

# Intel's TCB statuses, best first (Intel PCS API v4, "tcbStatus").
TCB_STATUS_ORDER: tuple[str, ...] = _tcb.TCB_STATUSES

_HEADER_SIZE = L.HEADER_SIZE
_TEE_TYPE_SGX = L.TEE_TYPE_SGX
_TEE_TYPE_TDX = L.TEE_TYPE_TDX
_TD_REPORT10_SIZE = L.TD_REPORT10_SIZE
_TD_REPORT15_SIZE = L.TD_REPORT15_SIZE
_SGX_REPORT_SIZE = L.SGX_REPORT_SIZE
_QE_REPORT_SIZE = L.QE_REPORT_SIZE
_CERT_TYPE_PCK_CHAIN = L.CERT_DATA_PCK_CHAIN
_TD_ATTR_DEBUG = L.TD_ATTR_DEBUG
_TD_ATTR_SEPT_VE_DISABLE = L.TD_ATTR_SEPT_VE_DISABLE
_SGX_ATTR_DEBUG = L.SGX_ATTR_DEBUG
_TD10_FIELDS = L.TD10_FIELDS
_TD_REPORT_DATA = L.TD_REPORT_DATA
_TD15_EXTRA = L.TD15_EXTRA
_SGX_FIELDS = L.SGX_FIELDS
_SGX_REPORT_DATA = L.SGX_REPORT_DATA
# Which report fields count as measurements (the rest go to `fields`).
_TD_MEASUREMENTS = (
    "mrtd",
    "rtmr0",
    "rtmr1",
    "rtmr2",
    "rtmr3",
    "mrseam",
    "mrsignerseam",
    "mr_config_id",
    "mr_owner",
    "mr_owner_config",
    "xfam",
    "td_attributes",
    "tee_tcb_svn",
)
_SGX_MEASUREMENTS = ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "attributes")


@dataclass(frozen=True)
class _Quote:
    """The parts of a DCAP quote this module reads itself."""

    version: int
    tee: str  # "tdx" | "sgx"
    body_type: str  # "td10" | "td15" | "td15ex" | "sgx"
    header: dict[str, Any]
    report: dict[str, bytes]
    report_data: bytes
    pck_chain_pem: bytes
    size: int
    body_start: int  # offset of the report body
    signed_end: int  # the attestation key signs quote[:signed_end] (header, v5 descriptor, body)
    qe_at: int  # offset of the QE report (384 bytes), then its signature (64), the auth data size (u16)
    auth_at: int  # offset of the QE auth data
    auth_len: int
    cert_at: int  # offset of the PEM chain (type 5), -1 without one
    cert_end: int


# ---------------------------------------------------------------------------------------------- parsing


def _need(data: bytes, pos: int, n: int, what: str) -> int:
    """Bounds check for a read of `n` bytes at `pos`; returns the end offset. Short -> MalformedEvidence."""
    end = pos + n
    if end > len(data):
        raise MalformedEvidence(
            f"quote is truncated: {what} needs {n} bytes at offset {pos}, only {max(0, len(data) - pos)} left"
        )
    return end


def _u16(data: bytes, pos: int, what: str) -> tuple[int, int]:
    end = _need(data, pos, 2, what)
    return _U16.unpack_from(data, pos)[0], end


def _u32(data: bytes, pos: int, what: str) -> tuple[int, int]:
    end = _need(data, pos, 4, what)
    return _U32.unpack_from(data, pos)[0], end


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<HHIHH16s20s")


def looks_like_dcap_quote(data: bytes) -> bool:
    """True when `data` starts with a DCAP quote header (v3 SGX, v4/v5 SGX or TDX, ECDSA attestation key)."""
    if len(data) < _HEADER_SIZE:
        return False
    version, key_type, tee_type = struct.unpack_from("<HHI", data, 0)
    if version == 3:
        return key_type in (2, 3)
    return version in (4, 5) and key_type in (2, 3) and tee_type in (_TEE_TYPE_SGX, _TEE_TYPE_TDX)


def _fields(body: bytes, layout: tuple[tuple[str, int, int], ...]) -> dict[str, bytes]:
    return {name: body[off : off + size] for name, off, size in layout}


def _parse(quote: bytes, limits: VerifierLimits = DEFAULT_LIMITS) -> _Quote:
    if not isinstance(quote, bytes | bytearray | memoryview):
        raise MalformedEvidence("quote must be bytes")
    quote = bytes(quote)
    if len(quote) > limits.max_quote_size:
        raise MalformedEvidence(f"quote is {len(quote)} bytes, over the {limits.max_quote_size}-byte limit")
    # (1) Header (48 bytes): version, attestation key type, TEE type (v4+; reserved in v3), QE/PCE SVN,
    # QE vendor ID, user data.
    _need(quote, 0, _HEADER_SIZE, "header")
    version, key_type, tee_type, qe_svn, pce_svn, qe_vendor_id, user_data = _HEADER.unpack_from(quote, 0)
    if version not in (3, 4, 5):
        raise MalformedEvidence(f"not a DCAP quote: unsupported quote version {version} (expected 3, 4 or 5)")
    if key_type not in (2, 3):
        raise MalformedEvidence(f"unsupported attestation key type {key_type} (expected 2 = ECDSA P-256)")
    if version == 3:
        tee_type = _TEE_TYPE_SGX  # v3 quotes are SGX only; the field is reserved
    if tee_type not in (_TEE_TYPE_SGX, _TEE_TYPE_TDX):
        raise MalformedEvidence(f"unknown TEE type 0x{tee_type:08x} in the quote header")
    header = {
        "version": version,
        "attestation_key_type": key_type,
        "tee_type": tee_type,
        "qe_svn": qe_svn,
        "pce_svn": pce_svn,
        "qe_vendor_id": qe_vendor_id.hex(),
        "user_data": user_data.hex(),
    }
    pos = _HEADER_SIZE
    # (2) Body: v3/v4 put the report right after the header; v5 first has a body descriptor (type, size).
    if version == 5:
        body_type_code, pos = _u16(quote, pos, "body.type")
        body_size, pos = _u32(quote, pos, "body.size")
        expected = {
            1: _SGX_REPORT_SIZE,
            2: _TD_REPORT10_SIZE,
            3: _TD_REPORT15_SIZE,
            4: L.TD_REPORT15EX_SIZE,
        }.get(body_type_code)
        if expected is None:
            raise MalformedEvidence(f"unknown quote v5 body type {body_type_code}")
        if body_size != expected:
            raise MalformedEvidence(
                f"quote v5 body type {body_type_code} has size {body_size}, not {expected}"
            )
        body_type = {1: "sgx", 2: "td10", 3: "td15", 4: "td15ex"}[body_type_code]
        if (body_type == "sgx") != (tee_type == _TEE_TYPE_SGX):
            raise MalformedEvidence("quote v5 body type does not match the header's TEE type")
    else:
        body_type = "sgx" if tee_type == _TEE_TYPE_SGX else "td10"
    size = {
        "sgx": _SGX_REPORT_SIZE,
        "td10": _TD_REPORT10_SIZE,
        "td15": _TD_REPORT15_SIZE,
        "td15ex": L.TD_REPORT15EX_SIZE,
    }[body_type]
    end = _need(quote, pos, size, f"{body_type} report body")
    body = quote[pos:end]
    pos = end
    if body_type == "sgx":
        report = _fields(body, _SGX_FIELDS)
        off, n = _SGX_REPORT_DATA
    else:
        report = _fields(body, _TD10_FIELDS)
        if body_type in ("td15", "td15ex"):
            report.update(_fields(body, _TD15_EXTRA))
        if body_type == "td15ex":
            report.update(_fields(body, L.TD15EX_EXTRA))
        off, n = _TD_REPORT_DATA
    report_data = body[off : off + n]
    # (3) Signature data: ECDSA signature (64), attestation key (64), then certification data; for v4/v5
    # that is type 6 (QE report certification data) wrapping type 5 (PCK chain, PEM); for v3 the QE report
    # (384), its signature (64) and the QE auth data come first and type 5 follows directly.
    sig_len, pos = _u32(quote, pos, "signature_data_len")
    sig_end = _need(quote, pos, sig_len, "signature data")
    sig = quote[:sig_end]  # reads below stay inside the signature data
    pos = _need(sig, pos, 128, "quote signature and attestation key")
    if version == 3:
        qe_at = pos
        pos = _need(sig, pos, _QE_REPORT_SIZE + 64, "QE report and signature")
        auth_len, pos = _u16(sig, pos, "QE auth data size")
        pos = _need(sig, pos, auth_len, "QE auth data")
        cert_type, pos = _u16(sig, pos, "certification data type")
        cert_len, pos = _u32(sig, pos, "certification data size")
        cert_end = _need(sig, pos, cert_len, "certification data")
    else:
        outer_type, pos = _u16(sig, pos, "certification data type")
        outer_len, pos = _u32(sig, pos, "certification data size")
        outer = quote[: _need(sig, pos, outer_len, "certification data")]
        # dcap-qvl 0.7 reads the outer type-6 structure without checking its type number; so do we.
        del outer_type
        qe_at = pos
        pos = _need(outer, pos, _QE_REPORT_SIZE + 64, "QE report and signature")
        auth_len, pos = _u16(outer, pos, "QE auth data size")
        pos = _need(outer, pos, auth_len, "QE auth data")
        cert_type, pos = _u16(outer, pos, "PCK certification data type")
        cert_len, pos = _u32(outer, pos, "PCK certification data size")
        cert_end = _need(outer, pos, cert_len, "PCK certification data")
    # Type 5 is the PEM chain; any other (an encrypted PPID) needs the chain from the collateral, which
    # dcap-qvl decides (it rejects the quote unless the collateral carries a pck_certificate_chain).
    cert = quote[pos:cert_end] if cert_type == _CERT_TYPE_PCK_CHAIN else b""
    auth_at = qe_at + _QE_REPORT_SIZE + 64 + 2
    return _Quote(
        version=version,
        tee="sgx" if tee_type == _TEE_TYPE_SGX else "tdx",
        body_type=body_type,
        header=header,
        report=report,
        report_data=report_data,
        pck_chain_pem=cert.rstrip(b"\x00"),
        size=len(quote),
        body_start=end - size,
        signed_end=end,
        qe_at=qe_at,
        auth_at=auth_at,
        auth_len=auth_len,
        cert_at=pos if cert_type == _CERT_TYPE_PCK_CHAIN else -1,
        cert_end=cert_end,
    )


def _debug(q: _Quote) -> bool:
    if q.tee == "sgx":
        return bool(q.report["attributes"][0] & _SGX_ATTR_DEBUG)
    return bool(int.from_bytes(q.report["td_attributes"], "little") & _TD_ATTR_DEBUG)


def parse_quote(quote: bytes, *, limits: VerifierLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse (without verifying) a DCAP quote into a dict: header fields, `tee` ("tdx"|"sgx"), `body_type`,
    `measurements` (name -> raw bytes), `report_data`, `debug` and `pck_chain_pem`.

    Raises MalformedEvidence. Nothing in the result is trustworthy until `verify_dcap_quote` accepts it.
    """
    q = _parse(quote, limits)
    names = _SGX_MEASUREMENTS if q.tee == "sgx" else _TD_MEASUREMENTS
    return {
        **q.header,
        "tee": q.tee,
        "body_type": q.body_type,
        "measurements": {n: q.report[n] for n in names},
        "report": dict(q.report),
        "report_data": q.report_data,
        "debug": _debug(q),
        "pck_chain_pem": q.pck_chain_pem,
    }


def pck_fmspc(quote: bytes) -> str:
    """The FMSPC (upper-case hex) from the PCK certificate inside the quote. Raises MalformedEvidence."""
    _parse(quote)
    try:
        return str(dcap_qvl.parse_quote(quote).fmspc()).upper()
    except Exception as exc:  # dcap-qvl raises ValueError on any undecodable input
        raise MalformedEvidence(
            f"cannot read the FMSPC from the PCK certificate: {_no_rust_debug(str(exc))}"
        ) from exc


def pck_ca(quote: bytes) -> str:
    """ "processor" or "platform": which Intel PCK CA issued the quote's PCK certificate."""
    _parse(quote)
    try:
        return str(dcap_qvl.parse_quote(quote).ca()).lower()
    except Exception as exc:
        raise MalformedEvidence(
            f"cannot read the PCK CA from the certificate chain: {_no_rust_debug(str(exc))}"
        ) from exc


# ------------------------------------------------------------------------------------------ collateral


@dataclass(frozen=True)
class _Collateral:
    obj: Any  # dcap_qvl.QuoteCollateralV3
    tcb_fmspc: str
    tcb_id: str
    tcb_next_update: str
    qe_id: str
    qe_next_update: str
    digest: bytes  # sha256 of the exact bytes: part of every verdict-cache key
    # The parsed documents (collateral, TCB info, QE identity), for what is needed from the second sight
    # of a platform on, computed then (a first sight costs dcap-qvl's check and the parse only).
    docs: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = field(repr=False, compare=False)

    @functools.cached_property
    def window(self) -> _Window | None:
        """See _collateral_window."""
        return _collateral_window(*self.docs)

    @functools.cached_property
    def pck_crl(self) -> x509.CertificateRevocationList | None:
        """For the platform-model path; None: not used."""
        return _pck_crl(self.docs[0])

    @functools.cached_property
    def rules(self) -> _tcb.TcbRules | None:
        """The TCB levels, for the platform-model path; None: not used."""
        return _tcb.parse_rules(self.docs[1], self.docs[2])


_COLLATERALS: BoundedCache[bytes, _Collateral] = named_cache("dcap.collateral")
_VERDICTS: BoundedCache[tuple[bytes, ...], _Verdict] = named_cache("dcap.verdicts")
_ATTESTATION_KEYS: BoundedCache[bytes, ec.EllipticCurvePublicKey] = named_cache("dcap.attestation_keys")


_COLLATERAL_FIELDS = (
    "pck_crl_issuer_chain, root_ca_crl, pck_crl, tcb_info_issuer_chain, tcb_info, tcb_info_signature, "
    "qe_identity_issuer_chain, qe_identity, qe_identity_signature"
)


def _load_collateral(data: bytes) -> _Collateral:
    # Cached by the exact bytes: parsing (JSON + hex + PEM) costs more than a quote signature check, and
    # the KMS sees the same collateral for every quote of a platform until nextUpdate.
    hit: _Collateral | None = _COLLATERALS.get(data)
    if hit is not None:
        return hit
    try:
        text = data.decode("utf-8")
        raw = _json.loads(text)
        if not isinstance(raw, dict):
            raise MalformedEvidence(
                f"collateral must be a QuoteCollateralV3 JSON object with the fields {_COLLATERAL_FIELDS}",
                step="collateral_ok",
            )
        missing = [k for k in ("tcb_info", "qe_identity") if not isinstance(raw.get(k), str)]
        if missing:
            raise MalformedEvidence(
                f"collateral has no {' and no '.join(missing)} field (a JSON string): QuoteCollateralV3 "
                f"JSON has the fields {_COLLATERAL_FIELDS}; fetch it again",
                step="collateral_ok",
            )
        tcb = _json.loads(raw["tcb_info"])
        qe = _json.loads(raw["qe_identity"])
        obj = dcap_qvl.QuoteCollateralV3.from_json(text)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise MalformedEvidence(
            f"collateral is not dcap-qvl QuoteCollateralV3 JSON: {_first_line(str(exc))}",
            step="collateral_ok",
        ) from exc
    if not isinstance(tcb, dict) or not isinstance(qe, dict):
        raise MalformedEvidence(
            "collateral tcb_info / qe_identity are not JSON objects", step="collateral_ok"
        )
    col = _Collateral(
        obj=obj,
        tcb_fmspc=str(tcb.get("fmspc", "")).upper(),
        tcb_id=str(tcb.get("id", "SGX")),
        tcb_next_update=str(tcb.get("nextUpdate", "?")),
        qe_id=str(qe.get("id", "?")),
        qe_next_update=str(qe.get("nextUpdate", "?")),
        digest=hashlib.sha256(data).digest(),
        docs=(raw, tcb, qe),
    )
    _COLLATERALS.put(data, col, 8 * len(data))  # the bytes, dcap-qvl's object, the parsed documents
    return col


def _pck_crl(raw: dict[str, Any]) -> x509.CertificateRevocationList | None:
    # Only when dcap-qvl takes the PCK chain from the quote (not from the collateral) and the CRL reads.
    if raw.get("pck_certificate_chain") is not None:
        return None
    try:
        crl = x509.load_der_x509_crl(bytes.fromhex(str(raw.get("pck_crl"))))
        _ = crl.issuer, list(crl)
    except Exception:  # lazily decoded: any error means "not used"
        return None
    return crl


def _collateral(collateral: bytes | str, limits: VerifierLimits) -> _Collateral:
    data = collateral.encode() if isinstance(collateral, str) else bytes(collateral)
    if len(data) > limits.max_collateral_size:
        raise MalformedEvidence(
            f"collateral is {len(data)} bytes, over the {limits.max_collateral_size}-byte limit",
            step="collateral_ok",
        )
    return _load_collateral(data)


# ---------------------------------------------------------------------------------- validity windows
#
# The verdict cache (see verify_dcap_quote) reuses dcap-qvl's verdict on a platform only at times when
# every time-dependent check dcap-qvl makes is certain to pass: strictly inside the intersection of every
# certificate's validity (each chain in the collateral and the quote), both CRLs' thisUpdate..nextUpdate
# and the TCB info's and QE identity's issueDate..nextUpdate. Anything we cannot read exactly (a PEM block
# that is not a certificate, a date we cannot parse) means "no window": never cached, dcap-qvl decides.

_Window = tuple[float, float]
_PEM_BEGIN = b"-----BEGIN "


def _intersect(a: _Window | None, b: _Window | None) -> _Window | None:
    if a is None or b is None:
        return None
    return max(a[0], b[0]), min(a[1], b[1])


_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"
_END_CERT = b"-----END CERTIFICATE-----"


def _pem_ders(pem: bytes) -> list[bytes] | None:
    """The DER of every PEM block of `pem`, or None unless every block is a CERTIFICATE block of strict
    base64 (no headers). Cheaper than cryptography's PEM loader by 30x, and strict on purpose: what it
    cannot read exactly, it does not read."""
    out: list[bytes] = []
    pos = 0
    while True:
        start = pem.find(_PEM_BEGIN, pos)
        if start < 0:
            return out
        if not pem.startswith(_BEGIN_CERT, start):
            return None
        end = pem.find(_END_CERT, start)
        if end < 0:
            return None
        try:
            body = b"".join(pem[start + len(_BEGIN_CERT) : end].split())
            out.append(binascii.a2b_base64(body, strict_mode=True))
        except binascii.Error:
            return None
        pos = end + len(_END_CERT)


def _certs_window(pem: bytes) -> _Window | None:
    """Intersection of the validity of every certificate in a PEM chain; None unless every PEM block
    of the text is a certificate that `cryptography` reads."""
    ders = _pem_ders(pem)
    if ders is None:
        return None
    window: _Window = (float("-inf"), float("inf"))
    try:
        for der in ders:
            c = x509.load_der_x509_certificate(der)
            lo, hi = c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp()
            window = max(window[0], lo), min(window[1], hi)
    except Exception:  # ValueError, InvalidVersion, OverflowError (names and dates are decoded lazily)
        return None
    return window


def _iso_window(doc: dict[str, Any]) -> _Window | None:
    try:
        lo = _dt.datetime.fromisoformat(str(doc["issueDate"]))
        hi = _dt.datetime.fromisoformat(str(doc["nextUpdate"]))
    except (KeyError, ValueError):
        return None
    if lo.tzinfo is None or hi.tzinfo is None:
        return None
    return lo.timestamp(), hi.timestamp()


def _crl_window(hex_der: object) -> _Window | None:
    try:
        crl = x509.load_der_x509_crl(bytes.fromhex(str(hex_der)))
        lo, nxt = crl.last_update_utc.timestamp(), crl.next_update_utc
    except Exception:  # ValueError, TypeError, InvalidVersion, OverflowError: no window
        return None
    return (lo, nxt.timestamp()) if nxt is not None else None


def _collateral_window(raw: dict[str, Any], tcb: dict[str, Any], qe: dict[str, Any]) -> _Window | None:
    window: _Window | None = _intersect(_iso_window(tcb), _iso_window(qe))
    for key in ("root_ca_crl", "pck_crl"):
        window = _intersect(window, _crl_window(raw.get(key)))
    for key in ("tcb_info_issuer_chain", "qe_identity_issuer_chain", "pck_crl_issuer_chain"):
        value = raw.get(key)
        if not isinstance(value, str):
            return None
        window = _intersect(window, _certs_window(value.encode()))
    extra = raw.get("pck_certificate_chain")
    if extra is not None:
        window = _intersect(window, _certs_window(str(extra).encode()))
    return window


# --------------------------------------------------------------------------------------- certificates


def _root_of_chain(chain_pem: bytes) -> tuple[str, str, bytes]:
    """(common name, RFC 4514 subject, DER) of the last certificate of a PEM chain (leaf -> root)."""
    start = chain_pem.rfind(_BEGIN_CERT)
    end = chain_pem.find(_END_CERT, start) if start >= 0 else -1
    if start < 0 or end < 0:
        return ("", "", b"")  # no readable root: not a development root; dcap-qvl judges the chain
    block = chain_pem[start:end]  # cached by the root's block: the same for every machine of a CA
    hit: tuple[str, str, bytes] | None = _PCK_ROOTS.get(block)
    if hit is not None:
        return hit
    der = b""
    try:
        der = binascii.a2b_base64(chain_pem[start + len(_BEGIN_CERT) : end])
        cert = x509.load_der_x509_certificate(der)
        # Decoding a name costs as much as the rest; only a root that could be a development root needs
        # it now (the subject of any other is read for an error message, if one is needed).
        cn = subject = ""
        if _DEV_ROOT_CN_BYTES in der:
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            cn = str(cns[0].value) if cns else ""
            subject = cert.subject.rfc4514_string()
        info = (cn, subject, der)
    except Exception:  # cryptography raises ValueError, and KeyError for unknown string tags
        info = ("", "", b"")
    _PCK_ROOTS.put(block, info, 2 * len(block) + len(der))
    return info


def _complete_blocks(pem: bytes) -> list[bytes]:
    """The DER of every complete CERTIFICATE block that decodes, the rest skipped: the blocks dcap-qvl's
    PEM reader could take (a truncated or garbled block must not hide the others)."""
    out: list[bytes] = []
    pos = 0
    while (start := pem.find(_BEGIN_CERT, pos)) >= 0:
        end = pem.find(_END_CERT, start)
        if end < 0:
            break
        try:
            out.append(binascii.a2b_base64(pem[start + len(_BEGIN_CERT) : end]))
        except binascii.Error:
            pass
        pos = end + len(_END_CERT)
    return out


def _issued_under(chain_pem: bytes, root_der: bytes) -> bool:
    """Whether a certificate of the chain names `root_der`'s subject as its issuer (and is not that root).
    Decides only which anchor dcap-qvl checks the chain against, so it reads every block it can."""
    try:
        root = x509.load_der_x509_certificate(root_der)
    except Exception:
        return False
    for der in _complete_blocks(chain_pem):
        try:
            cert = x509.load_der_x509_certificate(der)
            linked = cert.issuer == root.subject and cert.subject != root.subject
        except Exception:  # unreadable certificates are judged by dcap-qvl; here they link nothing
            linked = False
        if linked:
            return True
    return False


def is_development_chain(chain_pem: bytes) -> bool:
    """Whether a PCK chain ends at a teecloud development root (by its name; the signatures decide trust)."""
    return _root_of_chain(chain_pem)[0].startswith(DEV_ROOT_CN_PREFIX)


def _subject_of(der: bytes) -> str:
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except Exception:  # a display name only
        return "?"


_PCK_ROOTS: BoundedCache[bytes, tuple[str, str, bytes]] = named_cache("dcap.pck_chain")


def _anchor_window(der: bytes) -> _Window | None:
    try:
        cert = x509.load_der_x509_certificate(der)
        return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    except Exception:  # ValueError, InvalidVersion, OverflowError: no window
        return None


def _cert_cn(der: bytes) -> str:
    hit: str | None = _ANCHOR_NAMES.get(der)
    if hit is not None:
        return hit
    try:
        cns = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = str(cns[0].value) if cns else ""
    except Exception:  # a display name only; the certificate itself is checked by dcap-qvl
        name = ""
    _ANCHOR_NAMES.put(der, name, len(der) + 2 * len(name) + 64)
    return name


_ANCHOR_NAMES: BoundedCache[bytes, str] = named_cache("dcap.anchor_names")


def _fmspc_of_chain(quote: bytes) -> str:
    try:
        return str(dcap_qvl.parse_quote(quote).fmspc()).upper()
    except Exception as exc:  # dcap-qvl raises ValueError/RuntimeError on undecodable certificates
        raise MalformedEvidence(
            f"cannot read the FMSPC from the PCK certificate: {_no_rust_debug(str(exc))}"
        ) from exc


_FMSPCS: BoundedCache[bytes, str] = named_cache("dcap.fmspc")


def _chain_fmspc(chain_pem: bytes, quote: bytes) -> str:
    # The FMSPC is a property of the PCK certificate, so it is cached by the chain: decoding the
    # certificate costs about a tenth of a whole verification. The quote is passed only on a miss.
    cached: str | None = _FMSPCS.get(chain_pem)
    if cached is None:
        cached = _fmspc_of_chain(quote)
        _FMSPCS.put(chain_pem, cached, len(chain_pem) + 64)
    return cached


# --------------------------------------------------------------------------------- per-quote checks


def _verdict_key(q: _Quote, quote: bytes, col: _Collateral, anchor: bytes | None) -> tuple[bytes, ...]:
    """Everything dcap-qvl's verdict depends on except the time and the quote signature: the quote with
    the report fields dcap-qvl never reads (the measurements and report_data, covered only by the quote
    signature, which is checked on every hit) and the signature itself left out; the collateral's
    digest; the trust anchor (b"" = dcap-qvl's built-in Intel root)."""
    h = hashlib.sha256(quote[: q.body_start])
    body = quote[q.body_start : q.signed_end]
    for lo, hi in _KEPT[q.body_type]:
        h.update(body[lo:hi])
    sig = q.signed_end + 4
    h.update(quote[q.signed_end : sig])
    h.update(quote[sig + L.QUOTE_SIGNATURE_SIZE :])
    return (h.digest(), col.digest, anchor or b"")


def _kept_ranges(size: int, free: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    pos = 0
    for lo, hi in sorted(free):
        if lo > pos:
            out.append((pos, lo))
        pos = hi
    if pos < size:
        out.append((pos, size))
    return tuple(out)


# Report fields dcap-qvl 0.7 never reads (only its quote signature covers them): measurements and
# report_data. It reads tee_tcb_svn, mrsignerseam, seam_attributes and td_attributes (TCB level, module
# identity, attribute checks), mr_servicetd (TD 1.5) and the SGX attributes (debug); those stay in the key.
_FREE_TD = ((16, 64), (136, 584))  # mrseam; mrtd .. report_data
_FREE_SGX = ((64, 96), (128, 160), (256, 260), (320, 384))  # mr_enclave, mr_signer, isv ids, report_data
_KEPT = {
    "td10": _kept_ranges(L.TD_REPORT10_SIZE, _FREE_TD),
    "td15": _kept_ranges(L.TD_REPORT15_SIZE, _FREE_TD),
    # dcap-qvl 0.7 reads a TD 1.5ex report as a TD 1.5 one: the added fields only the signature covers
    "td15ex": _kept_ranges(L.TD_REPORT15EX_SIZE, (*_FREE_TD, (648, L.TD_REPORT15EX_SIZE))),
    "sgx": _kept_ranges(L.SGX_REPORT_SIZE, _FREE_SGX),
}


def _quote_signature_ok(q: _Quote, quote: bytes) -> bool:
    """The attestation key's ECDSA P-256 signature over header and body (what dcap-qvl's step 7 checks)."""
    sig = q.signed_end + 4
    raw_sig = quote[sig : sig + 64]
    raw_key = quote[sig + 64 : sig + 128]
    key = _ATTESTATION_KEYS.get(raw_key)
    try:
        if key is None:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw_key)
            _ATTESTATION_KEYS.put(raw_key, key, 64 + 256)
        der = encode_dss_signature(int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big"))
        key.verify(der, quote[: q.signed_end], _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        return False
    return True


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


_DCAP_REVOCATION: dict[str, Any] = {
    "checked": ["PCK chain and collateral signers: the root CA CRL and the PCK CRL (dcap-qvl)"],
    "not_checked": [],
    "complete": True,
}


@dataclass(frozen=True)
class _Verdict:
    """dcap-qvl's accepting verdict on a platform, reached at time `at`, reusable strictly inside
    `window`. The window is computed at the second sight (`None` until then): the first sight of a
    platform then costs no more than dcap-qvl's own check, plus parsing."""

    at: int
    window: _Window | None
    status: str
    advisories: tuple[str, ...]
    ppid: bytes


def _reusable(
    key: tuple[bytes, ...], q: _Quote, col: _Collateral, anchor: bytes | None, now: int
) -> _Verdict | None:
    cached: _Verdict | None = _VERDICTS.get(key)
    if cached is None:
        return None
    if cached.window is None:
        window = _intersect(col.window, _certs_window(q.pck_chain_pem))
        if anchor is not None:
            window = _intersect(window, _anchor_window(anchor))
        # Kept only when the time the verdict was reached at lies strictly inside the window: then every
        # time-dependent check dcap-qvl makes had the same outcome then as at any time it is reused. (The
        # key covers the chain and collateral bytes, so this window is that of the first sight's inputs.)
        if window is None or not window[0] < cached.at < window[1]:
            _VERDICTS.put(key, _Verdict(cached.at, (0.0, 0.0), "", (), b""), 128)  # never reusable
            return None
        cached = _Verdict(cached.at, window, cached.status, cached.advisories, cached.ppid)
        _VERDICTS.put(key, cached, 128 + len(cached.ppid))
    assert cached.window is not None
    return cached if cached.window[0] < now < cached.window[1] else None


# ------------------------------------------------------------------------------ platform model reuse
#
# A new machine of a platform model seen before (same collateral, anchor, CA chain, QE and certificate
# shape): its PCK certificate, QE report and quote are checked here -- the steps that depend on the machine
# -- and its TCB level is evaluated here (`_tcb`) against the collateral's TCB info and QE identity, which
# dcap-qvl has verified for the model's first machine. Exactly what makes a model is in `_machine`: the
# quote and the leaf certificate with only the per-machine bytes left out (attestation key and signature,
# QE report_data and signature, QE auth data, the leaf's serial, validity, key, key identifier and PPID) and
# the TCB values (the leaf's CPUSVN, PCESVN and component SVNs; TEE_TCB_SVN or the enclave's CPUSVN; the QE
# report's CPUSVN and ISVSVN; the TD's MRSIGNERSEAM and SEAMATTRIBUTES, checked against the TDX module
# identity; XFAM and the header's QE/PCE SVN, which dcap-qvl does not read). Everything else
# dcap-qvl's verdict depends on is in the key, and each left-out part is checked as dcap-qvl checks it
# (leaf signed by its CA, valid, not in the PCK CRL; QE report signed by the leaf; QE report_data =
# SHA-256(attestation key || auth data); the quote signature; the TCB level). A model is learned only when
# the TCB evaluation gave dcap-qvl's own verdict on the first machine; anything not read exactly, and
# every rejection, falls back to dcap-qvl.


@dataclass(frozen=True)
class _Model:
    at: int
    window: _Window
    issuer_key: ec.EllipticCurvePublicKey  # of the leaf's CA certificate, from the model's chain
    rules: _tcb.TcbRules


@dataclass(frozen=True)
class _Machine:
    key: tuple[bytes, ...]
    leaf_der: bytes
    leaf: PckLeaf
    rest: bytes  # the chain after the leaf

    @property
    def ppid(self) -> bytes:
        return self.leaf.ppid


_MODELS: BoundedCache[tuple[bytes, ...], _Model] = named_cache("dcap.models")

# TCB values left out of a model's key (offsets in the report body / QE report): TEE_TCB_SVN (and a TD
# 1.5's TEE_TCB_SVN2), MRSIGNERSEAM and SEAMATTRIBUTES (the module identity, checked by `_tcb`), XFAM
# (dcap-qvl 0.7 never reads it), or an enclave's CPUSVN; the QE's CPUSVN and ISVSVN.
_FREE_TD_TCB = ((0, 16), (64, 120), (128, 136))
_FREE_TCB = {
    "td10": _FREE_TD_TCB,
    "td15": (*_FREE_TD_TCB, (584, 600)),  # and TEE_TCB_SVN2
    "td15ex": (*_FREE_TD_TCB, (584, 600), (648, L.TD_REPORT15EX_SIZE)),  # and the fields dcap-qvl never reads
    "sgx": ((0, 16),),
}
_MODEL_KEPT = {
    name: _kept_ranges(size, free + _FREE_TCB[name])
    for name, size, free in (
        ("td10", L.TD_REPORT10_SIZE, _FREE_TD),
        ("td15", L.TD_REPORT15_SIZE, _FREE_TD),
        ("td15ex", L.TD_REPORT15EX_SIZE, _FREE_TD),
        ("sgx", L.SGX_REPORT_SIZE, _FREE_SGX),
    )
}
_QE_KEPT = _kept_ranges(320, ((0, 16), (258, 260)))  # the QE report but its report_data


def _machine(q: _Quote, quote: bytes, col: _Collateral, anchor: bytes | None) -> _Machine | None:
    if q.cert_at < 0 or col.pck_crl is None or col.rules is None or q.auth_len != L.QE_AUTH_DATA_SIZE:
        return None
    chain = quote[q.cert_at : q.cert_end]
    b0 = chain.find(_BEGIN_CERT)
    e0 = chain.find(_END_CERT, b0)
    if b0 < 0 or e0 < 0:
        return None
    e0 += len(_END_CERT)
    try:
        body = b"".join(chain[b0 + len(_BEGIN_CERT) : e0 - len(_END_CERT)].split())
        der = binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error:
        return None
    if chain[b0:e0] != canonical_pem(der):
        return None
    leaf = masked_tbs(der)
    if leaf is None:
        return None
    # Each part length-prefixed; the three length fields (signature data, type-6 and type-5 data) are left
    # out, as they change with the leaf's length; the positions they give are those dcap-qvl reads.
    sig = q.signed_end + 4
    body_bytes = quote[q.body_start : q.signed_end]
    qe_report = quote[q.qe_at : q.qe_at + 320]
    cert_type_at = q.auth_at + q.auth_len
    parts = [
        quote[:8] + quote[12 : q.body_start],  # header but QE/PCE SVN (and the v5 body descriptor)
        b"".join(body_bytes[lo:hi] for lo, hi in _MODEL_KEPT[q.body_type]),
        quote[sig + 128 : q.qe_at - 4] if q.qe_at > sig + 128 else b"",  # v4/v5: the type-6 type
        b"".join(qe_report[lo:hi] for lo, hi in _QE_KEPT),
        quote[q.auth_at - 2 : q.auth_at],  # QE auth data size (32)
        quote[cert_type_at : cert_type_at + 2],  # type 5
        chain[:b0],
        leaf.family,
        chain[e0:],
        quote[q.cert_end :],
    ]
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(4, "little") + part)
    return _Machine((h.digest(), col.digest, anchor or b""), der, leaf, chain[e0:])


def _tcb_status(q: _Quote, quote: bytes, m: _Machine, rules: _tcb.TcbRules) -> _tcb.Status | None:
    qe_isvsvn = int.from_bytes(quote[q.qe_at + 258 : q.qe_at + 260], "little")
    if q.tee == "sgx":
        return _tcb.evaluate(
            rules, tdx=False, cpu_svn=m.leaf.cpu_svn, pce_svn=m.leaf.pce_svn, qe_isvsvn=qe_isvsvn
        )
    return _tcb.evaluate(
        rules,
        tdx=True,
        cpu_svn=m.leaf.cpu_svn,
        pce_svn=m.leaf.pce_svn,
        qe_isvsvn=qe_isvsvn,
        tee_tcb_svn=q.report["tee_tcb_svn"],
        tee_tcb_svn2=q.report["tee_tcb_svn2"] if q.body_type in ("td15", "td15ex") else None,
        mr_signer_seam=q.report["mrsignerseam"],
        seam_attributes=q.report["seam_attributes"],
    )


@dataclass(frozen=True)
class _Candidate:
    """A machine dcap-qvl accepted, kept (bytes only) until a second machine with the same CA chain,
    collateral and anchor shows up; then its model is learned. `quote` None: learned already."""

    quote: bytes | None
    at: int
    status: str
    advisories: tuple[str, ...]
    ppid: bytes


_CANDIDATES: BoundedCache[tuple[bytes, ...], _Candidate] = named_cache("dcap.model_candidates")


def _candidate_key(
    q: _Quote, quote: bytes, col: _Collateral, anchor: bytes | None
) -> tuple[bytes, ...] | None:
    if q.cert_at < 0:
        return None
    chain = quote[q.cert_at : q.cert_end]
    end = chain.find(_END_CERT)
    if end < 0:
        return None
    return (hashlib.sha256(chain[end:]).digest(), col.digest, anchor or b"")


def _learn_candidate(c: _Candidate, pre: tuple[bytes, ...], col: _Collateral, anchor: bytes | None) -> None:
    assert c.quote is not None
    _CANDIDATES.put(pre, _Candidate(None, c.at, c.status, c.advisories, c.ppid), 256)
    try:
        q = _parse(c.quote)
    except VerificationError:
        return
    m = _machine(q, c.quote, col, anchor)
    if m is not None and m.ppid == c.ppid:
        _learn_model(q, c.quote, m, col, anchor, c.at, (c.status, c.advisories))


def _model_verdict(q: _Quote, quote: bytes, col: _Collateral, m: _Machine, now: int) -> _tcb.Status | None:
    """The TCB status and advisories dcap-qvl would give this machine of a known model, when it passes
    every machine-specific check; None otherwise (dcap-qvl decides)."""
    model = _MODELS.get(m.key)
    if model is None or not model.window[0] < now < model.window[1]:
        return None
    try:
        leaf = x509.load_der_x509_certificate(m.leaf_der)
        if not leaf.not_valid_before_utc.timestamp() < now < leaf.not_valid_after_utc.timestamp():
            return None
        assert col.pck_crl is not None
        if col.pck_crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
            return None
        # The issuer name and both signature algorithm fields (ecdsa-with-SHA256) are in the model's key.
        model.issuer_key.verify(leaf.signature, leaf.tbs_certificate_bytes, _ECDSA_SHA256)
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            return None
        qe_report = quote[q.qe_at : q.qe_at + _QE_REPORT_SIZE]
        raw = quote[q.qe_at + _QE_REPORT_SIZE : q.qe_at + _QE_REPORT_SIZE + 64]
        der_sig = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        key.verify(der_sig, qe_report, _ECDSA_SHA256)
    except Exception:  # unreadable, unsigned or forged: dcap-qvl gives the verdict and its reason
        return None
    sig = q.signed_end + 4
    att_key = quote[sig + 64 : sig + 128]
    auth = quote[q.auth_at : q.auth_at + q.auth_len]
    if hashlib.sha256(att_key + auth).digest() != quote[q.qe_at + 320 : q.qe_at + 352]:
        return None
    return _tcb_status(q, quote, m, model.rules)


def _learn_model(
    q: _Quote,
    quote: bytes,
    m: _Machine,
    col: _Collateral,
    anchor: bytes | None,
    now: int,
    verdict: _tcb.Status,
) -> None:
    """After dcap-qvl accepted this machine: remember its model, when every input reads exactly and the
    TCB evaluation gives dcap-qvl's verdict on it."""
    if _MODELS.get(m.key) is not None or col.rules is None:
        return
    if _tcb_status(q, quote, m, col.rules) != verdict:
        return
    try:
        leaf = x509.load_der_x509_certificate(m.leaf_der)
        cas = [x509.load_der_x509_certificate(d) for d in _pem_ders(m.rest) or []]
        if leaf.signature_algorithm_oid != x509.oid.SignatureAlgorithmOID.ECDSA_WITH_SHA256:
            return
        issuers = [c for c in cas if c.subject == leaf.issuer]
        assert col.pck_crl is not None
        if len(issuers) != 1 or col.pck_crl.issuer != leaf.issuer:
            return
        for c in cas:  # name constraints would apply to each leaf's own names: not a model property
            if any(e.oid == x509.oid.ExtensionOID.NAME_CONSTRAINTS for e in c.extensions):
                return
    except Exception:  # anything unreadable: no model
        return
    window = _intersect(col.window, _certs_window(m.rest))
    if anchor is not None:
        window = _intersect(window, _anchor_window(anchor))
    if window is None or not window[0] < now < window[1]:
        return
    key = issuers[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return
    _MODELS.put(m.key, _Model(now, window, key, col.rules), 1024 + len(m.rest))


# ------------------------------------------------------------------------------------ error mapping


@functools.lru_cache(maxsize=1024)
def _iso(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _humanize(msg: str) -> str:
    msg = msg.removeprefix("Verification failed: ")
    msg = re.sub(r"UnixTime\((\d+)\)", lambda m: _iso(int(m.group(1))), msg)
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


# rustls-webpki's error kinds, which dcap-qvl passes on in Rust's debug form (`CrlExpired { time: ..,
# next_update: .. }`, `UnknownIssuer`): what each means for a DCAP quote and what the user can do. The kind
# stays in the reason, in parentheses, for those who look it up.
_FETCH = "fetch current collateral (Intel PCS or a PCCS) or verify at a time inside its validity window"
_WEBPKI_KINDS: dict[str, tuple[type[VerificationError], str]] = {
    "CrlExpired": (
        Expired,
        "a certificate revocation list (CRL) of the collateral expired at {next_update}, before the "
        "verification time {time}: " + _FETCH,
    ),
    "CertExpired": (
        Expired,
        "a certificate of the PCK or collateral chain expired at {not_after}, before the verification "
        "time {time}: " + _FETCH,
    ),
    "CertNotValidYet": (
        Expired,
        "a certificate of the PCK or collateral chain is not yet valid: valid from {not_before}, after the "
        "verification time {time}; check the verification time and the clock",
    ),
    "CertRevoked": (
        CertificateChainInvalid,
        "a certificate of the PCK chain is on Intel's revocation list: the platform's key is withdrawn and "
        "its evidence cannot be accepted",
    ),
    "UnknownIssuer": (
        UntrustedRoot,
        "the certificate chain does not lead to the trusted root: the evidence is not signed under the "
        "expected Intel root (or the wrong root was configured)",
    ),
    "UnknownRevocationStatus": (
        CertificateChainInvalid,
        "no revocation list in the collateral covers a certificate of the chain: the collateral is "
        "incomplete; fetch it again",
    ),
    "BadDer": (
        MalformedEvidence,
        "a certificate or revocation list is not valid DER: the quote or the collateral is damaged",
    ),
    "BadDerTime": (
        MalformedEvidence,
        "a certificate or revocation list carries an unreadable date: the quote or the collateral is damaged",
    ),
    "TrailingData": (
        MalformedEvidence,
        "a certificate or revocation list has bytes after its end: the quote or the collateral is damaged",
    ),
    "InvalidSignatureForPublicKey": (
        CertificateChainInvalid,
        "a certificate's signature does not verify with its issuer's key: the chain is damaged or forged",
    ),
    "InvalidCrlSignatureForPublicKey": (
        CertificateChainInvalid,
        "a revocation list's signature does not verify with its issuer's key: the collateral is damaged "
        "or forged; fetch it again",
    ),
    "IssuerNotCrlSigner": (
        CertificateChainInvalid,
        "a revocation list is signed by a certificate not allowed to sign CRLs: the collateral is not "
        "Intel's; fetch it again",
    ),
    "CaUsedAsEndEntity": (
        CertificateChainInvalid,
        "the chain's first certificate is a CA certificate, not a PCK certificate",
    ),
    "EndEntityUsedAsCa": (
        CertificateChainInvalid,
        "a leaf certificate is used as a CA in the chain: the chain is not Intel's",
    ),
    "PathLenConstraintViolated": (
        CertificateChainInvalid,
        "the chain is longer than its CA certificates allow: the chain is not Intel's",
    ),
    "RequiredEkuNotFound": (
        CertificateChainInvalid,
        "a certificate lacks the extended key usage its place in the chain needs",
    ),
    "UnsupportedSignatureAlgorithm": (
        CertificateChainInvalid,
        "a certificate uses a signature algorithm Intel's chains do not use",
    ),
    "UnsupportedCriticalExtension": (
        CertificateChainInvalid,
        "a certificate has a critical extension no Intel certificate has",
    ),
    "UnsupportedCrlVersion": (
        MalformedEvidence,
        "a revocation list has an unsupported version: the collateral is damaged",
    ),
    "UnsupportedDeltaCrl": (
        MalformedEvidence,
        "the collateral holds a delta CRL, which Intel does not publish: the collateral is not Intel's",
    ),
    "MaximumPathDepthExceeded": (
        CertificateChainInvalid,
        "the certificate chain is too deep to be an Intel chain",
    ),
}
_WEBPKI_KIND_RE = re.compile(
    r"\b(" + "|".join(sorted(_WEBPKI_KINDS, key=len, reverse=True)) + r")"
    r"(?:Context)?\b(?:\s*\{([^{}]*)\}|\(([^()]*)\))?"
)
# Any other Rust debug value left in a message: `Name { a: 1, b: 2 }` -> `Name (a 1, b 2)`.
_RUST_DEBUG_RE = re.compile(r"\b([A-Z]\w*)\s*\{([^{}]*)\}")


def _debug_fields(body: str) -> dict[str, str]:
    return {k: v.strip() for k, v in re.findall(r"(\w+):\s*([^,]+)", body)}


def _webpki_reason(text: str) -> tuple[type[VerificationError], str] | None:
    """A known webpki error kind in dcap-qvl's text -> (error class, sentence ending in "(Kind)")."""
    m = _WEBPKI_KIND_RE.search(text)
    if m is None:
        return None
    kind = m.group(1)
    cls, template = _WEBPKI_KINDS[kind]
    fields = _debug_fields(m.group(2) or "")
    keys = re.findall(r"\{(\w+)\}", template)
    values = {k: fields.get(k, "an unknown time") for k in keys}
    return cls, f"{template.format(**values)} ({kind})"


def _no_rust_debug(text: str) -> str:
    """Rewrite Rust debug structs that no rule named into plain words (kept for experts)."""
    return _RUST_DEBUG_RE.sub(
        lambda m: f"{m.group(1)} ({', '.join(f'{k} {v}' for k, v in _debug_fields(m.group(2)).items())})",
        text,
    )


def _map_error(exc: Exception, *, now: int, col: _Collateral, root_subject: str) -> VerificationError:
    """Turn dcap-qvl's ValueError text into one of our error classes: a sentence a user can act on, with
    dcap-qvl's own words (or webpki's error kind) kept in parentheses."""
    text = _no_rust_debug(_humanize(str(exc)))
    low = text.lower()
    at = _iso(now)
    known = _webpki_reason(_humanize(str(exc)))
    if known is not None:
        cls, sentence = known
        if cls is UntrustedRoot:
            sentence = f"the PCK certificate chain ends at {root_subject!r}: {sentence}"
        return cls(sentence)
    for doc, name in (("tcb_info", "TCB info"), ("qe_identity", "QE identity")):
        if f"invalid for {doc}" in low:
            return SignatureInvalid(
                f"the collateral's {name} signature does not verify with its issuer certificate: the "
                f"collateral is damaged or altered; fetch it again ({text})",
                step="collateral_ok",
            )
    if "failed to decode quote" in low or "failed to parse quote" in low:
        return MalformedEvidence(f"quote is malformed: {text}")
    if "debug mode is enabled" in low:
        # dcap-qvl 0.7 refuses debug TDs / enclaves before TCB evaluation; no policy can accept them.
        return PolicyViolation(
            "debug TEE: the TD / enclave runs in debug mode, so the host can read its memory "
            "(refused by dcap-qvl regardless of policy)",
            step="policy:debug",
        )
    if "unknown qe vendor" in low:
        return MalformedEvidence(f"quote header names an unknown QE vendor: {text}")
    if "fmspc mismatch" in low:
        return CollateralMismatch(
            f"collateral is for another platform: its TCB info is for FMSPC {col.tcb_fmspc}, "
            "not the FMSPC in the quote's PCK certificate"
        )
    if "unsupported qe identity" in low or ("tcb" in low and "id" in low and "unsupported" in low):
        return CollateralMismatch(f"collateral is for another TEE kind: {text}")
    if "tcbinfo expired" in low or "tcb info expired" in low:
        return Expired(f"TCB info expired: its nextUpdate {col.tcb_next_update} is before {at} ({text})")
    if "qe identity expired" in low or "qeidentity expired" in low:
        return Expired(f"QE identity expired: its nextUpdate {col.qe_next_update} is before {at} ({text})")
    if "crlexpired" in low or "crl expired" in low:
        return Expired(f"a certificate revocation list expired: {text}")
    if "expired" in low:
        return Expired(f"collateral or certificate expired at {at}: {text}")
    if "notvalidyet" in low or "not valid yet" in low or "in the future" in low:
        return Expired(f"collateral or certificate is not yet valid at {at}: {text}")
    if "no matching tcb level" in low:
        return TcbNotAcceptable(
            "TCB evaluation failed: No matching TCB level found (the platform's TCB is not listed in the "
            "collateral's TCB info; update the platform or fetch newer collateral)"
        )
    if "revoked" in low:
        return CertificateChainInvalid(f"a certificate in the PCK chain is revoked: {text}")
    if "unknownissuer" in low or "unknown issuer" in low:
        return UntrustedRoot(
            f"the PCK certificate chain ends at {root_subject!r}, "
            f"which is not the trusted Intel root ({text})"
        )
    if "cert" in low or "crl" in low or "chain" in low or "issuer" in low or "eku" in low:
        return CertificateChainInvalid(
            f"PCK certificate chain (root {root_subject!r}) does not verify: {text}"
        )
    if "signature" in low or "hash mismatch" in low:
        return SignatureInvalid(f"quote signature does not verify: {text}")
    return VerificationError(f"quote verification failed: {text}")


# -------------------------------------------------------------------------------------- verification


def verify_dcap_quote(
    quote: bytes,
    collateral: bytes | str,
    *,
    now: int,
    dev_root_der: bytes | None = None,
    intel_root_der: bytes | None = None,
    limits: VerifierLimits = DEFAULT_LIMITS,
) -> VerifiedEvidence:
    """Verify a TDX (v4/v5) or SGX (v3) quote against QuoteCollateralV3 JSON at unix time `now`.

    `intel_root_der` replaces dcap-qvl's built-in Intel SGX Root CA when given. `dev_root_der` is the one
    teecloud development root the caller trusts (the simulated TEE's); quotes under it come back with
    tee "<kind>-simulated" and simulated=True. Raises a VerificationError subclass.

    Steps:
      (1) parse the quote (header, report body, certification data) within the size limits;
      (2) parse the collateral (cached by its bytes);
      (3) the collateral is for the quote's TEE kind (and, when dcap-qvl rejects, for its FMSPC: a
          mismatch is named as such);
      (4) pick the root: `dev_root_der` when given and the chain is under it, else Intel's (a development
          chain that fails against Intel's root is reported as "signed by a development root");
      (5) dcap-qvl: PCK chain + CRLs, collateral signatures and validity at `now`, QE report, quote
          signature, TCB level -- or its earlier accepting verdict on the same platform bytes, collateral
          and anchor, when `now` is strictly inside every validity window it depended on, after this
          quote's own signature verifies (dcap-qvl's step 7);
      (6) a Revoked TCB is never acceptable;
      (7) build the VerifiedEvidence (device_id = sha256(PPID), as dstack does).
    """
    if isinstance(now, bool) or not isinstance(now, int):
        raise TypeError("now must be an int (unix seconds)")
    # (1): parse.
    q = _parse(quote, limits)
    quote = bytes(quote)
    kind_name = "TDX" if q.tee == "tdx" else "SGX"
    steps = [Step("parsed", True, f"{kind_name} quote v{q.version} ({q.body_type} report), {q.size} bytes")]
    # (2): collateral.
    col = _collateral(collateral, limits)
    # (3): collateral must be for this kind of TEE (dcap-qvl checks it too, later; this names it).
    if (col.tcb_id == "TDX") != (q.tee == "tdx"):
        raise CollateralMismatch(f"collateral is for {col.tcb_id}, the quote is {kind_name}")
    # (4): choose the root. The development root only when the caller trusts it and the chain is under it
    # (its root copy, or a certificate issued in that root's name: webpki ignores the copy); else Intel's.
    root_cn, root_subject, root_der = _root_of_chain(q.pck_chain_pem)
    dev_chain = root_cn.startswith(DEV_ROOT_CN_PREFIX)
    dev = bytes(dev_root_der) if dev_root_der is not None else None
    simulated = dev is not None and (root_der == dev or _issued_under(q.pck_chain_pem, dev))
    anchor: bytes | None
    if simulated:
        anchor = dev
        anchor_name = _cert_cn(dev) if dev is not None else ""
    else:
        anchor = bytes(intel_root_der) if intel_root_der is not None else None
        anchor_name = _cert_cn(anchor) if anchor is not None else "Intel SGX Root CA (built into dcap-qvl)"
    # (5): dcap-qvl does the cryptography and the TCB evaluation, or its verdict on this very platform
    # (same bytes but for the measurements, same collateral and anchor) is reused at a time inside the
    # verdict's window, after checking this quote's own signature.
    key = _verdict_key(q, quote, col, anchor)
    cached = _reusable(key, q, col, anchor, now)
    # The model path only runs where a machine with the same CA chain, collateral and anchor was accepted
    # before (`_CANDIDATES`): the first machine of a model costs dcap-qvl's check and nothing more.
    pre = _candidate_key(q, quote, col, anchor) if cached is None else None
    candidate = _CANDIDATES.get(pre) if pre is not None else None
    machine = model = None
    if candidate is not None and pre is not None:
        machine = _machine(q, quote, col, anchor)
        if machine is not None:
            if candidate.quote is not None:
                _learn_candidate(candidate, pre, col, anchor)
            model = _model_verdict(q, quote, col, machine, now)
    if cached is not None and _quote_signature_ok(q, quote):
        status, advisories, ppid = cached.status, cached.advisories, cached.ppid
    elif machine is not None and model is not None and _quote_signature_ok(q, quote):
        # A new machine of a known model: its own checks passed; its TCB level evaluated as dcap-qvl does.
        (status, advisories), ppid = model, machine.ppid
        _VERDICTS.put(key, _Verdict(now, None, status, advisories, ppid), 128 + len(ppid))
    else:
        try:
            if anchor is None:
                report = dcap_qvl.verify(quote, col.obj, now)
            else:
                report = dcap_qvl.verify_with_root_ca(quote, col.obj, anchor, now)
        except (ValueError, RuntimeError) as exc:
            if dev_chain and not simulated:  # a development chain can only fail against Intel's root
                detail = ""
                if dev is not None:
                    detail = (
                        f" (its root {root_subject!r} is not the trusted development root {_cert_cn(dev)!r})"
                    )
                raise UntrustedRoot(DEV_ROOT_REASON + detail) from exc
            # Collateral for another platform (FMSPC) is named as such, whichever check of dcap-qvl's
            # failed first (it compares FMSPCs last, after every signature and date).
            fmspc = _chain_fmspc(q.pck_chain_pem, quote)
            if col.tcb_fmspc != fmspc:
                raise CollateralMismatch(
                    f"collateral is for another platform: its TCB info is for FMSPC {col.tcb_fmspc}, "
                    f"the quote's PCK certificate says FMSPC {fmspc}"
                ) from exc
            subject = root_subject or _subject_of(root_der)
            raise _map_error(exc, now=now, col=col, root_subject=subject) from exc
        status = str(report.status)
        advisories = tuple(str(a) for a in report.advisory_ids)
        ppid = bytes(report.ppid or b"")
        if _VERDICTS.get(key) is None:
            _VERDICTS.put(key, _Verdict(now, None, status, advisories, ppid), 128 + len(ppid))
        if machine is not None and ppid == machine.ppid:
            _learn_model(q, quote, machine, col, anchor, now, (status, advisories))
        elif pre is not None and candidate is None:
            _CANDIDATES.put(pre, _Candidate(quote, now, status, advisories, ppid), 256 + len(quote))
    # (6): Revoked means Intel withdrew the platform's keys; no policy may accept it.
    if status == "Revoked":
        raise TcbNotAcceptable("TCB status is Revoked: Intel has revoked this platform's TCB")
    steps += [
        Step(
            "quote_verified", True, "quote signed by the QE attestation key; QE report signed by the PCK key"
        ),
        Step("cert_chain_verified", True, f"PCK certificate chain and CRLs verify to {anchor_name}"),
        Step(
            "collateral_ok",
            True,
            f"TCB info ({col.tcb_id}, FMSPC {col.tcb_fmspc}, next update {col.tcb_next_update}) and QE "
            f"identity ({col.qe_id}, next update {col.qe_next_update}) signed and valid at {_iso(now)}",
        ),
        Step(
            "tcb_ok",
            True,
            f"TCB status {status}"
            + (f", advisories {', '.join(advisories)}" if advisories else ", no advisories"),
        ),
    ]
    # (7): the typed result.
    names = _SGX_MEASUREMENTS if q.tee == "sgx" else _TD_MEASUREMENTS
    measurements = {n: q.report[n] for n in names}
    fields: dict[str, Any] = {
        "quote_version": q.version,
        "body_type": q.body_type,
        "qe_svn": q.header["qe_svn"],
        "pce_svn": q.header["pce_svn"],
        "qe_vendor_id": q.header["qe_vendor_id"],
        "fmspc": col.tcb_fmspc,
        "root_ca": anchor_name,
        # dcap-qvl checks the whole PCK chain and the collateral's signers against both CRLs, always
        "revocation": {k: list(v) if isinstance(v, list) else v for k, v in _DCAP_REVOCATION.items()},
    }
    for name, value in q.report.items():
        if name not in measurements:
            fields[name] = value.hex()
    if q.tee == "sgx":
        fields["isv_prod_id"] = int.from_bytes(q.report["isv_prod_id"], "little")
        fields["isv_svn"] = int.from_bytes(q.report["isv_svn"], "little")
    else:
        td_attr = int.from_bytes(q.report["td_attributes"], "little")
        fields["sept_ve_disable"] = bool(td_attr & _TD_ATTR_SEPT_VE_DISABLE)
    return VerifiedEvidence(
        tee=q.tee + ("-simulated" if simulated else ""),
        tcb_status=status,
        advisory_ids=advisories,
        measurements=measurements,
        report_data=q.report_data,
        debug=_debug(q),
        simulated=simulated,
        device_id=hashlib.sha256(ppid).digest() if ppid else b"",
        fields=fields,
        steps=tuple(steps),
    )
