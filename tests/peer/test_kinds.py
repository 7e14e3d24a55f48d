"""Every evidence kind through the one peer verifier: the per-caller allowlist, real TDX / SEV-SNP / SGX
vectors inside RA-TLS certificates, and the boot-time rule that only TDX evidence can satisfy."""

from __future__ import annotations

import calendar
import json
import random
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation.models import TeeKind, VerifiedEvidence
from teecloud.keys import ratls
from teecloud.keys.certs import issue_cert
from teecloud.keys.ratls import OID_EVENT_LOG, OID_QUOTE, make_ratls_cert, parse_ratls_cert
from teecloud.peer import (
    AttestedPeer,
    PeerPolicy,
    PeerRejected,
    PeerVerifier,
    StaticCollateral,
    require_boot_time,
)
from teecloud.tee.simulated import SimulatedTdx

from .test_verifier import booted, cert, rejected, verifier

SNP_PIN = calendar.timegm((2026, 7, 1, 0, 0, 0))
TDX_PIN = calendar.timegm((2025, 7, 4, 0, 0, 0))
SGX_PIN = TDX_PIN


def _carrying(evidence: bytes, *, at: int, log: bytes = b"", app_id: bytes | None = None) -> bytes:
    """An RA-TLS certificate (attacker's own key) whose quote extension carries `evidence` as is."""
    key = ec.generate_private_key(ec.SECP256R1())
    exts = [ratls._ext(OID_QUOTE, evidence)]
    if log:
        exts.append(ratls._ext(OID_EVENT_LOG, log))
    if app_id is not None:
        exts.append(ratls._ext(ratls.OID_APP_ID, app_id))
    c = issue_cert(
        key.public_key(),
        issuer_key=key,
        issuer_name=None,
        subject_cn="peer",
        not_before=at - 60,
        not_after=at + 600,
        extra_extensions=exts,
    )
    return c.public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> bytes:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # real VCEKs carry a non-positive serial number
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


class _Fixed:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def collateral_for(self, quote: bytes, *, now: int) -> bytes:
        return self.blob


@pytest.fixture
def snp_vec(vectors: Path) -> dict[str, bytes]:
    d = vectors / "snp"
    return {
        "report": (d / "go-sev-guest_attestation.bin").read_bytes(),
        "vcek": (d / "go-sev-guest_vcek.testcer").read_bytes(),
        "ask_ark": (d / "go-sev-guest_ask_ark_milan.pem").read_bytes(),
    }


def _snp_verifier(v: dict[str, bytes], *, roots: bytes | None = None, clock: int = SNP_PIN) -> PeerVerifier:
    # the VCEK source gives the VCEK and the ASK/ARK bundle; the trusted root is the caller's own
    policy = PeerPolicy(accepted_kinds=(TeeKind.TDX, TeeKind.SNP), amd_roots=(roots or v["ask_ark"],))
    return PeerVerifier(
        policy,
        _Fixed(b""),
        snp_certs=_Fixed(_pem(v["vcek"]) + v["ask_ark"]),
        clock=lambda: clock,
    )


def test_default_allowlist_is_tdx_only_and_says_so(snp_vec: dict[str, bytes]) -> None:
    der = _carrying(snp_vec["report"], at=SNP_PIN)
    v = PeerVerifier(PeerPolicy(), _Fixed(b""), clock=lambda: SNP_PIN)
    err = rejected(v, der)
    assert err.step == "kind" and "snp evidence is not accepted for this policy" in err.reason
    with pytest.raises(PeerRejected) as q:
        v.verify_quote(snp_vec["report"], "")
    assert q.value.step == "kind"


def test_policy_allowlist_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="AMD root"):
        PeerPolicy(accepted_kinds=(TeeKind.SNP,))
    with pytest.raises(ValueError, match="subset"):
        PeerPolicy(accepted_kinds=(TeeKind.NITRO,))
    with pytest.raises(ValueError, match="subset"):
        PeerPolicy(accepted_kinds=())


def test_real_snp_report_is_verified_through_the_attestation_verifier(snp_vec: dict[str, bytes]) -> None:
    """The go-sev-guest report (real Milan hardware) is a debug guest: the signature and the VCEK chain
    verify, then the peer policy refuses it, never a debug TEE."""
    v = _snp_verifier(snp_vec)
    with pytest.raises(PeerRejected) as err:
        v.verify_quote(snp_vec["report"], "")
    assert "debug" in err.value.reason, err.value.reason
    # inside an RA-TLS certificate: the same verdict (the evidence is judged before anything it claims)
    assert "debug" in rejected(v, _carrying(snp_vec["report"], at=SNP_PIN)).reason


