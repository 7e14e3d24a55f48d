"""CollateralStore: FMSPC -> QuoteCollateralV3 JSON, from a directory of `<FMSPC>.json` or a mapping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teecloud import _json
from teecloud.collateral.errors import CollateralNotFound, InvalidCollateral, why

__all__ = ["CollateralEntry", "CollateralStore", "describe_collateral"]


# QuoteCollateralV3 members (dcap-qvl's JSON form): PEM chains, hex DER CRLs and signatures, JSON text.
_MEMBERS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


@dataclass(frozen=True)
class CollateralEntry:
    fmspc: str
    tee: str  # "tdx" | "sgx"
    raw: bytes
    doc: Mapping[str, Any]
    next_update: str  # earliest nextUpdate of TCB info and QE identity (ISO 8601)
    issue_date: str


def describe_collateral(raw: bytes) -> CollateralEntry:
    """Read FMSPC, TEE kind and validity from QuoteCollateralV3 JSON. Raises InvalidCollateral."""
    try:
        doc = _json.loads(raw)
        missing = [k for k in _MEMBERS if not isinstance(doc.get(k), str)]
        if missing:
            raise ValueError(f"members {', '.join(missing)} must be strings")
        for key in ("pck_crl", "root_ca_crl"):
            bytes.fromhex(doc[key])  # the PCCS server serves these as DER; refuse a bad entry when loading
        tcb = _json.loads(doc["tcb_info"])
        qe = _json.loads(doc["qe_identity"])
        fmspc = str(tcb["fmspc"]).upper()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidCollateral(f"not QuoteCollateralV3 JSON: {why(exc)}") from exc
    tee = "tdx" if tcb.get("id") == "TDX" else "sgx"
    next_update = min(str(tcb.get("nextUpdate", "")), str(qe.get("nextUpdate", "")))
    return CollateralEntry(fmspc, tee, bytes(raw), doc, next_update, str(tcb.get("issueDate", "")))


class CollateralStore:
    """Collateral by FMSPC (upper-case hex). Several entries may share the QE identity / CRLs of one TEE
    kind; `latest(tee)` picks the newest for the FMSPC-independent PCCS endpoints."""

    def __init__(self, entries: Mapping[str, bytes] | None = None) -> None:
        self._by_fmspc: dict[str, CollateralEntry] = {}
        for raw in (entries or {}).values():
            self.add(raw)

    @classmethod
    def from_directory(cls, directory: str | Path) -> CollateralStore:
        store = cls()
        for path in sorted(Path(directory).glob("*.json")):
            store.add(path.read_bytes())
        return store

    @classmethod
    def from_source(cls, source: str | Path | Mapping[str, bytes] | CollateralStore) -> CollateralStore:
        if isinstance(source, CollateralStore):
            return source
        if isinstance(source, Mapping):
            return cls(source)
        path = Path(source)
        if path.is_dir():
            return cls.from_directory(path)
        store = cls()
        store.add(path.read_bytes())
        return store

    def add(self, raw: bytes) -> CollateralEntry:
        entry = describe_collateral(raw)
        self._by_fmspc[entry.fmspc] = entry
        return entry

    def get(self, fmspc: str) -> bytes | None:
        entry = self._by_fmspc.get(fmspc.upper())
        return entry.raw if entry else None

    def entry(self, fmspc: str) -> CollateralEntry:
        entry = self._by_fmspc.get(fmspc.upper())
        if entry is None:
            raise CollateralNotFound(f"no collateral for FMSPC {fmspc.upper()}")
        return entry

    def latest(self, tee: str) -> CollateralEntry:
        entries = [e for e in self._by_fmspc.values() if e.tee == tee]
        if not entries:
            raise CollateralNotFound(f"no {tee.upper()} collateral")
        return max(entries, key=lambda e: e.issue_date)

    def fmspcs(self) -> list[str]:
        return sorted(self._by_fmspc)
