"""Build Intel DCAP artefacts (certificates, CRLs, tcbInfo, qeIdentity, TDX quotes v4) under a local CA.

Pure: keys, identities and `now` come in, bytes go out; no file or clock access. The layouts follow
  - Intel "TDX DCAP Quoting Library API" (quote v4: header, TD report 1.0, ECDSA auth data with
    certification data type 6 wrapping the QE report and type 5 PEM chain),
  - Intel "SGX PCK Certificate and Certificate Revocation List Profile Specification" (the SGX extension
    OID 1.2.840.113741.1.13.1 and its sub-OIDs, CRL issuers),
  - Intel PCS API v4 ("TDX TCB Info" v3 and "TD QE Identity" v2 JSON, signed over their exact bytes),
and what dcap-qvl 0.7.0 checks (../shared/reference/dcap-quotes.md). Everything is ECDSA P-256/SHA-256
with raw r||s signatures, the only algorithm DCAP uses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

# the verifier recognises dev roots by this prefix: one constant, owned by the verifier
from teecloud.attestation.dcap import DEV_ROOT_CN_PREFIX
from teecloud.attestation.dcap_layout import (
    ATT_KEY_TYPE_ECDSA_P256,
    CERT_DATA_PCK_CHAIN,
    CERT_DATA_QE_REPORT,
    HEADER_SIZE,
    QE_REPORT_SIZE,
    QE_VENDOR_ID_INTEL,
    TD_ATTR_DEBUG,
    TD_ATTR_SEPT_VE_DISABLE,
    TD_REPORT10_SIZE,
    TEE_TYPE_TDX,
)

__all__ = [
    "DEV_ROOT_CN_PREFIX",
    "PlatformIdentity",
    "QuoteBuilder",
    "SimulatedTcb",
    "build_collateral",
    "build_pki",
    "raw_ecdsa_sign",
]


SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
QUOTE_VERSION_4 = 4
# The quote layout has one home, the verifier's (teecloud.attestation.dcap_layout).
TD_REPORT10_LEN = TD_REPORT10_SIZE
HEADER_LEN = HEADER_SIZE
QE_REPORT_LEN = QE_REPORT_SIZE


_CERT_YEARS = {"root": 20, "platform": 15, "tcb": 10, "pck": 10}
COLLATERAL_VALIDITY = dt.timedelta(days=30)
# Collateral is dated a little in the past so a verifier whose clock lags this one still accepts it.
COLLATERAL_BACKDATE = dt.timedelta(hours=1)


# ---------------------------------------------------------------------------------------------------------
# Minimal DER encoder for the SGX extension value. cryptography can only embed a custom extension as raw
# DER (x509.UnrecognizedExtension) and has no general ASN.1 encoder; the structure is five small types.


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(value)) + value


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _der_int(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")  # leading 0 keeps it non-negative
    return _tlv(0x02, body)


def _der_seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _pair(sub: str, value: bytes) -> bytes:
    return _der_seq(_der_oid(f"{SGX_EXTENSION_OID}.{sub}"), value)


def sgx_extension_der(*, ppid: bytes, cpusvn: bytes, pcesvn: int, pceid: bytes, fmspc: bytes) -> bytes:
    """SGXExtensions (PCK certificate profile, section "Intel SGX PCK Certificate" extensions)."""
    tcb_items = [_pair(f"2.{i + 1}", _der_int(cpusvn[i])) for i in range(16)]
    tcb_items.append(_pair("2.17", _der_int(pcesvn)))
    tcb_items.append(_pair("2.18", _tlv(0x04, cpusvn)))
    return _der_seq(
        _pair("1", _tlv(0x04, ppid)),
        _pair("2", _der_seq(*tcb_items)),
        _pair("3", _tlv(0x04, pceid)),
        _pair("4", _tlv(0x04, fmspc)),
        _pair("5", _tlv(0x0A, b"\x00")),  # SGX type: Standard
    )


# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulatedTcb:
    """The simulated platform's TCB. The PCK certificate carries cpusvn/pcesvn; quotes carry tee_tcb_svn."""

    cpusvn: bytes = bytes([4, 4, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0])
    pcesvn: int = 13
    pceid: bytes = b"\x00\x00"
    # TEE_TCB_SVN: [0] = TDX module ISVSVN, [1] = module major version, [2] = TDX late microcode.
    tee_tcb_svn_uptodate: bytes = bytes([3, 1, 3] + [0] * 13)
    tee_tcb_svn_outofdate: bytes = bytes([3, 1, 2] + [0] * 13)
    qe_isvsvn: int = 4
    qe_isvprodid: int = 2
    qe_mrsigner: bytes = hashlib.sha256(b"teecloud simulated TD quoting enclave signer").digest()
    qe_mrenclave: bytes = hashlib.sha256(b"teecloud simulated TD quoting enclave").digest()
    qe_attributes: bytes = bytes.fromhex("11000000000000000000000000000000")
    mr_seam: bytes = hashlib.sha384(b"teecloud simulated TDX module").digest()
    outofdate_advisory: str = "TEECLOUD-SIM-SA-0001"


