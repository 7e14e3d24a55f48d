"""`teecloud ai proxy` as a user starts it (a process, --trust-dev-root against the simulated CVM and GPU of
this installation), used by the official openai client; its usage errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from teecloud.cli import app as teecloud_app
from tests.ai.conftest import MODEL_ID, ROOT, Stack, free_port

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "e2ee", [[], ["--secp256k1"], ["--receipts", "fetch"]], ids=["x25519", "secp256k1", "fetched-receipts"]
)
def test_the_proxy_command_verifies_and_forwards(stack: Stack, tmp_path: Path, e2ee: list[str]) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TEECLOUD_HOME": str(stack.home)}
    cmd = [
        sys.executable, "-c", "from teecloud.cli import main; main()", "ai", "proxy",
        "--upstream", stack.front.url, "--allow-http", "--trust-dev-root", "--port", str(port),
        "--kms-root", stack.provider.root.k256_public_key.hex(), "--app-id", stack.app_id.hex(),
        "--compose-hash", stack.compose_hash.hex(), "--model", MODEL_ID,
        "--weights-sha256", stack.config.weights_sha256.hex(), *e2ee,
    ]  # fmt: skip
    log = open(tmp_path / "proxy.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
            try:
                httpx.get(url + "/v1/models", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        raw = oa.chat.completions.with_raw_response.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert raw.headers["x-teecloud-verified"] == "receipt"
        info = httpx.get(url + "/v1/teecloud/upstream").json()
        assert info["app_id"] == stack.app_id.hex() and info["simulated"] is True
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the proxy this test started
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["--upstream", "http://127.0.0.1:9", "--kms-root", "02" + "11" * 32, "--trust-dev-root"],
            "plain HTTP",
        ),
        (["--upstream", "ftp://x", "--kms-root", "02" + "11" * 32, "--trust-dev-root"], "http"),
        (["--upstream", "https://x", "--kms-root", "zz", "--trust-dev-root"], "hex"),
        (["--upstream", "https://x", "--kms-root", "0211"], "33 or 65"),
        (["--upstream", "https://x", "--kms-root", "02" + "11" * 32, "--secp256k1", "--no-e2ee"], "cannot"),
        (
            [
                "--upstream",
                "https://x",
                "--kms-root",
                "02" + "11" * 32,
                "--receipts",
                "poll",
                "--trust-dev-root",
            ],
            "'inline' or 'fetch'",
        ),
        (["--upstream", "https://x", "--kms-root", "02" + "11" * 32], "--pccs-url"),
        (
            ["--upstream", "https://x", "--kms-root", "02" + "11" * 32, "--app-id", "11", "--trust-dev-root"],
            "20",
        ),
    ],
)
def test_proxy_usage_errors(args: list[str], needle: str) -> None:
    r = CliRunner().invoke(teecloud_app, ["ai", "proxy", *args])
    assert r.exit_code == 2 and needle in " ".join(r.stderr.split()), r.stderr


def test_verify_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("{not json")
    for args, needle in [
        ([str(tmp_path / "missing.json")], "cannot read"),
        ([str(tmp_path / "r.json")], "not JSON"),
    ]:
        r = CliRunner().invoke(teecloud_app, ["ai", "verify", *args, "--kms-root", "02" + "11" * 32])
        assert r.exit_code == 2 and needle in " ".join(r.stderr.split()), r.stderr
    (tmp_path / "r.json").write_text('{"body": {}, "signature": "", "keyset": {}}')
    r = CliRunner().invoke(
        teecloud_app, ["ai", "verify", str(tmp_path / "r.json"), "--kms-root", "02" + "11" * 32]
    )
    assert r.exit_code == 1 and "refused" in r.stderr


def test_verify_checks_the_request_and_response_bytes(stack: Stack, tmp_path: Path) -> None:
    body = json.dumps({"prompt": "hello", "max_tokens": 3}).encode()
    r = httpx.post(stack.front.url + "/v1/completions", content=body, timeout=60)
    assert r.status_code == 200
    doc = httpx.get(f"{stack.front.url}/v1/receipts/{r.headers['x-receipt-id']}").json()
    (tmp_path / "receipt.json").write_text(json.dumps(doc))
    (tmp_path / "req").write_bytes(body)
    (tmp_path / "resp").write_bytes(r.content)
    (tmp_path / "other").write_bytes(r.content.replace(b'"text"', b'"text" ', 1))
    root = stack.provider.root.k256_public_key.hex()
    base = [
        "ai",
        "verify",
        str(tmp_path / "receipt.json"),
        "--kms-root",
        root,
        "--request",
        str(tmp_path / "req"),
    ]
    ok = CliRunner().invoke(teecloud_app, [*base, "--response", str(tmp_path / "resp")])
    assert ok.exit_code == 0 and "request, response" in " ".join(ok.stdout.split()), ok.stdout
    bad = CliRunner().invoke(teecloud_app, [*base, "--response", str(tmp_path / "other")])
    assert bad.exit_code == 1 and "refused: response" in " ".join(bad.stderr.split()), bad.stderr
    other_root = CliRunner().invoke(
        teecloud_app, ["ai", "verify", str(tmp_path / "receipt.json"), "--kms-root", "02" + "11" * 32]
    )
    assert other_root.exit_code == 1 and "keyset_chain" in " ".join(other_root.stderr.split())
