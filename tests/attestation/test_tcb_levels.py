"""teecloud's own TCB level evaluation (attestation._tcb, used for new machines of a known platform model)
against dcap-qvl: real Intel TCB infos from ../shared/vectors, and a generated TDX TCB info with many levels
(shuffled), TDX module identities and QE levels, signed by the simulated platform's TCB signing key, over
hundreds of simulated machines with random TCB values (CPUSVN, PCESVN, TEE_TCB_SVN incl. the module
version and ISVSVN, QE ISVSVN). Every machine must get dcap-qvl's accept/reject, status and advisories, and
the accepted ones must have taken teecloud's path (no dcap-qvl run), which the model cache's hits count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from teecloud.attestation import _cache, _tcb, dcap
from tests.attestation.test_differential import Case, _as_v5, _other_machine, _vector_cases, check, theirs

_STATUSES = dcap.TCB_STATUS_ORDER


def _hits() -> int:
    return {s.name: s for s in _cache.all_caches()}["dcap.models"].hits


def test_real_tcb_infos_evaluate_as_dcap_qvl(vectors: Path) -> None:
    # Intel's own TCB infos and QE identities (TDX v4 and v5, SGX): the evaluation of each vector's TCB
    # values gives dcap-qvl's status and advisories.
    for case in _vector_cases(vectors):
        q = dcap._parse(case.quote)
        col = dcap._collateral(case.collateral, dcap.DEFAULT_LIMITS)
        m = dcap._machine(q, case.quote, col, None)
        assert col.rules is not None and m is not None, case.name
        ok, status, advisories = theirs(case.quote, case.collateral, case.now, None)
        got = dcap._tcb_status(q, case.quote, m, col.rules)
        assert got == ((status, advisories) if ok else None), case.name


def _nudge(rng: random.Random, svns: bytes, steps: tuple[int, ...]) -> list[int]:
    """`svns` with up to two components moved by one of `steps` (often none)."""
    out = list(svns)
    for _ in range(rng.choice((0, 0, 1, 2))):
        i = rng.randrange(len(out))
        out[i] = max(0, out[i] + rng.choice(steps))
    return out


def _levels(rng: random.Random, base: Any) -> list[dict[str, Any]]:
    """A dozen TDX TCB levels around the simulated platform's TCB, in random order."""
    exact = {
        "tcb": {
            "sgxtcbcomponents": [{"svn": v} for v in base.cpusvn],
            "pcesvn": base.pcesvn,
            "tdxtcbcomponents": [{"svn": v} for v in base.tee_tcb_svn_uptodate],
        },
        "tcbDate": "2025-01-01T00:00:00Z",
        "tcbStatus": "UpToDate",
    }
    out = [exact]
    for i in range(12):
        sgx = _nudge(rng, base.cpusvn, (-1, -1, 1))
        tdx = list(base.tee_tcb_svn_uptodate)
        tdx[2] = max(0, tdx[2] + rng.choice((-1, 0, 1)))
        tdx[0] = rng.choice((1, 2, 3))
        if rng.random() < 0.3:
            tdx[1] = rng.choice((0, 1, 2))
        status = _STATUSES[i % len(_STATUSES)] if i else "UpToDate"
        level: dict[str, Any] = {
            "tcb": {
                "sgxtcbcomponents": [{"svn": v} for v in sgx],
                "pcesvn": base.pcesvn + rng.choice((-1, 0, 1)),
                "tdxtcbcomponents": [{"svn": v} for v in tdx],
            },
            "tcbDate": f"2025-0{1 + i % 9}-01T00:00:00Z",
            "tcbStatus": status,
        }
        if status != "UpToDate" or rng.random() < 0.2:
            level["advisoryIDs"] = rng.sample(["INTEL-SA-00001", "INTEL-SA-00615", "INTEL-SA-00828"], 2)
        out.append(level)
    rng.shuffle(out)
    return out