@dataclass(frozen=True)
class PlatformIdentity:
    """Per-installation identity of the simulated machine."""

    ppid: bytes  # 16 bytes
    fmspc: bytes  # 6 bytes


@dataclass(frozen=True)
class Pki:
    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    platform_key: ec.EllipticCurvePrivateKey
    platform_cert: x509.Certificate
    tcb_key: ec.EllipticCurvePrivateKey
    tcb_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck_cert: x509.Certificate
    attestation_key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teecloud development (NOT Intel)"),
        ]
    )


def _key_usage(*, cert_sign: bool, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=digital_signature,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,  # dcap-qvl: a CRL issuer must have cRLSign (IssuerNotCrlSigner)
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    *,
    subject: x509.Name,
    subject_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
    years: int,
    now: dt.datetime,
    serial: int,
    extra: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    pub = subject_key.public_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=ca, digital_signature=not ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    for ext in extra:
        b = b.add_extension(ext, critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def build_pki(
    *,
    identity: PlatformIdentity,
    tcb: SimulatedTcb,
    now: dt.datetime,
    install_tag: str,
    serials: Sequence[int],
) -> Pki:
    """Create the dev root CA, platform CA, TCB-signing certificate, PCK certificate and attestation key.

    `serials` are four random positive serial numbers (root, platform CA, TCB signer, PCK).
    """
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(5)]
    root_key, platform_key, tcb_key, pck_key, att_key = keys
    root_name = _name(f"{DEV_ROOT_CN_PREFIX} {install_tag}")
    platform_name = _name("teecloud Simulated SGX PCK Platform CA")
    root = _issue(
        subject=root_name, subject_key=root_key, issuer=root_name, issuer_key=root_key, ca=True,
        years=_CERT_YEARS["root"], now=now, serial=serials[0],
    )  # fmt: skip
    platform = _issue(
        subject=platform_name, subject_key=platform_key, issuer=root_name, issuer_key=root_key, ca=True,
        years=_CERT_YEARS["platform"], now=now, serial=serials[1],
    )  # fmt: skip
    tcb_cert = _issue(
        subject=_name("teecloud Simulated SGX TCB Signing"), subject_key=tcb_key, issuer=root_name,
        issuer_key=root_key, ca=False, years=_CERT_YEARS["tcb"], now=now, serial=serials[2],
    )  # fmt: skip
    ext = sgx_extension_der(
        ppid=identity.ppid, cpusvn=tcb.cpusvn, pcesvn=tcb.pcesvn, pceid=tcb.pceid, fmspc=identity.fmspc
    )
    pck = _issue(
        subject=_name("teecloud Simulated SGX PCK Certificate"), subject_key=pck_key, issuer=platform_name,
        issuer_key=platform_key, ca=False, years=_CERT_YEARS["pck"], now=now, serial=serials[3],
        extra=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), ext)],
    )  # fmt: skip
    return Pki(root_key, root, platform_key, platform, tcb_key, tcb_cert, pck_key, pck, att_key)


def raw_ecdsa_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature as raw r||s (64 bytes), the form DCAP uses everywhere."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 64-byte x||y public key DCAP embeds in quotes."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _crl(
    *,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    this_update: dt.datetime,
    revoked_serials: Sequence[int],
    crl_number: int,
) -> bytes:
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(this_update)
        .next_update(this_update + COLLATERAL_VALIDITY)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    for serial in revoked_serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build()
        )
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _components(svns: bytes) -> list[dict[str, Any]]:
    return [{"svn": v} for v in svns]


