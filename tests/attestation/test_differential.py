"""Differential test: teecloud's DCAP verifier (with its verdict cache) against dcap-qvl itself.

For every TDX/SGX vector in ../shared/vectors and for a simulated platform (many distinct valid quotes, so
the verdict cache is hit with good signatures), both must give the same accept/reject and, on accept, the
same TCB status and advisories, on:
  - the vectors at their pins and at and around every validity boundary (each certificate's notBefore /
    notAfter, both CRLs' thisUpdate / nextUpdate, TCB info and QE identity issueDate / nextUpdate);
  - seeded mutations: bit flips in the header and report body, the quote signature and attestation key,
    the QE report and its auth data, the PCK certificates, and every collateral field.
Every comparison runs with the caches as earlier comparisons left them (warm), which is what could go
wrong: a reused verdict that dcap-qvl would not give.

Where: `test_differential_default` (a few hundred mutations, seeded, a few seconds) runs in every pytest
run; `test_differential_thousands` (marked slow: thousands of mutations) runs in the full suite
(scripts/test.sh, CI) and is skipped with `-m "not slow"`.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509

from teecloud.attestation import _cache, dcap
from teecloud.attestation.errors import VerificationError

Verdict = tuple[bool, str, tuple[str, ...]]


def ts(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


@dataclass
class Case:
    name: str
    quote: bytes
    collateral: bytes
    now: int
    root: bytes | None = None  # a trusted development root (simulated platform); None = Intel's


def theirs(quote: bytes, collateral: bytes, now: int, root: bytes | None) -> Verdict:
    try:
        obj = dcap_qvl.QuoteCollateralV3.from_json(collateral.decode("utf-8"))
        if root is None:
            r = dcap_qvl.verify(quote, obj, now)
        else:
            r = dcap_qvl.verify_with_root_ca(quote, obj, root, now)
    except (ValueError, RuntimeError, UnicodeDecodeError):
        return (False, "", ())
    return (True, str(r.status), tuple(str(a) for a in r.advisory_ids))


def ours(quote: bytes, collateral: bytes, now: int, root: bytes | None) -> Verdict:
    try:
        ev = dcap.verify_dcap_quote(quote, collateral, now=now, dev_root_der=root)
    except VerificationError:
        return (False, "", ())
    return (True, ev.tcb_status, ev.advisory_ids)


def check(case: Case, quote: bytes, collateral: bytes, now: int, what: str) -> bool:
    a, b = ours(quote, collateral, now, case.root), theirs(quote, collateral, now, case.root)
    assert a == b, f"{case.name}: {what} at {now}: teecloud {a}, dcap-qvl {b}"
    return a[0]


# ------------------------------------------------------------------------------------------------ cases


def _vector_cases(vectors: Path) -> list[Case]:
    report = json.loads((vectors / "tdx/dstack_quote_report.json").read_text())
    outdated_col = (vectors / "tdx/tdx_quote_outdated_collateral.json").read_bytes()
    return [
        Case(
            "tdx_quote",
            (vectors / "tdx/tdx_quote").read_bytes(),
            (vectors / "tdx/tdx_quote_collateral.json").read_bytes(),
            ts("2025-07-04T00:00:00Z"),
        ),
        Case("dstack", bytes.fromhex(report["quote"]), outdated_col, ts("2026-03-05T00:00:00Z")),
        Case(
            "tdx_v5_outdated",
            (vectors / "tdx/tdx_quote_outdated").read_bytes(),
            outdated_col,
            ts("2026-03-05T00:00:00Z"),
        ),
        Case(
            "sgx",
            (vectors / "sgx/sgx_quote").read_bytes(),
            (vectors / "sgx/sgx_quote_collateral.json").read_bytes(),
            ts("2025-07-04T00:00:00Z"),
        ),
    ]


@pytest.fixture(scope="module")
def sim_cases(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    from teecloud.tee.simulated import SimulatedTdx

    home = tmp_path_factory.mktemp("sim")
    now = int(time.time())
    sim = SimulatedTdx(home)
    out = [
        Case(f"sim-{i}", sim.quote(i.to_bytes(4, "big")), sim.collateral(now=now), now, sim.dev_root_der())
        for i in range(8)
    ]
    debug = SimulatedTdx(home, debug=True)
    out.append(Case("sim-debug", debug.quote(b"d"), debug.collateral(now=now), now, sim.dev_root_der()))
    old = SimulatedTdx(home, tcb="OutOfDate")
    out.append(Case("sim-outofdate", old.quote(b"o"), old.collateral(now=now), now, sim.dev_root_der()))
    revoked = SimulatedTdx(home, revoked_pck=True)
    out.append(Case("sim-revoked", revoked.quote(b"r"), revoked.collateral(now=now), now, sim.dev_root_der()))
    # quote v5 forms of the simulated platform: a TD 1.5 body and a TD 1.5ex body (service TD fields)
    for body_type in (3, 4):
        q5 = _as_v5(sim, sim.quote(bytes([body_type])), body_type)
        out.append(Case(f"sim-v5-type{body_type}", q5, sim.collateral(now=now), now, sim.dev_root_der()))
    # other machines of the same model (own PCK certificate, attestation key and PPID; same CA and TCB):
    # after the first, each is verified through the platform-model path
    col = sim.collateral(now=now)
    for m in range(4):
        quotes = _other_machine(sim, bytes([0x40 + m]) * 16, 2)
        out += [Case(f"machine-{m}-{i}", q, col, now, sim.dev_root_der()) for i, q in enumerate(quotes)]
    return out


def _as_v5(
    sim: object,
    quote: bytes,
    body_type: int,
    extra: bytes | None = None,
    *,
    key: object = None,
    svn2: bytes | None = None,
) -> bytes:
    """A simulated v4 quote as quote v5 with a TD 1.5 (type 3) or TD 1.5ex (type 4) body: TEE_TCB_SVN2 =
    `svn2` (default TEE_TCB_SVN), no service TD, and for 1.5ex `extra` (237 bytes, random by default) after
    it; signed again by `key` (default the platform's attestation key)."""
    import struct

    from teecloud.tee import _dcap_builder as b

    body = quote[48 : 48 + 584] + (svn2 if svn2 is not None else quote[48 : 48 + 16]) + bytes(48)
    if body_type == 4:
        body += extra if extra is not None else random.randbytes(237)
    header = struct.pack("<H", 5) + quote[2:48]
    signed = header + struct.pack("<HI", body_type, len(body)) + body
    sig = b.raw_ecdsa_sign(key or sim._pki.attestation_key, signed)  # type: ignore[attr-defined,arg-type]
    return signed + quote[632:636] + sig + quote[700:]


def _other_machine(
    sim: object, ppid: bytes, n: int, *, pki_out: list[object] | None = None, tcb: object = None
) -> list[bytes]:
    """Quotes of another simulated machine under `sim`'s platform CA (a PCK certificate shaped like the
    ones Intel issues: 20-byte serial); `tcb` (a SimulatedTcb) gives it other TCB values."""
    import dataclasses

    from cryptography.hazmat.primitives.asymmetric import ec

    from teecloud.tee import _dcap_builder as b

    pki = sim._pki  # type: ignore[attr-defined]
    tcb = tcb or sim._tcb  # type: ignore[attr-defined]
    key, att = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ext = b.sgx_extension_der(
        ppid=ppid,
        cpusvn=tcb.cpusvn,
        pcesvn=tcb.pcesvn,
        pceid=tcb.pceid,
        fmspc=sim._identity.fmspc,  # type: ignore[attr-defined]
    )
    cert = b._issue(
        subject=pki.pck_cert.subject,
        subject_key=key,
        issuer=pki.pck_cert.issuer,
        issuer_key=pki.platform_key,
        ca=False,
        years=10,
        now=dt.datetime.now(dt.UTC).replace(microsecond=0),
        serial=(1 << 158) | random.getrandbits(150),
        extra=[x509.UnrecognizedExtension(x509.ObjectIdentifier(b.SGX_EXTENSION_OID), ext)],
    )
    machine = dataclasses.replace(pki, pck_key=key, pck_cert=cert, attestation_key=att)
    if pki_out is not None:
        pki_out.append(machine)
    builder = b.QuoteBuilder(machine, tcb)
    return [
        builder.quote(
            builder.td_report(
                report_data=bytes([i]) * 64,
                mrtd=sim._mrtd,
                rtmrs=sim._rtmrs,
                debug=False,
                out_of_date=False,  # type: ignore[attr-defined]
            )
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------- boundaries


def _pem_certs(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode()) if "BEGIN" in text else []


def boundaries(case: Case) -> list[int]:
    """Every validity boundary of the quote's chain and the collateral, in unix seconds."""
    raw = json.loads(case.collateral)
    times: set[float] = set()
    for key in ("tcb_info", "qe_identity"):
        doc = json.loads(raw[key])
        for field in ("issueDate", "nextUpdate"):
            times.add(dt.datetime.fromisoformat(doc[field]).timestamp())
    for key in ("root_ca_crl", "pck_crl"):
        crl = x509.load_der_x509_crl(bytes.fromhex(raw[key]))
        times.add(crl.last_update_utc.timestamp())
        if crl.next_update_utc is not None:
            times.add(crl.next_update_utc.timestamp())
    chains = [
        raw.get(k, "") for k in ("tcb_info_issuer_chain", "qe_identity_issuer_chain", "pck_crl_issuer_chain")
    ]
    chains.append(dcap.parse_quote(case.quote)["pck_chain_pem"].decode())
    for text in chains:
        for cert in _pem_certs(text):
            times.add(cert.not_valid_before_utc.timestamp())
            times.add(cert.not_valid_after_utc.timestamp())
    return sorted({int(t) + d for t in times for d in (-1, 0, 1) if 0 < int(t) + d < 2**40})


# ---------------------------------------------------------------------------------------- mutations


def _regions(quote: bytes) -> dict[str, tuple[int, int]]:
    q = dcap._parse(quote)
    sig = q.signed_end + 4
    pem = dcap.parse_quote(quote)["pck_chain_pem"]
    cert_at = quote.find(pem[:40])
    return {
        "header": (0, q.body_start),
        "body": (q.body_start, q.signed_end),
        "signature": (sig, sig + 64),
        "attestation_key": (sig + 64, sig + 128),
        "qe_report_and_auth": (sig + 128, cert_at),
        "pck_certificates": (cert_at, cert_at + len(pem)),
    }


_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_HEX = b"0123456789abcdef"


def _flip_text(rng: random.Random, text: bytes, alphabet: bytes) -> bytes:
    """Replace one character of `alphabet` in `text` by another of it (keeps PEM / hex well-formed)."""
    spots = [i for i, c in enumerate(text) if c in alphabet]
    if not spots:
        return text
    i = rng.choice(spots)
    new = rng.choice([c for c in alphabet if c != text[i]])
    return text[:i] + bytes([new]) + text[i + 1 :]


def mutate_quote(rng: random.Random, quote: bytes) -> tuple[str, bytes]:
    regions = _regions(quote)
    name = rng.choice(list(regions))
    lo, hi = regions[name]
    if name == "pck_certificates":
        return name, quote[:lo] + _flip_text(rng, quote[lo:hi], _B64) + quote[hi:]
    pos = rng.randrange(lo, hi)
    data = bytearray(quote)
    data[pos] ^= 1 << rng.randrange(8)
    return f"{name}@{pos}", bytes(data)


COLLATERAL_FIELDS = (
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


def mutate_collateral(rng: random.Random, collateral: bytes) -> tuple[str, bytes]:
    raw = json.loads(collateral)
    field = rng.choice(COLLATERAL_FIELDS)
    value = raw[field].encode()
    if field.endswith("_chain"):
        value = _flip_text(rng, value, _B64)
    elif field in ("tcb_info", "qe_identity"):
        value = _flip_text(rng, value, b"0123456789")
    else:
        value = _flip_text(rng, value, _HEX)
    raw[field] = value.decode()
    return field, json.dumps(raw).encode()


def run_mutations(cases: list[Case], count: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for i in range(count):
        case = cases[i % len(cases)]
        kind = rng.random()
        if kind < 0.6:
            what, quote = mutate_quote(rng, case.quote)
            check(case, quote, case.collateral, case.now, f"quote mutation {what}")
        elif kind < 0.9:
            what, col = mutate_collateral(rng, case.collateral)
            check(case, case.quote, col, case.now, f"collateral mutation {what}")
        else:
            times = boundaries(case)
            now = rng.choice(times)
            what = "boundary time"
            check(case, case.quote, case.collateral, now, what)
        # and the unmutated evidence still gets dcap-qvl's verdict, whatever the caches now hold
        check(case, case.quote, case.collateral, case.now, f"original after {what}")
        yield what


# -------------------------------------------------------------------------------------------- tests


def test_vectors_and_every_boundary(vectors: Path) -> None:
    _cache.clear_all()
    for case in _vector_cases(vectors):
        check(case, case.quote, case.collateral, case.now, "pin")
        check(case, case.quote, case.collateral, case.now + 40 * 86400, "pin + 40 days")
        accepted = [t for t in boundaries(case) if check(case, case.quote, case.collateral, t, "boundary")]
        if case.name != "tdx_v5_outdated":  # "No matching TCB level" at every time
            assert accepted, f"{case.name}: accepted at no boundary time"


def test_simulated_platform_boundaries(sim_cases: list[Case]) -> None:
    for case in sim_cases:
        for t in [case.now, *boundaries(case)]:
            check(case, case.quote, case.collateral, t, "boundary")


def test_cache_is_hit_and_agrees(sim_cases: list[Case]) -> None:
    # Distinct valid quotes of one platform: the second and later reuse the first one's verdict.
    _cache.clear_all()
    plain = [c for c in sim_cases if c.name.startswith("sim-") and c.name[4:].isdigit()]
    for case in plain:
        assert check(case, case.quote, case.collateral, case.now, "distinct quote")
    stats = {s.name: s for s in _cache.all_caches()}["dcap.verdicts"]
    assert stats.hits >= len(plain) - 1


def test_new_machines_of_a_known_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The platform-model path: a first machine teaches the model; others are checked machine by machine
    # (their PCK certificate, QE report, quote signature) and must still get dcap-qvl's verdict, including
    # a machine whose PCK certificate the collateral revokes and one whose certificate its CA did not sign.
    from teecloud.tee import _dcap_builder as b
    from teecloud.tee.simulated import SimulatedTdx

    _cache.clear_all()
    home = tmp_path_factory.mktemp("models")
    now = int(time.time())
    sim = SimulatedTdx(home)
    root = sim.dev_root_der()
    pkis: list[object] = []
    first = _other_machine(sim, b"\x01" * 16, 1, pki_out=pkis)[0]
    second = _other_machine(sim, b"\x02" * 16, 1, pki_out=pkis)[0]
    third = _other_machine(sim, b"\x03" * 16, 1, pki_out=pkis)[0]
    # a collateral whose PCK CRL revokes the second machine's certificate
    issue = b.collateral_issue_time(dt.datetime.fromtimestamp(now, dt.UTC))
    raw = b.build_collateral(
        pkis[1], fmspc=sim._identity.fmspc, tcb=sim._tcb, issue=issue, revoke_pck=True, crl_number=7
    )  # type: ignore[arg-type]
    revoking = json.dumps(raw).encode()
    case = Case("models", first, revoking, now, root)
    assert check(case, first, revoking, now, "first machine")  # learns the model
    hits = {s.name: s for s in _cache.all_caches()}["dcap.models"].hits
    assert not check(case, second, revoking, now, "revoked machine")
    assert check(case, third, revoking, now, "third machine")
    assert {s.name: s for s in _cache.all_caches()}["dcap.models"].hits > hits
    # whatever their ECDSA signatures' lengths, more machines of the model take the model path
    before = {s.name: s for s in _cache.all_caches()}["dcap.models"].hits
    for i in range(6):
        assert check(case, _other_machine(sim, bytes([0x10 + i]) * 16, 1)[0], revoking, now, f"machine {i}")
    assert {s.name: s for s in _cache.all_caches()}["dcap.models"].hits - before == 6
    # a leaf signed by another key but otherwise shaped like the model's: rejected, as dcap-qvl does
    from cryptography.hazmat.primitives.asymmetric import ec

    sim._pki = b.Pki(**{**pkis[0].__dict__, "platform_key": ec.generate_private_key(ec.SECP256R1())})  # type: ignore[attr-defined]
    forged = _other_machine(sim, b"\x04" * 16, 1)[0]
    assert not check(case, forged, revoking, now, "leaf not signed by the platform CA")
    for t in boundaries(case):
        check(case, third, revoking, t, "boundary")


def test_differential_default(vectors: Path, sim_cases: list[Case]) -> None:
    cases = _vector_cases(vectors) + sim_cases
    assert len(list(run_mutations(cases, 300, seed=12))) == 300


@pytest.mark.slow
def test_differential_thousands(vectors: Path, sim_cases: list[Case]) -> None:
    cases = _vector_cases(vectors) + sim_cases
    assert len(list(run_mutations(cases, 4000, seed=2026))) == 4000


def test_quote_v5_td15ex_bodies(tmp_path_factory: pytest.TempPathFactory) -> None:
    # dcap-qvl 0.7 verifies a TD 1.5ex body (v5 type 4) as a TD 1.5 one; so does teecloud, and the fields
    # only the quote signature covers (the service TD bindings, TD_ID) do not split the verdict cache
    from teecloud.tee.simulated import SimulatedTdx

    _cache.clear_all()
    now = int(time.time())
    sim = SimulatedTdx(tmp_path_factory.mktemp("td15ex"))
    col, root = sim.collateral(now=now), sim.dev_root_der()
    case = Case("td15ex", b"", col, now, root)
    quotes = [_as_v5(sim, sim.quote(bytes([i])), 4) for i in range(4)]
    for i, q in enumerate(quotes):
        assert check(case, q, col, now, f"td15ex {i}")
    assert {s.name: s for s in _cache.all_caches()}["dcap.verdicts"].hits >= 3
    ev = dcap.verify_dcap_quote(quotes[0], col, now=now, dev_root_der=root)
    assert ev.fields["body_type"] == "td15ex" and len(bytes.fromhex(ev.fields["td_id"])) == 32
    # a service TD bound (MR_SERVICETD not zero): both refuse
    q = bytearray(quotes[0])
    q[48 + 6 + 600] = 1
    assert not check(case, bytes(q), col, now, "service TD")