def test_snp_signature_chain_and_log_are_checked(snp_vec: dict[str, bytes]) -> None:
    v = _snp_verifier(snp_vec)
    report = bytearray(snp_vec["report"])
    report[0x90] ^= 1  # MEASUREMENT: covered by the signature
    err = rejected(v, _carrying(bytes(report), at=SNP_PIN))
    assert err.step == "quote_verified" and "signature does not verify" in err.reason, (err.step, err.reason)
    # an untrusted root: the chain does not end at the caller's ARK
    other_root = (Path(__file__).parents[2] / "../shared/vectors/tdx/Intel_SGX_RootCA.der").resolve()
    policy = PeerPolicy(accepted_kinds=(TeeKind.SNP,), amd_roots=(other_root.read_bytes(),))
    bundle = _Fixed(_pem(snp_vec["vcek"]) + snp_vec["ask_ark"])  # the source's own ARK is no anchor
    w = PeerVerifier(policy, _Fixed(b""), snp_certs=bundle, clock=lambda: SNP_PIN)
    assert rejected(w, _carrying(snp_vec["report"], at=SNP_PIN)).step == "cert_chain_verified"
    # an event log beside SNP evidence could only be a claim: refused
    log = json.dumps([]).encode() + b" "
    assert rejected(v, _carrying(snp_vec["report"], at=SNP_PIN, log=log)).step == "parsed"
    # no VCEK source configured: fail closed
    x = PeerVerifier(_snp_verifier(snp_vec).policy, _Fixed(b""), clock=lambda: SNP_PIN)
    assert rejected(x, _carrying(snp_vec["report"], at=SNP_PIN)).step == "collateral_ok"


def test_real_tdx_quote_in_someone_elses_certificate_is_refused(vectors: Path) -> None:
    """A genuine Intel-signed quote (dcap-qvl's sample) copied into an attacker's certificate: the quote
    verifies against Intel's root and its collateral, and is refused after that."""
    quote = (vectors / "tdx" / "tdx_quote").read_bytes()
    collateral = (vectors / "tdx" / "tdx_quote_collateral.json").read_bytes()
    v = PeerVerifier(PeerPolicy.production(), _Fixed(collateral), clock=lambda: TDX_PIN)
    # signature, PCK chain and collateral pass (Intel's root); then no log the attacker has replays to its
    # RTMRs, and a log that did would still meet the binding (report_data 9a9d48e7... is not this key's)
    err = rejected(v, _carrying(quote, at=TDX_PIN, log=b"[]"))
    assert err.step == "event_log_verified" and "RTMR0 does not match" in err.reason, (err.step, err.reason)
    # the same certificate 40 days later: collateral expired
    late = PeerVerifier(PeerPolicy.production(), _Fixed(collateral), clock=lambda: TDX_PIN + 40 * 86400)
    assert rejected(late, _carrying(quote, at=TDX_PIN + 40 * 86400, log=b"[]")).step == "collateral_ok"


def test_sgx_quote_is_not_peer_evidence(vectors: Path) -> None:
    quote = (vectors / "sgx" / "sgx_quote").read_bytes()
    collateral = (vectors / "sgx" / "sgx_quote_collateral.json").read_bytes()
    v = PeerVerifier(PeerPolicy.production(), _Fixed(collateral), clock=lambda: SGX_PIN)
    err = rejected(v, _carrying(quote, at=SGX_PIN))
    assert err.step == "parsed" and "SGX" in err.reason


def test_snp_peer_never_passes_the_boot_time_rule(snp_vec: dict[str, bytes]) -> None:
    """require_boot_time is defined over RTMR3: evidence of a kind without one is refused with the reason,
    whatever it carries (here: verified-looking SNP evidence with an app_info forged in memory)."""
    from teecloud.attestation.models import AppInfo

    ev = VerifiedEvidence(
        tee="snp",
        tcb_status="VcekTcbMatched",
        advisory_ids=(),
        measurements={"measurement": bytes(48)},
        report_data=bytes(64),
        debug=False,
        app_info=AppInfo(app_id=bytes(20), compose_hash=bytes(32)),
    )
    peer = AttestedPeer(ev, None)
    with pytest.raises(PeerRejected) as err:
        require_boot_time(peer)
    assert err.value.step == "boot_time" and "snp has no RTMR3" in err.value.reason
    # and it names no app: reading its identity fails closed
    with pytest.raises(PeerRejected) as ident:
        _ = peer.app_id
    assert ident.value.step == "boot_info"


def test_tdx_peer_still_passes_the_boot_time_rule(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    peer = verifier(tee).verify_cert(cert(tee))
    assert peer.kind == TeeKind.TDX
    assert require_boot_time(peer).app_id == peer.app_id


def _self_signed(tee: SimulatedTdx, key: ec.EllipticCurvePrivateKey, now: int) -> x509.Certificate:
    return make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject="s",
        usage="x",
        not_before=now,
        not_after=now + 600,
    )


def test_tampered_event_log_is_refused(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    good = make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject="s",
        usage="x",
        not_before=now,
        not_after=now + 600,
    )
    log = [e for e in json.loads(parse_ratls_cert(good).event_log) if e["event"] != "instance-id"]
    forged = issue_cert(
        key.public_key(),
        issuer_key=key,
        issuer_name=None,
        subject_cn="s",
        not_before=now,
        not_after=now + 600,
        extra_extensions=[
            ratls._ext(OID_QUOTE, parse_ratls_cert(good).quote),
            ratls._ext(OID_EVENT_LOG, json.dumps(log).encode()),
        ],
    )
    assert (
        rejected(verifier(tee), forged.public_bytes(serialization.Encoding.DER)).step == "event_log_verified"
    )