def tcb_info_json(*, fmspc: bytes, tcb: SimulatedTcb, issue: dt.datetime) -> str:
    """A TDX TCB Info v3 (Intel PCS v4 `/tdx/certification/v4/tcb`) for the simulated platform.

    Two levels: the simulated TCB is UpToDate; a quote whose TEE_TCB_SVN[2] is one lower (the
    `tcb="OutOfDate"` knob) only meets the OutOfDate level.
    """
    zero48 = "00" * 48
    module = {"mrsigner": zero48, "attributes": "0000000000000000", "attributesMask": "FFFFFFFFFFFFFFFF"}
    tcb_date = "2025-01-01T00:00:00Z"
    info: dict[str, Any] = {
        "id": "TDX",
        "version": 3,
        "issueDate": _iso(issue),
        "nextUpdate": _iso(issue + COLLATERAL_VALIDITY),
        "fmspc": fmspc.hex().upper(),
        "pceId": tcb.pceid.hex().upper(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": 1,
        "tdxModule": module,
        "tdxModuleIdentities": [
            {
                "id": f"TDX_{tcb.tee_tcb_svn_uptodate[1]:02X}",
                **module,
                "tcbLevels": [
                    {
                        "tcb": {"isvsvn": tcb.tee_tcb_svn_uptodate[0]},
                        "tcbDate": tcb_date,
                        "tcbStatus": "UpToDate",
                    }
                ],
            }
        ],
        "tcbLevels": [
            {
                "tcb": {
                    "sgxtcbcomponents": _components(tcb.cpusvn),
                    "pcesvn": tcb.pcesvn,
                    "tdxtcbcomponents": _components(tcb.tee_tcb_svn_uptodate),
                },
                "tcbDate": tcb_date,
                "tcbStatus": "UpToDate",
            },
            {
                "tcb": {
                    "sgxtcbcomponents": _components(tcb.cpusvn),
                    "pcesvn": tcb.pcesvn,
                    "tdxtcbcomponents": _components(tcb.tee_tcb_svn_outofdate),
                },
                "tcbDate": "2024-01-01T00:00:00Z",
                "tcbStatus": "OutOfDate",
                "advisoryIDs": [tcb.outofdate_advisory],
            },
        ],
    }
    return json.dumps(info, separators=(",", ":"))


def qe_identity_json(*, tcb: SimulatedTcb, issue: dt.datetime) -> str:
    """A TD QE Identity v2 (Intel PCS v4 `/tdx/certification/v4/qe/identity`)."""
    ident = {
        "id": "TD_QE",
        "version": 2,
        "issueDate": _iso(issue),
        "nextUpdate": _iso(issue + COLLATERAL_VALIDITY),
        "tcbEvaluationDataNumber": 1,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": tcb.qe_attributes.hex().upper(),
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": tcb.qe_mrsigner.hex().upper(),
        "isvprodid": tcb.qe_isvprodid,
        "tcbLevels": [
            {"tcb": {"isvsvn": tcb.qe_isvsvn}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"}
        ],
    }
    return json.dumps(ident, separators=(",", ":"))


def build_collateral(
    pki: Pki,
    *,
    fmspc: bytes,
    tcb: SimulatedTcb,
    issue: dt.datetime,
    revoke_pck: bool = False,
    crl_number: int = 1,
) -> dict[str, str]:
    """Collateral in dcap-qvl's QuoteCollateralV3 JSON form (the same keys as Intel-backed collateral).

    `issue` is the issueDate/thisUpdate of the TCB info, QE identity and both CRLs (valid 30 days).
    `revoke_pck` lists the PCK certificate's serial in the PCK CRL (simulates a revoked platform).
    """
    tcb_info = tcb_info_json(fmspc=fmspc, tcb=tcb, issue=issue)
    qe_identity = qe_identity_json(tcb=tcb, issue=issue)
    chain_tcb = _pem(pki.tcb_cert) + _pem(pki.root_cert)
    root_crl = _crl(
        issuer_cert=pki.root_cert, issuer_key=pki.root_key, this_update=issue, revoked_serials=(),
        crl_number=crl_number,
    )  # fmt: skip
    pck_crl = _crl(
        issuer_cert=pki.platform_cert,
        issuer_key=pki.platform_key,
        this_update=issue,
        revoked_serials=(pki.pck_cert.serial_number,) if revoke_pck else (),
        crl_number=crl_number,
    )
    return {
        "pck_crl_issuer_chain": _pem(pki.platform_cert) + _pem(pki.root_cert),
        "root_ca_crl": root_crl.hex(),
        "pck_crl": pck_crl.hex(),
        "tcb_info_issuer_chain": chain_tcb,
        "tcb_info": tcb_info,
        "tcb_info_signature": raw_ecdsa_sign(pki.tcb_key, tcb_info.encode()).hex(),
        "qe_identity_issuer_chain": chain_tcb,
        "qe_identity": qe_identity,
        "qe_identity_signature": raw_ecdsa_sign(pki.tcb_key, qe_identity.encode()).hex(),
    }


def collateral_issue_time(now: dt.datetime) -> dt.datetime:
    return now.replace(microsecond=0) - COLLATERAL_BACKDATE


class QuoteBuilder:
    """Assembles TDX quotes v4. Everything but the TD report and its signature is computed once: the
    header, the QE report (signed by the PCK key, binding the attestation key and QE auth data) and the
    PEM chain. Each quote then costs one ECDSA signature."""

    def __init__(self, pki: Pki, tcb: SimulatedTcb) -> None:
        self._att_key = pki.attestation_key
        self._tcb = tcb
        att_pub = raw_public_key(pki.attestation_key)
        # QE authentication data: 32 bytes (dcap-qvl requires exactly 32), fixed per platform.
        qe_auth = hashlib.sha256(b"teecloud simulated QE auth data" + att_pub).digest()
        qe_report = self._qe_report(report_data=hashlib.sha256(att_pub + qe_auth).digest() + bytes(32))
        qe_report_sig = raw_ecdsa_sign(pki.pck_key, qe_report)
        chain = (_pem(pki.pck_cert) + _pem(pki.platform_cert) + _pem(pki.root_cert)).encode() + b"\x00"
        inner = struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(chain)) + chain
        cert_data_6 = qe_report + qe_report_sig + struct.pack("<H", len(qe_auth)) + qe_auth + inner
        self._auth_tail = att_pub + struct.pack("<HI", CERT_DATA_QE_REPORT, len(cert_data_6)) + cert_data_6
        self._header = (
            struct.pack("<HHIHH", QUOTE_VERSION_4, ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_TDX, 0, 0)
            + QE_VENDOR_ID_INTEL
            + bytes(20)
        )
        assert len(self._header) == HEADER_LEN

    def _qe_report(self, *, report_data: bytes) -> bytes:
        """SGX REPORT body (Intel SGX SDK `sgx_report_body_t`, 384 bytes) of the simulated QE."""
        t = self._tcb
        body = (
            t.cpusvn
            + struct.pack("<I", 0)  # MISCSELECT
            + bytes(28)
            + t.qe_attributes
            + t.qe_mrenclave
            + bytes(32)
            + t.qe_mrsigner
            + bytes(96)
            + struct.pack("<HH", t.qe_isvprodid, t.qe_isvsvn)
            + bytes(60)
            + report_data
        )
        assert len(body) == QE_REPORT_LEN
        return body

    def td_report(
        self,
        *,
        report_data: bytes,
        mrtd: bytes,
        rtmrs: Sequence[bytes],
        debug: bool,
        out_of_date: bool,
        mr_config_id: bytes = bytes(48),
        mr_owner: bytes = bytes(48),
        mr_owner_config: bytes = bytes(48),
    ) -> bytes:
        """TD report body 1.0 (TDX DCAP quote v4, "TD Quote Body", 584 bytes)."""
        attrs = TD_ATTR_SEPT_VE_DISABLE | (TD_ATTR_DEBUG if debug else 0)
        tcb = self._tcb
        body = (
            (tcb.tee_tcb_svn_outofdate if out_of_date else tcb.tee_tcb_svn_uptodate)
            + tcb.mr_seam
            + bytes(48)  # MRSIGNERSEAM: zero for Intel's module, as tcbInfo.tdxModule.mrsigner says
            + bytes(8)  # SEAMATTRIBUTES
            + struct.pack("<Q", attrs)
            + bytes.fromhex("e702060000000000")  # XFAM: x87, SSE, AVX, AVX-512, PK state
            + mrtd
            + mr_config_id
            + mr_owner
            + mr_owner_config
            + b"".join(rtmrs)
            + report_data
        )
        assert len(body) == TD_REPORT10_LEN
        return body

    def quote(self, td_report: bytes) -> bytes:
        signed = self._header + td_report
        auth = raw_ecdsa_sign(self._att_key, signed) + self._auth_tail
        return signed + struct.pack("<I", len(auth)) + auth
