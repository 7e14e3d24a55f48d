"""Vendor trust anchors: download them (`teecloud trust fetch`) and read the trust directory.

The verifier never embeds vendor roots (except Intel's, which dcap-qvl carries); they are files the user
fetched, inspected (the CLI prints their SHA-256 fingerprints) and placed in `data_home()/trust/`.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from teecloud._fs import atomic_write, data_home
from teecloud.collateral.errors import InvalidCollateral, PccsUnavailable

__all__ = [
    "TRUST_FILE_SUFFIXES",
    "VENDOR_ROOT_URLS",
    "FetchedAnchor",
    "default_trust_dir",
    "fetch_trust_anchors",
    "load_trust_directory",
]

# file name in the trust directory -> the vendor's official download URL
VENDOR_ROOT_URLS: Mapping[str, str] = {
    "intel_sgx_root_ca.der": "https://certificates.trustedservices.intel.com/Intel_SGX_Provisioning_Certification_RootCA.cer",
    "amd_milan_ask_ark.pem": "https://kdsintf.amd.com/vcek/v1/Milan/cert_chain",
    "amd_genoa_ask_ark.pem": "https://kdsintf.amd.com/vcek/v1/Genoa/cert_chain",
    "amd_turin_ask_ark.pem": "https://kdsintf.amd.com/vcek/v1/Turin/cert_chain",
    "aws_nitro_enclaves_root_g1.pem": "https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip",
    "nvidia_device_identity_ca.pem": (
        "https://raw.githubusercontent.com/NVIDIA/nvtrust/main/guest_tools/gpu_verifiers/"
        "local_gpu_verifier/src/verifier/certs/verifier_device_root.pem"
    ),
}
TRUST_FILE_SUFFIXES = (".pem", ".der", ".cer", ".crt")
MAX_ANCHOR_DOWNLOAD = 256 * 1024


def default_trust_dir() -> Path:
    return data_home() / "trust"


@dataclass(frozen=True)
class FetchedAnchor:
    path: Path
    url: str
    subjects: tuple[str, ...]
    sha256: tuple[str, ...]  # fingerprint of each certificate (DER)


def _certificates(blob: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" in blob:
        return x509.load_pem_x509_certificates(blob)
    return [x509.load_der_x509_certificate(blob)]


def _unzip_pem(blob: bytes, url: str) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".pem") and info.file_size <= MAX_ANCHOR_DOWNLOAD:
                    return zf.read(info)
    except zipfile.BadZipFile as exc:
        raise InvalidCollateral(f"{url} is not a zip archive: {exc}") from exc
    raise InvalidCollateral(f"{url} holds no .pem certificate")


def fetch_trust_anchors(
    dest: Path | None = None,
    *,
    url_base: str | None = None,
    urls: Mapping[str, str] = VENDOR_ROOT_URLS,
    transport: httpx.BaseTransport | None = None,
    timeout: float = 20.0,
) -> tuple[list[FetchedAnchor], list[str]]:
    """Download each vendor root into `dest` (default: the trust directory). With `url_base`, each URL's
    path is fetched from that server instead (mirrors, tests). Returns (fetched, errors); a file is only
    written when it parses as certificates."""
    dest = Path(dest) if dest is not None else default_trust_dir()
    fetched: list[FetchedAnchor] = []
    errors: list[str] = []
    with httpx.Client(timeout=timeout, transport=transport, follow_redirects=True) as client:
        for name, url in urls.items():
            if url_base:
                url = url_base.rstrip("/") + urlparse(url).path
            try:
                resp = client.get(url)
                if resp.status_code != 200:
                    raise PccsUnavailable(f"HTTP {resp.status_code}")
                blob = resp.content
                if len(blob) > MAX_ANCHOR_DOWNLOAD:
                    raise InvalidCollateral(f"over {MAX_ANCHOR_DOWNLOAD} bytes")
                if url.endswith(".zip"):
                    blob = _unzip_pem(blob, url)
                certs = _certificates(blob)
            except (
                httpx.HTTPError,
                PccsUnavailable,
                InvalidCollateral,
                ValueError,
                x509.InvalidVersion,  # cryptography's error for a bad version field: not a ValueError
            ) as exc:
                errors.append(f"{name}: {url}: {exc}")
                continue
            atomic_write(dest / name, blob, mode=0o644)
            fetched.append(
                FetchedAnchor(
                    path=dest / name,
                    url=url,
                    subjects=tuple(c.subject.rfc4514_string() for c in certs),
                    sha256=tuple(hashlib.sha256(c.public_bytes(Encoding.DER)).hexdigest() for c in certs),
                )
            )
    return fetched, errors


def load_trust_directory(directory: Path | None = None) -> list[tuple[Path, bytes]]:
    """Every certificate file (.pem .der .cer .crt) in the trust directory, sorted by name."""
    directory = Path(directory) if directory is not None else default_trust_dir()
    if not directory.is_dir():
        return []
    return [
        (p, p.read_bytes())
        for p in sorted(directory.iterdir())
        if p.is_file() and p.suffix.lower() in TRUST_FILE_SUFFIXES
    ]
