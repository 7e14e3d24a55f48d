"""Intel TCB level evaluation as dcap-qvl 0.7 does it (private; the platform-family path of `dcap`).

Given a platform's TCB values -- CPUSVN and PCESVN from its PCK certificate, TEE_TCB_SVN (and a TD 1.5's
TEE_TCB_SVN2), MRSIGNERSEAM and SEAMATTRIBUTES from a TD report, the QE's ISVSVN -- and the collateral's TCB
info and QE identity, give the TCB status and advisory IDs dcap-qvl 0.7 gives: the first TCB level (in its
canonical order) the platform meets, a module version leaving TEE_TCB_SVN[0..1] to the TDX module identity
it selects, that identity's level converged in, the QE's level converged in (Intel QVL's
convergeTcbStatusWithQeTcbStatus), the statuses each structure may carry at a matched level, Revoked
refused, and a TD 1.5's relaunch advice. Intel's rules: Intel PCS API v4 (`tcbLevels`,
`tdxModuleIdentities`, QE identity `tcbLevels`) and the SGX/TDX DCAP Quote Verification Library.

Why hand-written: dcap-qvl exposes this only inside `verify`, which also repeats every signature check of
the collateral; `dcap` uses this for a machine whose family (everything but per-machine bytes and TCB
values) dcap-qvl has already accepted under the same collateral, and only when this evaluation reproduced
dcap-qvl's verdict on that first machine. `tests/attestation/test_tcb_levels.py` holds it to dcap-qvl on
Intel's TCB infos and on generated TCB infos and platforms (quote v4 and v5).

Only acceptance is computed here: anything dcap-qvl would reject, or that does not read exactly, is None
and dcap-qvl runs (and gives its reason).
"""

from __future__ import annotations

import binascii
import datetime as _dt
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["TCB_STATUSES", "TcbRules", "evaluate", "parse_rules"]

# The statuses a TCB info or QE identity may list, best first (Intel PCS API v4, "tcbStatus").
TCB_STATUSES: tuple[str, ...] = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)

Status = tuple[str, tuple[str, ...]]

# The statuses Intel's QVL (and dcap-qvl) accept at a matched level of each structure.
_MODULE_STATUSES = ("UpToDate", "OutOfDate", "Revoked")
_QE_STATUSES = ("UpToDate", "OutOfDate", "ConfigurationNeeded", "Revoked", "OutOfDateConfigurationNeeded")


@dataclass(frozen=True)
class _Level:
    sgx: tuple[int, ...]
    tdx: tuple[int, ...]
    pce_svn: int
    status: Status
    date: str


@dataclass(frozen=True)
class _Module:
    """A TDX module identity (`tdxModule` has no levels); byte fields None when not exact hex."""

    id: str
    mrsigner: bytes | None
    attributes: bytes | None
    mask: bytes | None
    levels: tuple[tuple[int, Status, str], ...]  # (ISVSVN, status, tcbDate)


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
    if status not in TCB_STATUSES:
        raise _Unreadable
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
    levels: list[tuple[int, Status, str]] = []
    if with_levels:
        for level in _list(doc.get("tcbLevels")):
            level = _dict(level)
            isvsvn = _int(_dict(level.get("tcb")).get("isvsvn"), 0xFF)
            levels.append((isvsvn, _status(level), _str(level.get("tcbDate"))))
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
                    date=_str(level.get("tcbDate")),
                )
            )
        # dcap-qvl sorts the levels as Intel's QVL does, whatever the JSON order: by SGX components, then
        # PCESVN, then (TDX) TDX components, each highest first; a stable sort.
        levels.sort(key=lambda lv: (lv.sgx, lv.pce_svn, lv.tdx if tdx else ()), reverse=True)
        module = identities = None
        if tdx:
            raw = tcb_info.get("tdxModule")
            module = _module(_dict(raw), False) if raw is not None else None
            identities = tuple(
                _module(_dict(i), True) for i in _list(tcb_info.get("tdxModuleIdentities", []))
            )
        qe_levels = []
        for level in _list(qe_identity.get("tcbLevels")):
            level = _dict(level)
            qe_levels.append((_int(_dict(level.get("tcb")).get("isvsvn"), 0xFFFF), _status(level)))
    except _Unreadable:
        return None
    return TcbRules(tdx, tuple(levels), module, identities or (), tuple(qe_levels))


def _converge(status: str, component: str) -> str:
    """A status converged with a component's (the QE's, the TDX module's), as Intel's QVL does."""
    if component == "Revoked":
        return "Revoked"
    if component == "OutOfDate":
        if status in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if status in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return status


def _merge(a: Status, b: Status) -> Status:
    advisories = list(a[1])
    for adv in b[1]:
        if adv not in advisories:
            advisories.append(adv)
    return _converge(a[0], b[0]), tuple(advisories)


def _relaunch(launch: str, current: str) -> str:
    """TD 1.5: the launch TCB's status given the current TCB's (Intel QVL's checkForRelaunch)."""
    config = ("ConfigurationNeeded", "OutOfDateConfigurationNeeded", "ConfigurationAndSWHardeningNeeded")
    if launch in ("OutOfDate", "OutOfDateConfigurationNeeded") and current in (
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
    ):
        if launch in config or current in config:
            return "TDRelaunchAdvisedConfigurationNeeded"
        return "TDRelaunchAdvised"
    return launch


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


