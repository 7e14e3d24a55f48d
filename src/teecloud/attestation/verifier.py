"""One entry point for every TEE kind: detect, verify, replay, judge; report each step.

`verify()` is what a user-facing tool calls: it never raises on hostile evidence, it returns a
`VerificationResult` whose `steps` say what passed and what failed, and why. Caller mistakes (missing
collateral, an unreadable policy, a trust anchor that is not a certificate) raise `UsageError`.

`verify_tdx_with_event_log()` is what services embed (the KMS, the RA-TLS verifier): it returns a
`VerifiedEvidence` with `app_info` filled from the replayed event log, or raises a `VerificationError`.

`peer_evidence_kind()` / `verify_peer_evidence()` are the same for every kind a peer may present in an
RA-TLS certificate (the raw bytes of a TDX quote or a SEV-SNP report; no text or JSON containers): the
peer verifier (teecloud.peer) decides which kinds a caller accepts, then verifies through here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from teecloud import _json
from teecloud.attestation import dcap, eventlog, nitro, nvidia, snp
from teecloud.attestation._cache import BoundedCache, named_cache
from teecloud.attestation._limits import DEFAULT_LIMITS, VerifierLimits
from teecloud.attestation._revocation import Revocation
from teecloud.attestation.errors import (
    MalformedEvidence,
    PolicyViolation,
    TcbNotAcceptable,
    UntrustedRoot,
    UsageError,
    VerificationError,
)
from teecloud.attestation.models import (
    AppInfo,
    EventLogEntry,
    Step,
    TeeKind,
    VerificationResult,
    VerifiedEvidence,
)
from teecloud.attestation.policy import Policy

__all__ = [
    "TrustAnchors",
    "detect_kind",
    "peer_evidence_kind",
    "split_certificates",
    "unwrap_evidence",
    "verify",
    "verify_peer_evidence",
    "verify_tdx_with_event_log",
]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
# ------------------------------------------------------------------------------------------ certificates


def split_certificates(blobs: bytes | Iterable[bytes]) -> list[bytes]:
    """Certificates (DER) from PEM text (any number of blocks) or single DER blobs. Raises UsageError."""
    items = [blobs] if isinstance(blobs, bytes | bytearray) else list(blobs)
    out: list[bytes] = []
    for item in items:
        blob = bytes(item)
        hit = _SPLIT.get(blob)
        if hit is not None:
            out += hit
            continue
        before = len(out)
        pems = _PEM_CERT.findall(blob)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # AMD VCEKs carry non-positive serial numbers
                if pems:
                    out += [x509.load_pem_x509_certificate(p).public_bytes(Encoding.DER) for p in pems]
                else:
                    out += [
                        x509.load_der_x509_certificate(d).public_bytes(Encoding.DER) for d in _der_items(blob)
                    ]
        except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
            raise UsageError(f"not a certificate (PEM or DER): {exc}") from exc
        _SPLIT.put(blob, tuple(out[before:]), 2 * len(blob))
    return out


_SPLIT: BoundedCache[bytes, tuple[bytes, ...]] = named_cache("x509.split")


def _der_items(blob: bytes) -> list[bytes]:
    """A DER bundle: one certificate, or several concatenated (each a SEQUENCE with a definite length).
    Anything that is not exactly such a sequence of SEQUENCEs is returned whole, for the loader to judge."""
    items: list[bytes] = []
    pos = 0
    while pos < len(blob) and len(items) < 16:
        if blob[pos] != 0x30 or pos + 2 > len(blob):
            return [blob]
        length, head = blob[pos + 1], 2
        if length & 0x80:
            n = length & 0x7F
            if not 1 <= n <= 3 or pos + 2 + n > len(blob):
                return [blob]
            length, head = int.from_bytes(blob[pos + 2 : pos + 2 + n], "big"), 2 + n
        end = pos + head + length
        if end > len(blob):
            return [blob]
        items.append(blob[pos:end])
        pos = end
    return items if pos == len(blob) and items else [blob]


def _load(der: bytes) -> x509.Certificate:
    hit = _LOADED.get(der)
    if hit is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hit = x509.load_der_x509_certificate(der)
        _LOADED.put(der, hit, 3 * len(der))
    return hit


_LOADED: BoundedCache[bytes, x509.Certificate] = named_cache("x509.loaded")


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


def _to_pem(ders: Iterable[bytes]) -> bytes:
    return b"".join(_load(d).public_bytes(Encoding.PEM) for d in ders)


def _self_signed(der: bytes) -> bool:
    cert = _load(der)
    return cert.subject == cert.issuer


@dataclass(frozen=True)
class TrustAnchors:
    """Vendor roots the caller trusts. Intel's root defaults to the one built into dcap-qvl.

    `amd_ark` may also hold ASK certificates (AMD publishes them together as `cert_chain`): self-signed ones
    are the anchors, the others serve as intermediates. `other` holds certificates whose vendor could not be
    recognised; they are offered to the SEV-SNP, Nitro and NVIDIA chain checks. `dev_root_der` is the
    teecloud development root, trusted only when given explicitly.
    """

    intel_root_der: bytes | None = None
    amd_ark: tuple[bytes, ...] = ()
    nitro_roots: tuple[bytes, ...] = ()
    nvidia_roots: tuple[bytes, ...] = ()
    dev_root_der: bytes | None = None
    other: tuple[bytes, ...] = ()

    @classmethod
    def from_certificates(cls, blobs: Iterable[bytes], *, dev_root_der: bytes | None = None) -> TrustAnchors:
        """Sort certificates (PEM or DER blobs) by vendor, from their subject names."""
        intel: bytes | None = None
        amd: list[bytes] = []
        nitro: list[bytes] = []
        nvidia: list[bytes] = []
        other: list[bytes] = []
        for der in split_certificates(list(blobs)):
            cert = _load(der)
            cn, org = _attr(cert, NameOID.COMMON_NAME), _attr(cert, NameOID.ORGANIZATION_NAME)
            if cn.startswith(dcap.DEV_ROOT_CN_PREFIX):
                raise UsageError(
                    f"{cn!r} is a teecloud development root: "
                    "trust it with --trust-dev-root, not as a vendor root"
                )
            if cn == "Intel SGX Root CA":
                intel = der
            elif org == "Advanced Micro Devices" or cn.startswith(("ARK-", "ASK-")):
                amd.append(der)
            elif "nitro-enclaves" in cn or org == "Amazon":
                nitro.append(der)
            elif "NVIDIA" in org or "NVIDIA" in cn:
                nvidia.append(der)
            else:
                other.append(der)
        return cls(
            intel_root_der=intel,
            amd_ark=tuple(amd),
            nitro_roots=tuple(nitro),
            nvidia_roots=tuple(nvidia),
            dev_root_der=dev_root_der,
            other=tuple(other),
        )


def _normalized(a: TrustAnchors) -> TrustAnchors:
    """Every anchor as one DER certificate (callers may pass PEM bundles); UsageError if not certificates."""
    return replace(
        a,
        amd_ark=tuple(split_certificates(a.amd_ark)),
        nitro_roots=tuple(split_certificates(a.nitro_roots)),
        nvidia_roots=tuple(split_certificates(a.nvidia_roots)),
        other=tuple(split_certificates(a.other)),
    )


# ------------------------------------------------------------------------------------------------ detect


@dataclass(frozen=True)
class _Detected:
    kind: TeeKind
    payload: bytes  # the quote / report / document itself
    event_log: str | None = None  # from a dstack {"quote", "event_log"} file
    container: str = ""


def _dstack_json(data: bytes) -> _Detected | None:
    if not data.lstrip()[:1] == b"{":
        return None
    hit = _DSTACK_JSON.get(data)
    if hit is None:
        # Pure function of the bytes, cached like the collateral: decoding 17 KB of JSON and hex costs a
        # tenth of a verification, and a CVM re-sends the same document.
        hit = _dstack_json_decode(data)
        _DSTACK_JSON.put(data, hit, len(data) + len(hit.payload) + 2 * len(hit.event_log or ""))
    return hit


_DSTACK_JSON: BoundedCache[bytes, _Detected] = named_cache("dstack.json")


def _dstack_json_decode(data: bytes) -> _Detected:
    try:
        obj = _json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedEvidence(f"evidence looks like JSON but does not parse: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("quote"), str):
        raise MalformedEvidence('JSON evidence must be a dstack object with a hex "quote" field')
    try:
        quote = bytes.fromhex(obj["quote"].removeprefix("0x"))
    except ValueError as exc:
        raise MalformedEvidence('the "quote" field is not hex') from exc
    log = obj.get("event_log")
    if log is not None and not isinstance(log, str):
        log = json.dumps(log)
    if not dcap.looks_like_dcap_quote(quote):
        raise MalformedEvidence('the "quote" field is not a DCAP quote')
    kind = TeeKind.TDX if dcap.parse_quote(quote)["tee"] == "tdx" else TeeKind.SGX
    return _Detected(kind, quote, log, container="dstack JSON")


_SNIFFERS = (
    (TeeKind.SNP, snp.looks_like),
    (TeeKind.NITRO, nitro.looks_like),
    (TeeKind.NVIDIA, nvidia.looks_like),
)


def detect_kind(evidence: bytes) -> TeeKind | None:
    """The TEE kind of `evidence` from its structure, or None when unrecognised (never raises)."""
    try:
        return _detect(bytes(evidence), None).kind
    except (VerificationError, ValueError, TypeError):
        return None


_HEX_TEXT = frozenset(b"0123456789abcdefABCDEF \t\r\n")
_B64_TEXT = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \t\r\n")


def _text_payload(data: bytes) -> tuple[bytes, str] | None:
    """Evidence written as text: hex (dstack's tappd, explorers; optional 0x) or base64 (standard or
    URL-safe). Returns the decoded bytes and the container's name, or None when `data` is neither."""
    text = data.strip()
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    if not text or len(text) > 2 * DEFAULT_LIMITS.max_evidence_size:
        return None
    if all(c in _HEX_TEXT for c in text):
        compact = b"".join(text.split())
        if len(compact) % 2 == 0:
            return bytes.fromhex(compact.decode()), "hex text"
    if all(c in _B64_TEXT for c in text):
        compact = b"".join(text.split())
        try:
            raw = base64.b64decode(compact.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
        except (binascii.Error, ValueError):
            return None
        return raw, "base64 text"
    return None


def _detect(data: bytes, kind: TeeKind | None) -> _Detected:
    found = _detect_binary(data)
    if found is None and data[:1] != b"{":
        # Text forms of the same evidence: hex or base64 of a quote, report, document or SPDM exchange.
        # NVIDIA's own files are hex text of the exchange, recognised either way.
        decoded = _text_payload(data)
        if decoded is not None:
            inner = _detect_binary(decoded[0])
            if inner is not None and inner.event_log is None:
                found = replace(inner, container=decoded[1])
    if found is None:
        if kind is not None:
            raise MalformedEvidence(f"evidence is not {kind.value} evidence (unrecognised format)")
        raise MalformedEvidence(
            "unrecognised evidence format (not a DCAP quote, SEV-SNP report, Nitro or NVIDIA document, "
            "raw or as hex / base64 text or dstack JSON)"
        )
    if kind is not None and found.kind != kind:
        raise MalformedEvidence(f"evidence is not {kind.value} evidence: it looks like {found.kind.value}")
    return found


def unwrap_evidence(evidence: bytes) -> tuple[TeeKind, bytes]:
    """The kind and the binary evidence inside `evidence` as a user has it: raw, hex or base64 text,
    dstack JSON / the dstack SDK's GetQuote output. Raises MalformedEvidence when unrecognised."""
    found = _detect(bytes(evidence), None)
    return found.kind, found.payload


def _detect_binary(data: bytes) -> _Detected | None:
    found = _dstack_json(data)
    if found is None and dcap.looks_like_dcap_quote(data):
        found = _Detected(TeeKind.TDX if dcap.parse_quote(data)["tee"] == "tdx" else TeeKind.SGX, data)
    if found is None:
        for other, looks_like in _SNIFFERS:
            if looks_like(data):
                found = _Detected(other, data)
                break
    return found


# ------------------------------------------------------------------------------------------------ verify


def _event_log_step(
    ev: VerifiedEvidence, log: str | bytes | Sequence[EventLogEntry], limits: VerifierLimits
) -> VerifiedEvidence:
    measured = tuple(sorted((k, v) for k, v in ev.measurements.items() if k in _APP_INFO_INPUTS))
    if isinstance(log, str | bytes):
        # A pure function of the log text and the quoted registers: a CVM presents the same log and
        # quote with every RA-TLS handshake. Only successes are cached.
        key = (log, measured, ev.device_id, limits)
        hit = _REPLAYED.get(key)
        if hit is None:
            hit = _replay(tuple(eventlog.parse_event_log(log, limits=limits)), measured, ev.device_id)
            _REPLAYED.put(key, hit, len(log) + 2048)
        app, reason = hit
    else:
        app, reason = _replay(tuple(log), measured, ev.device_id)
    return replace(ev, app_info=app, steps=(*ev.steps, Step("event_log_verified", True, reason)))


# The measurements the replay and the derived values (mr_system, mr_aggregated) depend on.
_APP_INFO_INPUTS = frozenset(
    ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner", "mr_owner_config")
)


def _replay(
    entries: tuple[EventLogEntry, ...], measured: tuple[tuple[str, bytes], ...], device_id: bytes
) -> tuple[AppInfo, str]:
    measurements = dict(measured)
    rtmrs = [measurements[f"rtmr{i}"] for i in range(4)]
    app = eventlog.verify_event_log(entries, rtmrs)
    app = eventlog.derive_app_info(measurements, entries, device_id=device_id, app_info=app)
    named = sum(1 for e in entries if e.imr == 3)
    return app, f"{len(entries)} events replay to RTMR0-3 ({named} in RTMR3)"


_REPLAYED: BoundedCache[
    tuple[str | bytes, tuple[tuple[str, bytes], ...], bytes, VerifierLimits], tuple[AppInfo, str]
] = named_cache("eventlog.replayed")


def _verify_kind(
    found: _Detected,
    *,
    collateral: bytes | str | None,
    cert_chain: bytes | Sequence[bytes] | None,
    anchors: TrustAnchors,
    now: int,
    limits: VerifierLimits,
    expected_nonce: bytes | None,
    revocation: Revocation,
) -> VerifiedEvidence:
    if found.kind in (TeeKind.TDX, TeeKind.SGX):
        if collateral is None:
            chain = dcap.parse_quote(found.payload)["pck_chain_pem"]
            if dcap.is_development_chain(chain) and anchors.dev_root_der is None:
                # Say what it is, not what is missing: no collateral would make it acceptable.
                raise UntrustedRoot(
                    f"{dcap.DEV_ROOT_REASON}: simulated evidence, rejected unless the development root "
                    "is trusted (--trust-dev-root)"
                )
            raise UsageError(f"{found.kind.value.upper()} quotes need collateral (QuoteCollateralV3 JSON)")
        return dcap.verify_dcap_quote(
            found.payload,
            collateral,
            now=now,
            dev_root_der=anchors.dev_root_der,
            intel_root_der=anchors.intel_root_der,
            limits=limits,
        )
    chain = split_certificates(cert_chain) if cert_chain else []
    if found.kind == TeeKind.SNP:
        pool = [*anchors.amd_ark, *anchors.other]
        roots = [c for c in pool if _self_signed(c)]
        # The signing key's certificate: the VCEK, or the VLEK of a VLEK-signed report (the report says).
        names = ("VCEK", "VLEK")
        vceks = [c for c in chain if any(n in _attr(_load(c), NameOID.COMMON_NAME) for n in names)] or chain[
            :1
        ]
        if not vceks:
            raise UsageError("SEV-SNP evidence needs its VCEK or VLEK certificate (--cert-chain VCEK.der)")
        vcek = vceks[0]
        intermediates = [c for c in chain if c != vcek] + [c for c in pool if c not in roots]
        return snp.verify_snp_report(
            found.payload,
            vcek_der=vcek,
            cert_chain_pem=_to_pem(intermediates),
            trust_anchors=roots,
            now=now,
            revocation=revocation,
        )
    if found.kind == TeeKind.NITRO:
        return nitro.verify_nitro_document(
            found.payload,
            trust_anchors=[*anchors.nitro_roots, *anchors.other],
            now=now,
            revocation=revocation,
        )
    if not chain:
        raise UsageError("NVIDIA evidence needs the device certificate chain (--cert-chain FILE, leaf first)")
    return nvidia.verify_nvidia_evidence(
        found.payload,
        cert_chain_pem=_to_pem(chain),
        trust_anchors=[*anchors.nvidia_roots, *anchors.other],
        now=now,
        expected_nonce=expected_nonce,
        revocation=revocation,
    )


def verify(
    evidence: bytes,
    *,
    kind: TeeKind | str | None = None,
    collateral: bytes | str | None = None,
    cert_chain: bytes | Sequence[bytes] | None = None,
    event_log: str | bytes | Sequence[EventLogEntry] | None = None,
    anchors: TrustAnchors | None = None,
    policy: Policy | None = None,
    now: int,
    expected_nonce: bytes | None = None,
    crls: Sequence[bytes] = (),
    ocsp_responses: Sequence[bytes] = (),
    limits: VerifierLimits = DEFAULT_LIMITS,
) -> VerificationResult:
    """Verify evidence of any supported kind and judge it with `policy` (default: `Policy.default()`).

    `crls` / `ocsp_responses` (DER; CRLs also PEM) are checked offline against the SEV-SNP, Nitro and NVIDIA
    chains (AMD's KDS CRL, CRLs from the certificates' distribution points, NVIDIA's OCSP answers); without
    them those results say "revocation not checked" (Policy.require_revocation makes that a rejection).
    TDX/SGX revocation comes with the collateral (dcap-qvl checks both CRLs).

    Steps:
      (1) size limit, then detect the kind (DCAP header, dstack JSON, SEV-SNP / Nitro / NVIDIA sniffers);
          a given `kind` must agree with what the bytes are;
      (2) the kind's verifier: signatures, certificate chain to `anchors`, collateral, TCB;
      (3) TDX with an event log (argument, or inside dstack JSON): replay into RTMR0-3, read app info;
      (4) the policy, one step per rule.
    Never raises on hostile evidence: every rejection is a result with is_valid=False and the failing step.
    """
    if isinstance(now, bool) or not isinstance(now, int):
        raise UsageError("now must be an int (unix seconds)")
    anchors = _normalized(anchors or TrustAnchors())
    policy = policy or Policy.default()
    try:
        want = TeeKind(kind) if kind is not None else None
    except ValueError as exc:
        raise UsageError(f"unknown kind {kind!r}; expected one of {[k.value for k in TeeKind]}") from exc
    steps: list[Step] = []
    tee = want.value if want else ""
    try:
        try:
            # (1): limits and kind.
            data = bytes(evidence)
            if len(data) > limits.max_evidence_size:
                raise MalformedEvidence(
                    f"evidence is {len(data)} bytes, over the {limits.max_evidence_size}-byte limit"
                )
            found = _detect(data, want)
            tee = found.kind.value
            # (2): the kind's verifier.
            ev = _verify_kind(
                found,
                collateral=collateral,
                cert_chain=cert_chain,
                anchors=anchors,
                now=now,
                limits=limits,
                expected_nonce=expected_nonce,
                revocation=Revocation(tuple(bytes(c) for c in crls), tuple(bytes(o) for o in ocsp_responses)),
            )
            tee = ev.tee
            steps = list(ev.steps)
            # (3): event log.
            log = event_log if event_log is not None else found.event_log
            if log is not None:
                if ev.kind != TeeKind.TDX:
                    raise UsageError(f"event-log replay is for TDX evidence, not {ev.kind.value}")
                ev = _event_log_step(ev, log, limits)
                steps = list(ev.steps)
        except (VerificationError, UsageError):
            raise
        except Exception as exc:  # the boundary: a parser bug must not become a traceback or an accept
            raise MalformedEvidence(f"evidence could not be parsed ({type(exc).__name__}: {exc})") from exc
    except VerificationError as err:
        steps.append(Step(err.step, False, err.reason))
        return VerificationResult(False, tee, err.reason, tuple(steps))
    # (4): policy.
    judged = policy.check(ev)
    steps += judged
    failed = next((s for s in judged if not s.ok), None)
    return VerificationResult(
        is_valid=failed is None,
        tee=ev.tee,
        reason=failed.reason if failed else "ok",
        steps=tuple(steps),
        evidence=ev,
        tcb_status=ev.tcb_status,
        advisory_ids=ev.advisory_ids,
    )


def verify_tdx_with_event_log(
    quote: bytes,
    collateral: bytes | str,
    event_log: str | bytes | Sequence[EventLogEntry],
    *,
    now: int,
    dev_root_der: bytes | None = None,
    policy: Policy | None = None,
    intel_root_der: bytes | None = None,
    limits: VerifierLimits = DEFAULT_LIMITS,
) -> VerifiedEvidence:
    """Verify a TDX quote, replay its event log, fill `app_info`, and apply `policy` (default
    `Policy.default()`). Returns the evidence with every step, or raises a VerificationError subclass
    (PolicyViolation / TcbNotAcceptable name the failing policy step)."""
    policy = policy or Policy.default()
    try:
        if len(quote) >= 8 and (quote[:2] == b"\x03\x00" or quote[4:8] == bytes(4)):
            raise MalformedEvidence("expected a TDX quote, got an SGX quote")
        ev = dcap.verify_dcap_quote(
            quote,
            collateral,
            now=now,
            dev_root_der=dev_root_der,
            intel_root_der=intel_root_der,
            limits=limits,
        )
        ev = _event_log_step(ev, event_log, limits)
    except (VerificationError, UsageError, TypeError):
        raise
    except Exception as exc:  # boundary, as in verify()
        raise MalformedEvidence(f"evidence could not be parsed ({type(exc).__name__}: {exc})") from exc
    judged = policy.check(ev)
    for step in judged:
        if not step.ok:
            cls = (
                TcbNotAcceptable
                if step.name in ("policy:tcb_status", "policy:advisories")
                else PolicyViolation
            )
            raise cls(step.reason, step=step.name)
    return replace(ev, steps=(*ev.steps, *judged))


# The kinds a peer's RA-TLS certificate may carry, and how their raw bytes are recognised.
PEER_KINDS: tuple[TeeKind, ...] = (TeeKind.TDX, TeeKind.SNP)


def peer_evidence_kind(evidence: bytes) -> TeeKind:
    """The kind of the raw evidence a peer presents: a TDX quote or a SEV-SNP report, nothing else (an SGX
    quote, a Nitro or NVIDIA document, text or JSON wrappers are not peer evidence). Raises
    MalformedEvidence."""
    data = bytes(evidence)
    if dcap.looks_like_dcap_quote(data):
        if len(data) >= 8 and (data[:2] == b"\x03\x00" or data[4:8] == bytes(4)):
            raise MalformedEvidence(
                "the evidence is an SGX quote; a peer presents a TDX quote or SEV-SNP report"
            )
        return TeeKind.TDX
    if snp.looks_like(data):
        return TeeKind.SNP
    raise MalformedEvidence("unrecognised peer evidence (neither a TDX quote nor a SEV-SNP report)")


def verify_peer_evidence(
    evidence: bytes,
    *,
    collateral: bytes | str,
    event_log: str | bytes,
    now: int,
    anchors: TrustAnchors | None = None,
    policy: Policy | None = None,
    limits: VerifierLimits = DEFAULT_LIMITS,
) -> VerifiedEvidence:
    """Verify a peer's evidence of any kind in PEER_KINDS and apply `policy`; raise a VerificationError.

    (1) the kind from the raw bytes (peer_evidence_kind);
    (2) TDX: `collateral` is QuoteCollateralV3 JSON and `event_log` replays into RTMR0-3
        (verify_tdx_with_event_log, with anchors.dev_root_der / intel_root_der);
        SEV-SNP: `collateral` is the VCEK (or VLEK) certificate with its ASK, DER or PEM, chained to
        anchors.amd_ark; there is no event log (a non-empty one is refused: it could only be a claim);
    (3) the policy, each failing rule raising PolicyViolation / TcbNotAcceptable with its step.
    Caller mistakes (no AMD root for SEV-SNP evidence) raise UsageError."""
    kind = peer_evidence_kind(evidence)  # (1)
    anchors = anchors or TrustAnchors()
    if kind == TeeKind.TDX:  # (2) TDX
        return verify_tdx_with_event_log(
            bytes(evidence),
            collateral,
            event_log,
            now=now,
            dev_root_der=anchors.dev_root_der,
            policy=policy,
            intel_root_der=anchors.intel_root_der,
            limits=limits,
        )
    # (2) SEV-SNP
    if event_log:
        raise MalformedEvidence("SEV-SNP evidence has no event log (an event log is TDX's RTMR replay)")
    if not anchors.amd_ark:
        raise UsageError("SEV-SNP evidence needs the AMD root (ARK) as a trust anchor")
    chain = collateral.encode() if isinstance(collateral, str) else bytes(collateral)
    try:
        ev = _verify_kind(
            _Detected(kind, bytes(evidence)),
            collateral=None,
            cert_chain=chain,
            anchors=_normalized(anchors),
            now=now,
            limits=limits,
            expected_nonce=None,
            revocation=Revocation((), ()),
        )
    except (VerificationError, UsageError):
        raise
    except Exception as exc:  # boundary, as in verify()
        raise MalformedEvidence(f"evidence could not be parsed ({type(exc).__name__}: {exc})") from exc
    # (3)
    judged = (policy or Policy.default()).check(ev)
    for step in judged:
        if not step.ok:
            cls = (
                TcbNotAcceptable
                if step.name in ("policy:tcb_status", "policy:advisories")
                else PolicyViolation
            )
            raise cls(step.reason, step=step.name)
    return replace(ev, steps=(*ev.steps, *judged))
