"""Exact byte-level reading of a PCK leaf certificate, for reusing dcap-qvl's verdict across machines of one
platform model (private; see dcap.verify_dcap_quote).

Two PCK certificates of one platform family differ only in per-machine fields -- serial number, validity,
public key, subject key identifier, the CA's signature, the PPID inside Intel's SGX extension (OID
1.2.840.113741.1.13.1; Intel "SGX PCK Certificate and CRL Profile") -- and in the values of that
extension's TCB entry (the 16 component SVNs, PCESVN, CPUSVN). `masked_tbs` zeroes exactly those (the
lengths and tags stay), so two leaves with the same masked form have the same issuer, names, every other
extension (key usage, EKU, basic constraints, CRL distribution points), the same PCEID, FMSPC and SGX type,
and the same DER shape. It returns the TCB values as dcap-qvl 0.7 reads them (the first CPUSVN and PCESVN
entry of the TCB sequence; PCESVN one byte, or two big-endian), for the caller to evaluate against the TCB
info. A strict DER walk (definite lengths, known tags): anything it cannot read exactly is None, and
dcap-qvl then decides.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

__all__ = ["PckLeaf", "canonical_pem", "masked_tbs"]

_OID_SKI = bytes.fromhex("0603551d0e")
_OID_SGX = bytes.fromhex("06092a864886f84d010d01")
_OID_PPID = bytes.fromhex("060a2a864886f84d010d0101")
_OID_TCB = bytes.fromhex("060a2a864886f84d010d0102")
_OID_PCESVN = bytes.fromhex("060b2a864886f84d010d010211")
_OID_CPUSVN = bytes.fromhex("060b2a864886f84d010d010212")


@dataclass(frozen=True)
class PckLeaf:
    """What `masked_tbs` reads from a PCK leaf."""

    family: bytes  # SHA-256 of the masked TBS certificate and the signature algorithm
    ppid: bytes
    cpu_svn: bytes  # 16 bytes
    pce_svn: int


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the TLV at `pos`; ValueError unless it fits before `end`."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 3 or pos + n > end:
            raise ValueError("bad length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise ValueError("overrun")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, TLV start, content start, content end) of each TLV in data[start:end], exactly covering it."""
    out: list[tuple[int, int, int, int]] = []
    pos = start
    while pos < end:
        tag, cs, ce = _tlv(data, pos, end)
        out.append((tag, pos, cs, ce))
        pos = ce
    return out


def masked_tbs(der: bytes) -> PckLeaf | None:
    """The leaf's family digest (its TBS certificate with the per-machine fields and TCB values zeroed,
    and its signature algorithm), PPID and TCB values; or None."""
    try:
        tag, cs, ce = _tlv(der, 0, len(der))
        if tag != 0x30 or ce != len(der):
            return None
        parts = _children(der, cs, ce)
        if len(parts) != 3 or parts[0][0] != 0x30:
            return None
        _, _, tbs_s, tbs_e = parts[0]
        fields = _children(der, tbs_s, tbs_e)
        masked = bytearray(der)
        i = 1 if fields and fields[0][0] == 0xA0 else 0
        # serial, signature, issuer, validity, subject, subjectPublicKeyInfo
        want = (0x02, 0x30, 0x30, 0x30, 0x30, 0x30)
        if len(fields) < i + 6 or tuple(f[0] for f in fields[i : i + 6]) != want:
            return None
        for index in (i, i + 3, i + 5):  # serial, validity, key
            _, _, s, e = fields[index]
            masked[s:e] = bytes(e - s)
        sgx: tuple[bytes, bytes, int] | None = None
        for tag, _, s, e in fields[i + 6 :]:
            if tag in (0x81, 0x82):  # issuer / subject unique IDs: kept as they are
                continue
            if tag != 0xA3:
                return None
            (seq,) = _children(der, s, e)
            if seq[0] != 0x30:
                return None
            for etag, _, es, ee in _children(der, seq[2], seq[3]):
                items = _children(der, es, ee) if etag == 0x30 else []
                if not 2 <= len(items) <= 3 or items[0][0] != 0x06 or items[-1][0] != 0x04:
                    return None
                oid = der[items[0][1] : items[0][3]]
                _, _, vs, ve = items[-1]
                if oid == _OID_SKI:
                    masked[vs:ve] = bytes(ve - vs)
                elif oid == _OID_SGX:
                    if sgx is not None:
                        return None
                    sgx = _mask_sgx(der, masked, vs, ve)
                    if sgx is None:
                        return None
        if sgx is None:
            return None
        # The TBS (masked) and the signature algorithm; not the signature (its length varies by a byte or
        # two with ECDSA, and with it the lengths of the whole certificate).
        alg = der[parts[1][1] : parts[1][3]]
        family = hashlib.sha256(bytes(masked[parts[0][1] : tbs_e]) + alg).digest()
        return PckLeaf(family, *sgx)
    except ValueError:
        return None


def _pairs(der: bytes, start: int, end: int) -> list[tuple[bytes, tuple[int, int, int, int]]] | None:
    """(OID TLV, value TLV) of each SEQUENCE { OID, value } in the SEQUENCE at der[start:end]."""
    (seq,) = _children(der, start, end)
    if seq[0] != 0x30:
        return None
    out = []
    for tag, _, s, e in _children(der, seq[2], seq[3]):
        if tag != 0x30:
            return None
        items = _children(der, s, e)
        if len(items) != 2 or items[0][0] != 0x06:
            return None
        out.append((der[items[0][1] : items[0][3]], items[1]))
    return out


def _mask_sgx(der: bytes, masked: bytearray, start: int, end: int) -> tuple[bytes, bytes, int] | None:
    """(PPID, CPUSVN, PCESVN) from Intel's SGX extension, zeroing the PPID and every TCB value."""
    pairs = _pairs(der, start, end)
    if pairs is None:
        return None
    ppid = tcb = None
    for oid, (tag, tlv, vs, ve) in pairs:
        if oid == _OID_PPID:
            if tag != 0x04 or ppid is not None:
                return None
            ppid = der[vs:ve]
            masked[vs:ve] = bytes(ve - vs)
        elif oid == _OID_TCB:
            if tcb is not None:
                return None
            tcb = _mask_tcb(der, masked, tlv, ve)
            if tcb is None:
                return None
    if ppid is None or tcb is None:
        return None
    return ppid, tcb[0], tcb[1]


def _mask_tcb(der: bytes, masked: bytearray, start: int, end: int) -> tuple[bytes, int] | None:
    pairs = _pairs(der, start, end)
    if pairs is None:
        return None
    cpu_svn: bytes | None = None
    pce_svn: int | None = None
    for oid, (tag, _, vs, ve) in pairs:
        value = der[vs:ve]
        if oid == _OID_CPUSVN and cpu_svn is None:  # dcap-qvl takes the first of each
            if tag != 0x04 or len(value) != 16:
                return None
            cpu_svn = value
        elif oid == _OID_PCESVN and pce_svn is None:
            if tag != 0x02 or len(value) not in (1, 2):
                return None
            pce_svn = int.from_bytes(value, "big")
        masked[vs:ve] = bytes(ve - vs)
    if cpu_svn is None or pce_svn is None:
        return None
    return cpu_svn, pce_svn


def canonical_pem(der: bytes) -> bytes:
    """The PEM block as Intel's QE and OpenSSL write it: 64-character lines, LF line ends."""
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----"
