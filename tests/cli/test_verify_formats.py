"""`teecloud verify` on evidence in every form a user has it, autodetected: raw, hex text, base64 text,
dstack JSON, the dstack SDK's GetQuote output, SEV-SNP report files, certificate bundles PEM or DER; and
issue 11's findings on simulated evidence (any order after `agent simulate`, simulated without trust)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.cli.test_verify_cli import V_DSTACK_PIN, V_TDX_PIN, as_json


def _tdx(vectors: Path, tmp_path: Path, form: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    raw = (vectors / "tdx/tdx_quote").read_bytes()
    body = {
        "raw": raw,
        "hex": raw.hex().encode() + b"\n",
        "hex-0x-wrapped": b"0x"
        + b"\n".join(raw.hex().encode()[i : i + 64] for i in range(0, 2 * len(raw), 64)),
        "base64": base64.b64encode(raw) + b"\n",
        "base64-wrapped": base64.encodebytes(raw),
        "base64url": base64.urlsafe_b64encode(raw),
    }[form]
    path = tmp_path / f"quote.{form}"
    path.write_bytes(body)
    return as_json(
        "verify", path, "--collateral", vectors / "tdx/tdx_quote_collateral.json", "--at", V_TDX_PIN
    )


@pytest.mark.parametrize("form", ["raw", "hex", "hex-0x-wrapped", "base64", "base64-wrapped", "base64url"])
def test_tdx_quote_in_every_text_form(vectors: Path, tmp_path: Path, form: str) -> None:
    code, doc = _tdx(vectors, tmp_path, form)
    assert code == 0, doc
    assert doc["tee"] == "tdx" and doc["tcb_status"] == "UpToDate"
    assert doc["report_data"].startswith("9a9d48e7f6799642")


def test_text_that_is_no_evidence_is_rejected_with_a_reason(tmp_path: Path) -> None:
    for name, body in (
        ("short.hex", b"00ff00ff"),
        ("words.txt", b"hello world, not a quote"),
        ("b64", b"aGVsbG8="),
    ):
        path = tmp_path / name
        path.write_bytes(body)
        code, doc = as_json("verify", path)
        assert code == 1 and "unrecognised evidence format" in doc["reason"], doc


def test_dstack_json_and_sdk_get_quote_output(vectors: Path, tmp_path: Path) -> None:
    report = json.loads((vectors / "tdx/dstack_quote_report.json").read_text())
    # the dstack SDK's GetQuoteResponse as a user saves it: 0x-less hex quote, the event log as a JSON string
    sdk = {"quote": report["quote"], "event_log": report["event_log"], "report_data": report["report_data"]}
    path = tmp_path / "get_quote.json"
    path.write_text(json.dumps(sdk))
    code, doc = as_json(
        "verify",
        path,
        "--collateral",
        vectors / "tdx/tdx_quote_outdated_collateral.json",
        "--at",
        V_DSTACK_PIN,
    )
    assert code == 0, doc
    assert doc["app_info"] and doc["app_info"]["compose_hash"]
    # and tappd's form: 0x-prefixed quote, the event log as a JSON array
    tappd = {"quote": "0x" + report["quote"], "event_log": json.loads(report["event_log"])}
    path.write_text(json.dumps(tappd))
    code, doc = as_json(
        "verify",
        path,
        "--collateral",
        vectors / "tdx/tdx_quote_outdated_collateral.json",
        "--at",
        V_DSTACK_PIN,
    )
    assert code == 0, doc


def _snp_args(vectors: Path, report: Path, chain: Path) -> list[object]:
    return [
        "verify",
        report,
        "--cert-chain",
        chain,
        "--trust-anchor",
        vectors / "snp/go-sev-guest_ask_ark_milan.pem",
        "--at",
        "2026-07-01T00:00:00Z",
    ]


@pytest.mark.parametrize("form", ["raw", "hex", "base64"])
def test_snp_report_files_and_der_bundles(vectors: Path, tmp_path: Path, form: str) -> None:
    raw = (vectors / "snp/go-sev-guest_attestation.bin").read_bytes()
    report = tmp_path / f"report.{form}"
    report.write_bytes({"raw": raw, "hex": raw.hex().encode(), "base64": base64.b64encode(raw)}[form])
    # the VCEK with the ASK and ARK as one DER bundle (concatenated certificates)
    ask_ark = x509.load_pem_x509_certificates((vectors / "snp/go-sev-guest_ask_ark_milan.pem").read_bytes())
    bundle = tmp_path / "chain.der"
    bundle.write_bytes(
        (vectors / "snp/go-sev-guest_vcek.testcer").read_bytes()
        + b"".join(c.public_bytes(Encoding.DER) for c in ask_ark)
    )
    code, doc = as_json(*_snp_args(vectors, report, bundle))
    # verified (signature, chain, TCB); the vector is a debug guest, which the default policy refuses
    assert code == 1 and doc["tee"] == "snp" and "debug" in doc["reason"], doc
    assert all(s["ok"] for s in doc["steps"] if not s["name"].startswith("policy:"))
    assert any(s["name"] == "revocation" and "not checked" in s["reason"] for s in doc["steps"])
    # the same as a PEM bundle
    pem = tmp_path / "chain.pem"
    vcek = x509.load_der_x509_certificate((vectors / "snp/go-sev-guest_vcek.testcer").read_bytes())
    pem.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in [vcek, *ask_ark]))
    code2, doc2 = as_json(*_snp_args(vectors, report, pem))
    assert (code2, doc2["reason"]) == (code, doc["reason"])


# --- issue 11: simulated evidence ------------------------------------------------------------------------


def _sdk_output(tmp_path: Path) -> tuple[Path, object]:
    from teecloud.tee.simulated import SimulatedTdx

    tee = SimulatedTdx()  # what `teecloud agent simulate` opens: this installation's platform
    doc = {
        "quote": tee.quote(b"any-order").hex(),
        "event_log": json.dumps([e.to_json() for e in tee.event_log()]),
        "report_data": b"any-order".ljust(64, b"\0").hex(),
        "vm_config": json.dumps(tee.vm_config()),
    }
    path = tmp_path / "get_quote.json"
    path.write_text(json.dumps(doc))
    return path, tee


def test_agent_simulate_then_verify_with_dev_root_needs_no_export(
    tmp_path: Path, teecloud_home: Path
) -> None:
    path, _ = _sdk_output(tmp_path)
    collateral_dir = teecloud_home / "simulated-tee" / "collateral"
    assert not collateral_dir.exists() or not any(collateral_dir.iterdir())  # nobody wrote collateral yet
    code, doc = as_json("verify", path, "--trust-dev-root")
    assert code == 0, doc
    assert doc["tee"] == "tdx-simulated" and doc["simulated"] is True
    # and again (now from the data directory), and at an explicit time
    assert as_json("verify", path, "--trust-dev-root")[0] == 0
    assert as_json("verify", path, "--trust-dev-root", "--at", "2030-01-01T00:00:00Z")[0] == 0


def test_simulated_evidence_without_trust_is_rejected_as_simulated(tmp_path: Path) -> None:
    path, _ = _sdk_output(tmp_path)
    code, doc = as_json("verify", path)  # no --collateral, no --trust-dev-root
    assert code == 1, doc
    assert not doc["is_valid"]
    assert "simulated evidence" in doc["reason"] and "development root" in doc["reason"]
    # the raw quote too (hex text)
    raw = tmp_path / "quote.hex"
    raw.write_text(json.loads(path.read_text())["quote"])
    code, doc = as_json("verify", raw)
    assert code == 1 and "simulated evidence" in doc["reason"]


# --- revocation options ----------------------------------------------------------------------------------


def _ark_named_crl(vectors: Path, *, revoke_ask: bool) -> bytes:
    """A CRL in the name of the vector's ARK, signed by another key (we do not hold AMD's)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa

    ask, ark = x509.load_pem_x509_certificates((vectors / "snp/go-sev-guest_ask_ark_milan.pem").read_bytes())
    start = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    b = x509.CertificateRevocationListBuilder().issuer_name(ark.subject).last_update(start)
    b = b.next_update(start + dt.timedelta(days=60))
    if revoke_ask:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(ask.serial_number).revocation_date(start).build()
        )
    return b.sign(rsa.generate_private_key(65537, 2048), hashes.SHA384()).public_bytes(Encoding.DER)


