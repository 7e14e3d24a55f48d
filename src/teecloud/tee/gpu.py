"""GPU evidence sources: what a CVM's GPUs say about themselves, beside `TeePlatform` (teecloud.tee.base).

    GpuEvidenceSource   collect(nonce32) -> [{"evidence": hex, "certificate_chain": PEM, "simulated": bool}],
                        one item per GPU given to this CVM
    SimulatedGpu        a development GPU: answers SPDM 1.1 GET_MEASUREMENTS (DMTF DSP0274 §10.11, the
                        layout attestation/nvidia.py parses, NVIDIA's opaque fields) signed with ECDSA P-384
                        by a device key under a development device root of this installation
                        (<home>/simulated-gpu/); always labelled simulated, accepted only where that root is
                        trusted
    NvmlGpuSource       a real GPU through NVML (`nvmlDeviceGetConfComputeGpuAttestationReport` and
                        `nvmlDeviceGetConfComputeGpuCertificate`, the calls NVIDIA's nvtrust local verifier
                        makes); raises GpuUnavailable when NVML or a GPU is absent (this machine has neither,
                        so it is untested beyond that refusal)

Both the guest boot sequence (teecloud.agent.boot, the GPU gate) and the inference app's attestation route
(teecloud.ai) read GPUs through this one protocol.

    guest_gpu_source(mode, ...)   the qemu guest's source: NVML when the VM has an NVIDIA GPU (PCI vendor
                        0x10de, display class; passed through by the host with vfio-pci), else in mode plain
                        the SimulatedGpu (labelled), else none (a tdx / sev-snp VM without a GPU)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from teecloud._fs import atomic_write, data_home
from teecloud.tee.errors import GpuUnavailable

__all__ = [
    "MAX_GPUS",
    "GpuEvidenceSource",
    "GpuUnavailable",
    "NvmlGpuSource",
    "SimulatedGpu",
    "guest_gpu_source",
    "nvidia_gpus",
]

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
            digest = self.measurement(index)
            value = bytes([1 if index < 3 else 3]) + len(digest).to_bytes(2, "little") + digest
            record += bytes([index, 0x01]) + len(value).to_bytes(2, "little") + value
        opaque = b""
        for ftype, val in (
            (3, self.driver_version.encode() + b"\0"),
            (6, self.VBIOS_OPAQUE),
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

    # The simulated measurement blocks by RIM: NVIDIA splits the golden values between a driver RIM and a
    # VBIOS RIM; here blocks 1-2 are the "driver's", 3-4 the "VBIOS's".
    RIM_BLOCKS: ClassVar[dict[str, tuple[int, ...]]] = {"driver": (1, 2), "vbios": (3, 4)}
    VBIOS_OPAQUE = bytes([0x01, 0x00, 0x9F, 0x96, 0x01])

    @staticmethod
    def measurement(index: int) -> bytes:
        return hashlib.sha384(f"simulated gpu measurement {index}".encode()).digest()

    def rim(self, kind: str = "driver", *, golden: dict[int, bytes] | None = None) -> bytes:
        """A RIM for this GPU's simulated firmware in NVIDIA's format (a signed SWID tag; see
        teecloud.attestation.nvidia), signed by a RIM-signing certificate under the simulated device root.
        Labelled SIMULATED in its name and tagId. `golden` overrides values (for tests of a mismatch)."""
        from lxml import etree
        from signxml import methods
        from signxml.signer import XMLSigner

        from teecloud.attestation.nvidia import RIM_HASH_NS, RIM_NS

        if kind not in self.RIM_BLOCKS:
            raise ValueError("kind is 'driver' or 'vbios'")
        v = self.VBIOS_OPAQUE
        version = (
            self.driver_version
            if kind == "driver"
            else ".".join(f"{b:02X}" for b in (v[3], v[2], v[1], v[0], v[4]))
        )
        key = ec.generate_private_key(ec.SECP384R1())
        cert = _cert(
            _name("teecloud SIMULATED GPU RIM signing"), key, self._root.subject, self._root_key, ca=False
        )
        root = etree.Element(
            f"{{{RIM_NS}}}SoftwareIdentity",
            nsmap={None: RIM_NS, "SHA384": RIM_HASH_NS},
            name=f"teecloud SIMULATED GPU {kind} RIM",
            tagId=f"TEECLOUD_SIMULATED_GPU_{kind.upper()}_{version}",
            version=version,
            corpus="true",
        )
        etree.SubElement(root, f"{{{RIM_NS}}}Meta", colloquialVersion=version, product="SIMULATED GPU")
        payload = etree.SubElement(root, f"{{{RIM_NS}}}Payload")
        for index in self.RIM_BLOCKS[kind]:
            value = (golden or {}).get(index, self.measurement(index))
            etree.SubElement(
                payload,
                f"{{{RIM_NS}}}Resource",
                {
                    "type": "Measurement",
                    "index": str(index),
                    "active": "True",
                    "alternatives": "1",
                    "name": f"SIMULATED_MEASUREMENT_{index}",
                    "size": str(len(value)),
                    f"{{{RIM_HASH_NS}}}Hash0": value.hex(),
                },
            )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        chain = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (cert, self._root)]
        signer = XMLSigner(
            method=methods.enveloped, signature_algorithm="ecdsa-sha384", digest_algorithm="sha384"
        )
        return bytes(
            etree.tostring(signer.sign(root, key=pem, cert=chain), xml_declaration=True, encoding="UTF-8")
        )

    def device_certificates(self) -> tuple[x509.Certificate, x509.Certificate]:
        """(attestation leaf, device root): what an OCSP response for this GPU is about."""
        return self._leaf, self._root

    def ocsp_response(
        self,
        *,
        revoked: bool = False,
        this_update: dt.datetime | None = None,
        valid_for: dt.timedelta | None = None,
    ) -> bytes:
        """An OCSP response (RFC 6960, DER) for the attestation certificate, signed by the device root, as
        NVIDIA's OCSP service answers for a real GPU's chain. Development only."""
        from cryptography.x509 import ocsp

        now = this_update or dt.datetime.now(dt.UTC)
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=self._leaf,
            issuer=self._root,
            algorithm=hashes.SHA384(),
            cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
            this_update=now,
            next_update=now + (valid_for or dt.timedelta(days=7)),
            revocation_time=now if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, self._root)
        resp = builder.sign(self._root_key, hashes.SHA384())
        return resp.public_bytes(serialization.Encoding.DER)

    def collect(self, nonce: bytes) -> list[dict[str, Any]]:
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self._leaf, self._root))
        return [
            {"evidence": self.attest(nonce).hex(), "certificate_chain": chain.decode(), "simulated": True}
        ]


class NvmlGpuSource:
    """Every GPU of this CVM through NVML (the `nvidia-ml-py` package, module `pynvml`), as NVIDIA's nvtrust
    local verifier reads them. Not simulated. Raises GpuUnavailable when NVML, a GPU or CC mode is absent.

    The confidential-computing state NVML reports here is the host driver's word and only a precondition;
    what the gate trusts is the SPDM evidence the GPU signs (teecloud.attestation.nvidia)."""

    simulated = False

    def collect(self, nonce: bytes) -> list[dict[str, Any]]:
        if len(nonce) != 32:
            raise ValueError("the SPDM requester nonce is 32 bytes")
        try:
            import pynvml  # optional: present only on GPU hosts
        except ImportError as exc:
            raise GpuUnavailable("NVML is not installed (pip install nvidia-ml-py on a GPU host)") from exc
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # pynvml.NVMLError and ctypes load failures alike
            raise GpuUnavailable(f"NVML could not start (no NVIDIA driver or GPU?): {exc}") from exc
        try:
            state = pynvml.nvmlSystemGetConfComputeState()
            if int(state.ccFeature) != 1:
                raise GpuUnavailable("the GPUs are not in confidential-computing mode (ccFeature off)")
            count = int(pynvml.nvmlDeviceGetCount())
            if not 1 <= count <= MAX_GPUS:
                raise GpuUnavailable(f"expected 1..{MAX_GPUS} GPUs, NVML reports {count}")
            out = []
            for index in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                report = pynvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
                evidence = bytes(report.attestationReport[: int(report.attestationReportSize)])
                certs = pynvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
                chain = bytes(certs.attestationCertChain[: int(certs.attestationCertChainSize)])
                out.append(
                    {
                        "evidence": evidence.hex(),
                        "certificate_chain": chain.decode("ascii"),
                        "simulated": False,
                    }
                )
            return out
        except GpuUnavailable:
            raise
        except Exception as exc:
            raise GpuUnavailable(f"NVML could not produce GPU attestation evidence: {exc}") from exc
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception:  # noqa: S110  # shutting down after a failure must not hide that failure
                pass


NVIDIA_VENDOR = "0x10de"
_DISPLAY_CLASS = "0x03"  # PCI base class 03h: display controller (VGA 0300, 3D controller 0302)
PCI_DEVICES = Path("/sys/bus/pci/devices")


def nvidia_gpus(pci_devices: Path = PCI_DEVICES) -> list[str]:
    """The PCI addresses of this machine's NVIDIA GPUs (vendor 0x10de, display class), from sysfs."""
    found = []
    try:
        devices = sorted(pci_devices.iterdir())
    except OSError:
        return []
    for device in devices[:4096]:
        try:
            vendor = (device / "vendor").read_text()[:16].strip().lower()
            klass = (device / "class").read_text()[:16].strip().lower()
        except OSError:
            continue
        if vendor == NVIDIA_VENDOR and klass.startswith(_DISPLAY_CLASS):
            found.append(device.name)
    return found[:MAX_GPUS]


def guest_gpu_source(
    mode: str, *, pci_devices: Path = PCI_DEVICES, home: Path | None = None
) -> GpuEvidenceSource | None:
    """The GPU evidence source of a qemu guest in `mode`: NvmlGpuSource when the VM has an NVIDIA GPU (any
    mode: a plain VM never gets one, the host refuses it); else the SimulatedGpu of `home` in mode plain
    (labelled simulated in every evidence item); else None."""
    if nvidia_gpus(pci_devices):
        return NvmlGpuSource()
    if mode == "plain":
        return SimulatedGpu(home)
    return None
