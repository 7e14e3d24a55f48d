"""GPU evidence in the attestation report, bound to the report's fresh nonce.

    GpuEvidenceSource   collect(nonce32) -> [{"evidence": hex, "certificate_chain": PEM, "simulated": bool}]
    SimulatedGpu        a development GPU: answers SPDM 1.1 GET_MEASUREMENTS (DMTF DSP0274 §10.11, the
                        layout attestation/nvidia.py parses, NVIDIA's opaque fields) signed with ECDSA P-384
                        by a device key under a development device root of this installation
                        (<home>/simulated-gpu/); always labelled simulated, accepted only where that root is
                        trusted
    verify_gpu_evidence the client's check: each item through teecloud's NVIDIA verifier (chain to a trusted
                        device root, SPDM signature, requester nonce == the report_data the quote signs)

The nonce is the attestation route's report_data (32 bytes), so the GPU evidence is as fresh as the quote and
bound to the same key set. NVML (`nvmlDeviceGetConfComputeGpuAttestationReport`) on a real GPU is not
implemented here (no GPU on this machine): a real source implements the same one-method protocol.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from teecloud._fs import atomic_write, data_home
from teecloud.ai.errors import UpstreamRejected
from teecloud.attestation.errors import AttestationError
from teecloud.attestation.models import VerifiedEvidence
from teecloud.attestation.nvidia import verify_nvidia_evidence

__all__ = ["GpuEvidenceSource", "SimulatedGpu", "verify_gpu_evidence"]

MAX_GPUS = 16
SIMULATED_ROOT_CN = "teecloud SIMULATED GPU device root (development only)"


class GpuEvidenceSource(Protocol):
    def collect(self, nonce: bytes) -> list[dict[str, Any]]: ...


def _name(cn: str, serial: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if serial:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA384())


class SimulatedGpu:
    """One simulated GPU of this installation (state under <home>/simulated-gpu/, created once)."""

    simulated = True

    def __init__(self, home: Path | None = None, *, driver_version: str = "550.90.07") -> None:
        self.dir = (Path(home) if home is not None else data_home()) / "simulated-gpu"
        self.driver_version = driver_version
        self._root_key, self._root, self._key, self._leaf = self._load_or_create()

    def _load_or_create(self) -> tuple[Any, x509.Certificate, Any, x509.Certificate]:
        path = self.dir / "device.pem"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            root_key = ec.generate_private_key(ec.SECP384R1())
            key = ec.generate_private_key(ec.SECP384R1())
            root = _cert(_name(SIMULATED_ROOT_CN), root_key, _name(SIMULATED_ROOT_CN), root_key, ca=True)
            serial = os.urandom(8).hex().upper()
            leaf = _cert(
                _name("teecloud SIMULATED GPU attestation key", serial), key, root.subject, root_key, ca=False
            )
            pem = b"".join(
                k.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                for k in (root_key, key)
            ) + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root, leaf))
            tmp = self.dir / f".device.pem.{os.getpid()}.new"
            atomic_write(tmp, pem)
            try:
                os.link(tmp, path)  # create-if-absent without a race; the loser reads the winner's file
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        data = path.read_bytes()
        keys = [
            serialization.load_pem_private_key(b"-----BEGIN PRIVATE KEY-----" + part, None)
            for part in data.split(b"-----BEGIN PRIVATE KEY-----")[1:]
        ]
        certs = x509.load_pem_x509_certificates(data)
        return keys[0], certs[0], keys[1], certs[1]

    def root_der(self) -> bytes:
        """The development device root (trust it only for development)."""
        return self._root.public_bytes(serialization.Encoding.DER)

    def attest(self, nonce: bytes) -> bytes:
        """The SPDM 1.1 GET_MEASUREMENTS request (signature requested, all blocks) and the signed MEASUREMENTS
        response, raw bytes."""
        if len(nonce) != 32:
            raise ValueError("the SPDM requester nonce is 32 bytes")
        request = bytes([0x11, 0xE0, 0x01, 0xFF]) + nonce + bytes([0])
        record = b""
        for index in range(1, 5):  # DMTF blocks: SHA-384 digests of simulated firmware and configuration
            digest = hashlib.sha384(f"simulated gpu measurement {index}".encode()).digest()
            value = bytes([1 if index < 3 else 3]) + len(digest).to_bytes(2, "little") + digest
            record += bytes([index, 0x01]) + len(value).to_bytes(2, "little") + value
        opaque = b""
        for ftype, val in (
            (3, self.driver_version.encode() + b"\0"),
            (6, bytes([0x01, 0x00, 0x9F, 0x96, 0x01])),
        ):
            opaque += ftype.to_bytes(2, "little") + len(val).to_bytes(2, "little") + val
        response = (
            bytes([0x11, 0x60, 0x00, 0x00, 4])
            + len(record).to_bytes(3, "little")
            + record
            + os.urandom(32)
            + len(opaque).to_bytes(2, "little")
            + opaque
        )
        der = self._key.sign(request + response, ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        return request + response + r.to_bytes(48, "big") + s.to_bytes(48, "big")

    def collect(self, nonce: bytes) -> list[dict[str, Any]]:
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self._leaf, self._root))
        return [
            {"evidence": self.attest(nonce).hex(), "certificate_chain": chain.decode(), "simulated": True}
        ]


def verify_gpu_evidence(
    items: Any, *, trust_anchors: Sequence[bytes], expected_nonce: bytes, now: int
) -> list[VerifiedEvidence]:
    """Every GPU's evidence verifies under `trust_anchors` and answers `expected_nonce`;
    raises UpstreamRejected(step="gpu")."""
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_GPUS:
        raise UpstreamRejected(f"expected 1..{MAX_GPUS} GPU evidence items", step="gpu")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UpstreamRejected(f"GPU {i}: not an object", step="gpu")
        evidence, chain = item.get("evidence"), item.get("certificate_chain")
        if not isinstance(evidence, str) or not isinstance(chain, str) or len(evidence) > 131072:
            raise UpstreamRejected(f"GPU {i}: evidence and certificate_chain must be strings", step="gpu")
        try:
            out.append(
                verify_nvidia_evidence(
                    evidence.encode(),
                    cert_chain_pem=chain.encode()[:65536],
                    trust_anchors=trust_anchors,
                    now=now,
                    expected_nonce=expected_nonce,
                )
            )
        except AttestationError as exc:
            raise UpstreamRejected(f"GPU {i}: {exc}", step="gpu") from exc
    return out
