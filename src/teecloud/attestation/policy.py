"""Appraisal policy: what genuine evidence must also say to be accepted.

A policy is declarative and versioned (TOML or JSON, `version = 1`; see docs/verification.md):

    version = 1
    allowed_tee = ["tdx", "sgx"]           # TEE kinds accepted (absent: any kind)
    min_tcb_status = "UpToDate"            # Intel TCB floor (default UpToDate)
    allowed_advisory_ids = []              # absent: any advisory; present: only these (empty: none)
    reject_debug = true                    # default true
    allow_simulated = false                # default false: development-root evidence is refused
    require_revocation = false             # true: every certificate of the chain checked against a CRL/OCSP
    report_data = "1234..."                # expected report_data (hex, zero-padded to the field)
    allowed_compose_hashes = ["..."]       # from the replayed event log
    allowed_os_image_hashes = ["..."]
    allowed_app_ids = ["..."]
    [measurements]                         # reference values, by the vendor's name
    mrtd = ["91eb..."]                     # one value or a list of accepted values
    rtmr0 = "44c0..."

Every rule is checked (AllOf); the evidence passes only when all pass. A key that is absent puts no
constraint; an allow-list that is present but empty allows nothing. Unknown keys are refused, so a typo
cannot silently disable a rule.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teecloud import _json
from teecloud.attestation._limits import DEFAULT_LIMITS
from teecloud.attestation.dcap import TCB_STATUS_ORDER
from teecloud.attestation.errors import UsageError
from teecloud.attestation.models import AppInfo, Step, TeeKind, VerifiedEvidence

__all__ = ["POLICY_VERSION", "Policy"]

POLICY_VERSION = 1
_INTEL_KINDS = frozenset({"tdx", "sgx"})
_KEYS = frozenset(
    {
        "version",
        "allowed_tee",
        "min_tcb_status",
        "allowed_advisory_ids",
        "reject_debug",
        "allow_simulated",
        "report_data",
        "measurements",
        "allowed_compose_hashes",
        "allowed_os_image_hashes",
        "allowed_app_ids",
        "require_revocation",
    }
)


@dataclass(frozen=True)
class _Claims:
    """What a policy judges, taken from a VerifiedEvidence (kept separate so each rule is testable)."""

    tee: str
    simulated: bool
    debug: bool
    tcb_status: str
    advisory_ids: tuple[str, ...]
    measurements: Mapping[str, bytes]
    report_data: bytes
    app_info: AppInfo | None
    revocation: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, ev: VerifiedEvidence) -> _Claims:
        return cls(
            tee=ev.tee,
            simulated=ev.simulated,
            debug=ev.debug,
            tcb_status=ev.tcb_status,
            advisory_ids=tuple(ev.advisory_ids),
            measurements=ev.measurements,
            report_data=ev.report_data,
            app_info=ev.app_info,
            revocation=ev.fields.get("revocation")
            if isinstance(ev.fields.get("revocation"), Mapping)
            else None,
        )


def _hexes(value: Any, key: str) -> tuple[bytes, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise UsageError(f"policy: {key} must be a hex string or a list of hex strings")
    out = []
    for v in items:
        try:
            out.append(bytes.fromhex(v.removeprefix("0x")))
        except ValueError as exc:
            raise UsageError(f"policy: {key} has a value that is not hex: {v!r}") from exc
    return tuple(out)


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"policy: {key} must be a list of strings")
    return tuple(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"policy: {key} must be true or false")
    return value


def _short(b: bytes) -> str:
    h = b.hex()
    return h if len(h) <= 24 else f"{h[:16]}…{h[-8:]}"


@dataclass(frozen=True)
class Policy:
    """A versioned appraisal policy. `None` for an allow-list means "no constraint" (key absent)."""

    version: int = POLICY_VERSION
    allowed_tee: tuple[str, ...] | None = None
    min_tcb_status: str = "UpToDate"
    allowed_advisory_ids: tuple[str, ...] | None = None
    reject_debug: bool = True
    allow_simulated: bool = False
    report_data: bytes | None = None
    measurements: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)
    allowed_compose_hashes: tuple[bytes, ...] | None = None
    allowed_os_image_hashes: tuple[bytes, ...] | None = None
    allowed_app_ids: tuple[bytes, ...] | None = None
    require_revocation: bool = False

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def default(cls) -> Policy:
        """Rejects debug and simulated evidence; TCB floor UpToDate; everything else unconstrained."""
        return cls()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        if not isinstance(data, Mapping):
            raise UsageError("policy must be a table / JSON object")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise UsageError(f"policy: unknown key(s) {', '.join(unknown)}")
        version = data.get("version")
        if version != POLICY_VERSION:
            raise UsageError(f"policy: version must be {POLICY_VERSION}, got {version!r}")
        kw: dict[str, Any] = {}
        if "allowed_tee" in data:
            kinds = _strings(data["allowed_tee"], "allowed_tee")
            valid = {k.value for k in TeeKind}
            bad = [k for k in kinds if k not in valid]
            if bad:
                raise UsageError(f"policy: allowed_tee has unknown kind(s) {bad}; known: {sorted(valid)}")
            kw["allowed_tee"] = kinds
        if "min_tcb_status" in data:
            status = data["min_tcb_status"]
            if status not in TCB_STATUS_ORDER[:-1]:
                raise UsageError(f"policy: min_tcb_status must be one of {list(TCB_STATUS_ORDER[:-1])}")
            kw["min_tcb_status"] = status
        if "allowed_advisory_ids" in data:
            kw["allowed_advisory_ids"] = _strings(data["allowed_advisory_ids"], "allowed_advisory_ids")
        for key in ("reject_debug", "allow_simulated", "require_revocation"):
            if key in data:
                kw[key] = _bool(data[key], key)
        if "report_data" in data:
            if not isinstance(data["report_data"], str):
                raise UsageError("policy: report_data must be a hex string")
            (kw["report_data"],) = _hexes(data["report_data"], "report_data")
        if "measurements" in data:
            ms = data["measurements"]
            if not isinstance(ms, Mapping):
                raise UsageError("policy: measurements must be a table of name = hex or [hex, ...]")
            kw["measurements"] = {str(k): _hexes(v, f"measurements.{k}") for k, v in ms.items()}
        for key in ("allowed_compose_hashes", "allowed_os_image_hashes", "allowed_app_ids"):
            if key in data:
                if not isinstance(data[key], list):
                    raise UsageError(f"policy: {key} must be a list of hex strings")
                kw[key] = _hexes(data[key], key)
        return cls(**kw)

    @classmethod
    def from_text(cls, text: str, *, fmt: str | None = None) -> Policy:
        """Parse TOML or JSON (`fmt` "toml"/"json"; guessed from the first character when omitted)."""
        if len(text) > DEFAULT_LIMITS.max_policy_size:
            raise UsageError("policy file is too large")
        fmt = fmt or ("json" if text.lstrip().startswith("{") else "toml")
        try:
            data = _json.loads(text) if fmt == "json" else tomllib.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise UsageError(f"policy is not valid {fmt.upper()}: {exc}") from exc
        return cls.from_mapping(data)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file (.toml or .json). Raises UsageError when unreadable or invalid."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read policy {p}: {exc}") from exc
        fmt = {".json": "json", ".toml": "toml"}.get(p.suffix.lower())
        return cls.from_text(text, fmt=fmt)

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "min_tcb_status": self.min_tcb_status,
            "reject_debug": self.reject_debug,
            "allow_simulated": self.allow_simulated,
        }
        if self.require_revocation:
            out["require_revocation"] = True
        if self.allowed_tee is not None:
            out["allowed_tee"] = list(self.allowed_tee)
        if self.allowed_advisory_ids is not None:
            out["allowed_advisory_ids"] = list(self.allowed_advisory_ids)
        if self.report_data is not None:
            out["report_data"] = self.report_data.hex()
        if self.measurements:
            out["measurements"] = {k: [v.hex() for v in vs] for k, vs in self.measurements.items()}
        for key in ("allowed_compose_hashes", "allowed_os_image_hashes", "allowed_app_ids"):
            values: tuple[bytes, ...] | None = getattr(self, key)
            if values is not None:
                out[key] = [v.hex() for v in values]
        return out

    # ---------------------------------------------------------------------------------------- judging

    def check(self, evidence: VerifiedEvidence) -> list[Step]:
        """One Step per rule ("policy:<rule>"), each with its reason. Valid iff every step is ok."""
        return self._check_claims(_Claims.of(evidence))

    def _check_claims(self, c: _Claims) -> list[Step]:
        steps: list[Step] = []
        kind = c.tee.removesuffix("-simulated")
        # (1) TEE kind.
        if self.allowed_tee is not None:
            ok = kind in self.allowed_tee
            steps.append(
                Step(
                    "policy:tee",
                    ok,
                    f"{kind} is allowed" if ok else f"{kind} is not in {list(self.allowed_tee)}",
                )
            )
        # (2) Simulated (development-root) evidence.
        if c.simulated:
            ok = self.allow_simulated
            steps.append(
                Step(
                    "policy:simulated",
                    ok,
                    "simulated TEE evidence allowed by allow_simulated"
                    if ok
                    else "simulated TEE evidence (development root) is not accepted "
                    "(allow_simulated is false)",
                )
            )
        # (3) Debug.
        if self.reject_debug:
            steps.append(
                Step(
                    "policy:debug",
                    not c.debug,
                    f"{kind} is a debug TEE: its memory is readable by the host"
                    if c.debug
                    else "not in debug mode",
                )
            )
        # (3b) Revocation: every certificate below the anchor checked against a CRL or OCSP response.
        if self.require_revocation:
            rev = c.revocation or {}
            missing = list(rev.get("not_checked", ["the chain"])) if not rev.get("complete") else []
            steps.append(
                Step(
                    "policy:revocation",
                    not missing,
                    "every certificate of the chain was checked for revocation"
                    if not missing
                    else f"revocation not checked for {', '.join(map(str, missing))} "
                    "(require_revocation is true)",
                )
            )
        # (4) TCB floor and advisories (Intel TCB statuses; other kinds have no TCB status to compare).
        steps.extend(self._check_tcb(kind, c))
        # (5) Reference measurements.
        for name, accepted in self.measurements.items():
            value = c.measurements.get(name)
            if value is None:
                steps.append(
                    Step(f"policy:measurement:{name}", False, f"the evidence has no measurement {name!r}")
                )
                continue
            ok = value in accepted
            steps.append(
                Step(
                    f"policy:measurement:{name}",
                    ok,
                    f"{name} {_short(value)} matches a reference value"
                    if ok
                    else f"{name} {_short(value)} matches none of the {len(accepted)} reference value(s)",
                )
            )
        # (6) report_data.
        if self.report_data is not None:
            expected = self.report_data.ljust(len(c.report_data), b"\x00")
            ok = c.report_data == expected
            steps.append(
                Step(
                    "policy:report_data",
                    ok,
                    "report_data matches"
                    if ok
                    else f"report_data {_short(c.report_data)} is not the expected {_short(expected)}",
                )
            )
        # (7) What the event log says ran.
        for key, attr, label in (
            ("allowed_compose_hashes", "compose_hash", "compose hash"),
            ("allowed_os_image_hashes", "os_image_hash", "OS image hash"),
            ("allowed_app_ids", "app_id", "app id"),
        ):
            allowed: tuple[bytes, ...] | None = getattr(self, key)
            if allowed is None:
                continue
            name = f"policy:{attr}"
            got: bytes = getattr(c.app_info, attr) if c.app_info is not None else b""
            if c.app_info is None:
                steps.append(Step(name, False, f"no verified event log, so the {label} is unknown"))
            elif not got:
                steps.append(Step(name, False, f"the event log does not measure a {label}"))
            else:
                ok = got in allowed
                steps.append(
                    Step(name, ok, f"{label} {_short(got)} " + ("is allowed" if ok else f"is not in {key}"))
                )
        return steps

    def _check_tcb(self, kind: str, c: _Claims) -> Sequence[Step]:
        steps: list[Step] = []
        if kind in _INTEL_KINDS or c.tcb_status in TCB_STATUS_ORDER:
            floor = TCB_STATUS_ORDER.index(self.min_tcb_status)
            rank = TCB_STATUS_ORDER.index(c.tcb_status) if c.tcb_status in TCB_STATUS_ORDER else None
            ok = rank is not None and rank <= floor and c.tcb_status != "Revoked"
            reason = (
                f"TCB status {c.tcb_status} meets the floor {self.min_tcb_status}"
                if ok
                else f"TCB status {c.tcb_status or '(none)'} is below the policy floor {self.min_tcb_status}"
            )
            steps.append(Step("policy:tcb_status", ok, reason))
        if self.allowed_advisory_ids is not None:
            extra = [a for a in c.advisory_ids if a not in self.allowed_advisory_ids]
            steps.append(
                Step(
                    "policy:advisories",
                    not extra,
                    f"advisories not allowed by the policy: {', '.join(extra)}"
                    if extra
                    else "all advisories are allowed"
                    if c.advisory_ids
                    else "no advisories",
                )
            )
        return steps