def test_amd_kds_crl_is_fetched_cached_and_checked(
    vectors: Path, tmp_path: Path, teecloud_home: Path
) -> None:
    from fastapi import FastAPI, Response

    from tests.cli.test_verify_cli import serve

    crl = _ark_named_crl(vectors, revoke_ask=True)
    hits: list[str] = []
    kds = FastAPI()

    @kds.get("/vcek/v1/{product}/crl")
    def get(product: str) -> Response:
        hits.append(product)
        return Response(crl, media_type="application/pkix-crl")

    report = vectors / "snp/go-sev-guest_attestation.bin"
    chain = vectors / "snp/go-sev-guest_vcek.testcer"
    for url in serve(kds):
        for _ in range(2):
            code, doc = as_json(*_snp_args(vectors, report, chain), "--amd-kds-url", url)
            # the CRL names the ARK but is not signed by it: the chain is rejected, not silently passed
            assert code == 1 and "not signed by 'ARK-Milan'" in doc["reason"], doc
    assert hits == ["Milan"]  # fetched once, then from data_home()/amd-kds-cache until its nextUpdate
    assert (teecloud_home / "amd-kds-cache" / "vcek-Milan.crl").read_bytes() == crl


def test_crl_and_ocsp_options_reach_the_verifier(vectors: Path, tmp_path: Path) -> None:
    crl = tmp_path / "ark.crl"
    crl.write_bytes(_ark_named_crl(vectors, revoke_ask=False))
    report = vectors / "snp/go-sev-guest_attestation.bin"
    code, doc = as_json(*_snp_args(vectors, report, vectors / "snp/go-sev-guest_vcek.testcer"), "--crl", crl)
    assert code == 1 and "not signed by 'ARK-Milan'" in doc["reason"]
    junk = tmp_path / "x.ocsp"
    junk.write_bytes(b"junk")
    code, doc = as_json(
        "verify",
        vectors / "nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor",
        "--trust-anchor",
        vectors / "nitro/AWS_NitroEnclaves_Root-G1.pem",
        "--at",
        "2025-12-25T13:15:37Z",
        "--ocsp",
        junk,
    )
    assert code == 1 and "OCSP response #0" in doc["reason"]
