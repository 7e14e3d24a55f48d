"""`teecloud fn deploy / call / logs / verify / upgrade` against a running runtime."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teecloud.cli import app
from teecloud.functions import FunctionRuntime
from teecloud.functions.http import FunctionServer

from .conftest import Guest, Outside
from .wat import _IMPORTS

SECRET_WAT = f"""(module {_IMPORTS} (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $n i32)
    (call $input_read (i32.const 0))
    (local.set $n (call $secret_get (i32.const 0) (call $input_len) (i32.const 1024) (i32.const 1024)))
    (drop (call $output (i32.const 1024) (local.get $n)))
    (i32.const 0)))"""


@pytest.fixture
def url(runtime: FunctionRuntime) -> Iterator[str]:
    s = FunctionServer(runtime)
    s.start()
    yield s.url
    s.stop()


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_deploy_call_logs_verify(url: str, guest: Guest, outside: Outside, tmp_path: Path) -> None:
    src = tmp_path / "secret.wat"
    src.write_text(SECRET_WAT)
    root = guest.kms_root.hex()
    code, out, err = _run("fn", "deploy", str(src), "--secret", "TOKEN=abc", "--kms-root", root, "--url", url)
    assert code == 0, err
    fh = json.loads(out)["function_hash"]
    code, out, err = _run("fn", "call", fh, "--input", "TOKEN", "--url", url)
    assert code == 0, err
    body = json.loads(out)
    assert body["output_text"] == "abc"
    result = tmp_path / "result.json"
    result.write_text(out)
    code, out, err = _run("fn", "verify", str(result), "--kms-root", root, "--function-hash", fh)
    assert code == 0 and out.startswith("valid"), err
    # tampered, another function, another root, expired, not JSON: rejected (1) or usage error (2)
    tampered = dict(body["result"], output="0x616264")
    (tmp_path / "t.json").write_text(json.dumps(tampered))
    assert _run("fn", "verify", str(tmp_path / "t.json"), "--kms-root", root)[0] == 1
    assert _run("fn", "verify", str(result), "--kms-root", root, "--function-hash", "11" * 32)[0] == 1
    assert _run("fn", "verify", str(result), "--kms-root", "02" + "11" * 32)[0] == 1
    assert (
        _run("fn", "verify", str(result), "--kms-root", root, "--at", str(body["result"]["expiry"] + 1))[0]
        == 1
    )
    (tmp_path / "x.json").write_text("{nope")
    assert _run("fn", "verify", str(tmp_path / "x.json"), "--kms-root", root)[0] == 2
    code, out, _ = _run("fn", "logs", fh, "--url", url)
    assert code == 0 and json.loads(out.splitlines()[-1])["status"] == "ok"


def test_deploy_registers_on_chain_and_upgrades(url: str, guest: Guest, tmp_path: Path) -> None:
    from teecloud.chain import ChainClient
    from teecloud.chain.functions import FunctionRegistry

    src = tmp_path / "echo.wat"
    src.write_text(SECRET_WAT)
    runtime_app = "0x" + guest.app_id.hex()
    code, out, err = _run("fn", "deploy", str(src), "--register", runtime_app, "--url", url)
    assert code == 0, err
    rec = json.loads(out)
    with ChainClient.embedded() as chain:
        reg = FunctionRegistry(chain, rec["function_id"])
        assert reg.is_code_hash_allowed(rec["function_hash"]) and reg.runtime_app_id().lower() == runtime_app
    new = "0x" + "ab" * 32
    code, out, err = _run("fn", "upgrade", rec["function_id"], rec["function_hash"], new)
    assert code == 0 and out.startswith("direct"), err
    with ChainClient.embedded() as chain:
        reg = FunctionRegistry(chain, rec["function_id"])
        assert reg.is_code_hash_allowed(new) and not reg.is_code_hash_allowed(rec["function_hash"])
    # mistakes: clear messages, no traceback
    code, _, err = _run("fn", "upgrade", rec["function_id"], rec["function_hash"], new)
    assert code == 1 and "old code hash not allowed" in err
    code, _, err = _run("fn", "deploy", str(tmp_path / "missing.wat"), "--url", url)
    assert code == 2 and "cannot read" in err
    bad = tmp_path / "bad.wat"
    bad.write_text("(module (func")
    code, _, err = _run("fn", "deploy", str(bad), "--url", url)
    assert code == 2 and "WebAssembly" in err
    code, _, err = _run("fn", "call", "00" * 32, "--url", url)
    assert code == 1 and "404" in err
    code, _, err = _run("fn", "call", "00" * 32, "--url", "http://127.0.0.1:1")
    assert code == 1 and "cannot reach" in err


def test_fn_serve_runs_the_runtime_on_the_guest_agent(
    guest: Guest, sockdir: Path, teecloud_home: Path
) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", "from teecloud.cli import main; main()", "fn", "serve", "--port", str(port)]
    cmd += ["--dstack-sock", str(sockdir / "dstack.sock"), "--no-check-registry"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=1).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "fn serve did not answer"
                time.sleep(0.2)
        assert info["app_id"] == "0x" + guest.app_id.hex()
        assert info["compose_hash"] == "0x" + guest.compose_hash.hex()
        assert info["relayer"] is None  # no --oracle: no relayer
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_fn_serve_refuses_a_trust_bundle_that_is_not_pem(sockdir: Path, guest: Guest) -> None:
    """TEECLOUD_FN_TRUST_PEM (the runtime app's compose declares the CAs `fetch` trusts): bad text is a clear
    error before anything listens, never a traceback."""
    r = CliRunner().invoke(
        app,
        ["fn", "serve", "--port", "0", "--dstack-sock", str(sockdir / "dstack.sock"), "--no-check-registry"],
        env={"TEECLOUD_FN_TRUST_PEM": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"},
    )
    assert r.exit_code == 2 and "not a PEM certificate bundle" in r.stderr
    assert "Traceback" not in r.output


def test_fn_serve_trust_bundle_adds_to_the_system_roots(outside: Outside) -> None:
    import ssl

    from teecloud.cli.fn_cmd import _trust

    ctx = _trust(outside.ca_pem)
    assert ctx is not None
    names = [dict(x[0] for x in c["subject"]).get("commonName") for c in ctx.get_ca_certs()]
    assert "teecloud test CA" in names
    assert len(names) > 1 or not ssl.create_default_context().get_ca_certs()  # the system's roots stay
    assert _trust("") is None and _trust(None) is None
