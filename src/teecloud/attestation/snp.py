"""AMD SEV-SNP attestation reports: parse, verify ARK -> ASK -> VCEK -> report, check reported_tcb.

Layout: SEV Secure Nested Paging Firmware ABI Specification (AMD pub. 56860), "ATTESTATION_REPORT
Structure" (Table 21 in rev 1.54, Table 22/23 in rev 1.55+), report versions 2 and 3. TCB_VERSION:
same spec, "TCB_VERSION Structure" (Table 3; Turin/family 1Ah uses the FMC layout). The VCEK certificate and
its extensions: AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface Specification"
(pub. 57230), Table 8 (OIDs 1.3.6.1.4.1.3704.1.*).

Verification steps (`verify_snp_report`):
  (1) parse the 1184-byte report (version 2 or 3, signature algorithm 1 = ECDSA P-384 with SHA-384, signed
      by the VCEK);
  (2) chain VCEK -> ASK -> ARK (RSASSA-PSS, SHA-384) to a caller-trusted ARK, ARK self-signature included;
      every certificate valid at `now`;
  (3) ECDSA P-384 signature (r, s little-endian, 72 bytes each at 0x2A0) over bytes [0x000, 0x2A0);
  (4) reported_tcb equals the VCEK's TCB extensions, chip_id equals the VCEK's hwID (unless masked);
  (5) collect measurements, debug (policy bit 19), report_data, chip_id, product line.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from teecloud.attestation import _x509
from teecloud.attestation._revocation import Revocation, check_revocation
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    CollateralMismatch,
    MalformedEvidence,
    SignatureInvalid,
)
from teecloud.attestation.models import Step, TeeKind, VerifiedEvidence

__all__ = [
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "SUPPORTED_VERSIONS",
    "TCB_STATUS",
    "Revocation",
    "SnpReport",
    "TcbVersion",
    "looks_like",
    "parse_snp_report",
    "split_vcek",
    "verify_snp_report",
]

REPORT_SIZE = 0x4A0  # 1184 bytes, the only size of a v2/v3 report
SIGNED_SIZE = 0x2A0  # the signature covers bytes [0x000, 0x2A0)
SUPPORTED_VERSIONS = frozenset({2, 3})
SIG_ALGO_ECDSA_P384_SHA384 = 1
SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1  # a Versioned Loaded Endorsement Key: issued to a cloud provider, chained ASVK -> ARK

# We have no AMD TCB list to grade against: what is established is that the report's TCB is exactly the TCB
# AMD certified in the VCEK. Policies must accept this status for SNP explicitly.
TCB_STATUS = "VcekTcbMatched"

POLICY_DEBUG_BIT = 19
TURIN_FAMILY = 0x1A

# VCEK extension OIDs (AMD pub. 57230, Table 8).
_OID_PRODUCT_NAME = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.2")
_OID_BL_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
_OID_TEE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
_OID_SNP_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
_OID_UCODE_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
_OID_FMC_SPL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.9")
_OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")
_OID_CSP_ID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.5")  # VLEK only: the cloud provider's name


@dataclass(frozen=True)
class TcbVersion:
    """TCB_VERSION (ABI spec Table 3): a little-endian u64 of security patch levels.

    Milan/Genoa: boot_loader byte 0, tee byte 1, snp byte 6, microcode byte 7.
    Turin (family 1Ah): fmc byte 0, boot_loader byte 1, tee byte 2, snp byte 3, microcode byte 7.
    """

    raw: bytes  # the 8 bytes as they appear in the report
    boot_loader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, *, turin: bool = False) -> TcbVersion:
        if turin:
            return cls(raw, boot_loader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(raw, boot_loader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    @property
    def value(self) -> int:
        return int.from_bytes(self.raw, "little")

    def components(self) -> dict[str, int]:
        out = {"boot_loader": self.boot_loader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def to_json(self) -> dict[str, Any]:
        return {"raw": self.raw.hex(), "value": f"0x{self.value:016x}", **self.components()}


@dataclass(frozen=True)
class SnpReport:
    """Every field of ATTESTATION_REPORT (ABI spec rev 1.55+, Table 22/23), versions 2 and 3.

    Offsets in comments. Version 3 adds CPUID_FAM_ID/MOD_ID/STEP in what version 2 reserves at 0x188;
    reserved areas are kept so that nothing in the signed bytes is dropped silently.
    """

    version: int  # 0x000 u32
    guest_svn: int  # 0x004 u32
    policy: int  # 0x008 u64 guest policy (bit 19 DEBUG)
    family_id: bytes  # 0x010 16
    image_id: bytes  # 0x020 16
    vmpl: int  # 0x030 u32
    signature_algo: int  # 0x034 u32 (1 = ECDSA P-384 with SHA-384)
    current_tcb: TcbVersion  # 0x038 u64
    platform_info: int  # 0x040 u64 (bit 0 SMT_EN, 1 TSME_EN, 2 ECC_EN, 3 RAPL_DIS, 4 CIPHERTEXT_HIDING_EN)
    flags: int  # 0x048 u32: bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY
    reserved0: bytes  # 0x04C 4
    report_data: bytes  # 0x050 64
    measurement: bytes  # 0x090 48
    host_data: bytes  # 0x0C0 32
    id_key_digest: bytes  # 0x0E0 48
    author_key_digest: bytes  # 0x110 48
    report_id: bytes  # 0x140 32
    report_id_ma: bytes  # 0x160 32
    reported_tcb: TcbVersion  # 0x180 u64
    cpuid_fam_id: int | None  # 0x188 u8 (v3+; None in v2)
    cpuid_mod_id: int | None  # 0x189 u8 (v3+)
    cpuid_step: int | None  # 0x18A u8 (v3+)
    reserved1: bytes  # 0x188..0x1A0 in v2 (24), 0x18B..0x1A0 in v3 (21)
    chip_id: bytes  # 0x1A0 64
    committed_tcb: TcbVersion  # 0x1E0 u64
    current_build: int  # 0x1E8 u8
    current_minor: int  # 0x1E9 u8
    current_major: int  # 0x1EA u8
    reserved2: int  # 0x1EB u8
    committed_build: int  # 0x1EC u8
    committed_minor: int  # 0x1ED u8
    committed_major: int  # 0x1EE u8
    reserved3: int  # 0x1EF u8
    launch_tcb: TcbVersion  # 0x1F0 u64
    reserved4: bytes  # 0x1F8..0x2A0 (168)
    signature_r: int  # 0x2A0 72 bytes little-endian
    signature_s: int  # 0x2E8 72 bytes little-endian
    signature_reserved: bytes  # 0x330..0x4A0 (368)
    signed_bytes: bytes  # [0x000, 0x2A0)

    @property
    def debug(self) -> bool:
        return bool(self.policy >> POLICY_DEBUG_BIT & 1)

    @property
    def author_key_en(self) -> bool:
        return bool(self.flags & 1)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.flags >> 1 & 1)

    @property
    def signing_key(self) -> int:
        """0 = VCEK, 1 = VLEK, 7 = none."""
        return self.flags >> 2 & 0b111

    @property
    def chip_id_masked(self) -> bool:
        return not any(self.chip_id)

    def policy_fields(self) -> dict[str, Any]:
        p = self.policy
        return {
            "abi_minor": p & 0xFF,
            "abi_major": p >> 8 & 0xFF,
            "smt": bool(p >> 16 & 1),
            "migrate_ma": bool(p >> 18 & 1),
            "debug": bool(p >> 19 & 1),
            "single_socket": bool(p >> 20 & 1),
            "cxl_allow": bool(p >> 21 & 1),
            "mem_aes_256_xts": bool(p >> 22 & 1),
            "rapl_dis": bool(p >> 23 & 1),
            "ciphertext_hiding": bool(p >> 24 & 1),
            "page_swap_disable": bool(p >> 25 & 1),
        }

    def to_fields(self) -> dict[str, Any]:
        """Every field, JSON-ready (bytes as lowercase hex)."""
        return {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": f"0x{self.policy:x}",
            "policy_fields": self.policy_fields(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb": self.current_tcb.to_json(),
            "platform_info": f"0x{self.platform_info:x}",
            "author_key_en": self.author_key_en,
            "mask_chip_key": self.mask_chip_key,
            "signing_key": self.signing_key,
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb": self.reported_tcb.raw.hex(),
            "reported_tcb_fields": self.reported_tcb.to_json(),
            "cpuid_fam_id": self.cpuid_fam_id,
            "cpuid_mod_id": self.cpuid_mod_id,
            "cpuid_step": self.cpuid_step,
            "chip_id": self.chip_id.hex(),
            "committed_tcb": self.committed_tcb.to_json(),
            "current_version": f"{self.current_major}.{self.current_minor}.{self.current_build}",
            "committed_version": f"{self.committed_major}.{self.committed_minor}.{self.committed_build}",
            "launch_tcb": self.launch_tcb.to_json(),
        }


def looks_like(data: bytes) -> bool:
    """Cheap sniff for kind autodetection: right size, a supported version, ECDSA P-384 algorithm."""
    if len(data) != REPORT_SIZE:
        return False
    version, algo = struct.unpack_from("<I", data, 0)[0], struct.unpack_from("<I", data, 0x34)[0]
    return version in SUPPORTED_VERSIONS and algo == SIG_ALGO_ECDSA_P384_SHA384


def parse_snp_report(report: bytes) -> SnpReport:
    """Parse a v2/v3 ATTESTATION_REPORT. Structure only: no signature or chain checks."""
    if not isinstance(report, bytes | bytearray | memoryview):
        raise MalformedEvidence(f"SEV-SNP report must be bytes, got {type(report).__name__}")
    report = bytes(report)
    if len(report) != REPORT_SIZE:
        raise MalformedEvidence(f"SEV-SNP report is {len(report)} bytes, expected exactly {REPORT_SIZE}")
    try:
        return _parse(report)
    except (struct.error, IndexError) as exc:  # defensive: sizes were checked above
        raise MalformedEvidence(f"SEV-SNP report cannot be parsed ({exc})") from exc


def _parse(r: bytes) -> SnpReport:
    version, guest_svn, policy = struct.unpack_from("<IIQ", r, 0x000)
    if version not in SUPPORTED_VERSIONS:
        raise MalformedEvidence(
            f"SEV-SNP report version {version} is not supported (supported: {sorted(SUPPORTED_VERSIONS)})"
        )
    vmpl, signature_algo = struct.unpack_from("<II", r, 0x030)
    platform_info, flags = struct.unpack_from("<QI", r, 0x040)
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    if version >= 3:
        cpuid_fam_id, cpuid_mod_id, cpuid_step = r[0x188], r[0x189], r[0x18A]
        reserved1 = r[0x18B:0x1A0]
    else:
        cpuid_fam_id = cpuid_mod_id = cpuid_step = None
        reserved1 = r[0x188:0x1A0]
    turin = cpuid_fam_id == TURIN_FAMILY

    def tcb(off: int) -> TcbVersion:
        return TcbVersion.decode(r[off : off + 8], turin=turin)

    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=r[0x010:0x020],
        image_id=r[0x020:0x030],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=tcb(0x038),
        platform_info=platform_info,
        flags=flags,
        reserved0=r[0x04C:0x050],
        report_data=r[0x050:0x090],
        measurement=r[0x090:0x0C0],
        host_data=r[0x0C0:0x0E0],
        id_key_digest=r[0x0E0:0x110],
        author_key_digest=r[0x110:0x140],
        report_id=r[0x140:0x160],
        report_id_ma=r[0x160:0x180],
        reported_tcb=tcb(0x180),
        cpuid_fam_id=cpuid_fam_id,
        cpuid_mod_id=cpuid_mod_id,
        cpuid_step=cpuid_step,
        reserved1=reserved1,
        chip_id=r[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        current_build=r[0x1E8],
        current_minor=r[0x1E9],
        current_major=r[0x1EA],
        reserved2=r[0x1EB],
        committed_build=r[0x1EC],
        committed_minor=r[0x1ED],
        committed_major=r[0x1EE],
        reserved3=r[0x1EF],
        launch_tcb=tcb(0x1F0),
        reserved4=r[0x1F8:0x2A0],
        signature_r=int.from_bytes(r[0x2A0:0x2E8], "little"),
        signature_s=int.from_bytes(r[0x2E8:0x330], "little"),
        signature_reserved=r[0x330:0x4A0],
        signed_bytes=r[:SIGNED_SIZE],
    )


# --- VCEK extensions ------------------------------------------------------------------------------------


def _der_value(raw: bytes, tag: int, what: str) -> bytes:
    """Content of a single short DER TLV. Hand-written: cryptography has no public generic DER decoder,
    and these AMD extensions are one primitive each (INTEGER, IA5String, OCTET STRING)."""
    if len(raw) < 2 or raw[0] != tag:
        raise CertificateChainInvalid(f"VCEK extension {what} is not the expected DER type", step="tcb_ok")
    length = raw[1]
    body = raw[2:]
    if length & 0x80:  # long form, at most 2 length octets for our tiny values
        n = length & 0x7F
        if n not in (1, 2) or len(body) < n:
            raise CertificateChainInvalid(f"VCEK extension {what} has a bad DER length", step="tcb_ok")
        length, body = int.from_bytes(body[:n], "big"), body[n:]
    if len(body) != length:
        raise CertificateChainInvalid(f"VCEK extension {what} has a bad DER length", step="tcb_ok")
    return body


def _ext_raw(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, TypeError) as exc:
        raise CertificateChainInvalid(f"VCEK has malformed extensions ({exc})", step="tcb_ok") from exc
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CertificateChainInvalid(
            f"VCEK extension {oid.dotted_string} has an unexpected type", step="tcb_ok"
        )
    return value.value


def _ext_int(cert: x509.Certificate, oid: x509.ObjectIdentifier, name: str) -> int | None:
    raw = _ext_raw(cert, oid)
    if raw is None:
        return None
    body = _der_value(raw, 0x02, name)
    if not body or body[0] & 0x80:
        raise CertificateChainInvalid(f"VCEK extension {name} is not a non-negative INTEGER", step="tcb_ok")
    return int.from_bytes(body, "big")


@dataclass(frozen=True)
class VcekInfo:
    product_name: str
    tcb: dict[str, int]
    hwid: bytes | None
    csp_id: str = ""


def _vcek_info(vcek: x509.Certificate) -> VcekInfo:
    product_raw = _ext_raw(vcek, _OID_PRODUCT_NAME)
    product = ""
    if product_raw is not None:
        product = _der_value(product_raw, 0x16, "productName").decode("ascii", "replace")
    tcb: dict[str, int] = {}
    for oid, name in (
        (_OID_BL_SPL, "boot_loader"),
        (_OID_TEE_SPL, "tee"),
        (_OID_SNP_SPL, "snp"),
        (_OID_UCODE_SPL, "microcode"),
        (_OID_FMC_SPL, "fmc"),
    ):
        value = _ext_int(vcek, oid, name)
        if value is not None:
            tcb[name] = value
    hwid = _ext_raw(vcek, _OID_HWID)
    if hwid is not None and len(hwid) == 66 and hwid[:2] == b"\x04\x40":  # tolerate an OCTET STRING wrapper
        hwid = hwid[2:]
    csp_raw = _ext_raw(vcek, _OID_CSP_ID)
    csp = _der_value(csp_raw, 0x0C, "csp_id").decode("utf-8", "replace") if csp_raw is not None else ""
    return VcekInfo(product_name=product, tcb=tcb, hwid=hwid, csp_id=csp)


def _product_line(ask: x509.Certificate, ark: x509.Certificate, *, vlek: bool) -> str:
    """AMD names its CAs 'ARK-<product>', 'SEV-<product>' (the ASK, which signs VCEKs) and
    'SEV-VLEK-<product>' (the ASVK, which signs VLEKs); they must agree with each other and with the key
    type the report names."""
    ark_cn, ask_cn = _x509.common_name(ark), _x509.common_name(ask)
    want = "SEV-VLEK-" if vlek else "SEV-"
    if (
        not ark_cn.startswith("ARK-")
        or not ask_cn.startswith(want)
        or (not vlek and ask_cn.startswith("SEV-VLEK-"))
    ):
        kind = "VLEK (ARK-<product> / SEV-VLEK-<product>)" if vlek else "VCEK (ARK-<product> / SEV-<product>)"
        raise CertificateChainInvalid(f"AMD CA names '{ark_cn}' / '{ask_cn}' are not those of a {kind} chain")
    product = ark_cn.removeprefix("ARK-")
    if ask_cn.removeprefix(want) != product:
        raise CertificateChainInvalid(f"ASK '{ask_cn}' and ARK '{ark_cn}' belong to different product lines")
    return product


def split_vcek(bundle: bytes) -> tuple[bytes, bytes]:
    """From one PEM bundle holding VCEK, ASK and ARK (any order), return (vcek_der, ask_ark_pem).

    For callers (the CLI) that receive a single certificate file: the VCEK is the one certificate that is not
    a CA. Only a convenience for splitting files; `verify_snp_report` still checks everything.
    """
    certs = _x509.load_certificates(bundle, what="SEV-SNP certificate bundle")
    leaves: list[x509.Certificate] = []
    cas: list[x509.Certificate] = []
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        (cas if is_ca else leaves).append(cert)
    if len(leaves) != 1:
        raise MalformedEvidence(
            f"SEV-SNP certificate bundle must hold exactly one VCEK (non-CA), found {len(leaves)}",
            step=_x509.CHAIN_STEP,
        )
    rest = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas)
    return leaves[0].public_bytes(serialization.Encoding.DER), rest


# --- verification ---------------------------------------------------------------------------------------


def verify_snp_report(
    report: bytes,
    *,
    vcek_der: bytes,
    cert_chain_pem: bytes,
    trust_anchors: Sequence[bytes],
    now: int,
    revocation: Revocation | None = None,
) -> VerifiedEvidence:
    """Verify a SEV-SNP report signed by `vcek_der` -- the VCEK, or the VLEK when the report's SIGNING_KEY
    field says so -- chained through `cert_chain_pem` (ASK or ASVK, optionally ARK) to one of
    `trust_anchors` (ARK certificates, PEM or DER). `revocation` holds the CRLs (AMD KDS: the ARK's CRL of
    ASKs/ASVKs; an ASK's CRL covers its VCEKs) and OCSP responses to check the chain against; without them
    the result says "revocation not checked". Raises VerificationError subclasses."""
    steps: list[Step] = []
    # (1): parse
    rep = parse_snp_report(report)
    if rep.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise MalformedEvidence(
            f"SEV-SNP signature algorithm {rep.signature_algo} is not supported (expected 1, ECDSA P-384)"
        )
    if rep.signing_key not in (SIGNING_KEY_VCEK, SIGNING_KEY_VLEK):
        raise MalformedEvidence(
            f"SEV-SNP report is signed by key type {rep.signing_key} (0 = VCEK or 1 = VLEK expected)"
        )
    vlek = rep.signing_key == SIGNING_KEY_VLEK
    key_name = "VLEK" if vlek else "VCEK"
    steps.append(
        Step("parsed", True, f"SEV-SNP attestation report version {rep.version}, signed by its {key_name}")
    )

    # (2): certificate chain
    vcek = _x509.load_certificate(vcek_der, what=key_name)
    leaf_cn = _x509.common_name(vcek)
    if ("VLEK" in leaf_cn) != vlek:
        raise CertificateChainInvalid(
            f"the report is signed by its {key_name}, but the signing certificate given is '{leaf_cn}'"
        )
    pool = _x509.load_certificates(cert_chain_pem, what="ASK/ARK chain")
    chain = _x509.build_and_verify_chain(
        vcek, pool, trust_anchors, now=now, algorithms=_x509.RSA_PSS, root_algorithms=_x509.RSA_PSS
    )
    if len(chain.path) != 3:
        raise CertificateChainInvalid(
            f"expected {key_name} <- {'ASVK' if vlek else 'ASK'} <- ARK, found a chain of {len(chain.path)}: "
            f"{chain.summary()}"
        )
    product = _product_line(chain.path[1], chain.root, vlek=vlek)
    steps.append(Step("cert_chain_verified", True, chain.summary()))
    revoked = check_revocation(chain.path, revocation or Revocation(), now=now)
    steps.append(Step("revocation", True, revoked.summary()))

    # (3): report signature
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise CertificateChainInvalid(f"{key_name} public key is not an ECDSA P-384 key")
    try:
        key.verify(
            encode_dss_signature(rep.signature_r, rep.signature_s),
            rep.signed_bytes,
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature as exc:
        raise SignatureInvalid(f"SEV-SNP report signature does not verify with the {key_name}") from exc
    steps.append(Step("quote_verified", True, f"ECDSA P-384/SHA-384 report signature by the {key_name}"))

    # (4): the report's TCB and chip must be the ones AMD certified in the VCEK
    info = _vcek_info(vcek)
    if info.product_name and info.product_name.split("-", 1)[0] != product:
        raise CertificateChainInvalid(
            f"VCEK is for product '{info.product_name}' but its chain is for {product}", step="tcb_ok"
        )
    reported = rep.reported_tcb.components()
    missing = sorted(set(reported) - set(info.tcb))
    if missing:
        raise CertificateChainInvalid(f"VCEK lacks TCB extension(s) {missing}", step="tcb_ok")
    diffs = [f"{k}: report {v}, VCEK {info.tcb[k]}" for k, v in reported.items() if info.tcb[k] != v]
    if diffs:
        raise CollateralMismatch(
            "reported_tcb does not match the VCEK's TCB (" + "; ".join(diffs) + ")", step="tcb_ok"
        )
    # A VLEK is not tied to one chip (it has no hwID): chip_id is only compared for VCEK-signed reports.
    if not rep.chip_id_masked and not vlek:
        if info.hwid is None:
            raise CollateralMismatch("VCEK has no hwID extension to compare chip_id with", step="tcb_ok")
        if info.hwid != rep.chip_id:
            raise CollateralMismatch(
                "chip_id does not match the VCEK's hwID: VCEK of another chip", step="tcb_ok"
            )
    steps.append(
        Step("tcb_ok", True, f"reported_tcb {rep.reported_tcb.raw.hex()} and chip_id match the VCEK")
    )

    # (5): result
    fields = rep.to_fields()
    fields.update(
        {
            "product_line": product,
            "vcek_product_name": info.product_name,
            "chip_id_masked": rep.chip_id_masked,
            "vcek_tcb": info.tcb,
            "signing_key_name": key_name,
            "csp_id": info.csp_id,
            "revocation": revoked.to_json(),
        }
    )
    return VerifiedEvidence(
        tee=TeeKind.SNP.value,
        tcb_status=TCB_STATUS,
        advisory_ids=(),
        measurements={
            "measurement": rep.measurement,
            "host_data": rep.host_data,
            "report_data": rep.report_data,
        },
        report_data=rep.report_data,
        debug=rep.debug,
        device_id=rep.chip_id if not rep.chip_id_masked else (info.hwid or b""),
        fields=fields,
        steps=tuple(steps),
    )
