"""Exact byte-level reading of a PCK leaf certificate, for reusing dcap-qvl's verdict across machines of one
platform model (private; see dcap.verify_dcap_quote).

Two PCK certificates of the same model differ only in per-machine fields: serial number, validity, public
key, subject key identifier, the CA's signature, and the PPID inside Intel's SGX extension (OID
1.2.840.113741.1.13.1; Intel "SGX PCK Certificate and CRL Profile"). `masked_tbs` zeroes exactly those, so
two leaves with the same masked form have the same issuer, names, every other extension (key usage, EKU,
basic constraints, CRL distribution points) and the same TCB fields (CPUSVN, PCESVN, PCEID, FMSPC, SGX
type). A strict DER walk (definite lengths, known tags): anything it cannot read exactly is None, and
dcap-qvl then decides.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["canonical_pem", "masked_tbs"]

_OID_SKI = bytes.fromhex("0603551d0e")
_OID_SGX = bytes.fromhex("06092a864886f84d010d01")
_OID_PPID = bytes.fromhex("060a2a864886f84d010d0101")


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


def masked_tbs(der: bytes) -> tuple[bytes, bytes] | None:
    """(SHA-256 of the TBS certificate with its per-machine fields zeroed and of the signature algorithm,
    the PPID) or None."""
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
        ppid: bytes | None = None
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
                    ppid = _mask_ppid(der, masked, vs, ve)
                    if ppid is None:
                        return None
        if ppid is None:
            return None
        # The TBS (masked) and the signature algorithm; not the signature (its length varies by a byte or
        # two with ECDSA, and with it the lengths of the whole certificate).
        alg = der[parts[1][1] : parts[1][3]]
        return hashlib.sha256(bytes(masked[parts[0][1] : tbs_e]) + alg).digest(), ppid
    except ValueError:
        return None


def _mask_ppid(der: bytes, masked: bytearray, start: int, end: int) -> bytes | None:
    (seq,) = _children(der, start, end)
    if seq[0] != 0x30:
        return None
    ppid: bytes | None = None
    for tag, _, s, e in _children(der, seq[2], seq[3]):
        if tag != 0x30:
            return None
        items = _children(der, s, e)
        if len(items) != 2 or items[0][0] != 0x06:
            return None
        if der[items[0][1] : items[0][3]] == _OID_PPID:
            if items[1][0] != 0x04 or ppid is not None:
                return None
            _, _, vs, ve = items[1]
            ppid = der[vs:ve]
            masked[vs:ve] = bytes(ve - vs)
    return ppid


def canonical_pem(der: bytes) -> bytes:
    """The PEM block as Intel's QE and OpenSSL write it: 64-character lines, LF line ends."""
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----"