def _signed(sim: Any, raw: dict[str, str], tcb_info: dict[str, Any], qe_identity: dict[str, Any]) -> bytes:
    """The collateral `raw` with this TCB info and QE identity, signed by the platform's TCB signing key."""
    from teecloud.tee import _dcap_builder as b

    for key, doc in (("tcb_info", tcb_info), ("qe_identity", qe_identity)):
        text = json.dumps(doc, separators=(",", ":"))
        raw[key] = text
        raw[f"{key}_signature"] = b.raw_ecdsa_sign(sim._pki.tcb_key, text.encode()).hex()
    return json.dumps(raw).encode()


def _rich_collateral(sim: Any, now: int, rng: random.Random) -> bytes:
    from teecloud.tee import _dcap_builder as b

    base = sim._tcb
    issue = b.collateral_issue_time(dt.datetime.fromtimestamp(now, dt.UTC))
    raw = b.build_collateral(sim._pki, fmspc=sim._identity.fmspc, tcb=base, issue=issue)
    info = json.loads(raw["tcb_info"])
    zero48 = "00" * 48
    info["tcbLevels"] = _levels(rng, base)
    info["tdxModuleIdentities"] = [
        {
            "id": "TDX_01",
            "mrsigner": zero48,
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
            "tcbLevels": [
                {"tcb": {"isvsvn": 3}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
                {
                    "tcb": {"isvsvn": 2},
                    "tcbDate": "2024-01-01T00:00:00Z",
                    "tcbStatus": "OutOfDate",
                    "advisoryIDs": ["INTEL-SA-00615", "INTEL-SA-01111"],
                },
            ],
        },
        {  # a module version whose signer is not the simulated module's: rejected
            "id": "tdx_02",
            "mrsigner": "11" * 48,
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
            "tcbLevels": [{"tcb": {"isvsvn": 1}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"}],
        },
    ]
    qe = json.loads(raw["qe_identity"])
    qe["tcbLevels"] = [
        {"tcb": {"isvsvn": 4}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
        {
            "tcb": {"isvsvn": 3},
            "tcbDate": "2024-06-01T00:00:00Z",
            "tcbStatus": "SWHardeningNeeded",
            "advisoryIDs": ["INTEL-SA-00828"],
        },
        {
            "tcb": {"isvsvn": 2},
            "tcbDate": "2024-01-01T00:00:00Z",
            "tcbStatus": "OutOfDate",
            "advisoryIDs": ["INTEL-SA-00615", "INTEL-SA-00828"],
        },
    ]
    return _signed(sim, raw, info, qe)


def _random_tcb(rng: random.Random, base: Any) -> Any:
    tee = list(base.tee_tcb_svn_uptodate)
    tee[0] = rng.choice((1, 2, 3, 4))
    tee[1] = rng.choice((0, 1, 1, 1, 2, 3))
    tee[2] = max(0, tee[2] + rng.choice((-1, 0, 1)))
    return dataclasses.replace(
        base,
        cpusvn=bytes(_nudge(rng, base.cpusvn, (-1, 1, 1))),
        pcesvn=base.pcesvn + rng.choice((-1, 0, 0, 1, 120)),  # 133: a two-byte DER INTEGER (another shape)
        tee_tcb_svn_uptodate=bytes(tee),
        qe_isvsvn=rng.choice((1, 2, 2, 3, 4, 4, 5)),
    )


def _other_td(rng: random.Random, quote: bytes, key: Any) -> bytes:
    """The quote with another module signer (the one TDX_02 names, or random), SEAMATTRIBUTES or XFAM, signed
    again by the machine's attestation key."""
    from teecloud.tee import _dcap_builder as b

    body = bytearray(quote[48 : 48 + 584])
    what = rng.choice(("signer", "attributes", "xfam"))
    if what == "signer":
        body[64:112] = rng.choice((b"\x11" * 48, rng.randbytes(48)))
    elif what == "attributes":
        body[112 + rng.randrange(8)] |= 1 << rng.randrange(8)
    else:
        body[128:136] = rng.randbytes(8)
    signed = quote[:48] + bytes(body)
    return signed + quote[632:636] + b.raw_ecdsa_sign(key, signed) + quote[700:]


def _run(tmp_path: Path, seed: int, machines: int) -> tuple[int, int]:
    from teecloud.tee.simulated import SimulatedTdx

    _cache.clear_all()
    rng = random.Random(seed)
    now = int(time.time())
    sim = SimulatedTdx(tmp_path)
    root = sim.dev_root_der()
    col = _rich_collateral(sim, now, rng)
    case = Case("tcb-levels", b"", col, now, root)
    # Two machines at the simulated TCB teach the model (the first is kept as a candidate, the second
    # makes it learned), whatever verdict dcap-qvl gives them.
    for i in range(2):
        check(case, _other_machine(sim, bytes([0xA0 + i]) * 16, 1)[0], col, now, "teacher")
    accepted = native = 0
    # PCESVN >= 128 is a two-byte INTEGER: another certificate shape; v5 quotes: another header and body
    shapes = {(False, 0)}
    for i in range(machines):
        tcb = _random_tcb(rng, sim._tcb)
        pki: list[Any] = []
        quote = _other_machine(sim, rng.randbytes(16), 1, tcb=tcb, pki_out=pki)[0]
        if rng.random() < 0.3:
            quote = _other_td(rng, quote, pki[0].attestation_key)
        body_type = rng.choice((0, 0, 3, 4))  # 0: quote v4; 3, 4: v5 with a TD 1.5 / 1.5ex body
        if body_type:
            svn2 = bytearray(quote[48:64])  # the current TCB: after a TD-preserving update, or not
            if rng.random() < 0.5:
                i = rng.choice((0, 2))
                svn2[i] = max(0, min(255, svn2[i] + rng.choice((1, -1))))
            quote = _as_v5(sim, quote, body_type, key=pki[0].attestation_key, svn2=bytes(svn2))
        before = _hits()
        ok = check(case, quote, col, now, f"machine {i}")
        shape = (tcb.pcesvn >= 128, body_type)
        if ok and shape not in shapes:  # the first accepted machine of a shape: dcap-qvl, then learned
            shapes.add(shape)
            assert _hits() == before
            continue
        accepted += ok
        native += ok and _hits() > before
    return accepted, native


def test_new_tcb_levels_of_a_model_get_dcap_qvls_verdict(tmp_path: Path) -> None:
    accepted, native = _run(tmp_path, seed=7, machines=160)
    assert accepted >= 20, accepted  # the generated levels accept a good share
    assert native == accepted  # and every accepted machine took teecloud's path


# ------------------------------------------------------------------------------------------------- SGX


def _sgx_quote(sim: Any, tcb: Any, ppid: bytes, report_data: bytes) -> bytes:
    """An SGX quote v3 (Intel SGX ECDSA Quote Library API, A.4) of a new simulated machine at `tcb`: an
    enclave report body, the attestation key's signature, the QE report signed by the machine's PCK key,
    32 bytes of QE auth data and the PEM chain (type 5)."""
    import hashlib
    import struct

    from teecloud.tee import _dcap_builder as b

    pki: list[Any] = []
    _other_machine(sim, ppid, 1, tcb=tcb, pki_out=pki)
    machine = pki[0]
    builder = b.QuoteBuilder(machine, tcb)
    att_pub = b.raw_public_key(machine.attestation_key)
    auth = hashlib.sha256(b"teecloud test SGX QE auth data" + att_pub).digest()
    qe_report = builder._qe_report(report_data=hashlib.sha256(att_pub + auth).digest() + bytes(32))
    qe_sig = b.raw_ecdsa_sign(machine.pck_key, qe_report)
    chain = "".join(b._pem(c) for c in (machine.pck_cert, machine.platform_cert, machine.root_cert)).encode()
    header = struct.pack("<HHIHH", 3, 2, 0, 0, 0) + b.QE_VENDOR_ID_INTEL + bytes(20)
    body = (
        tcb.cpusvn
        + bytes(4)  # MISCSELECT
        + bytes(28)
        + bytes([0x05]) + bytes(7) + bytes([0x03]) + bytes(7)  # ATTRIBUTES: INIT | MODE64BIT, not DEBUG; XFRM
        + hashlib.sha256(b"test enclave").digest()  # MRENCLAVE
        + bytes(32)
        + hashlib.sha256(b"test enclave signer").digest()  # MRSIGNER
        + bytes(96)
        + struct.pack("<HH", 1, 1)
        + bytes(60)
        + report_data
    )  # fmt: skip
    assert len(body) == 384
    sig = b.raw_ecdsa_sign(machine.attestation_key, header + body)
    data = (
        sig + att_pub + qe_report + qe_sig + struct.pack("<H", len(auth)) + auth
        + struct.pack("<HI", 5, len(chain)) + chain
    )  # fmt: skip
    return header + body + struct.pack("<I", len(data)) + data


def _sgx_collateral(sim: Any, now: int, rng: random.Random) -> bytes:
    """SGX collateral for the simulated platform (TCB info id SGX v3, QE identity id QE v2): a dozen levels
    around its TCB, in random order, and QE levels of several statuses; signed by its TCB signing key."""
    from teecloud.tee import _dcap_builder as b

    base = sim._tcb
    issue = b.collateral_issue_time(dt.datetime.fromtimestamp(now, dt.UTC))
    raw = b.build_collateral(sim._pki, fmspc=sim._identity.fmspc, tcb=base, issue=issue)
    info = json.loads(raw["tcb_info"])
    for key in ("tdxModule", "tdxModuleIdentities"):
        info.pop(key)
    info["id"] = "SGX"
    levels = [{"tcb": {"sgxtcbcomponents": [{"svn": v} for v in base.cpusvn], "pcesvn": base.pcesvn},
               "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"}]  # fmt: skip
    for i in range(12):
        status = _STATUSES[i % len(_STATUSES)]
        level: dict[str, Any] = {
            "tcb": {
                "sgxtcbcomponents": [{"svn": v} for v in _nudge(rng, base.cpusvn, (-1, -1, 1))],
                "pcesvn": base.pcesvn + rng.choice((-1, 0, 1)),
            },
            "tcbDate": f"2024-0{1 + i % 9}-01T00:00:00Z",
            "tcbStatus": status,
        }
        if status != "UpToDate":
            level["advisoryIDs"] = rng.sample(["INTEL-SA-00001", "INTEL-SA-00615", "INTEL-SA-00828"], 2)
        levels.append(level)
    rng.shuffle(levels)
    info["tcbLevels"] = levels
    qe = json.loads(raw["qe_identity"])
    qe["id"] = "QE"
    qe["tcbLevels"] = [
        {"tcb": {"isvsvn": 4}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
        {"tcb": {"isvsvn": 3}, "tcbDate": "2024-06-01T00:00:00Z", "tcbStatus": "ConfigurationNeeded"},
        {"tcb": {"isvsvn": 2}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "OutOfDate",
         "advisoryIDs": ["INTEL-SA-00615"]},
    ]  # fmt: skip
    return _signed(sim, raw, info, qe)


def test_sgx_machines_at_new_tcb_levels(tmp_path: Path) -> None:
    # the same for SGX quotes (v3): two machines at the simulated TCB teach the model, then machines at
    # random TCB levels get dcap-qvl's verdict, each acceptance through teecloud's path
    from teecloud.tee.simulated import SimulatedTdx

    _cache.clear_all()
    rng = random.Random(5)
    now = int(time.time())
    sim = SimulatedTdx(tmp_path)
    col = _sgx_collateral(sim, now, rng)
    case = Case("sgx-levels", b"", col, now, sim.dev_root_der())
    for i in range(2):
        assert check(case, _sgx_quote(sim, sim._tcb, bytes([0xB0 + i]) * 16, bytes(64)), col, now, "teacher")
    accepted = native = 0
    for i in range(100):
        tcb = _random_tcb(rng, sim._tcb)
        if tcb.pcesvn >= 128:
            continue
        quote = _sgx_quote(sim, tcb, rng.randbytes(16), rng.randbytes(64))
        before = _hits()
        ok = check(case, quote, col, now, f"SGX machine {i}")
        accepted += ok
        native += ok and _hits() > before
    assert accepted >= 15 and native == accepted, (accepted, native)


@pytest.mark.slow
def test_new_tcb_levels_many_seeds(tmp_path: Path) -> None:
    for seed in range(4):
        accepted, native = _run(tmp_path / str(seed), seed=100 + seed, machines=150)
        assert native == accepted and accepted > 0


def test_unreadable_rules_mean_no_model_path() -> None:
    # anything the strict reader does not read exactly: no rules, so dcap-qvl decides every machine
    assert (
        _tcb.parse_rules({"id": "TDX", "version": 3, "tcbLevels": [{"tcb": {}}]}, {"tcbLevels": []}) is None
    )
    level = {
        "tcb": {"sgxtcbcomponents": [{"svn": 1.0}], "pcesvn": 1},
        "tcbDate": "x",
        "tcbStatus": "UpToDate",
    }
    assert _tcb.parse_rules({"id": "SGX", "version": 2, "tcbLevels": [level]}, {"tcbLevels": []}) is None
    level["tcb"]["sgxtcbcomponents"] = [{"svn": True}]  # type: ignore[index]
    assert _tcb.parse_rules({"id": "SGX", "version": 2, "tcbLevels": [level]}, {"tcbLevels": []}) is None
    level["tcbStatus"] = "Fine"
    level["tcb"]["sgxtcbcomponents"] = [{"svn": 1}]  # type: ignore[index]
    assert _tcb.parse_rules({"id": "SGX", "version": 2, "tcbLevels": [level]}, {"tcbLevels": []}) is None


def test_evaluation_rules() -> None:
    # dcap-qvl's rules, one at a time: first matching level in canonical order (not JSON order); the QE's
    # level converged in (OutOfDate makes UpToDate OutOfDate and ConfigurationNeeded
    # OutOfDateConfigurationNeeded; advisories appended once); a status the structure may not carry, no
    # match, a component count mismatch or Revoked: no verdict
    def lv(sgx: int, pce: int, status: str, adv: list[str]) -> dict[str, Any]:
        return {
            "tcb": {"sgxtcbcomponents": [{"svn": sgx}] * 16, "pcesvn": pce},
            "tcbDate": "2025-01-01T00:00:00Z",
            "tcbStatus": status,
            "advisoryIDs": adv,
        }

    def qe_level(svn: int, status: str, adv: list[str]) -> dict[str, Any]:
        return {
            "tcb": {"isvsvn": svn},
            "tcbDate": "2025-01-01T00:00:00Z",
            "tcbStatus": status,
            "advisoryIDs": adv,
        }

    qe = {
        "tcbLevels": [
            qe_level(5, "UpToDate", []),
            qe_level(3, "OutOfDate", ["B", "A"]),
            qe_level(1, "SWHardeningNeeded", []),
        ]
    }
    info = {
        "id": "SGX",
        "version": 2,
        "tcbLevels": [
            lv(2, 5, "ConfigurationNeeded", ["A"]),
            lv(3, 5, "UpToDate", []),
            lv(9, 1, "Revoked", []),
        ],
    }
    rules = _tcb.parse_rules(info, qe)
    assert rules is not None

    def ev(cpu: int, pce: int, qsvn: int) -> _tcb.Status | None:
        return _tcb.evaluate(rules, tdx=False, cpu_svn=bytes([cpu] * 16), pce_svn=pce, qe_isvsvn=qsvn)

    assert ev(3, 5, 5) == ("UpToDate", ())
    assert ev(3, 5, 4) == ("OutOfDate", ("B", "A"))
    assert ev(2, 9, 4) == ("OutOfDateConfigurationNeeded", ("A", "B"))
    assert ev(2, 9, 5) == ("ConfigurationNeeded", ("A",))
    assert ev(3, 4, 5) is None  # PCESVN below every level it could meet
    assert ev(1, 9, 5) is None  # CPUSVN below every level
    assert ev(3, 5, 2) is None  # the QE level met carries SWHardeningNeeded: not a QE identity status
    assert ev(3, 5, 0) is None  # QE below every level
    assert ev(9, 9, 5) is None  # Revoked
    assert _tcb.evaluate(rules, tdx=False, cpu_svn=bytes(15), pce_svn=9, qe_isvsvn=5) is None
