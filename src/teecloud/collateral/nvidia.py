"""Offline NVIDIA collateral: OCSP responses for GPU device chains and RIMs (Reference Integrity Manifests),
cached on disk like PCCS collateral, so a boot does not depend on NVIDIA's OCSP and RIM services being up.

    <dir>/ocsp/<issuer key hash>-<serial>.der   one OCSP response (RFC 6960) per certificate, the newest
    <dir>/rim/<sha256 of version:tagId>.xml     one RIM per (version, tagId)

Served only within validity: an OCSP response between its thisUpdate and nextUpdate (one without a
nextUpdate is refused: it would never expire), a RIM while its signing chain is valid (it is verified again
each time it is served). A stale item is refused when added and never served; files are replaced atomically.
What the answers mean is judged by teecloud.attestation.nvidia (`revocation=`, `rims=`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509 import ocsp

from teecloud._fs import atomic_write
from teecloud.attestation.errors import VerificationError
from teecloud.attestation.nvidia import MAX_OCSP_BYTES, MAX_RIM_SIZE, Revocation, Rim, verify_rim
from teecloud.collateral.errors import InvalidCollateral

__all__ = ["MAX_CACHED", "NvidiaCollateralCache", "OcspEntry"]

MAX_CACHED = 256  # items of each kind the cache serves


@dataclass(frozen=True)
class OcspEntry:
    serial: int
    issuer_key_hash: bytes
    status: str  # "good" | "revoked" | "unknown"
    this_update: int
    next_update: int


def _ts(value: dt.datetime) -> int:
    return int(value.replace(tzinfo=dt.UTC).timestamp()) if value.tzinfo is None else int(value.timestamp())


def describe_ocsp(der: bytes) -> OcspEntry:
    """Structure of one OCSP response (its signature is checked against the chain by the verifier)."""
    if not isinstance(der, bytes) or not 0 < len(der) <= MAX_OCSP_BYTES:
        raise InvalidCollateral(f"an OCSP response is 1..{MAX_OCSP_BYTES} bytes of DER")
    try:
        resp = ocsp.load_der_ocsp_response(der)
        if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise InvalidCollateral(f"OCSP response status is {resp.response_status.name}")
        singles = list(resp.responses)
        if len(singles) != 1:
            raise InvalidCollateral("an OCSP response for the cache answers for exactly one certificate")
        one = singles[0]
        # cryptography parses these lazily: an unknown algorithm would surface only in the verifier
        _ = (resp.signature_hash_algorithm, one.hash_algorithm, resp.tbs_response_bytes)
        if one.next_update_utc is None:
            raise InvalidCollateral("OCSP response without nextUpdate (it would never expire)")
        return OcspEntry(
            serial=one.serial_number,
            issuer_key_hash=one.issuer_key_hash,
            status=one.certificate_status.name.lower(),
            this_update=_ts(one.this_update_utc),
            next_update=_ts(one.next_update_utc),
        )
    except InvalidCollateral:
        raise
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCollateral(f"not a DER OCSP response: {exc}") from None


class NvidiaCollateralCache:
    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    # --- OCSP -------------------------------------------------------------------------------------------

    def add_ocsp(self, der: bytes, *, now: int) -> OcspEntry:
        """Cache a response (replacing an older one for the same certificate); a stale one is refused."""
        entry = describe_ocsp(der)
        if not entry.this_update <= now < entry.next_update:
            raise InvalidCollateral(
                f"stale OCSP response for serial {entry.serial:x}: valid "
                f"{entry.this_update}..{entry.next_update}, now {now}"
            )
        path = self.dir / "ocsp" / f"{entry.issuer_key_hash.hex()}-{entry.serial:x}.der"
        try:
            old = describe_ocsp(path.read_bytes())
            if old.this_update > entry.this_update:
                return old  # the cache keeps the newer answer
        except (OSError, InvalidCollateral):
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, der, mode=0o644)
        return entry

    def ocsp_responses(self, *, now: int) -> tuple[bytes, ...]:
        """Every cached response valid at `now` (stale and damaged ones are not served)."""
        out = []
        for path in sorted((self.dir / "ocsp").glob("*.der"))[:MAX_CACHED]:
            try:
                der = path.read_bytes()
                entry = describe_ocsp(der)
            except (OSError, InvalidCollateral):
                continue
            if entry.this_update <= now < entry.next_update:
                out.append(der)
        return tuple(out)

    def revocation(self, *, now: int) -> Revocation:
        return Revocation(ocsp_responses=self.ocsp_responses(now=now)[:16])

    # --- RIMs -------------------------------------------------------------------------------------------

    def _rim_path(self, rim: Rim) -> Path:
        key = hashlib.sha256(f"{rim.version}:{rim.tag_id}".encode()).hexdigest()[:32]
        return self.dir / "rim" / f"{key}.xml"

    def add_rim(self, xml: bytes, *, trust_anchors: Sequence[bytes], now: int) -> Rim:
        """Verify a RIM (signature; chain valid at `now`) and cache it; refuses an invalid or expired one."""
        try:
            rim = verify_rim(xml, trust_anchors=trust_anchors, now=now)
        except VerificationError as exc:
            raise InvalidCollateral(f"RIM refused: {exc}") from None
        path = self._rim_path(rim)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, xml, mode=0o644)
        return rim

    def rims(self, versions: Iterable[str], *, trust_anchors: Sequence[bytes], now: int) -> tuple[bytes, ...]:
        """The cached RIMs for these driver/VBIOS versions that still verify at `now`."""
        wanted = {v.lower() for v in versions if v}
        out = []
        for path in sorted((self.dir / "rim").glob("*.xml"))[:MAX_CACHED]:
            try:
                xml = path.read_bytes()
                if len(xml) > MAX_RIM_SIZE:
                    continue
                rim = verify_rim(xml, trust_anchors=trust_anchors, now=now)
            except (OSError, VerificationError):
                continue  # expired signing chain, damaged file: not served
            if rim.version in wanted:
                out.append(xml)
        return tuple(out)