def test_untrusted_dev_root_and_debug_and_expiry(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    other = SimulatedTdx(teecloud_home / "other")
    assert rejected(verifier(tee, PeerPolicy.dev(other.dev_root_der())), cert(tee)).step != "kind"
    # the window is judged once, here: an expired certificate, and one not yet valid beyond the skew
    now = int(time.time())
    assert rejected(verifier(tee), cert(tee, nb=now - 700, lifetime=600)).step == "cert_fresh"
    assert rejected(verifier(tee), cert(tee, nb=now + 600, lifetime=600)).step == "cert_fresh"
    # within the clock skew: accepted, and the evidence is judged as of not_before
    assert verifier(tee).verify_cert(cert(tee, nb=now + 30, lifetime=600)).app_id


def test_mutated_evidence_never_verifies(teecloud_home: Path) -> None:
    """Generated mutations of a genuine certificate's quote bytes (flips, truncations, kind-header swaps):
    none is accepted, and each is refused with a PeerRejected (no other exception escapes)."""
    tee = booted(teecloud_home)
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    good = make_ratls_cert(
        tee,
        key,
        issuer_key=None,
        issuer_cert=None,
        subject="s",
        usage="x",
        not_before=now,
        not_after=now + 600,
    )
    claims = parse_ratls_cert(good)
    v = verifier(tee)
    genuine = v.verify_cert(good.public_bytes(serialization.Encoding.DER))
    signed = 48 + 584  # TDX quote v4 header + TD report body: what the attestation key signs
    rng = random.Random(18)
    for i in range(80):
        q = bytearray(claims.quote)
        match i % 4:
            case 0:
                q[rng.randrange(signed)] ^= 1 << rng.randrange(8)
            case 1:
                q = q[: rng.randrange(len(q))]
            case 2:
                q[0:8] = bytes.fromhex("0200000001000000")  # an SNP-report-looking version field
                q = q[:1184]
            case _:
                q[4:8] = bytes(4)  # claims SGX
        forged = issue_cert(
            key.public_key(),
            issuer_key=key,
            issuer_name=None,
            subject_cn="s",
            not_before=now,
            not_after=now + 600,
            extra_extensions=[
                ratls._ext(OID_QUOTE, bytes(q)),
                ratls._ext(OID_EVENT_LOG, claims.event_log.encode()),
            ],
        )
        with pytest.raises(PeerRejected):
            v.verify_cert(forged.public_bytes(serialization.Encoding.DER))
    # anywhere in the quote: refused, or (bytes outside what is signed, e.g. PEM whitespace of the PCK
    # chain) exactly the same verified facts: a flip never changes what the peer is believed to be
    for _ in range(60):
        q = bytearray(claims.quote)
        q[rng.randrange(len(q))] ^= 1 << rng.randrange(8)
        forged = issue_cert(
            key.public_key(),
            issuer_key=key,
            issuer_name=None,
            subject_cn="s",
            not_before=now,
            not_after=now + 600,
            extra_extensions=[
                ratls._ext(OID_QUOTE, bytes(q)),
                ratls._ext(OID_EVENT_LOG, claims.event_log.encode()),
            ],
        )
        try:
            peer = v.verify_cert(forged.public_bytes(serialization.Encoding.DER))
        except PeerRejected:
            continue
        assert peer.boot_info == genuine.boot_info
        assert peer.evidence.measurements == genuine.evidence.measurements
        assert peer.evidence.report_data == genuine.evidence.report_data


def test_app_id_claim_is_checked_once_in_the_peer(teecloud_home: Path) -> None:
    tee = booted(teecloud_home)
    err = rejected(verifier(tee), cert(tee, app_id=b"\xee" * 20))
    assert err.step == "boot_info" and "differs from the measured app-id" in err.reason
    assert err.boot_info is not None  # audited: who made the claim


def test_certificate_parse_is_structure_only() -> None:
    # keys.ratls no longer judges anything but the key binding: no window, no app_id, no quote verification
    assert not hasattr(ratls, "verify_ratls_cert")
    assert x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.1") == OID_QUOTE
    assert StaticCollateral  # the TDX source is unchanged


def test_an_snp_only_caller_refuses_tdx_evidence(teecloud_home: Path, snp_vec: dict[str, bytes]) -> None:
    """The allowlist cuts both ways: a caller that accepts only SEV-SNP refuses a genuine TDX certificate
    (simulated, with the development root trusted) before any of it is verified."""
    tee = booted(teecloud_home)
    policy = PeerPolicy.dev(
        tee.dev_root_der(), accepted_kinds=(TeeKind.SNP,), amd_roots=(snp_vec["ask_ark"],)
    )
    err = rejected(PeerVerifier(policy, StaticCollateral(tee.collateral)), cert(tee))
    assert err.step == "kind" and "tdx evidence is not accepted" in err.reason