def _dated(text: str) -> bool:
    """Whether dcap-qvl (chrono's RFC 3339 parser, after the epoch) reads this date; strict: a subset."""
    if not _RFC3339.fullmatch(text):
        return False
    try:
        return _dt.datetime.fromisoformat(text).timestamp() >= 0
    except ValueError:
        return False


def _module_for(rules: TcbRules, tee_tcb_svn: bytes) -> _Module | None:
    """The module expectations that apply: the identity the module version (TEE_TCB_SVN[1]) selects, or
    `tdxModule` (`rules.module`, no levels) for version 0; None when neither is there (dcap-qvl rejects)."""
    if tee_tcb_svn[1] == 0:
        return rules.module
    wanted = f"TDX_{tee_tcb_svn[1]:02X}".encode().lower()
    for ident in rules.identities:
        if ident.id.encode("utf-8").lower() == wanted:  # ASCII-only case folding, as in Rust
            return ident
    return None


def _level(
    rules: TcbRules, cpu_svn: bytes, pce_svn: int, tee_tcb_svn: bytes | None
) -> tuple[Status, str] | None:
    """The first TCB level the platform meets: (status, advisories), its tcbDate."""
    for level in rules.levels:
        if pce_svn < level.pce_svn:
            continue
        if len(level.sgx) != len(cpu_svn):
            return None
        if any(a < b for a, b in zip(cpu_svn, level.sgx, strict=True)):
            continue
        if tee_tcb_svn is not None:
            if len(level.tdx) != len(tee_tcb_svn):
                return None
            skip = 2 if tee_tcb_svn[1] > 0 else 0  # a module version leaves SVNs 0 and 1 to the module
            if any(a < b for a, b in zip(tee_tcb_svn[skip:], level.tdx[skip:], strict=True)):
                continue
        return level.status, level.date
    return None


def _tdx_level(rules: TcbRules, cpu_svn: bytes, pce_svn: int, tee_tcb_svn: bytes) -> Status | None:
    """The platform level for `tee_tcb_svn` converged with the module level the same SVNs select."""
    found = _level(rules, cpu_svn, pce_svn, tee_tcb_svn)
    if found is None:
        return None
    status, date = found
    chosen = _module_for(rules, tee_tcb_svn)
    if chosen is None:
        return None  # (without `tdxModule`, `_module_ok` rejects the quote too)
    if chosen is rules.module:
        return status  # version 0: no module levels to converge
    module = next((lv for lv in chosen.levels if tee_tcb_svn[0] >= lv[0]), None)
    if module is None or module[1][0] not in _MODULE_STATUSES:
        return None
    if not (_dated(module[2]) and _dated(date)):
        return None
    return _merge(status, module[1])


def _module_ok(rules: TcbRules, tee_tcb_svn: bytes, mr_signer_seam: bytes, seam_attributes: bytes) -> bool:
    """The TD report's module signer and SEAM attributes against the module identity (or `tdxModule`)."""
    base = rules.module
    if base is None or None in (base.mrsigner, base.attributes, base.mask):
        return False  # dcap-qvl decodes the base module's fields even when an identity replaces them
    chosen = _module_for(rules, tee_tcb_svn)
    if chosen is None or chosen.mrsigner is None or chosen.attributes is None or chosen.mask is None:
        return False
    if mr_signer_seam != chosen.mrsigner:
        return False
    for want, mask, have in zip(chosen.attributes, chosen.mask, seam_attributes, strict=True):
        if want & mask != have & mask or have & ~mask & 0xFF:
            return False
    return True


def evaluate(
    rules: TcbRules,
    *,
    tdx: bool,
    cpu_svn: bytes,
    pce_svn: int,
    qe_isvsvn: int,
    tee_tcb_svn: bytes = b"",
    tee_tcb_svn2: bytes | None = None,
    mr_signer_seam: bytes = b"",
    seam_attributes: bytes = b"",
) -> Status | None:
    """dcap-qvl's (status, advisory IDs) for these TCB values, or None where it would not accept.
    `tee_tcb_svn2`: a TD 1.5 report's current TCB."""
    qe = next((s for svn, s in rules.qe_levels if qe_isvsvn >= svn), None)
    if qe is None or qe[0] not in _QE_STATUSES:
        return None
    current: str | None = None
    if not tdx:
        found = _level(rules, cpu_svn, pce_svn, None)
        platform = found[0] if found is not None else None
    else:
        platform = _tdx_level(rules, cpu_svn, pce_svn, tee_tcb_svn)
        if platform is None or not _module_ok(rules, tee_tcb_svn, mr_signer_seam, seam_attributes):
            return None
        if tee_tcb_svn2 is not None:
            now = _tdx_level(rules, cpu_svn, pce_svn, tee_tcb_svn2)
            if now is None:
                return None
            current = _converge(now[0], qe[0])
    if platform is None:
        return None
    final = _merge(platform, qe)
    if final[0] == "Revoked" or current == "Revoked":
        return None
    if current is not None:
        final = (_relaunch(final[0], current), final[1])
    return final
