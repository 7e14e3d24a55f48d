"""attestation._pck: which parts of a PCK leaf make its platform model, and the TCB values read from it.

Leaves that differ only in per-machine fields and TCB values share a model digest; any other difference
(FMSPC, PCEID, SGX type, the issuer, another extension, another DER shape) makes another model, so dcap-qvl
judges that leaf. CPUSVN and PCESVN are read as dcap-qvl reads them.
"""

from __future__ import annotations

import datetime as dt
import random

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation import _pck
from teecloud.tee import _dcap_builder as b

_CA = ec.generate_private_key(ec.SECP256R1())
_NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _leaf(
    *,
    ppid: bytes = b"\x01" * 16,
    cpusvn: bytes = bytes([4, 4, 2, 2, 3, 1, 0, 5] + [0] * 8),
    pcesvn: int = 13,
    pceid: bytes = b"\x00\x00",
    fmspc: bytes = bytes.fromhex("00906ED50000"),
    issuer: str = "Intel SGX PCK Platform CA",
    extra: list[x509.ExtensionType] | None = None,
    now: dt.datetime = _NOW,
) -> bytes:
    ext = b.sgx_extension_der(ppid=ppid, cpusvn=cpusvn, pcesvn=pcesvn, pceid=pceid, fmspc=fmspc)
    cert = b._issue(
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Intel SGX PCK Certificate")]),
        subject_key=ec.generate_private_key(ec.SECP256R1()),
        issuer=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, issuer)]),
        issuer_key=_CA,
        ca=False,
        years=10,
        now=now,
        serial=(1 << 158) | random.getrandbits(150),
        extra=[x509.UnrecognizedExtension(x509.ObjectIdentifier(b.SGX_EXTENSION_OID), ext), *(extra or [])],
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _read(der: bytes) -> _pck.PckLeaf:
    leaf = _pck.masked_tbs(der)
    assert leaf is not None
    return leaf


def test_per_machine_fields_and_tcb_values_do_not_make_another_model() -> None:
    base = _read(_leaf())
    other = _read(
        _leaf(
            ppid=b"\x02" * 16,
            cpusvn=bytes([5, 4, 2, 2, 3, 1, 0, 6] + [0] * 8),
            pcesvn=14,
            now=_NOW + dt.timedelta(days=3),
        )
    )
    assert other.family == base.family
    assert (base.ppid, base.cpu_svn, base.pce_svn) == (
        b"\x01" * 16,
        bytes([4, 4, 2, 2, 3, 1, 0, 5] + [0] * 8),
        13,
    )
    assert (other.ppid, other.cpu_svn[0], other.pce_svn) == (b"\x02" * 16, 5, 14)


def test_everything_else_makes_another_model() -> None:
    base = _read(_leaf()).family
    assert _read(_leaf(fmspc=bytes.fromhex("00906ED50001"))).family != base
    assert _read(_leaf(pceid=b"\x00\x01")).family != base
    assert _read(_leaf(issuer="Intel SGX PCK Processor CA")).family != base
    another = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    assert _read(_leaf(extra=[another])).family != base
    # PCESVN 133 is a two-byte DER INTEGER: another shape (read as dcap-qvl does, big-endian)
    wide = _read(_leaf(pcesvn=133))
    assert wide.family != base and wide.pce_svn == 133
    # a component SVN of 200 likewise
    high, low = _leaf(cpusvn=bytes([200] + [0] * 15)), _leaf(cpusvn=bytes([100] + [0] * 15))
    assert _read(high).family != _read(low).family


def test_unreadable_leaves_have_no_model() -> None:
    der = _leaf()
    assert _pck.masked_tbs(der[:-1]) is None  # truncated
    assert _pck.masked_tbs(der + b"\x00") is None  # trailing bytes
    assert _pck.masked_tbs(b"") is None
    # no SGX extension at all
    plain = b._issue(
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]),
        subject_key=ec.generate_private_key(ec.SECP256R1()),
        issuer=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "y")]),
        issuer_key=_CA,
        ca=False,
        years=1,
        now=_NOW,
        serial=1234,
    )
    assert _pck.masked_tbs(plain.public_bytes(serialization.Encoding.DER)) is None
