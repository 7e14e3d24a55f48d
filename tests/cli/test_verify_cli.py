"""`teecloud verify` / `teecloud trust` end to end through the Typer app (exit codes, JSON, table)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from teecloud.cli import app

runner = CliRunner()
V_TDX_PIN = "2025-07-04T00:00:00Z"
V_DSTACK_PIN = "2026-03-05T00:00:00Z"


def run(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def as_json(*args: object) -> tuple[int, dict]:  # type: ignore[type-arg]
    code, out, _err = run(*args, "--json")
    return code, json.loads(out)


def test_dstack_json_valid(vectors: Path) -> None:
    code, out = as_json(
        "verify",
        vectors / "tdx/dstack_quote_report.json",
        "--collateral",
        vectors / "tdx/tdx_quote_outdated_collateral.json",
        "--at",
        V_DSTACK_PIN,
    )
    assert code == 0
    for key in (
        "is_valid",
        "tee",
        "reason",
        "tcb_status",
        "advisory_ids",
        "measurements",
        "report_data",
        "steps",
    ):
        assert key in out
    assert out["is_valid"] is True and out["tee"] == "tdx" and out["tcb_status"] == "UpToDate"
    assert out["measurements"]["rtmr3"].startswith("0f787c3877f3e950")
    assert out["app_info"]["app_id"] == "3763bc34552cf3a27ff71ad5f7a90471562a1a2d"
    assert {s["name"] for s in out["steps"]} >= {
        "quote_verified",
        "collateral_ok",
        "tcb_ok",
        "event_log_verified",
    }


def test_table_output(vectors: Path) -> None:
    code, out, _ = run(
        "verify",
        vectors / "tdx/tdx_quote",
        "--collateral",
        vectors / "tdx/tdx_quote_collateral.json",
        "--at",
        V_TDX_PIN,
    )
    assert code == 0
    assert "VALID" in out and "quote_verified" in out and "mrtd" in out and "91eb2b44d141d4ec" in out


def test_expired_is_exit_1_with_reason(vectors: Path) -> None:
    code, out = as_json(
        "verify",
        vectors / "tdx/tdx_quote",
        "--collateral",
        vectors / "tdx/tdx_quote_collateral.json",
        "--at",
        "2025-08-13T00:00:00Z",
    )
    assert code == 1 and out["is_valid"] is False and "expired" in out["reason"]


def test_outdated_tcb(vectors: Path) -> None:
    code, out = as_json(
        "verify",
        vectors / "tdx/tdx_quote_outdated",
        "--collateral",
        vectors / "tdx/tdx_quote_outdated_collateral.json",
        "--at",
        V_DSTACK_PIN,
    )
    assert code == 1 and "No matching TCB level found" in out["reason"]


def test_sgx_with_policy_file(vectors: Path, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\nmin_tcb_status = "ConfigurationAndSWHardeningNeeded"\n')
    args = [
        "verify",
        vectors / "sgx/sgx_quote",
        "--collateral",
        vectors / "sgx/sgx_quote_collateral.json",
        "--at",
        V_TDX_PIN,
    ]
    code, out = as_json(*args, "--policy", policy)
    assert (
        code == 0
        and out["tee"] == "sgx"
        and sorted(out["advisory_ids"]) == ["INTEL-SA-00289", "INTEL-SA-00615"]
    )
    code, out = as_json(*args)
    assert code == 1 and "policy floor" in out["reason"]


def test_policy_mismatch(vectors: Path, tmp_path: Path) -> None:
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"version": 1, "measurements": {"mrtd": ["00" * 48]}}))
    code, out = as_json(
        "verify",
        vectors / "tdx/tdx_quote",
        "--collateral",
        vectors / "tdx/tdx_quote_collateral.json",
        "--at",
        V_TDX_PIN,
        "--policy",
        policy,
    )
    assert code == 1 and out["reason"].startswith("mrtd")


def test_separate_event_log_and_tampering(vectors: Path, tmp_path: Path) -> None:
    report = json.loads((vectors / "tdx/dstack_quote_report.json").read_text())
    (tmp_path / "quote").write_bytes(bytes.fromhex(report["quote"]))
    log = json.loads(report["event_log"])
    log[23]["event_payload"] = "00" * 20  # instance-id
    (tmp_path / "log.json").write_text(json.dumps(log))
    code, out = as_json(
        "verify",
        tmp_path / "quote",
        "--event-log",
        tmp_path / "log.json",
        "--collateral",
        vectors / "tdx/tdx_quote_outdated_collateral.json",
        "--at",
        V_DSTACK_PIN,
    )
    assert code == 1 and "'instance-id'" in out["reason"]


def test_snp_nitro_nvidia(vectors: Path) -> None:
    policy_args: list[object] = []
    code, out = as_json(
        "verify",
        vectors / "snp/go-sev-guest_attestation.bin",
        "--cert-chain",
        vectors / "snp/go-sev-guest_vcek.testcer",
        "--trust-anchor",
        vectors / "snp/go-sev-guest_ask_ark_milan.pem",
        "--at",
        "2026-07-01T00:00:00Z",
        *policy_args,
    )
    # genuine, but the vector's guest policy allows debugging: rejected by the default policy
    assert code == 1 and out["tee"] == "snp" and "debug" in out["reason"]
    assert out["measurements"]["measurement"].startswith("b07af9620f3b839b")
    assert all(s["ok"] for s in out["steps"] if not s["name"].startswith("policy:"))
    code, out = as_json(
        "verify",
        vectors / "nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor",
        "--trust-anchor",
        vectors / "nitro/AWS_NitroEnclaves_Root-G1.pem",
        "--at",
        "2025-12-25T13:15:37Z",
    )
    assert code == 0 and out["tee"] == "nitro"
    code, out = as_json(
        "verify",
        vectors / "nvidia/nvtrust_lgv_hopperAttestationReport.txt",
        "--cert-chain",
        vectors / "nvidia/nvtrust_lgv_hopperCertChain.txt",
        "--trust-anchor",
        vectors / "nvidia/nvtrust_lgv_verifier_device_root.pem",
        "--at",
        V_TDX_PIN,
    )
    assert code == 0 and out["tee"] == "nvidia"


def test_nitro_root_from_trust_directory(vectors: Path, teecloud_home: Path) -> None:
    (teecloud_home / "trust").mkdir()
    (teecloud_home / "trust" / "nitro.pem").write_bytes(
        (vectors / "nitro/AWS_NitroEnclaves_Root-G1.pem").read_bytes()
    )
    code, _out = as_json(
        "verify",
        vectors / "nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor",
        "--at",
        "2025-12-25T13:15:37Z",
    )
    assert code == 0


def test_wrong_kind(vectors: Path) -> None:
    code, out = as_json(
        "verify",
        vectors / "tdx/tdx_quote",
        "--kind",
        "nitro",
        "--at",
        V_TDX_PIN,
        "--collateral",
        vectors / "tdx/tdx_quote_collateral.json",
    )
    assert code == 1 and "not nitro evidence" in out["reason"]


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "/nonexistent/evidence"],
        ["verify", "{v}/tdx/tdx_quote", "--at", "yesterday"],
        ["verify", "{v}/tdx/tdx_quote", "--kind", "tpm", "--collateral", "{v}/tdx/tdx_quote_collateral.json"],
        ["verify", "{v}/tdx/tdx_quote"],  # no collateral
        [
            "verify",
            "{v}/tdx/tdx_quote",
            "--collateral",
            "{v}/tdx/tdx_quote_collateral.json",
            "--policy",
            "/nope.toml",
        ],
        [
            "verify",
            "{v}/tdx/tdx_quote",
            "--collateral",
            "{v}/tdx/tdx_quote_collateral.json",
            "--trust-anchor",
            "{v}/nvidia/nvtrust_lgv_hopperAttestationReport.txt",
        ],
        [
            "verify",
            "{v}/tdx/tdx_quote",
            "--trust-dev-root",
            "--collateral",
            "{v}/tdx/tdx_quote_collateral.json",
        ],
    ],
)
def test_usage_errors_exit_2(vectors: Path, args: list[str]) -> None:
    code, out, err = run(*[a.format(v=vectors) for a in args])
    assert code == 2, (out, err)
    assert "error" in err.lower() or "usage" in err.lower()


def test_garbage_evidence_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"\x00garbage" * 10)
    code, out = as_json("verify", tmp_path / "junk", "--at", V_TDX_PIN)
    assert code == 1 and "unrecognised" in out["reason"]


# ---------------------------------------------------------------------------- simulated TEE (dev root)


def test_simulated_tdx_needs_explicit_dev_root(tmp_path: Path, teecloud_home: Path) -> None:
    sim_mod = pytest.importorskip("teecloud.tee.simulated")
    sim = sim_mod.SimulatedTdx(teecloud_home)
    now = int(time.time())
    (tmp_path / "q").write_bytes(sim.quote(b"\x01" * 64))
    (tmp_path / "c.json").write_bytes(sim.collateral(now=now))
    base = ["verify", tmp_path / "q", "--collateral", tmp_path / "c.json"]
    code, out = as_json(*base)
    assert code == 1 and out["reason"] == "signed by a development root, not by Intel"
    # default path data_home()/simulated-tee/root_ca.der; trusting it is the choice to accept simulation
    code, out = as_json(*base, "--trust-dev-root")
    assert code == 0 and out["tee"] == "tdx-simulated" and out["simulated"] is True
    # the library's default policy still refuses simulated evidence: only the explicit flag accepts it
    from teecloud.attestation.policy import Policy

    assert Policy.default().allow_simulated is False


def test_simulated_debug_td_is_rejected(tmp_path: Path, teecloud_home: Path) -> None:
    sim_mod = pytest.importorskip("teecloud.tee.simulated")
    sim = sim_mod.SimulatedTdx(teecloud_home, debug=True)
    now = int(time.time())
    (tmp_path / "q").write_bytes(sim.quote(b"\x02" * 64))
    (tmp_path / "c.json").write_bytes(sim.collateral(now=now))
    policy = tmp_path / "p.toml"
    policy.write_text("version = 1\nallow_simulated = true\n")
    code, out = as_json(
        "verify", tmp_path / "q", "--collateral", tmp_path / "c.json", "--trust-dev-root", "--policy", policy
    )
    assert code == 1 and "debug" in out["reason"]
    assert out["steps"][-1]["name"] == "policy:debug"
    # dcap-qvl refuses debug TDs before TCB evaluation, so even a policy without reject_debug refuses them
    policy.write_text("version = 1\nallow_simulated = true\nreject_debug = false\n")
    code, out = as_json(
        "verify", tmp_path / "q", "--collateral", tmp_path / "c.json", "--trust-dev-root", "--policy", policy
    )
    assert code == 1 and "debug" in out["reason"]


# ------------------------------------------------------------------------------------ PCCS and trust


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(asgi_app: object) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(asgi_app, host="127.0.0.1", port=port, log_level="error"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def pccs_url(vectors: Path) -> Iterator[str]:
    from teecloud.collateral import make_pccs_app

    store = {
        p: (vectors / p).read_bytes()
        for p in ("tdx/tdx_quote_collateral.json", "tdx/tdx_quote_outdated_collateral.json")
    }
    yield from serve(make_pccs_app(store))


def test_verify_with_pccs(vectors: Path, pccs_url: str, teecloud_home: Path) -> None:
    code, out = as_json(
        "verify", vectors / "tdx/dstack_quote_report.json", "--pccs-url", pccs_url, "--at", V_DSTACK_PIN
    )
    assert code == 0, out
    assert list((teecloud_home / "pccs-cache").glob("tdx-*-90C06F000000.json"))


def test_pccs_down_is_exit_2(vectors: Path) -> None:
    code, _out, err = run(
        "verify",
        vectors / "tdx/tdx_quote",
        "--pccs-url",
        f"http://127.0.0.1:{free_port()}",
        "--at",
        V_TDX_PIN,
    )
    assert code == 2 and "unreachable" in err


NVIDIA_PATH = "/NVIDIA/nvtrust/main/guest_tools/gpu_verifiers/local_gpu_verifier/src/verifier/certs/" + (
    "verifier_device_root.pem"
)


@pytest.fixture
def vendor_mirror(vectors: Path) -> Iterator[str]:
    from fastapi import FastAPI, Response

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("root.pem", (vectors / "nitro/AWS_NitroEnclaves_Root-G1.pem").read_bytes())
    files = {
        "/Intel_SGX_Provisioning_Certification_RootCA.cer": (
            vectors / "tdx/Intel_SGX_RootCA.der"
        ).read_bytes(),
        "/vcek/v1/Milan/cert_chain": (vectors / "snp/go-sev-guest_ask_ark_milan.pem").read_bytes(),
        "/AWS_NitroEnclaves_Root-G1.zip": buf.getvalue(),
        NVIDIA_PATH: (vectors / "nvidia/nvtrust_lgv_verifier_device_root.pem").read_bytes(),
        "/vcek/v1/Genoa/cert_chain": b"not a certificate",
    }
    mirror = FastAPI()

    @mirror.get("/{path:path}")
    def get(path: str) -> Response:
        body = files.get("/" + path)
        return Response(body, status_code=200) if body is not None else Response(b"", status_code=404)

    yield from serve(mirror)


def test_trust_fetch_and_use(vectors: Path, vendor_mirror: str, teecloud_home: Path) -> None:
    code, out, err = run("trust", "fetch", "--url-base", vendor_mirror)
    assert code == 1  # Genoa is garbage and Turin is missing on the mirror
    assert "amd_genoa_ask_ark.pem" in err and "amd_turin_ask_ark.pem" in err
    trust = teecloud_home / "trust"
    assert sorted(p.name for p in trust.iterdir()) == [
        "amd_milan_ask_ark.pem",
        "aws_nitro_enclaves_root_g1.pem",
        "intel_sgx_root_ca.der",
        "nvidia_device_identity_ca.pem",
    ]
    assert "sha256" in out and "ARK-Milan" in out
    code, out, _ = run("trust", "list")
    assert code == 0 and "aws.nitro-enclaves" in out
    # the fetched roots are used by default
    code, out2 = as_json(
        "verify",
        vectors / "nitro/dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor",
        "--at",
        "2025-12-25T13:15:37Z",
    )
    assert code == 0
    code, out2 = as_json(
        "verify",
        vectors / "tdx/tdx_quote",
        "--collateral",
        vectors / "tdx/tdx_quote_collateral.json",
        "--at",
        V_TDX_PIN,
    )
    assert code == 0 and any(
        "Intel SGX Root CA" in s["reason"] and "built into" not in s["reason"] for s in out2["steps"]
    )


def test_trust_fetch_unreachable(teecloud_home: Path) -> None:
    code, _out, err = run("trust", "fetch", "--url-base", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "failed" in err


def test_evidence_or_app_is_required(vectors: Path) -> None:
    code, _out, err = run("verify")
    assert code == 2 and "EVIDENCE" in err
    code, _out, err = run("verify", vectors / "tdx" / "tdx_quote", "--app", "x")
    assert code == 2 and "not both" in err


# ------------------------------------------------------------------------------- simulated TEE (issue 3)


def _simulated_dstack_json(tmp_path: Path) -> tuple[Path, object]:
    from teecloud.tee.simulated import SimulatedTdx

    tee = SimulatedTdx()  # this installation's dev root, under TEECLOUD_HOME
    tee.emit_event("app-started", b"\x01")
    report_data = bytes(range(32))
    doc = {
        "quote": tee.quote(report_data).hex(),
        "event_log": json.dumps([e.to_json() for e in tee.event_log()]),
        "report_data": report_data.ljust(64, b"\0").hex(),
        "vm_config": json.dumps(tee.vm_config()),
    }
    path = tmp_path / "simulated.json"
    path.write_text(json.dumps(doc))
    return path, tee


def test_simulated_quote_rejected_by_default_accepted_with_the_dev_root(tmp_path: Path) -> None:
    path, tee = _simulated_dstack_json(tmp_path)
    collateral = tmp_path / "collateral.json"
    collateral.write_bytes(tee.collateral())  # type: ignore[attr-defined]
    code, doc = as_json("verify", path, "--collateral", collateral)
    assert code == 1 and doc["reason"] == "signed by a development root, not by Intel"
    # --trust-dev-root: this installation's root, and its collateral from the data directory
    code, doc = as_json("verify", path, "--trust-dev-root")
    assert code == 0, doc
    assert doc["is_valid"] and doc["tee"] == "tdx-simulated" and doc["simulated"] is True
    assert doc["report_data"].startswith(bytes(range(32)).hex())
    # a policy file cannot silently lose the dev-root choice, and a foreign dev root is still refused
    other = tmp_path / "other-root.der"
    from teecloud.tee.simulated import SimulatedTdx

    other.write_bytes(SimulatedTdx(tmp_path / "elsewhere").dev_root_der())
    code, doc = as_json("verify", path, "--collateral", collateral, "--dev-root", other)
    assert code == 1 and not doc["is_valid"]


def test_simulated_collateral_is_served_like_real_collateral(tmp_path: Path, teecloud_home: Path) -> None:
    """The simulated platform's collateral directory, served by the PCCS-compatible server, is fetched by
    the verifier exactly like Intel's."""
    from teecloud.collateral import CollateralStore, make_pccs_app

    path, tee = _simulated_dstack_json(tmp_path)
    tee.collateral()  # type: ignore[attr-defined]  # written to the data directory on first use
    store = CollateralStore.from_directory(teecloud_home / "simulated-tee" / "collateral")
    for url in serve(make_pccs_app(store)):
        code, doc = as_json("verify", path, "--pccs-url", url, "--trust-dev-root")
        assert code == 0, doc
        assert doc["tee"] == "tdx-simulated"
        code, doc = as_json("verify", path, "--pccs-url", url)
        assert code == 1 and doc["reason"] == "signed by a development root, not by Intel"


def test_usage_errors_in_json_mode_still_print_one_object(tmp_path: Path) -> None:
    code, out, _err = run("verify", tmp_path / "missing.bin", "--json")
    assert code == 2 and json.loads(out)["is_valid"] is False
