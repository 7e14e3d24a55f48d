"""Intel TCB level evaluation as dcap-qvl 0.7 does it (private; the platform-family path of `dcap`).

Given a platform's TCB values -- CPUSVN and PCESVN from its PCK certificate, TEE_TCB_SVN, MRSIGNERSEAM and
SEAMATTRIBUTES from a TD report, the QE's ISVSVN -- and the collateral's TCB info and QE identity, give the
TCB status and advisory IDs dcap-qvl would give (its steps 6, 8, 9 and 10: QE TCB level, platform TCB level,
TDX module identity, merge). Intel's rules: "Intel TDX DCAP Quote Verification Library, TCB level
selection" and Intel PCS API v4 (`tcbLevels`, `tdxModuleIdentities`, QE identity `tcbLevels`).

Why hand-written: dcap-qvl exposes this only inside `verify`, which also repeats every signature check of
the collateral; `dcap` uses this for a machine whose family (everything but per-machine bytes and TCB
values) dcap-qvl has already accepted under the same collateral, and only when this evaluation reproduced
dcap-qvl's verdict on that first machine. `tests/attestation/test_differential.py` holds it to dcap-qvl on
generated TCB infos and platforms.

Only acceptance is computed here: anything dcap-qvl would reject, or that does not read exactly, is None
and dcap-qvl runs (and gives its reason).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

__all__ = ["TcbRules", "evaluate", "parse_rules"]

# dcap-qvl's severity order for merging (worst wins); Revoked makes the whole quote invalid.
_SEVERITY = {
    "UpToDate": 0,
    "SWHardeningNeeded": 1,
    "ConfigurationNeeded": 2,
    "ConfigurationAndSWHardeningNeeded": 3,
    "OutOfDate": 4,
    "OutOfDateConfigurationNeeded": 5,
    "Revoked": 6,
}

Status = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Level:
    sgx: tuple[int, ...]
    tdx: tuple[int, ...]
    pce_svn: int
    status: Status


@dataclass(frozen=True)
class _Module:
    """A TDX module identity (`tdxModule` has no levels); byte fields None when not exact hex."""

    id: str
    mrsigner: bytes | None
    attributes: bytes | None
    mask: bytes | None
    levels: tuple[tuple[int, Status], ...]


@dataclass(frozen=True)
class TcbRules:
    tdx: bool  # TCB info id "TDX", version >= 3
    levels: tuple[_Level, ...]  # in dcap-qvl's canonical order
    module: _Module | None
    identities: tuple[_Module, ...]
    qe_levels: tuple[tuple[int, Status], ...]


class _Unreadable(Exception):
    pass


def _int(value: object, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise _Unreadable
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _Unreadable
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise _Unreadable
    return value


def _dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Unreadable
    return value


def _status(level: dict[str, Any]) -> Status:
    status = _str(level.get("tcbStatus"))
    if status not in _SEVERITY:
        raise _Unreadable
    _str(level.get("tcbDate"))
    advisories = tuple(_str(a) for a in _list(level.get("advisoryIDs", [])))
    return status, advisories


def _svns(value: object) -> tuple[int, ...]:
    return tuple(_int(_dict(c).get("svn"), 0xFF) for c in _list(value))


def _hex(value: object, size: int) -> bytes | None:
    try:
        out = binascii.unhexlify(_str(value))
    except (binascii.Error, ValueError):
        return None
    return out if len(out) == size else None


def _module(doc: dict[str, Any], with_levels: bool) -> _Module:
    levels: list[tuple[int, Status]] = []
    if with_levels:
        for level in _list(doc.get("tcbLevels")):
            level = _dict(level)
            levels.append((_int(_dict(level.get("tcb")).get("isvsvn"), 0xFF), _status(level)))
    return _Module(
        id=_str(doc.get("id", "")) if with_levels else "",
        mrsigner=_hex(doc.get("mrsigner"), 48),
        attributes=_hex(doc.get("attributes"), 8),
        mask=_hex(doc.get("attributesMask"), 8),
        levels=tuple(levels),
    )


def parse_rules(tcb_info: dict[str, Any], qe_identity: dict[str, Any]) -> TcbRules | None:
    """The TCB info's and QE identity's levels, read strictly; None when anything does not read."""
    try:
        version = _int(tcb_info.get("version"), 0xFFFFFFFF)
        tdx = tcb_info.get("id") == "TDX" and version >= 3
        levels = []
        for level in _list(tcb_info.get("tcbLevels")):
            level = _dict(level)
            tcb = _dict(level.get("tcb"))
            levels.append(
                _Level(
                    sgx=_svns(tcb.get("sgxtcbcomponents")),
                    tdx=_svns(tcb.get("tdxtcbcomponents", [])),
                    pce_svn=_int(tcb.get("pcesvn"), 0xFFFF),
                    status=_status(level),
                )
            )
        # dcap-qvl sorts the levels as Intel's QVL does, whatever the JSON order: by SGX components, then
        # PCESVN, then (TDX) TDX components, each highest first; a stable sort.
        levels.sort(key=lambda lv: (lv.sgx, lv.pce_svn, lv.tdx if tdx else ()), reverse=True)
        module = identities = None
        if tdx:
            raw = tcb_info.get("tdxModule")
            module = _module(_dict(raw), False) if raw is not None else None
            identities = tuple(_module(_dict(i), True) for i in _list(tcb_info.get("tdxModuleIdentities", [])))
        qe_levels = []
        for level in _list(qe_identity.get("tcbLevels")):
            level = _dict(level)
            qe_levels.append((_int(_dict(level.get("tcb")).get("isvsvn"), 0xFFFF), _status(level)))
    except _Unreadable:
        return None
    return TcbRules(tdx, tuple(levels), module, identities or (), tuple(qe_levels))


def _merge(a: Status, b: Status) -> Status:
    status = b[0] if _SEVERITY[b[0]] > _SEVERITY[a[0]] else a[0]
    advisories = list(a[1])
    for adv in b[1]:
        if adv not in advisories:
            advisories.append(adv)
    return status, tuple(advisories)


def _module_status(
    rules: TcbRules, tee_tcb_svn: bytes, mr_signer_seam: bytes, seam_attributes: bytes
) -> Status | bool:
    """The TDX module identity's status; True when the identity checks out with no levels to merge; False
    when dcap-qvl would reject."""
    base = rules.module
    if base is None:
        return False
    isvsvn, version = tee_tcb_svn[0], tee_tcb_svn[1]
    chosen = base
    if version > 0 and rules.identities:
        wanted = f"TDX_{version:02X}".encode().lower()
        for ident in rules.identities:
            if ident.id.encode("utf-8").lower() == wanted:  # ASCII-only case folding, as in Rust
                chosen = ident
                break
        else:
            return False
    # dcap-qvl decodes the base module's fields even when an identity overrides them
    if None in (base.mrsigner, base.attributes, base.mask):
        return False
    if chosen.mrsigner is None or chosen.attributes is None or chosen.mask is None:
        return False
    if mr_signer_seam != chosen.mrsigner:
        return False
    for want, mask, have in zip(chosen.attributes, chosen.mask, seam_attributes, strict=True):
        if want & mask != have & mask or have & ~mask & 0xFF:
            return False
    if chosen is base:
        return True
    for level_svn, status in chosen.levels:
        if isvsvn >= level_svn:
            return status
    return False


def evaluate(
    rules: TcbRules,
    *,
    tdx: bool,
    cpu_svn: bytes,
    pce_svn: int,
    qe_isvsvn: int,
    tee_tcb_svn: bytes = b"",
    mr_signer_seam: bytes = b"",
    seam_attributes: bytes = b"",
) -> Status | None:
    """dcap-qvl's (status, advisory IDs) for these TCB values, or None where it would not accept."""
    platform: Status | None = None
    for level in rules.levels:
        if pce_svn < level.pce_svn:
            continue
        if len(level.sgx) != len(cpu_svn):
            return None
        if any(a < b for a, b in zip(cpu_svn, level.sgx, strict=True)):
            continue
        if tdx:
            if len(level.tdx) != len(tee_tcb_svn):
                return None
            if any(a < b for a, b in zip(tee_tcb_svn, level.tdx, strict=True)):
                continue
        platform = level.status
        if tdx:
            module = _module_status(rules, tee_tcb_svn, mr_signer_seam, seam_attributes)
            if module is False:
                return None
            if isinstance(module, tuple):
                platform = _merge(platform, module)
        break
    if platform is None:
        return None
    qe: Status | None = next((s for svn, s in rules.qe_levels if qe_isvsvn >= svn), None)
    if qe is None:
        return None
    final = _merge(platform, qe)
    return None if final[0] == "Revoked" else final
